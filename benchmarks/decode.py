"""Decode speed of pocketlm's engine on the reference `small` vs transformers and llama.cpp (the engine issue).

Same run, same threads (2), batch 1 and 8, greedy, 32-token prompt cut from test.txt, 128 new tokens
forced; rate = b·127 / (t_128 − t_1) as in the eval protocol. Engines are timed in alternation, one
repeat each per round, and every ratio is a median over rounds of same-round ratios.

- transformers fp32 `generate` (the baseline), pocketlm fp32 eager and compiled;
- llama.cpp through llama-cpp-python at F32, Q8_0 and Q4_0 (GGUF written by pocketlm.gguf_export),
  batch 1; skipped with a message when llama-cpp-python is not installed;
- pocketlm int8 and int4 (RTN: int8 per channel, int4 groups of 128, LM head and embedding as one int8
  table; torch's packed CPU kernels with bf16 activations), compiled, against llama.cpp Q8_0 / Q4_0
  in the same rounds;
- greedy identity: 64 prompts × 32 new tokens, engine vs transformers, on small, moe, tiny, reasoner;
- the bandwidth bound: weight bytes read per token ÷ measured memory read bandwidth.

    python benchmarks/decode.py [--model ../shared/reference/models/small] [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.compress import RTNConfig, compress_
from pocketlm.eval.efficiency import decode_tok_s
from pocketlm.runtime import Generator, cpu_linear
from common import SHARED, parse_reference_args, write_result

PROMPT, NEW = 32, 128


def read_bandwidth_gbs() -> float:
    """Memory read bandwidth: the best of 5 sums over a 512 MB tensor (far larger than any cache)."""
    a = torch.ones(128 * 2**20)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bytes_per_token(model) -> int:
    """Weights a batch-1 decode step reads: every matrix of the decoder and the LM head (embedding: one row)."""
    seen, total = set(), 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if ("embed_tokens" in name and not model.config.tie_word_embeddings) or "rotary" in name:
            continue
        key = p.untyped_storage().data_ptr(), p.storage_offset()
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def matmul_floor_ms(cfg) -> float:
    """Best time (ms) of one batch-1 decode step's matrix products alone, on the engine's fp32 CPU kernel
    and packed shapes (qkv, o, gate|up, down per layer, then the head): what no framework overhead can beat."""
    cpu_linear.build_kernel()
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = [(h, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd), (cfg.num_attention_heads * hd, h),
              (h, 2 * inter), (inter, h)] * cfg.num_hidden_layers + [(h, cfg.vocab_size)]
    mats = [torch.randn(n, k) for k, n in shapes]  # (out, in), as the engine keeps them
    xs = {k: torch.randn(1, k) for k, _ in shapes}

    def step():
        for w in mats:
            torch.ops.pocketlm_cpu.linear(xs[w.shape[1]], w, None)
    step()
    return min(_timed(lambda: [step() for _ in range(20)]) for _ in range(5)) / 20 * 1000


def greedy_identity(name: str, tokens: torch.Tensor, n_prompts: int = 64, new: int = 32) -> dict:
    model, tok = pocketlm.load(name)
    gen = Generator(model, tok)
    same = 0
    for i in range(n_prompts):
        ids = tokens[i * 97: i * 97 + 24 + i % 9][None]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        ours = [int(t[0]) for t, _ in gen.generate_step([ids[0].tolist()], new, stop_tokens=set())]
        same += ours == ref
    return {"model": name, "prompts": n_prompts, "new_tokens": new, "identical": same}


class LlamaCpp:
    """llama-cpp-python on a GGUF file, timed like the other engines (greedy, batch 1)."""

    def __init__(self, path: str, threads: int):
        import llama_cpp
        self.path = path
        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                                   logits_all=True, verbose=False)

    def generate_s(self, ids: list[int], new: int) -> tuple[float, list[int]]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        out = []
        for i in range(new):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if i < new - 1:
                self.llm.eval([out[-1]])
        return time.perf_counter() - t0, out

    def rate(self, ids: list[int]) -> float:
        return (NEW - 1) / (self.generate_s(ids, NEW)[0] - self.generate_s(ids, 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--identity-models", default="small,moe,tiny,reasoner")
    args = parse_reference_args(ap)
    console = Console()
    model, tok = pocketlm.load(args.model)
    text = open(args.text, encoding="utf-8").read()[:40_000]
    tokens = torch.tensor(tok(text)["input_ids"])
    prompt = tokens[:PROMPT].tolist()

    # The engine packs weights in place; transformers gets its own untouched copy.
    hf_model, _ = pocketlm.load(args.model)
    eager, compiled = Generator(model, tok), Generator(model, tok, compile=True)
    engines = {"transformers fp32": hf_model, "pocketlm fp32 eager": eager, "pocketlm fp32 compiled": compiled}
    for bits, group in ((8, 128), (4, 128)):
        qmodel, _ = pocketlm.load(args.model)
        compress_(qmodel, RTNConfig(bits=bits, group_size=group, head=True), tok=tok, show_progress=False)
        engines[f"pocketlm int{bits} compiled"] = Generator(qmodel, tok, compile=True)
    for runner in engines.values():  # warm-up (and compile) outside the timed rounds
        for b in (1, 8):
            decode_tok_s(runner, tokens, batch=b, prompt_len=PROMPT, new_tokens=NEW, warmup=1, repeats=1)

    llama = {}
    try:
        import llama_cpp  # noqa: F401
        from pocketlm.gguf_export import export_gguf
        tmp = tempfile.mkdtemp()
        for q in ("F32", "Q8_0", "Q4_0"):
            llama[f"llama.cpp {q}"] = LlamaCpp(str(export_gguf(model, tok, f"{tmp}/small-{q}.gguf", q)), args.threads)
        for eng in llama.values():
            eng.rate(prompt)
        llama_note = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        llama_note = "llama-cpp-python is not installed: llama.cpp columns skipped (pip install llama-cpp-python)"
        console.print(f"[yellow]{llama_note}[/yellow]")

    rates: dict[str, dict[int, list[float]]] = {n: {1: [], 8: []} for n in [*engines, *llama]}
    for _ in range(args.rounds):
        for name, runner in engines.items():
            for b in (1, 8):
                rates[name][b].append(decode_tok_s(runner, tokens, batch=b, prompt_len=PROMPT, new_tokens=NEW,
                                                   warmup=0, repeats=1)[0])
        for name, eng in llama.items():
            rates[name][1].append(eng.rate(prompt))
    base = rates["transformers fp32"][1]

    def ratio(name: str, b: int = 1, ref: list[float] = base) -> float:
        return statistics.median(x / y for x, y in zip(rates[name][b], ref))

    bw = read_bandwidth_gbs()
    floor_ms = matmul_floor_ms(model.config)
    bpt = bytes_per_token(model)
    read = {n: bytes_per_token(r.model if isinstance(r, Generator) else r) for n, r in engines.items()}
    read.update({n: os.path.getsize(e.path) for n, e in llama.items()})  # the whole GGUF: weights + head
    rows = []
    for name in rates:
        r1 = statistics.median(rates[name][1])
        r8 = statistics.median(rates[name][8]) if rates[name][8] else None
        rows.append({"engine": name, "tok_s_b1": r1, "tok_s_b8": r8, "vs_transformers_b1": ratio(name),
                     "b8_over_b1": statistics.median(x / y for x, y in zip(rates[name][8], rates[name][1]))
                     if r8 else None, "rounds_b1": rates[name][1], "rounds_b8": rates[name][8]})
    fp32_bound = bw * 1e9 / bpt
    for row in rows:
        row["bytes_per_token"] = read[row["engine"]]
        row["fraction_of_bandwidth_bound"] = row["tok_s_b1"] / (bw * 1e9 / read[row["engine"]])
    vs_llama = {}
    if llama:
        vs_llama = {f"pocketlm {ours} compiled / llama.cpp {theirs}": ratio(f"pocketlm {ours} compiled", 1,
                                                                          rates[f"llama.cpp {theirs}"][1])
                    for ours, theirs in (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0"))}

    identity = [greedy_identity(str(SHARED / "models" / n) if n == "small" else n, tokens)
                for n in args.identity_models.split(",") if n]

    table = Table(title=f"decode on {args.model} ({args.threads} threads, {PROMPT}-token prompt, {NEW} new, greedy)")
    for col in ("engine", "tok/s b1", "× transformers b1", "tok/s b8", "b8 ÷ b1", "MB read/token", "of bandwidth bound"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["engine"], f"{r['tok_s_b1']:.1f}", f"{r['vs_transformers_b1']:.2f}×",
                      f"{r['tok_s_b8']:.1f}" if r["tok_s_b8"] else "–", f"{r['b8_over_b1']:.2f}×" if r["b8_over_b1"] else "–",
                      f"{r['bytes_per_token'] / 1e6:.1f}",
                      f"{r['fraction_of_bandwidth_bound']:.0%}")
    console.print(table)
    compile_s = {n: r.compile_s for n, r in engines.items() if isinstance(r, Generator) and r.compiled}
    console.print(f"compile time of the decode step (apart): {compiled.compile_s:.1f} s · read bandwidth {bw:.1f} GB/s · "
                  f"fp32 weights read per token {bpt / 1e6:.1f} MB → bound {fp32_bound:.0f} tok/s · fp32 matmuls "
                  f"alone {floor_ms:.2f} ms/token → {1000 / floor_ms:.0f} tok/s")
    for k, v in vs_llama.items():
        console.print(f"{k}: {v:.2f}×")
    console.print(f"{llama_note}")
    for ident in identity:
        console.print(f"greedy identical to transformers: {ident['model']}: {ident['identical']}/{ident['prompts']} prompts "
                      f"({ident['new_tokens']} tokens each)")

    path = write_result("decode_small", {
        "model": args.model, "threads": args.threads, "prompt_tokens": PROMPT, "new_tokens": NEW, "rounds": args.rounds,
        "rows": rows, "compile_s": compile_s, "read_bandwidth_gbs": bw, "fp32_bytes_per_token": bpt,
        "fp32_bandwidth_bound_tok_s": fp32_bound,
        "fp32_matmul_only_ms_per_token": floor_ms, "vs_llama_cpp": vs_llama, "llama_cpp": llama_note,
        "int8_int4": "RTN weight-only (int8 per output channel; int4 asymmetric, groups of 128) on every decoder "
                     "linear; the tied LM head and embedding as one int8 table (per row), bf16 activations in "
                     "torch's packed CPU kernels; llama.cpp's Q8_0/Q4_0 quantize every matrix in blocks of 32",
        "greedy_identity": identity,
        "targets": {"pocketlm fp32 / transformers fp32 (b1)": "≥ 3×", "batch 8 / batch 1 throughput": "≥ 4×"}})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
