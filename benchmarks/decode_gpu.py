"""Decode at 1B scale on a GPU (the engine issue's GPU check): how close the engine gets to HBM bandwidth.

A random-weight Llama of Llama-3.2-1B's shape (16 layers, hidden 2048, MLP 8192, 32 query / 8 KV
heads, vocab 128,256, tied head) in bf16, and the same model RTN int4 (groups of 128); greedy, a
32-token random prompt, 128 new tokens forced, batch 1 and 8; the engine compiled (CUDA graphs)
beside transformers' `generate` in the same run. The bound: weight bytes read per token ÷ measured
device copy bandwidth (bytes read + written per second by a 1 GiB copy), so "of bound" is the share
of the memory system a decode step uses.

    python benchmarks/decode_gpu.py                        # needs a CUDA device
    python benchmarks/decode_gpu.py --shape tiny --device cpu --out /tmp   # dry run of the script
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig

import pocketlm
from pocketlm.compress import RTNConfig, compress_
from pocketlm.errors import ConfigError
from pocketlm.eval.efficiency import decode_tok_s
from pocketlm.runtime import Generator
from common import write_result
from decode import bytes_per_token

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=8192),
}
PROMPT, NEW = 32, 128


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Best of 5 copies of 1 GiB (0.25 GiB on CPU): (read + write) bytes per second."""
    n = (2**30 if device.type == "cuda" else 2**28) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 2 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_llama(shape: str, device: torch.device):
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_gpu.py needs a CUDA device (or --device cpu for a dry run)")
    console = Console()
    _, tok = pocketlm.load("tiny")  # the generator needs a tokenizer only for text; ids are random here
    tokens = torch.randint(0, SHAPES[args.shape]["vocab_size"], (PROMPT * 8 + 64,))
    bw = copy_bandwidth_gbs(device)

    model = random_llama(args.shape, device)
    variants = {"bf16": model}
    int4 = random_llama(args.shape, device)
    compress_(int4, RTNConfig(bits=4, group_size=128), tok=tok, show_progress=False)
    variants["int4 RTN g128"] = int4
    read = {name: bytes_per_token(m) for name, m in variants.items()}  # before the engine packs anything

    rows, failed = [], {}
    for name, m in variants.items():
        runners = {"transformers": m} if name == "bf16" else {}
        runners["pocketlm compiled"] = Generator(m, tok, compile=True, max_context=1024)
        for engine, runner in runners.items():
            row = {"model": name, "engine": engine, "bytes_per_token": read[name]}
            try:
                for b in (1, 8):
                    decode_tok_s(runner, tokens, batch=b, prompt_len=PROMPT, new_tokens=8, warmup=1, repeats=1)
                    row[f"tok_s_b{b}"] = decode_tok_s(runner, tokens, batch=b, prompt_len=PROMPT, new_tokens=NEW,
                                                      warmup=0, repeats=args.repeats)[0]
            except ConfigError as e:  # e.g. a quantized path that cannot be captured: recorded, not hidden
                failed[f"{name} {engine}"] = str(e)
                console.print(f"[red]{name} {engine}: {e}[/red]")
                continue
            row["fraction_of_bandwidth_bound_b1"] = row["tok_s_b1"] * read[name] / (bw * 1e9)
            if isinstance(runner, Generator):
                row["compile_s"] = runner.compile_s
                row["int4_path"] = _linear_path(m) if name != "bf16" else None
            rows.append(row)
            console.print(row)

    hf_b1 = next(r["tok_s_b1"] for r in rows if r["engine"] == "transformers")
    table = Table(title=f"decode, random Llama {args.shape} on {device} (copy bandwidth {bw:.0f} GB/s)")
    for col in ("model", "engine", "tok/s b1", "× transformers b1", "tok/s b8", "MB read/token", "of bound b1"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], r["engine"], f"{r['tok_s_b1']:.1f}", f"{r['tok_s_b1'] / hf_b1:.2f}×",
                      f"{r['tok_s_b8']:.1f}", f"{r['bytes_per_token'] / 1e6:.0f}",
                      f"{r['fraction_of_bandwidth_bound_b1']:.0%}")
    console.print(table)
    path = write_result(f"decode_gpu_{args.shape}", {
        "shape": SHAPES[args.shape], "device": str(device), "prompt_tokens": PROMPT, "new_tokens": NEW,
        "copy_bandwidth_gbs": bw, "rows": rows, "failed": failed}, out_dir=args.out)
    console.print(f"wrote {path}")


def _linear_path(model) -> str:
    """Which matmul the quantized linears take on this device (fused kernel or the dequantize fallback)."""
    lin = model.model.layers[0].self_attn.q_proj
    return f"{type(lin).__name__}: " + ("fused CPU kernel" if lin.qweight.device.type == "cpu"
                                       else "dequantize, then matmul (no fused kernel on this device)")


if __name__ == "__main__":
    main()
