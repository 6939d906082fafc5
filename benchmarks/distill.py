"""Distillation on the reference models (the distillation issue's "Must show"), CPU.

--part small: `small` → a 50%-parameter student by Minitron width pruning, recovered by KD from the
  unpruned model (the minitron-50 recipe's passes) within a 20-minute CPU budget, against the same
  pruned student trained for the same steps on the same data with the plain LM loss (alpha 0).
  Perplexity on the test split; wall time of prune + KD.

--part reasoner: `reasoner` → a student with half its parameters (width pruning, calibrated on the
  teacher's chat answers), distilled on teacher-written slow traces and fast answers for
  arith_train prompts (sequence-level KD: LM loss on the teacher's tokens + logit KL), in rounds
  that pick the examples the student finds hardest; two arms from the same pruned student: the
  rounds' checkpoints merged (linear, half weight) before the next round, and not merged. Per round:
  slow and fast accuracy on the first --dev-items of arith_dev; at the end both arms and the teacher
  on all of arith_test.

--part search: `pocketlm search small --max-size-mb 8` (its report and Pareto plots are kept in
  results/search_small/).

    python benchmarks/distill.py --part small [--steps 420] [--threads 2]
    python benchmarks/distill.py --part reasoner [--train-items 3000 --fast-items 12000] [--rounds 3]
                                 [--per-round 8000] [--round-steps 280]
    python benchmarks/distill.py --part search [--max-size-mb 8]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.compress import KDConfig, WidthPruneConfig, compress_
from pocketlm.compress.distill.iterative import IterativeConfig, iterative_distill
from pocketlm.compress.distill.sequence import pack_examples, teacher_examples
from pocketlm.eval.data import read_tasks
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem
from pocketlm.runtime.reason import run_tasks
from common import RESULTS, SHARED, params, parse_reference_args, recovery_kd, write_result

CPU_BUDGET_S = 20 * 60


def part_small(args, console: Console) -> None:
    t_start = time.perf_counter()
    quality = pocketlm.EvalProtocol(text=args.text, tokens=args.tokens, speed=False)
    teacher, tok = pocketlm.load(args.model)
    teacher_ppl = pocketlm.evaluate(teacher, tok, quality, show_progress=False).quality["ppl"]
    calib = dict(tok=tok, calib_samples=64, calib_len=512, show_progress=False)
    train = str(SHARED / "corpus" / "train.txt")
    kd = recovery_kd(args.steps)

    t0 = time.perf_counter()
    pruned = copy.deepcopy(teacher)
    prune_stats = compress_(pruned, WidthPruneConfig(target_ratio=0.5), **calib)[0]["stats"]
    prune_s = time.perf_counter() - t0
    pruned_ppl = pocketlm.evaluate(pruned, tok, quality, show_progress=False).quality["ppl"]
    console.print(f"teacher ppl {teacher_ppl:.3f}; pruned to {params(pruned) / params(teacher):.3f}× params, "
                  f"ppl {pruned_ppl:.3f} before recovery ({prune_s:.0f} s)")
    rows = []
    for name, cfg in (("KD (alpha 0.9, T 2)", kd), ("LM loss only", kd.replace(alpha=0.0))):
        student = copy.deepcopy(pruned)
        t0 = time.perf_counter()
        stats = compress_(student, cfg, teacher=teacher, **calib)[0]["stats"]
        train_s = time.perf_counter() - t0
        ppl = pocketlm.evaluate(student, tok, quality, show_progress=False).quality["ppl"]
        rows.append({"name": name, "alpha": cfg.alpha, "steps": cfg.steps, "ppl": ppl, "ppl_vs_teacher": ppl / teacher_ppl,
                     "train_s": train_s, "prune_plus_train_s": prune_s + train_s, "loss_first": stats["loss_first"],
                     "loss_last": stats["loss_last"]})
        console.print(f"{name}: ppl {ppl:.3f} ({ppl / teacher_ppl:.3f}× teacher) in {prune_s + train_s:.0f} s")

    kd_row, lm_row = rows
    checks = {"kd_ppl_vs_teacher": kd_row["ppl_vs_teacher"], "kd_within_1_25x": kd_row["ppl_vs_teacher"] <= 1.25,
              "kd_beats_lm_only": kd_row["ppl"] < lm_row["ppl"],
              "kd_within_cpu_budget": kd_row["prune_plus_train_s"] <= CPU_BUDGET_S}
    table = Table(title=f"small → 50% width-pruned student, {args.steps} steps × 8 × 256 tokens, CPU {args.threads} threads")
    for col in ("student", "params ×", "ppl", "÷ teacher", "prune+train s"):
        table.add_column(col, justify="right")
    table.add_row("teacher (small)", "1.000", f"{teacher_ppl:.3f}", "1.000", "–")
    table.add_row("pruned, no recovery", f"{params(pruned) / params(teacher):.3f}", f"{pruned_ppl:.3f}",
                  f"{pruned_ppl / teacher_ppl:.3f}", f"{prune_s:.0f}")
    for r in rows:
        table.add_row(r["name"], f"{params(pruned) / params(teacher):.3f}", f"{r['ppl']:.3f}",
                      f"{r['ppl_vs_teacher']:.3f}", f"{r['prune_plus_train_s']:.0f}")
    console.print(table)
    console.print(checks)
    path = write_result("distill_small", {
        "device": "cpu", "model": args.model, "text": args.text, "tokens": args.tokens, "train_text": train,
        "teacher": {"ppl": teacher_ppl, "params": params(teacher)},
        "pruned": {"ppl": pruned_ppl, "params": params(pruned), "prune_s": prune_s, "stats": prune_stats},
        "kd_config": kd.to_dict(), "rows": rows, "checks": checks, "wall_s": time.perf_counter() - t_start})
    console.print(f"wrote {path}")


def accuracy(model, tok, items, modes=("slow", "fast")) -> dict:
    """Greedy accuracy and mean generated tokens per mode (on a copy: the engine repacks weights)."""
    dual = DualSystem(Generator(copy.deepcopy(model), tok), mode="fast")
    out = {}
    for mode in modes:
        r = run_tasks(dual, items, mode, show_progress=False)
        out[mode] = {"accuracy": r["accuracy"], "mean_tokens": r["mean_tokens"]}
    return out


def part_reasoner(args, console: Console) -> None:
    t_start = time.perf_counter()
    tasks = SHARED / "tasks"
    teacher, tok = pocketlm.load(str(SHARED / "models" / "reasoner"))
    train = read_tasks(tasks / "arith_train.jsonl", args.train_items + args.fast_items)
    train, fast_only = train[:args.train_items], train[args.train_items:]
    dev = read_tasks(tasks / "arith_dev.jsonl", args.dev_items)
    test = read_tasks(tasks / "arith_test.jsonl")
    t0 = time.perf_counter()
    teacher_test = accuracy(teacher, tok, test)
    console.print(f"teacher on arith_test: {teacher_test} ({time.perf_counter() - t0:.0f} s)")

    t0 = time.perf_counter()
    dual = DualSystem(Generator(copy.deepcopy(teacher), tok), mode="fast")
    examples = teacher_examples(dual, train, show_progress=False)  # slow traces and fast answers
    examples += teacher_examples(dual, fast_only, ("fast",), show_progress=False)  # fast answers are cheap
    gen_s = time.perf_counter() - t0
    kept = {m: sum(e["mode"] == m for e in examples) for m in ("slow", "fast")}
    console.print(f"teacher examples kept (correct): {kept} of {len(train)} slow and {len(train) + len(fast_only)} "
                  f"fast prompts, {gen_s:.0f} s")

    cfg = IterativeConfig(rounds=args.rounds, per_round=args.per_round, hard_share=0.75, merge="linear",
                          kd=KDConfig(steps=args.round_steps, batch_size=16, seq_len=256, lr=1e-3, alpha=0.5,
                                      warmup_steps=10))
    calib_rows, _ = pack_examples(examples[:: max(1, len(examples) // 512)], 256, tok.pad_token_id or 0)
    pruned = copy.deepcopy(teacher)
    prune_stats = compress_(pruned, WidthPruneConfig(target_ratio=0.5), tok=tok, calib=calib_rows[:128],
                            show_progress=False)[0]["stats"]
    pruned_dev = accuracy(pruned, tok, dev)
    console.print(f"student: {params(pruned) / params(teacher):.3f}× params; before KD on dev {pruned_dev}")

    arms = {}
    for arm, merge in (("merged", "linear"), ("not merged", None)):
        student = copy.deepcopy(pruned)
        t0 = time.perf_counter()
        history = iterative_distill(student, teacher, examples, cfg.replace(merge=merge), pad_id=tok.pad_token_id or 0,
                                    evaluate=lambda m: accuracy(m, tok, dev), show_progress=False)
        train_s = time.perf_counter() - t0
        final = accuracy(student, tok, test)
        arms[arm] = {"history": history, "test": final, "wall_s": train_s}
        write_result("distill_reasoner", {  # after each arm, so a stopped run keeps what it measured
            "partial": True, "teacher_test": teacher_test, "teacher_examples": kept, "arms": arms,
            "student": {"params": params(pruned), "teacher_params": params(teacher)}})
        for row in history:
            console.print(f"{arm} round {row['round']}: trained {row.get('trained')} merged {row.get('merged')}")
        console.print(f"{arm}: arith_test {final} ({train_s:.0f} s)")

    def kept_share(arm: str, mode: str) -> float:
        return arms[arm]["test"][mode]["accuracy"] / teacher_test[mode]["accuracy"]

    best = max(arms, key=lambda a: kept_share(a, "slow") + kept_share(a, "fast"))
    checks = {"student_params_ratio": params(pruned) / params(teacher), "best_arm": best,
              "slow_kept": kept_share(best, "slow"), "fast_kept": kept_share(best, "fast"),
              "keeps_90pct_slow": kept_share(best, "slow") >= 0.9, "keeps_90pct_fast": kept_share(best, "fast") >= 0.9}
    table = Table(title=f"reasoner → {checks['student_params_ratio']:.2f}× student, sequence-level KD, "
                        f"{args.rounds} rounds × {args.round_steps} steps (dev: first {args.dev_items} of arith_dev)")
    for col in ("model", "round", "dev slow", "dev fast", "test slow", "test fast", "slow kept", "fast kept"):
        table.add_column(col, justify="right")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    table.add_row("teacher", "–", "–", "–", pct(teacher_test["slow"]["accuracy"]), pct(teacher_test["fast"]["accuracy"]),
                  "–", "–")
    table.add_row("pruned, before KD", "0", pct(pruned_dev["slow"]["accuracy"]), pct(pruned_dev["fast"]["accuracy"]),
                  "–", "–", "–", "–")
    for arm, a in arms.items():
        for row in a["history"]:
            ev = row.get("merged") or row["trained"]
            last = row["round"] == args.rounds
            table.add_row(arm, str(row["round"]), pct(ev["slow"]["accuracy"]), pct(ev["fast"]["accuracy"]),
                          *((pct(a["test"]["slow"]["accuracy"]), pct(a["test"]["fast"]["accuracy"]),
                             pct(kept_share(arm, "slow")), pct(kept_share(arm, "fast"))) if last else ("",) * 4))
    console.print(table)
    console.print(checks)
    path = write_result("distill_reasoner", {
        "partial": False, "device": "cpu", "threads": args.threads, "train_items": len(train),
        "fast_only_items": len(fast_only),
        "dev_items": len(dev),
        "test_items": len(test), "teacher_test": teacher_test, "teacher_examples": kept, "teacher_generation_s": gen_s,
        "student": {"params": params(pruned), "teacher_params": params(teacher), "prune_stats": prune_stats,
                    "dev_before_kd": pruned_dev},
        "config": {**cfg.to_dict(), "kd": cfg.kd.to_dict()}, "arms": arms, "checks": checks,
        "wall_s": time.perf_counter() - t_start})
    console.print(f"wrote {path}")


def part_search(args, console: Console) -> None:
    """`pocketlm search small --max-size-mb 8` with the default space (width 0/25/50% + KD × none/int8/int4)."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pocketlm", "search", args.model, "--max-size-mb", str(args.max_size_mb),
               "--threads", str(args.threads), "-o", f"{tmp}/search"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        result = json.loads(Path(f"{tmp}/search/search.json").read_text())
        keep = RESULTS / "search_small"  # the report and its Pareto plots (not the best/ model)
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for name in ("report.md", "report.html", "quality_vs_size.png", "quality_vs_speed.png"):
            shutil.copy(f"{tmp}/search/{name}", keep / name)
    checks = {"candidates_measured": len(result["candidates"]), "at_least_6": len(result["candidates"]) >= 6,
              "best": result["best"], "best_within_budget": result["best"] is not None,
              "pareto_front": result["pareto"]["quality_vs_size"]}
    console.print(checks)
    path = write_result("distill_search", {"device": "cpu", "command": " ".join(cmd[1:]), "search": result,
                                           "checks": checks, "wall_s": wall})
    console.print(f"wrote {path} and {keep}/")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("small", "reasoner", "search"), default="small")
    ap.add_argument("--max-size-mb", type=float, default=8.0, help="search: the size budget")
    ap.add_argument("--steps", type=int, default=420, help="small: KD steps")
    ap.add_argument("--train-items", type=int, default=3000, help="reasoner: arith_train prompts answered slow and fast")
    ap.add_argument("--fast-items", type=int, default=12000, help="reasoner: further arith_train prompts answered fast")
    ap.add_argument("--dev-items", type=int, default=200, help="reasoner: arith_dev items scored each round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=8000, help="reasoner: examples chosen per round")
    ap.add_argument("--round-steps", type=int, default=280)
    args = parse_reference_args(ap)
    console = Console(width=160)
    {"small": part_small, "reasoner": part_reasoner, "search": part_search}[args.part](args, console)


if __name__ == "__main__":
    main()
