"""Efficiency: weight bytes, peak memory, prefill latency, decode tokens/s (and the energy of decoding)."""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch

from ..io import weight_files
from ..progress import progress_bar
from ..runtime import Generator
from .energy import measure, pick_meter

VMHWM_RESET = Path("/proc/self/clear_refs")


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer tensor (tied weights counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def disk_bytes(path: Path | None) -> int | None:
    """Bytes of the weight files of a model directory, or of one GGUF file (None when the model was not
    loaded from either)."""
    if path is not None and Path(path).is_file():
        return Path(path).stat().st_size
    if path is None or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in weight_files(Path(path)))


def reset_peak_rss() -> str:
    """Reset the kernel's RSS high-water mark (VmHWM) so the next reading covers only what follows."""
    try:
        VMHWM_RESET.write_text("5")
        return "VmHWM, reset before the speed runs"
    except OSError:
        return "VmHWM over the process lifetime (reset not permitted)"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(tokens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(batch, length) ids cut from real text, each row from a different offset."""
    flat = tokens.flatten()
    reps = -(-(batch * length) // flat.numel())
    flat = flat.repeat(reps) if reps > 1 else flat
    return flat[: batch * length].view(batch, length)


def engine_name(runner) -> str:
    if isinstance(runner, Generator):
        return f"pocketlm ({runner.path})"
    return "transformers.generate"


def _device(runner) -> torch.device:
    return runner.decoder.device if isinstance(runner, Generator) else next(runner.parameters()).device


@torch.no_grad()
def prefill_ms(runner, tokens: torch.Tensor, *, length: int, warmup: int, repeats: int) -> float:
    """Median wall time to process a `length`-token prompt at batch 1 (KV cache built; the engine also
    picks the first token, transformers returns the logits of every position)."""
    dev = _device(runner)
    ids = _prompt(tokens, 1, length).to(dev)
    times = []
    for i in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        if isinstance(runner, Generator):
            for _ in runner.generate_step(ids.tolist(), 1, stop_tokens=set()):
                pass
        else:
            runner(input_ids=ids, use_cache=True)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@torch.no_grad()
def _generate_s(runner, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for greedy generation of exactly `new_tokens` (end-of-sequence ignored)."""
    dev = ids.device
    _sync(dev)
    t0 = time.perf_counter()
    if isinstance(runner, Generator):
        for _ in runner.generate_step(ids.tolist(), new_tokens, stop_tokens=set()):
            pass
    else:
        runner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        min_new_tokens=new_tokens, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    _sync(dev)
    return time.perf_counter() - t0


def decode_tok_s(runner, tokens: torch.Tensor, *, batch: int, prompt_len: int, new_tokens: int,
                 warmup: int, repeats: int, meter=None) -> tuple[float, dict | None]:
    """Decode throughput in tokens/s (all rows), prefill excluded, and the energy of the timed runs.

    runner: a runtime Generator, or an HF model (timed through transformers' generate).
    Each repeat times a 1-token and an N-token generation from the same prompt; the decode rate is
    batch·(N−1) / (t_N − t_1), medianed over repeats. With a `meter`, energy covers the timed runs
    (warm-up excluded) per generated token, the 32-token prompt prefills included.
    """
    ids = _prompt(tokens, batch, prompt_len).to(_device(runner))
    for _ in range(warmup):
        _generate_s(runner, ids, 1), _generate_s(runner, ids, new_tokens)
    rates = []
    with (measure(meter) if meter is not None else contextlib.nullcontext()) as reading:
        for _ in range(repeats):
            t1 = _generate_s(runner, ids, 1)
            tn = _generate_s(runner, ids, new_tokens)
            rates.append(batch * (new_tokens - 1) / max(tn - t1, 1e-9))
        if reading is not None:
            reading.tokens = repeats * batch * (1 + new_tokens)
    return statistics.median(rates), (reading.to_dict() if reading is not None else None)


def measure_efficiency(model, tok, tokens: torch.Tensor, protocol, *, source_path: Path | None = None,
                       show_progress: bool = True) -> tuple[dict, dict | None]:
    """Sizes always; speed, peak memory and energy when `protocol.speed`, with the engine the protocol
    names (pocketlm's runtime, eager or compiled, or transformers' generate). Returns (efficiency, energy)."""
    dev = next(model.parameters()).device
    wb = weight_bytes(model)
    db = disk_bytes(source_path)
    eff = {"weights_bytes": wb, "weights_mb": wb / 2**20, "disk_mb": db / 2**20 if db is not None else None,
           "peak_rss_mb": None, "rss_method": None, "cuda_max_allocated_mb": None, "prefill_ms": None,
           "prefill_tokens": protocol.prefill_tokens, "decode_tok_s": None, "decode_tok_s_batch": {},
           "threads": torch.get_num_threads(), "engine": None, "compile_s": None}
    if not protocol.speed:
        return eff, None
    runner = model if protocol.engine == "transformers" else Generator(model, tok, compile=protocol.compile)
    eff["engine"] = engine_name(runner)
    eff["rss_method"] = reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    steps = [("prefill", None), *[("decode", b) for b in protocol.decode_batch_sizes]]
    meter = pick_meter(str(dev), protocol.watts_per_core)
    energy = None
    for what, batch in progress_bar(steps, "speed", show=show_progress):
        if what == "prefill":
            eff["prefill_ms"] = prefill_ms(runner, tokens, length=protocol.prefill_tokens,
                                           warmup=protocol.warmup, repeats=protocol.repeats)
            continue
        # Energy per token is quoted for batch-1 decoding, the edge case.
        rate, reading = decode_tok_s(runner, tokens, batch=batch, prompt_len=protocol.decode_prompt_tokens,
                                     new_tokens=protocol.decode_new_tokens, warmup=protocol.warmup,
                                     repeats=protocol.repeats, meter=meter if batch == 1 else None)
        energy = reading or energy
        eff["decode_tok_s_batch"][str(batch)] = rate
    eff["decode_tok_s"] = eff["decode_tok_s_batch"].get("1")
    eff["peak_rss_mb"] = peak_rss_mb()
    if isinstance(runner, Generator) and runner.compiled:
        eff["compile_s"] = runner.compile_s  # spent in warm-up runs, outside every timed number
    if dev.type == "cuda":
        eff["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return eff, energy
