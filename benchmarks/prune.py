"""Pruning on the reference `small` model (the pruning issue's "Must show").

- 50% unstructured and 2:4: magnitude, Wanda, SparseGPT; Δppl and each method's Δppl ÷ magnitude's.
- Structured, 25% and 50% of parameters removed, (a) query heads + MLP channels, (b) Minitron width:
  weights MB, prefill latency (compute-bound) and decode time per token (pocketlm's engine, compiled,
  batch 1) as ratios to the dense model, timed alternately with it; ppl before recovery.
- After KD recovery: each structured model trained from the dense one (logit KL at T 2 + LM loss, the
  distillation issue's pass) for --recover-steps steps of 8 × 256 tokens of the train split; ppl again.
- Depth: drop 2 of 8 layers by Block Influence vs the last 2.
- Every artifact is saved, reloaded with pocketlm.load, and its logits compared with the in-memory model.

    python benchmarks/prune.py [--model ../shared/reference/models/small] [--threads 2] [--recover-steps 150]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.compress import (HeadPruneConfig, LayerDropConfig, MagnitudeConfig, MlpPruneConfig,
                               SparseGPTConfig, WandaConfig, WidthPruneConfig, compress_)
from pocketlm.eval.efficiency import decode_tok_s, prefill_ms
from pocketlm.runtime import Generator
from common import params, parse_reference_args, recovery_kd, write_result


def reloads_identically(model, tok, tmp: str, name: str) -> bool:
    path = f"{tmp}/{name}"
    pocketlm.save(model, tok, path)
    again, _ = pocketlm.load(path)
    x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(again(x).logits, model(x).logits)


def paired_speed(base, model, tok, tokens: torch.Tensor, rounds: int = 5) -> dict:
    """Prefill (512 tokens) and batch-1 decode (pocketlm's engine, compiled decode step, 128 tokens) of
    the pruned model against the dense one, alternated A B A B within each round; medians of the
    per-round ratios, so machine drift cancels."""
    runners = [Generator(copy.deepcopy(m), tok, compile=True) for m in (base, model)]  # the engine packs weights
    prefill, decode = [], []
    for _ in range(rounds):
        p = [prefill_ms(r, tokens, length=512, warmup=1, repeats=3) for r in runners]
        d = [decode_tok_s(r, tokens, batch=1, prompt_len=32, new_tokens=128, warmup=1, repeats=3)[0]
             for r in runners]
        prefill.append(p[1] / p[0])
        decode.append(d[0] / d[1])  # decode time per token, pruned / dense
    return {"prefill_ratio": statistics.median(prefill), "decode_time_ratio": statistics.median(decode),
            "prefill_ratios": prefill, "decode_time_ratios": decode}


def heads_and_mlp(base, tok, fraction: float, calib: dict) -> tuple:
    """Remove one query head in three (per KV group), then the MLP share that reaches `fraction` of the
    parameters removed in total."""
    model = copy.deepcopy(base)
    target = params(base) * (1 - fraction)
    applied = compress_(model, HeadPruneConfig(ratio=1 / 3), tok=tok, **calib)
    layer = model.model.layers[0]
    mlp_params = 3 * layer.mlp.down_proj.in_features * model.config.hidden_size * len(model.model.layers)
    ratio = (params(model) - target) / mlp_params
    applied += compress_(model, MlpPruneConfig(ratio=ratio), tok=tok, **calib)
    return model, applied


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--recover-steps", type=int, default=150, help="KD steps per structured model (0: skip)")
    args = parse_reference_args(ap)
    t_start = time.perf_counter()
    calib = dict(calib_samples=args.calib_samples, calib_len=512, show_progress=False)
    quality = pocketlm.EvalProtocol(text=args.text, tokens=args.tokens, speed=False)
    base, tok = pocketlm.load(args.model)
    dense = pocketlm.evaluate(base, tok, quality, show_progress=False)
    dense_ppl = dense.quality["ppl"]
    speed_tokens = torch.randint(0, base.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    rows, console = [], Console(width=160)
    # The distillation benchmark's KD recipe (alpha 0.9, T 2, lr 1e-3), shorter: every structured row gets it.
    kd = recovery_kd(args.recover_steps)

    def recover(model) -> dict:
        student = copy.deepcopy(model)
        t0 = time.perf_counter()
        stats = compress_(student, kd, teacher=base, tok=tok, show_progress=False)[0]["stats"]
        return {"ppl_after_kd": pocketlm.evaluate(student, tok, quality, show_progress=False).quality["ppl"],
                "kd_s": time.perf_counter() - t0, "kd_loss_first": stats["loss_first"], "kd_loss_last": stats["loss_last"]}

    def measure(name, model, applied, tmp, with_speed=False, **extra):
        report = pocketlm.evaluate(model, tok, quality, show_progress=False)
        ppl = report.quality["ppl"]
        row = {"name": name, "ppl": ppl, "delta_ppl": ppl - dense_ppl, "delta_pct": (ppl / dense_ppl - 1) * 100,
               "params": params(model), "params_ratio": params(model) / params(base),
               "weights_mb": report.efficiency["weights_mb"], "reloads_identically": reloads_identically(model, tok, tmp, name),
               "recipe": applied, **extra}
        if with_speed:  # the structured rows: speed, and ppl again after KD recovery
            row.update(paired_speed(base, model, tok, speed_tokens),
                       weights_ratio=report.efficiency["weights_mb"] / dense.efficiency["weights_mb"])
            if args.recover_steps:
                row.update(recover(model))
        rows.append(row)
        after = f", after KD {row['ppl_after_kd']:.3f}" if "ppl_after_kd" in row else ""
        console.print(f"{name}: ppl {ppl:.3f} (Δ {row['delta_pct']:+.2f}%){after}, params {row['params_ratio']:.3f}×")
        return row

    with tempfile.TemporaryDirectory() as tmp:
        for nm in (None, (2, 4)):
            for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig):
                model = copy.deepcopy(base)
                cfg = cls(sparsity=0.5, nm=nm)
                measure(f"{cfg.kind.removeprefix('prune_')} {'2:4' if nm else '50%'}", model,
                        compress_(model, cfg, tok=tok, **calib), tmp)
        for fraction in (0.25, 0.5):
            model, applied = heads_and_mlp(base, tok, fraction, calib)
            measure(f"heads+mlp -{fraction:.0%}", model, applied, tmp, with_speed=True)
            model = copy.deepcopy(base)
            cfg = WidthPruneConfig(target_params=int(params(base) * (1 - fraction)))
            measure(f"width -{fraction:.0%}", model, compress_(model, cfg, tok=tok, **calib), tmp, with_speed=True)
        for metric in ("block_influence", "last"):
            model = copy.deepcopy(base)
            applied = compress_(model, LayerDropConfig(drop=2, metric=metric), tok=tok, **calib)
            measure(f"drop 2 layers ({metric})", model, applied, tmp, dropped=applied[0]["stats"]["dropped"])

    by = {r["name"]: r for r in rows}
    checks = {
        "wanda_50_vs_magnitude": by["wanda 50%"]["delta_ppl"] / by["magnitude 50%"]["delta_ppl"],
        "sparsegpt_50_vs_magnitude": by["sparsegpt 50%"]["delta_ppl"] / by["magnitude 50%"]["delta_ppl"],
        "wanda_24_vs_magnitude": by["wanda 2:4"]["delta_ppl"] / by["magnitude 2:4"]["delta_ppl"],
        "sparsegpt_24_vs_magnitude": by["sparsegpt 2:4"]["delta_ppl"] / by["magnitude 2:4"]["delta_ppl"],
        "block_influence_beats_last": by["drop 2 layers (block_influence)"]["ppl"] < by["drop 2 layers (last)"]["ppl"],
        "all_reload_identically": all(r["reloads_identically"] for r in rows),
    }
    table = Table(title=f"pruning {args.model} (dense ppl {dense_ppl:.3f}, {args.threads} threads)")
    for col in ("method", "ppl", "Δppl %", "Δ/Δmag", "ppl after KD", "params ×", "weights ×", "prefill ×",
                "decode time ×", "reload ="):
        table.add_column(col, justify="right")
    mag = {"50%": by["magnitude 50%"]["delta_ppl"], "2:4": by["magnitude 2:4"]["delta_ppl"]}
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        key = r["name"].split()[-1] if r["name"].split()[0] in ("magnitude", "wanda", "sparsegpt") else None
        table.add_row(r["name"], f"{r['ppl']:.3f}", f"{r['delta_pct']:+.2f}",
                      fmt(r["delta_ppl"] / mag[key] if key else None, ".3f"), fmt(r.get("ppl_after_kd"), ".3f"),
                      f"{r['params_ratio']:.3f}",
                      fmt(r.get("weights_ratio"), ".3f"), fmt(r.get("prefill_ratio"), ".3f"),
                      fmt(r.get("decode_time_ratio"), ".3f"), "yes" if r["reloads_identically"] else "NO")
    console.print(table)
    console.print(checks)
    path = write_result("prune_small", {
        "model": args.model, "text": args.text, "tokens": args.tokens, "calib_samples": args.calib_samples,
        "kd_recovery": kd.to_dict() if args.recover_steps else None,
        "dense": {"ppl": dense_ppl, "params": params(base), "weights_mb": dense.efficiency["weights_mb"]},
        "speed_engine": "pocketlm engine, compiled decode step (batch 1, greedy, 32-token prompt, 128 new tokens); prefill: one "
                        "forward of 512 tokens; ratios pruned/dense, alternated within rounds, median of 5 rounds",
        "rows": rows, "checks": checks, "wall_s": time.perf_counter() - t_start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
