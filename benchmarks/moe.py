"""The on-device MoE runtime on the reference `moe` and MoEfication of `small` (the MoE issue's "Must show").

- Offloading, 25% of experts resident: LRU/LFU, with and without prefetch, with the store in the OS page
  cache and with every load read from disk: greedy tokens identical to all-resident, decode tok/s as a
  ratio to all-resident timed alternately in the same process (and to transformers' own MoE blocks,
  all resident, on the same engine), hit rates, and the experts' peak RSS
  (each configuration in its own process, see `pocketlm moe bench`) as a ratio to all-resident's.
- Routing diagnostics of the model on test.txt: per layer, each expert's share of tokens and the
  coefficient of variation of the counts.
- Expert-wise 8/4-bit mix at <= 40% of the bf16 expert bytes vs uniform int4 (group 32, the kernel's
  finest, 31% of bf16), a mix at exactly uniform int4's bytes, and uniform int8: Δppl on test.txt.
- Dynamic top-k by router mass (top-p): mean active experts and Δppl.
- MoEfication of `small` at E=8: Δppl at k = 1, 2, 4 (8 = dense check) and the FFN multiply-adds saved.

    python benchmarks/moe.py [--threads 2] [--tokens 65536]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.compress.calibration import calibration_tokens
from pocketlm.eval.data import read_text, token_windows
from pocketlm.eval.quality import score_windows
from pocketlm.moe.experts import expert_bytes
from pocketlm.moe.moefy import ffn_flops_saved, moefy, set_top_k
from common import SHARED, parse_reference_args, write_result

MOE = str(SHARED / "models" / "moe")


def moe_bench(args, threads: int, *options: str) -> dict:
    """One `pocketlm moe bench` configuration in its own process (its expert RSS is its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-c", "from pocketlm.cli import main; main()", "moe", "bench", MOE, "--threads", str(threads),
               "--json", str(out), *options]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    args = parse_reference_args(ap)
    t0 = time.time()
    console = Console(width=150)
    ppl = ["--ppl-tokens", str(args.tokens)]
    speed = ["--ppl-tokens", "0", "--rounds", str(args.rounds)]

    # all resident also scores the text: its routing counts are the model's own (static top-2)
    offload = {"all resident": moe_bench(args, args.threads, "--resident", "1.0", "--no-prefetch",
                                         "--rounds", str(args.rounds), *ppl)}
    for policy in ("lfu", "lru"):
        for prefetch in ("--prefetch", "--no-prefetch"):
            for cache in ("--page-cache", "--no-page-cache"):
                if policy == "lru" and cache == "--no-page-cache":
                    continue
                name = f"25% {policy} {prefetch[2:]} {cache[2:]}"
                offload[name] = moe_bench(args, args.threads, "--resident", "0.25", "--policy", policy,
                                          prefetch, cache, *speed)
    full_rss = offload["all resident"]["expert_peak_rss_mb"]
    table = Table(title="moe: 25% of experts resident vs all resident (batch 1, greedy, 128 tokens)")
    for col in ("run", "tokens identical", "tok/s", "× all-resident", "× HF blocks", "hit rate", "prefetch acc.",
                "stall s", "expert peak RSS MB", "× all-resident RSS"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in offload.items():
        c = r["cache"]
        table.add_row(name, str(r["tokens_identical"]), f"{r['decode_tok_s']['configured']:.1f}",
                      f"{r['speed_ratio']:.2f}", f"{r['speed_ratio_vs_transformers_blocks']:.2f}", f"{c['hit_rate']:.2f}",
                      "-" if c["prefetch_accuracy"] is None else f"{c['prefetch_accuracy']:.2f}",
                      f"{c['stall_s']:.2f}", f"{r['expert_peak_rss_mb']:.1f}",
                      f"{r['expert_peak_rss_mb'] / full_rss:.2f}")
    console.print(table)

    routing = offload["all resident"]["routing"]
    table = Table(title=f"moe: routing on {args.tokens} test tokens (share of tokens per expert; top-2, so shares sum to 2)")
    for col in ("layer", "CV", "busiest expert", "idlest expert", *(f"e{e}" for e in range(8))):
        table.add_column(col, justify="right")
    for x in routing["layers"]:
        table.add_row(str(x["layer"]), f"{x['cv']:.2f}", f"{max(x['share']):.1%}", f"{min(x['share']):.1%}",
                      *(f"{v:.2f}" for v in x["share"]))
    console.print(table)

    bf16_mb = offload["all resident"]["bf16_expert_mb"]
    per_expert = expert_bytes(256, 256, 4, 32) / 2**20
    n_experts = 48
    bits = {
        "mix 8/4 (g32) at 40% of bf16": moe_bench(args, args.threads, "--resident", "1.0", "--no-prefetch",
                                                  "--bits-budget-mb", str(0.4 * bf16_mb), "--rounds", "1", *ppl),
        "uniform int4 g32": moe_bench(args, args.threads, "--resident", "1.0", "--no-prefetch",
                                      "--bits-budget-mb", str(per_expert * n_experts), "--rounds", "1", *ppl),
        # the same bytes as uniform int4 g32, spent as coarser int4 groups plus some int8 experts
        "mix 8/4 (g128) at uniform int4 g32's bytes": moe_bench(
            args, args.threads, "--resident", "1.0", "--no-prefetch", "--bits-budget-mb", str(per_expert * n_experts),
            "--group-size", "128", "--rounds", "1", *ppl),
        "uniform int8": moe_bench(args, args.threads, "--resident", "1.0", "--no-prefetch",
                                  "--bits-budget-mb", str(bf16_mb), "--rounds", "1", *ppl),
    }
    table = Table(title=f"moe: expert-wise bit widths (ppl on {args.tokens} test tokens)")
    for col in ("experts", "MB", "share of bf16", "int8 experts", "ppl", "Δppl"):
        table.add_column(col, justify="left" if col == "experts" else "right")
    for name, r in bits.items():
        n8 = sum(row.count(8) for row in r["bits_plan"])
        table.add_row(name, f"{r['expert_mb_on_disk']:.2f}", f"{r['bits_share_of_bf16']:.1%}", f"{n8}/{n_experts}",
                      f"{r['ppl']:.3f}", f"{r['ppl_change']:+.2%}")
    console.print(table)

    topk = {p: moe_bench(args, args.threads, "--resident", "1.0", "--no-prefetch", "--top-p", str(p),
                         "--rounds", "1", *ppl) for p in (0.6, 0.7, 0.8, 0.9)}
    table = Table(title="moe: dynamic top-k by router mass (k_min 1, k_max 2)")
    for col in ("top-p", "mean active experts", "ppl", "Δppl"):
        table.add_column(col, justify="right")
    for p, r in topk.items():
        table.add_row(str(p), f"{r['routing']['mean_active_experts']:.3f}", f"{r['ppl']:.3f}", f"{r['ppl_change']:+.2%}")
    console.print(table)

    moefied = run_moefy(args)
    table = Table(title=f"small: MoEfication, E=8 (ppl on {args.tokens} test tokens, no retraining)")
    for col in ("k", "ppl", "Δppl", "FFN multiply-adds saved"):
        table.add_column(col, justify="right")
    for row in moefied["rows"]:
        table.add_row(str(row["k"]), f"{row['ppl']:.3f}", f"{row['ppl_change']:+.1%}", f"{row['ffn_flops_saved']:.1%}")
    console.print(table)

    lfu = offload["25% lfu prefetch page-cache"]
    ok_dyn = [p for p, r in topk.items() if r["routing"]["mean_active_experts"] < 2 and r["ppl_change"] <= 0.01]
    mix = bits["mix 8/4 (g32) at 40% of bf16"]
    verdict = {
        "offload_tokens_identical": all(r["tokens_identical"] for r in offload.values()),
        "offload_speed_ratio_lfu_prefetch": lfu["speed_ratio"], "offload_speed_target": 0.7,
        "offload_rss_ratio_lfu_prefetch": lfu["expert_peak_rss_mb"] / full_rss, "offload_rss_target": 0.5,
        "bits_mix_share": mix["bits_share_of_bf16"], "bits_mix_ppl_change": mix["ppl_change"],
        "bits_target": "share <= 0.40 and Δppl <= +3%",
        "dynamic_top_p_meeting_target": ok_dyn, "dynamic_target": "mean active < 2 and Δppl <= +1%",
    }
    console.print(verdict)
    path = write_result("moe", {"offload": offload, "bits": bits, "dynamic_top_k": {str(k): v for k, v in topk.items()},
                                "moefy": moefied, "verdict": verdict, "wall_s": time.time() - t0,
                                "tokens": args.tokens, "threads": args.threads})
    console.print(f"wrote {path} ({(time.time() - t0) / 60:.1f} min)")


def run_moefy(args) -> dict:
    model, tok = pocketlm.load(args.model)
    path, text = read_text(args.text)
    windows = token_windows(tok, text, path, args.tokens, 512)
    base = score_windows(model, windows, show_progress=False)["ppl"]
    calib, _ = calibration_tokens(tok, samples=32, seq_len=512)
    t = time.time()
    moefy(model, calib, experts=8, top_k=2, show_progress=False)
    fit_s = time.time() - t
    w = model.model.layers[0].mlp.gate_proj.weight
    rows = []
    for k in (8, 4, 2, 1):
        set_top_k(model, k)
        ppl = score_windows(model, windows, show_progress=False)["ppl"]
        rows.append({"k": k, "ppl": ppl, "ppl_change": ppl / base - 1,
                     "ffn_flops_saved": ffn_flops_saved(w.shape[1], w.shape[0], 8, k)})
    return {"model": args.model, "experts": 8, "dense_ppl": base, "moefy_s": fit_s, "calib_samples": 32, "rows": rows}


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
