"""llama.cpp as the peer of the real-model benchmark, through llama-cpp-python's C API: its own quantizer,
perplexity on the same token windows as pocketlm (token ids fed in, no re-tokenization), and greedy
decode at batch 1 and N (N sequences in one llama_batch per step, as llama-batched-bench does).

Installed on first use (`pip install llama-cpp-python`, which builds llama.cpp for this CPU: ~6 min
on 2 cores). On CPUs with AMX the build leaves AMX out and names every other x86 feature the CPU has
(AVX-512 VNNI included): its AMX matmul faults at its first tile load (general protection fault at
`ldtilecfg`) on the Xeon VMs these benchmarks run on, even with the tile permission granted.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import numpy as np

FTYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def build_flags() -> str:
    """llama.cpp's CMake flags for this x86 CPU without AMX: GGML_NATIVE would turn AMX on."""
    have = _cpu_flags()
    features = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni",
                "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
                "AVX512_BF16": "avx512_bf16"}
    on = " ".join(f"-DGGML_{name}={'ON' if flag in have else 'OFF'}" for name, flag in features.items())
    return f"-DGGML_NATIVE=OFF {on} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


def ensure_installed():
    if importlib.util.find_spec("llama_cpp") is None:
        env = {**os.environ, "CMAKE_ARGS": build_flags()} if _cpu_flags() & {"amx_int8", "amx_tile"} else None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python"], check=True, env=env)
    import llama_cpp
    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(_silent, ctypes.c_void_p())
    return llama_cpp


def _silent_log(level, text, user_data):
    pass


try:
    import llama_cpp as _lc
    _silent = _lc.llama_log_callback(_silent_log)
except ImportError:  # set again once installed
    _silent = None


def version() -> str:
    from importlib.metadata import version as v
    return f"llama-cpp-python {v('llama-cpp-python')}"


def quantize(src: str, dst: str, qtype: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama-quantize): F16 GGUF -> `qtype`."""
    lc = ensure_installed()
    p = lc.llama_model_quantize_default_params()
    p.ftype, p.nthread = getattr(lc, FTYPES[qtype]), threads
    if lc.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype}")


class Session:
    """One model and one context of `n_ctx` positions for up to `n_seq` sequences."""

    def __init__(self, path: str, threads: int, n_ctx: int = 512, n_seq: int = 1, all_logits: bool = False):
        lc = self.lc = ensure_installed()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx * n_seq, n_ctx * n_seq, min(512, n_ctx * n_seq), n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_ctx * n_seq, 0, n_seq)
        self.all_logits = all_logits

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, rows: list[list[int]], start: int, logits: str = "last") -> None:
        """Feed token rows (one per sequence) at positions start.. ; logits for 'last' or 'all' tokens."""
        b, i = self.batch, 0
        for seq, toks in enumerate(rows):
            for j, t in enumerate(toks):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, start + j, 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits == "all" or j == len(toks) - 1
                i += 1
        b.n_tokens = i
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def logits(self, i: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def perplexity(path: str, windows: np.ndarray, threads: int) -> dict:
    """exp(mean NLL) over (n, ctx) token windows, each scored from its own start (pocketlm's protocol)."""
    n, ctx = windows.shape
    s = Session(path, threads, n_ctx=ctx)
    nll, count = 0.0, 0
    try:
        for w in windows.tolist():
            s.clear()
            s.decode([w], 0, logits="all")
            logits = np.stack([s.logits(i) for i in range(ctx - 1)]).astype(np.float64)
            m = logits.max(-1, keepdims=True)
            logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
            nll += float((logz - logits[np.arange(ctx - 1), w[1:]]).sum())
            count += ctx - 1
    finally:
        s.close()
    return {"ppl": float(np.exp(nll / count)), "tokens_scored": count}


def decode_speed(path: str, prompt: list[int], new_tokens: int, batch: int, threads: int, repeats: int) -> dict:
    """Greedy decode of `batch` copies of `prompt` for `new_tokens` forced steps (no stop): median tok/s
    over `repeats` after one warm-up; and the prefill time of the batch's prompts."""
    s = Session(path, threads, n_ctx=len(prompt) + new_tokens + 1, n_seq=batch)
    tps, prefill = [], []
    try:
        for r in range(repeats + 1):
            s.clear()
            t0 = time.perf_counter()
            s.decode([prompt] * batch, 0)
            t1 = time.perf_counter()
            last = [len(prompt) * (k + 1) - 1 for k in range(batch)]
            for step in range(new_tokens):
                nxt = [int(np.argmax(s.logits(i))) for i in last]
                s.decode([[t] for t in nxt], len(prompt) + step)
                last = list(range(batch))
            t2 = time.perf_counter()
            if r:
                tps.append(batch * new_tokens / (t2 - t1))
                prefill.append((t1 - t0) * 1000)
    finally:
        s.close()
    return {"decode_tok_s": statistics.median(tps), "prefill_ms": statistics.median(prefill)}
