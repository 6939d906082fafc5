"""Structured pruning of a mixture-of-experts model: the reference `moe` (Mixtral layout, 8 experts).

Every expert loses the same share of its intermediate channels (25% and 50%), each keeping its own
strongest by routing-weighted activation importance, against the same shares removed at random
(same seed per expert) — the check that the importance ranking matters; and Minitron width pruning
(hidden channels through the router and every expert, plus expert channels) to 0.65× the
parameters. Perplexity on test.txt
before and after KD recovery from the unpruned model (--recover-steps of 8 × 256 train-split
tokens); parameters, weights MB; every artifact saved, reloaded with plain transformers and compared.

    python benchmarks/prune_moe.py [--threads 2] [--recover-steps 150]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

import pocketlm
from pocketlm.compress import MlpPruneConfig, WidthPruneConfig, compress_
from pocketlm.compress.prune.sparsify import fused_experts
from pocketlm.compress.prune.structured import prune_experts_, sync_config
from common import params, parse_reference_args, recovery_kd, write_result


def random_channels(model, ratio: float) -> None:
    """The baseline: every expert keeps a random (1 − ratio) share of its channels."""
    for i, layer in enumerate(model.model.layers):
        experts = fused_experts(layer)
        n_exp, inter = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
        keep = torch.stack([torch.randperm(inter, generator=torch.Generator().manual_seed(100 * i + e))
                            [: round(inter * (1 - ratio))] for e in range(n_exp)])
        prune_experts_(experts, keep)
    sync_config(model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recover-steps", type=int, default=150)
    args = parse_reference_args(ap, model="moe")
    t_start = time.perf_counter()
    quality = pocketlm.EvalProtocol(text=args.text, tokens=args.tokens, speed=False)
    base, tok = pocketlm.load(args.model)
    dense = pocketlm.evaluate(base, tok, quality, show_progress=False)
    kd = recovery_kd(max(1, args.recover_steps))  # used only with --recover-steps > 0
    console, rows = Console(width=140), []
    with tempfile.TemporaryDirectory() as tmp:
        calib = dict(tok=tok, calib_samples=128, calib_len=512, show_progress=False)
        runs = [(ratio, how) for ratio in (0.25, 0.5) for how in ("importance", "random")] + [(None, "width")]
        for ratio, how in runs:
            model = copy.deepcopy(base)
            if how == "importance":
                compress_(model, MlpPruneConfig(ratio=ratio), **calib)
            elif how == "random":
                random_channels(model, ratio)
            else:
                compress_(model, WidthPruneConfig(target_ratio=0.65), **calib)
            report = pocketlm.evaluate(model, tok, quality, show_progress=False)
            path = f"{tmp}/{how}-{ratio}"
            pocketlm.save(model, tok, path)
            plain = AutoModelForCausalLM.from_pretrained(path).eval()
            x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                same = torch.equal(plain(x).logits, model(x).logits)
            name = f"experts −{ratio:.0%} ({how})" if ratio else "width to ≤ 0.65× params"
            row = {"name": name, "ratio": ratio, "channels": how, "hidden": model.config.hidden_size,
                   "ppl": report.quality["ppl"], "params": params(model), "params_ratio": params(model) / params(base),
                   "weights_mb": report.efficiency["weights_mb"], "reloads_in_transformers": same,
                   "expert_intermediate": model.config.intermediate_size}
            if args.recover_steps:
                t0 = time.perf_counter()
                compress_(model, kd, teacher=base, tok=tok, show_progress=False)
                row.update(ppl_after_kd=pocketlm.evaluate(model, tok, quality, show_progress=False).quality["ppl"],
                           kd_s=time.perf_counter() - t0)
            rows.append(row)
            console.print(f"{row['name']}: ppl {row['ppl']:.3f}, after KD {row.get('ppl_after_kd', float('nan')):.3f}, "
                          f"params {row['params_ratio']:.3f}×")
    by = {(r["ratio"], r["channels"]): r for r in rows}
    checks = {f"importance_beats_random_{r:.0%}": by[(r, "importance")]["ppl"] < by[(r, "random")]["ppl"]
              for r in (0.25, 0.5)}
    checks["all_reload_in_transformers"] = all(r["reloads_in_transformers"] for r in rows)
    table = Table(title=f"{args.model}: structured pruning (dense ppl {dense.quality['ppl']:.3f}, {args.threads} threads)")
    for col in ("pruning", "ppl", "ppl after KD", "params ×", "weights MB", "reloads in transformers"):
        table.add_column(col, justify="right")
    table.add_row("dense", f"{dense.quality['ppl']:.3f}", "–", "1.000", f"{dense.efficiency['weights_mb']:.2f}", "–")
    for r in rows:
        table.add_row(r["name"], f"{r['ppl']:.3f}", f"{r['ppl_after_kd']:.3f}" if "ppl_after_kd" in r else "–",
                      f"{r['params_ratio']:.3f}", f"{r['weights_mb']:.2f}", "yes" if r["reloads_in_transformers"] else "NO")
    console.print(table)
    console.print(checks)
    path = write_result("prune_moe", {
        "model": args.model, "text": args.text, "tokens": args.tokens, "calib": "128 × 512 tokens of the train split",
        "kd_recovery": kd.to_dict() if args.recover_steps else None,
        "dense": {"ppl": dense.quality["ppl"], "params": params(base), "weights_mb": dense.efficiency["weights_mb"]},
        "rows": rows, "checks": checks, "wall_s": time.perf_counter() - t_start})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
