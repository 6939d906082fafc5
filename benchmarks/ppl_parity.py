"""Perplexity from `pocketlm eval` vs plain transformers under the same protocol (README: ppl parity).

Runs the command a user runs, `pocketlm eval MODEL --text TEXT --json OUT` (full protocol, speed
included), then plain transformers: each non-overlapping 512-token window of the first N tokens
scored from its own start with `model(input_ids, labels=input_ids).loss`, fp32, exp of the mean.

    python benchmarks/ppl_parity.py [--model ../shared/reference/models/small] [--text .../test.txt]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import parse_reference_args, write_result


def plain_transformers_ppl(model_dir: str, text: str, n_tokens: int, ctx: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"][:n_tokens]
    windows = torch.tensor(ids[: len(ids) // ctx * ctx]).view(-1, ctx)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    args = parse_reference_args(ap)

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pocketlm.cli", "eval", args.model, "--text", args.text, "--tokens",
               str(args.tokens), "--ctx", str(args.ctx), "--threads", str(args.threads), "--json", f"{tmp}/r.json"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        t_ours = time.perf_counter() - t0
        report = json.loads(Path(f"{tmp}/r.json").read_text())
    t0 = time.perf_counter()
    with open(args.text, encoding="utf-8") as f:
        ref = plain_transformers_ppl(args.model, f.read(), args.tokens, args.ctx)
    t_ref = time.perf_counter() - t0
    ours = report["quality"]["ppl"]
    ratio = ours / ref

    table = Table(title=f"perplexity parity on {args.model}")
    for col in ("pocketlm ppl", "transformers ppl", "ratio", "|Δ| %", "tokens scored", "target"):
        table.add_column(col, justify="right")
    table.add_row(f"{ours:.4f}", f"{ref:.4f}", f"{ratio:.6f}", f"{abs(ratio - 1) * 100:.4f}",
                  str(report["quality"]["tokens_scored"]), "|Δ| ≤ 1%")
    Console().print(table)
    path = write_result(f"ppl_parity_{args.model.rstrip('/').split('/')[-1]}", {
        "model": args.model, "text": args.text, "tokens": args.tokens, "ctx": args.ctx,
        "pocketlm_ppl": ours, "transformers_ppl": ref, "ratio": ratio, "within_1pct": abs(ratio - 1) <= 0.01,
        "tokens_scored": report["quality"]["tokens_scored"], "command": " ".join(cmd[2:]),
        "wall_s": {"pocketlm_eval_with_speed": t_ours, "transformers_ppl_only": t_ref}, "report": report})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
