"""`pocketlm bench`: prefill and decode speed of the engine (optionally beside transformers' generate)."""
from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch

from ..config import BaseConfig, check, register_config
from ..eval.data import DEFAULT_TEXT, read_text
from ..eval.efficiency import decode_tok_s, engine_name, peak_rss_mb, prefill_ms, reset_peak_rss, weight_bytes
from ..progress import progress_bar
from .generate import Generator


@register_config
@dataclasses.dataclass(frozen=True)
class BenchConfig(BaseConfig):
    """batch_sizes (1, 8); prompt_tokens (32) and new_tokens (128, forced, greedy) for decode;
    prefill_tokens (512) at batch 1; warmup (1) untimed runs, then the median of repeats (5);
    compile: compile the decode step (True); native: the native step instead (runtime/native.py), with
    native_activations fp32 or int8;
    transformers: also time HF generate and give ratios."""

    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 32
    new_tokens: int = 128
    prefill_tokens: int = 512
    warmup: int = 1
    repeats: int = 5
    compile: bool = True
    native: bool = False
    native_activations: str = "fp32"
    transformers: bool = False

    kind: ClassVar[str] = "bench"

    def validate(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        check(len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes),
              f"batch sizes must be positive (got {self.batch_sizes})", "use e.g. 1,8")
        check(self.prompt_tokens >= 1 and self.prefill_tokens >= 1, "prompt lengths must be at least 1", "use 1 or more")
        check(self.new_tokens >= 2, f"new_tokens must be at least 2 (got {self.new_tokens})",
              "use 2 or more (the rate is measured between the first and the last token)")
        check(not (self.compile and self.native), "the compiled and the native steps are two paths",
              "choose one (--native runs without --compile)")
        check(self.native_activations in ("fp32", "int8"), f"unknown native activations '{self.native_activations}'",
              "use fp32 or int8")
        check(self.repeats >= 1 and self.warmup >= 0, "repeats must be ≥ 1 and warmup ≥ 0", "use e.g. --repeats 5")


def run_bench(model, tok, cfg: BenchConfig = BenchConfig(), *, show_progress: bool = True) -> dict:
    """Speed of `model` under `cfg`: rows of (engine, batch, prefill_ms, decode_tok_s) plus compile time."""
    _, text = read_text(None)
    tokens = torch.tensor(tok(text[:20_000])["input_ids"])  # prompts are cut from real text
    need = max(cfg.prefill_tokens, cfg.prompt_tokens) + cfg.new_tokens
    limit = getattr(model.config, "max_position_embeddings", need)
    check(need <= limit, f"prompt + new tokens ({need}) exceed the model's context of {limit}",
          "lower --prefill-tokens, --prompt-tokens or --new-tokens")
    rows: dict[str, dict] = {}
    reset_peak_rss()
    t0 = time.perf_counter()
    # transformers first: the engine packs the model's weights in place, which would change its layout
    plan = (["transformers"] if cfg.transformers else []) + ["pocketlm"]
    steps = [(engine, b) for engine in plan for b in (None, *cfg.batch_sizes)]
    gen = None
    for engine, batch in progress_bar(steps, "bench", show=show_progress):
        if engine == "pocketlm" and gen is None:
            gen = Generator(model, tok, compile=cfg.compile, native=cfg.native,
                            native_activations=cfg.native_activations)
        runner = gen if engine == "pocketlm" else model
        row = rows.setdefault(engine, {"engine": engine_name(runner), "decode_tok_s": {}})
        if batch is None:
            row["prefill_ms"] = prefill_ms(runner, tokens, length=cfg.prefill_tokens, warmup=cfg.warmup,
                                           repeats=cfg.repeats)
        else:
            row["decode_tok_s"][str(batch)] = decode_tok_s(
                runner, tokens, batch=batch, prompt_len=cfg.prompt_tokens, new_tokens=cfg.new_tokens,
                warmup=cfg.warmup, repeats=cfg.repeats)[0]
    rows = {k: rows[k] for k in ("pocketlm", "transformers") if k in rows}
    result = {"config": cfg.to_dict(), "rows": list(rows.values()), "threads": torch.get_num_threads(),
              "path": gen.path,
              "compile_s": gen.compile_s if gen.compiled else None, "weights_mb": weight_bytes(model) / 2**20,
              "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0, "text": str(DEFAULT_TEXT)}
    if cfg.transformers:
        ours, hf = result["rows"]
        result["speedup_vs_transformers"] = {b: ours["decode_tok_s"][b] / hf["decode_tok_s"][b]
                                             for b in ours["decode_tok_s"]}
    return result
