"""Decode speed of pocketlm's engine vs transformers and llama.cpp, on `small` and on SmolLM2-135M.

Same run, same threads (2), batch 1 and 8, greedy, 32-token prompt cut from test.txt, 128 new tokens
forced; rate = b·127 / (t_128 − t_1) as in the eval protocol (llama.cpp: b·128 / decode time after
the prefill). Engines are timed in alternation, one repeat each per round, and every ratio is a
median over rounds of same-round ratios.

- transformers fp32 `generate` (the baseline); pocketlm fp32 eager; fp32 compiled (`--compiled`);
- pocketlm native step (runtime/native.py: one C++ call per token) at fp32, int8 (RTN per output
  channel) and int4 (RTN asymmetric, groups of 64: 4.5 bits per weight like Q4_0), LM head and
  embedding as one int8 table in both; fp32 activations, and (`a8`) 8-bit activations per block of
  32 with integer dot products as llama.cpp does;
- llama.cpp through llama-cpp-python at F32, Q8_0 and Q4_0 (F16 GGUF written by pocketlm.gguf_export,
  then llama.cpp's own quantizer), batch 1 and 8 (8 sequences per llama_batch);
- prefill ms of a 512-token prompt at batch 1 for every engine;
- greedy identity: 64 prompts × 16 new tokens, native vs eager at fp32/int8/int4;
- the bandwidth bound: weight bytes read per token ÷ measured memory read bandwidth.

    python benchmarks/decode.py [--model smollm2|../shared/reference/models/small] [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.compress import RTNConfig, compress_
from pocketlm.eval.efficiency import decode_tok_s, prefill_ms
from pocketlm.runtime import Generator, cpu_linear
from common import parse_reference_args, write_result

PROMPT, NEW, PREFILL = 32, 128, 512


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


def greedy_identity(variants: dict, tokens: torch.Tensor, n_prompts: int = 64, new: int = 16) -> list[dict]:
    """Native vs eager greedy tokens on `n_prompts` prompts of 24–32 tokens, per quantization variant."""
    out = []
    for name, (model, tok) in variants.items():
        eager, native = Generator(model, tok), Generator(model, tok, native=True)
        same = 0
        for i in range(n_prompts):
            ids = tokens[i * 97: i * 97 + 24 + i % 9].tolist()
            run = [[int(t[0]) for t, _ in g.generate_step([ids], new, stop_tokens=set())] for g in (eager, native)]
            same += run[0] == run[1]
        out.append({"variant": name, "prompts": n_prompts, "new_tokens": new, "identical": same})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="also time the compiled fp32 step")
    args = parse_reference_args(ap)
    import llamacpp
    from pocketlm.gguf_export import export_gguf
    console = Console(width=160)
    model, tok = pocketlm.load(args.model)
    label = Path(args.model).name
    text = open(args.text, encoding="utf-8").read()[:40_000]
    tokens = torch.tensor(tok(text)["input_ids"])
    prompt, long_prompt = tokens[:PROMPT].tolist(), tokens[:PREFILL].tolist()

    # llama.cpp's files first, from the untouched float weights
    tmp = Path(tempfile.mkdtemp())
    f16 = export_gguf(model, tok, tmp / "f16.gguf", "F16")
    ggufs = {"F32": export_gguf(model, tok, tmp / "f32.gguf", "F32")}
    for q in ("Q8_0", "Q4_0"):
        llamacpp.quantize(str(f16), str(tmp / f"{q}.gguf"), q, args.threads)
        ggufs[q] = tmp / f"{q}.gguf"

    hf_model, _ = pocketlm.load(args.model)  # the engine packs weights in place; transformers keeps its own copy
    variants = {"fp32": (model, tok)}
    for bits, group in ((8, None), (4, 64)):  # int8: one scale per output channel
        qmodel, _ = pocketlm.load(args.model)
        compress_(qmodel, RTNConfig(bits=bits, group_size=group, head=True), tok=tok, show_progress=False)
        variants[f"int{bits}"] = (qmodel, tok)
    engines = {"transformers fp32": hf_model, "pocketlm fp32 eager": Generator(model, tok)}
    if args.compiled:
        engines["pocketlm fp32 compiled"] = Generator(model, tok, compile=True)
    for name, (m, _) in variants.items():
        engines[f"pocketlm {name} native"] = Generator(m, tok, native=True)
        if name != "fp32":
            engines[f"pocketlm {name} native a8"] = Generator(m, tok, native=True, native_activations="int8")
    for runner in engines.values():  # warm-up (and compile) outside the timed rounds
        for b in (1, 8):
            decode_tok_s(runner, tokens, batch=b, prompt_len=PROMPT, new_tokens=NEW, warmup=1, repeats=1)
    llama = {f"llama.cpp {q}": str(path) for q, path in ggufs.items()}

    rates: dict[str, dict[int, list[float]]] = {n: {1: [], 8: []} for n in [*engines, *llama]}
    prefill: dict[str, list[float]] = {n: [] for n in rates}
    for _ in range(args.rounds):
        for name, runner in engines.items():
            for b in (1, 8):
                rates[name][b].append(decode_tok_s(runner, tokens, batch=b, prompt_len=PROMPT, new_tokens=NEW,
                                                   warmup=0, repeats=1)[0])
            prefill[name].append(prefill_ms(runner, tokens, length=PREFILL, warmup=0, repeats=1))
        for name, path in llama.items():
            for b in (1, 8):
                rates[name][b].append(llamacpp.decode_speed(path, prompt, NEW, b, args.threads, 1)["decode_tok_s"])
            prefill[name].append(llamacpp.decode_speed(path, long_prompt, 1, 1, args.threads, 1)["prefill_ms"])
    base = rates["transformers fp32"][1]

    def ratio(name: str, b: int = 1, ref: list[float] = base) -> float:
        return statistics.median(x / y for x, y in zip(rates[name][b], ref))

    bw = read_bandwidth_gbs()
    read = {n: bytes_per_token(r.model if isinstance(r, Generator) else r) for n, r in engines.items()}
    read.update({n: os.path.getsize(p) for n, p in llama.items()})  # the whole GGUF: weights + head
    rows = []
    for name in rates:
        r1, r8 = statistics.median(rates[name][1]), statistics.median(rates[name][8])
        rows.append({"engine": name, "tok_s_b1": r1, "tok_s_b8": r8, "vs_transformers_b1": ratio(name),
                     "b8_over_b1": statistics.median(x / y for x, y in zip(rates[name][8], rates[name][1])),
                     "prefill_ms_512": statistics.median(prefill[name]), "bytes_per_token": read[name],
                     "fraction_of_bandwidth_bound": r1 / (bw * 1e9 / read[name]),
                     "rounds_b1": rates[name][1], "rounds_b8": rates[name][8], "rounds_prefill": prefill[name]})
    vs_llama = {}
    for ours, theirs in (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0"), ("int8", "Q8_0 (a8)"),
                         ("int4", "Q4_0 (a8)")):
        a = f"pocketlm {ours} native" + (" a8" if "a8" in theirs else "")
        b = "llama.cpp " + theirs.split()[0]
        vs_llama[f"{a} / {b}"] = {
            "b1": ratio(a, 1, rates[b][1]), "b8": ratio(a, 8, rates[b][8]),
            "prefill_speed": statistics.median(y / x for x, y in zip(prefill[a], prefill[b]))}
    identity = greedy_identity(variants, tokens)

    table = Table(title=f"decode on {label} ({args.threads} threads, {PROMPT}-token prompt, {NEW} new, greedy; "
                        f"prefill {PREFILL} tokens)")
    for col in ("engine", "tok/s b1", "× transformers b1", "tok/s b8", "b8 ÷ b1", "prefill ms", "MB read/token",
                "of bandwidth bound"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["engine"], f"{r['tok_s_b1']:.1f}", f"{r['vs_transformers_b1']:.2f}×", f"{r['tok_s_b8']:.1f}",
                      f"{r['b8_over_b1']:.2f}×", f"{r['prefill_ms_512']:.0f}", f"{r['bytes_per_token'] / 1e6:.1f}",
                      f"{r['fraction_of_bandwidth_bound']:.0%}")
    console.print(table)
    console.print(f"read bandwidth {bw:.1f} GB/s; llama-cpp-python {llamacpp.version()}")
    for k, v in vs_llama.items():
        console.print(f"{k}: b1 {v['b1']:.2f}×, b8 {v['b8']:.2f}×, prefill speed {v['prefill_speed']:.2f}×")
    for ident in identity:
        console.print(f"greedy native = eager: {ident['variant']}: {ident['identical']}/{ident['prompts']} prompts "
                      f"({ident['new_tokens']} tokens each)")
    path = write_result(f"decode_{label}", {
        "model": args.model, "threads": args.threads, "prompt_tokens": PROMPT, "new_tokens": NEW,
        "prefill_tokens": PREFILL, "rounds": args.rounds, "rows": rows, "read_bandwidth_gbs": bw,
        "vs_llama_cpp": vs_llama, "llama_cpp": llamacpp.version(), "act8_kernel": cpu_linear.act8_kernel(),
        "greedy_native_vs_eager": identity,
        "int8_int4": "RTN weight-only: int8 per output channel, int4 asymmetric groups of 64 (4.5 bits per weight, "
                     "Q4_0's size); the tied LM head and embedding as one int8 table (per row); fp32 activations, "
                     "or (a8) 8-bit activations per block of 32 on the act8_kernel's integer dot products. "
                     "llama.cpp Q8_0/Q4_0: blocks of 32, activations quantized to 8 bits for its integer dot products",
        "targets": {"pocketlm int8 / llama.cpp Q8_0 (b1)": "≥ 1.0×", "pocketlm int4 / llama.cpp Q4_0 (b1)": "≥ 1.0×",
                    "batch 8 / batch 1 throughput": "≥ 4×", "prefill 512 vs llama.cpp": "≥ 1.0×"}})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
