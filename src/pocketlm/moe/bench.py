"""`pocketlm moe bench`: an offloaded / bit-mixed / dynamic-top-k MoE runtime against all-resident.

One process measures one configuration: first its expert memory (peak RSS over the model without
experts, so nothing else measured before it counts), then decode speed in alternating rounds with an
all-resident copy of the model (the same code, every expert in memory, the model's top-k), greedy
tokens of both, perplexity of both, cache counters and routing diagnostics.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from pathlib import Path
from typing import ClassVar

import torch

from ..compress.calibration import release_freed_memory
from ..config import BaseConfig, check, register_config
from ..eval.data import read_text, token_windows
from ..eval.efficiency import decode_tok_s, peak_rss_mb, reset_peak_rss
from ..eval.quality import score_windows
from ..io import load
from ..progress import progress_bar
from ..runtime import Generator
from .bits import plan_bits
from .block import Routing
from .runtime import fused_experts, offload_experts, require_moe


@register_config
@dataclasses.dataclass(frozen=True)
class MoEBenchConfig(BaseConfig):
    """resident (share in (0, 1] or a count) or expert_memory_mb: the cache budget; policy lru|lfu;
    prefetch; page_cache False: every load reads the disk; bits_budget_mb: expert-wise 8/4-bit mix
    within this size (int4 groups of group_size); top_p / threshold: dynamic top-k; decode of
    new_tokens after a prompt_tokens prompt, median of `rounds`; ppl_tokens of test text (0: skip)."""

    resident: float | int | None = 0.25
    expert_memory_mb: float | None = None
    policy: str = "lfu"
    prefetch: bool = False
    page_cache: bool = True
    bits_budget_mb: float | None = None
    group_size: int = 32
    top_p: float | None = None
    threshold: float | None = None
    prompt_tokens: int = 32
    new_tokens: int = 128
    rounds: int = 5
    ppl_tokens: int = 16384
    calib_samples: int = 32

    kind: ClassVar[str] = "moe_bench"

    def validate(self) -> None:
        check(self.policy in ("lru", "lfu"), f"unknown eviction policy '{self.policy}'", "use lru or lfu")
        check(self.bits_budget_mb is None or self.bits_budget_mb > 0, "the bit budget must be positive",
              "pass --bits-budget-mb above 0")
        check(self.group_size in (32, 64, 128, 256), f"int4 group size {self.group_size} is not one the kernel takes",
              "use 32, 64, 128 or 256")
        check(self.new_tokens >= 2 and self.prompt_tokens >= 1 and self.rounds >= 1,
              "new_tokens must be ≥ 2, prompt_tokens and rounds ≥ 1", "use e.g. --new-tokens 128")
        check(self.ppl_tokens >= 0 and self.calib_samples >= 1, "ppl_tokens must be ≥ 0 and calib_samples ≥ 1",
              "use e.g. --ppl-tokens 16384")
        self.routing()  # its own checks

    def routing(self) -> Routing:
        return Routing(top_p=self.top_p, threshold=self.threshold)


def _expert_bytes(model) -> tuple[int, int]:
    """Bytes of all experts in bf16 and in the model's own dtype."""
    tensors = [t for _, _, b in require_moe(model) for w in fused_experts(b) for t in w.values()]
    return sum(2 * t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def run_moe_bench(model_name: str, cfg: MoEBenchConfig = MoEBenchConfig(), *, dtype: str = "float32",
                  show_progress: bool = True) -> dict:
    t0 = time.perf_counter()
    model, tok = load(model_name, dtype=dtype)
    bf16_bytes, float_bytes = _expert_bytes(model)
    bits = plan_bits(model, tok, cfg.bits_budget_mb, cfg.group_size, cfg.calib_samples, show_progress) \
        if cfg.bits_budget_mb is not None else None
    rt = offload_experts(model, resident=cfg.resident if cfg.expert_memory_mb is None else None,
                         expert_memory_mb=cfg.expert_memory_mb, policy=cfg.policy, prefetch=cfg.prefetch,
                         routing=cfg.routing(), bits=bits, group_size=cfg.group_size, page_cache=cfg.page_cache,
                         warm=False)
    _, text = read_text(None)
    tokens = torch.tensor(tok(text[:20_000])["input_ids"])
    prompt = tokens[:cfg.prompt_tokens].tolist()
    gen = Generator(model, tok)
    # expert memory: RSS above the model without experts, over a warm-up and one decode
    gc.collect()
    release_freed_memory()
    reset_peak_rss()
    rss0 = _rss_mb()
    if rt.cache.budget >= rt.cache.total_bytes:
        rt.cache.warm()
    ours = [int(t) for t, _ in gen.generate_step([prompt], cfg.new_tokens)]
    expert_peak = peak_rss_mb() - rss0

    hf_gen = Generator(load(model_name, dtype=dtype)[0], tok)  # transformers' own MoE blocks, all resident
    base_model, _ = load(model_name, dtype=dtype)
    base_rt = offload_experts(base_model, resident=1.0, prefetch=False)
    base_gen = Generator(base_model, tok)
    theirs = [int(t) for t, _ in base_gen.generate_step([prompt], cfg.new_tokens)]
    rt.reset_stats()
    rates: dict[str, list[float]] = {"all_resident": [], "configured": [], "transformers_blocks": []}
    runners = (("all_resident", base_gen), ("configured", gen), ("transformers_blocks", hf_gen))
    for _ in progress_bar(range(cfg.rounds), "decode rounds", show=show_progress):  # alternate: shared machines drift
        for name, g in runners:
            rates[name].append(decode_tok_s(g, tokens, batch=1, prompt_len=cfg.prompt_tokens,
                                            new_tokens=cfg.new_tokens, warmup=0, repeats=1)[0])
    stats = rt.stats()
    ratio = statistics.median(c / b for b, c in zip(rates["all_resident"], rates["configured"]))
    result = {
        "model": model_name, "config": cfg.to_dict(), "threads": torch.get_num_threads(),
        "decode_tok_s": {k: statistics.median(v) for k, v in rates.items()}, "decode_rounds": rates,
        "speed_ratio": ratio, "tokens_identical": ours == theirs,
        "speed_ratio_vs_transformers_blocks": statistics.median(
            c / b for b, c in zip(rates["transformers_blocks"], rates["configured"])),
        "token_agreement": sum(a == b for a, b in zip(ours, theirs)) / len(theirs),
        "expert_peak_rss_mb": expert_peak, "expert_budget_mb": rt.cache.budget / 2**20,
        "expert_mb_all_resident": float_bytes / 2**20,
        "expert_mb_on_disk": stats["expert_bytes_on_disk"] / 2**20, "bf16_expert_mb": bf16_bytes / 2**20,
        "bits_share_of_bf16": stats["expert_bytes_on_disk"] / bf16_bytes if bits is not None else None,
        "bits_plan": bits, "cache": {k: v for k, v in stats.items() if k != "routing"},
    }
    if cfg.ppl_tokens:
        rt.reset_stats()
        path, text_all = read_text(None)
        windows = token_windows(tok, text_all, path, cfg.ppl_tokens, 512)
        base_ppl = score_windows(base_model, windows, show_progress=show_progress)["ppl"]
        ppl = score_windows(model, windows, show_progress=show_progress)["ppl"]
        result.update(ppl=ppl, ppl_all_resident=base_ppl, ppl_change=ppl / base_ppl - 1, ppl_tokens=cfg.ppl_tokens)
    result["routing"] = rt.stats()["routing"]  # over the perplexity text when it ran, else the decode rounds
    result["wall_s"] = time.perf_counter() - t0
    rt.close()
    base_rt.close()
    return result



def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()  # no /proc: the nearest reading there is
