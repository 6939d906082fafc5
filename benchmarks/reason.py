"""The dual-system runtime on the reference `reasoner` (the reasoning issue's "Must show").

- Router fit on arith_dev.jsonl (probe + thresholds for slow accuracy − 0.5 point on dev, the CLI's
  default), then on arith_test.jsonl, greedy: fast, slow, (a) probe, (b) confidence escalation,
  (a+b) both, the oracle (fast when fast is right, from the fast and slow runs), and (a+b) at two
  more operating points chosen on dev (slow − 1 point; 40% of slow's tokens): accuracy, mean
  generated tokens, share answered slow, wall time. The checks judge the default (a+b) and the one
  fit for 40% of slow's tokens (`router fit --token-budget`).
- Router frontier: the same fit on a larger labelled pool (4,000 arith_train items + dev): accuracy lost vs
  slow at 36–50% of slow's tokens, and the pool's 40%-budget thresholds run on the test set.
- Thinking budget: accuracy and tokens vs budget (0, 16, 32, 64, 128, unlimited), with the closing
  phrase (default), with a bare `</think>`, and with the fast-mode fallback.
- Self-repair: 200 prompts from test.txt with `tiny` (greedy, 128 tokens): share of outputs with a loop
  before and after repair, and whether every output that was never repaired is identical.

    python benchmarks/reason.py [--threads 2] [--budget-items 500] [--pool-items 4000]
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.eval.data import read_tasks
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem
from pocketlm.runtime.reason import run_tasks
from pocketlm.runtime.repair import RepairConfig, has_loop
from pocketlm.runtime.router import choose_thresholds, fit_router
from pocketlm.runtime.rows import decode_rows
from common import SHARED, write_result

TASKS = SHARED / "tasks"


def summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "rows"}


def oracle(fast: dict, slow: dict) -> dict:
    """Fast when fast is right, else slow (only the slow run's tokens: the oracle knows in advance)."""
    rows = [f if f["correct"] else s for f, s in zip(fast["rows"], slow["rows"])]
    n = len(rows)
    return {"mode": "oracle", "items": n, "accuracy": sum(r["correct"] for r in rows) / n,
            "mean_tokens": sum(r["tokens"] for r in rows) / n,
            "slow_share": sum(not f["correct"] for f in fast["rows"]) / n, "wall_s": None}


def routing(gen, items, dev_items, console) -> dict:
    base = DualSystem(gen, mode="fast")
    t0 = time.perf_counter()
    router, dev = fit_router(base, dev_items)
    fit_s = time.perf_counter() - t0
    console.print(f"router fit on {len(dev_items)} dev items in {fit_s:.0f} s: probe AUC {dev['probe_auc']:.3f}, "
                  f"confidence AUC {dev['confidence_auc']:.3f}")
    runs = {"fast": run_tasks(base, items, "fast"), "slow": run_tasks(base, items, "slow")}
    runs["oracle"] = oracle(runs["fast"], runs["slow"])
    for policy, label in (("probe", "(a) probe"), ("confidence", "(b) confidence"), ("both", "(a+b) both")):
        runs[label] = run_tasks(DualSystem(gen, mode="auto", router=router, policy=policy), items, "auto")
    # other operating points of the same probe, chosen on dev only: slow − 1 point, 40% of slow's tokens
    others = {"(a+b) dev target slow − 1 pt": {"target_accuracy": dev["slow"]["accuracy"] - 0.01},
              "(a+b) dev budget 40% tokens": {"token_budget": 0.4 * dev["slow"]["mean_tokens"]}}
    thresholds = {}
    for label, target in others.items():
        thresholds[label] = choose_thresholds(router.dev_runs, **target)
        other = router.with_thresholds(thresholds[label])
        runs[label] = run_tasks(DualSystem(gen, mode="auto", router=other, policy="both"), items, "auto")
    return {"router_fit_s": fit_s, "dev": dev, "other_thresholds": thresholds, "runs": runs}


FRONTIER = (0.36, 0.38, 0.40, 0.42, 0.45, 0.50)


def frontier(gen, items, pool_items, console) -> dict:
    """How much accuracy auto gives up at each share of slow's tokens, on a larger labelled pool (train
    items + dev, out-of-fold probe scores), so the answer does not hang on 1,000 dev items; then the
    pool's thresholds for 40% of slow's tokens, run on the test set."""
    t0 = time.perf_counter()
    router, pool = fit_router(DualSystem(gen, mode="fast"), pool_items)
    slow_acc, slow_tokens = pool["slow"]["accuracy"], pool["slow"]["mean_tokens"]
    chosen = {share: choose_thresholds(router.dev_runs, token_budget=share * slow_tokens) for share in FRONTIER}
    points = [{"token_share": share, **{policy: {"accuracy_drop": slow_acc - t["dev_accuracy"],
                                                 "tokens_share": t["dev_mean_tokens"] / slow_tokens, **t}
                                        for policy, t in chosen[share].items()}} for share in FRONTIER]
    at40 = router.with_thresholds(chosen[0.40])
    test = run_tasks(DualSystem(gen, mode="auto", router=at40, policy="both"), items, "auto")
    console.print(f"router pool of {len(pool_items)} labelled items fit and replayed in {time.perf_counter() - t0:.0f} s")
    return {"pool": pool, "points": points, "test_run": test}


def budgets(gen, items, levels) -> list[dict]:
    out = []
    variants = {"phrase": {}, "bare </think>": {"budget_close": "\n</think>\n\n"},
                "fast fallback": {"budget_fallback": "fast"}}
    for name, options in variants.items():
        for b in levels:
            r = run_tasks(DualSystem(gen, think_budget=b, **options), items, "slow", show_progress=False)
            out.append({"variant": name, "budget": b, **summary(r),
                         "budget_hit_share": sum(row["budget_hit"] for row in r["rows"]) / len(items)})
    return out


def repair_prompts(tok, n: int, length: int = 32) -> list[list[int]]:
    """n prompts of `length` tokens, each from the start of a line at evenly spaced offsets of test.txt."""
    text = (SHARED / "corpus" / "test.txt").read_text()
    step = len(text) // n
    prompts = []
    for i in range(n):
        start = text.find("\n", i * step) + 1
        prompts.append(tok(text[start:start + 8 * length], add_special_tokens=False)["input_ids"][:length])
    return prompts


def self_repair(n_prompts: int, new_tokens: int) -> dict:
    model, tok = pocketlm.load("tiny")
    gen = Generator(model, tok)
    cfg = RepairConfig()
    prompts = repair_prompts(tok, n_prompts)
    t0 = time.perf_counter()
    for plain in decode_rows(gen, prompts, new_tokens, stops=set()):
        pass
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    for fixed in decode_rows(gen, prompts, new_tokens, repair=cfg, stops=set()):
        pass
    t_fixed = time.perf_counter() - t0
    before = sum(has_loop(r.tokens, cfg) for r in plain) / n_prompts
    after = sum(has_loop(r.tokens, cfg) for r in fixed) / n_prompts
    untouched = [(p.tokens == f.tokens) for p, f in zip(plain, fixed) if f.repairs == 0]
    return {"prompts": n_prompts, "new_tokens": new_tokens, "config": cfg.to_dict(),
            "loop_share_before": before, "loop_share_after": after,
            "repaired_outputs": sum(f.repairs > 0 for f in fixed), "repairs": sum(f.repairs for f in fixed),
            "rolled_back_tokens": sum(f.dropped for f in fixed),
            "unrepaired_outputs": len(untouched), "unrepaired_identical": all(untouched),
            "wall_s_plain": t_plain, "wall_s_repair": t_fixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "reasoner"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-items", type=int, default=500, help="test items for the budget sweep")
    ap.add_argument("--budgets", default="0,16,32,64,128")
    ap.add_argument("--pool-items", type=int, default=4000,
                    help="arith_train items added to dev for the router frontier (0: skip it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    model, tok = pocketlm.load(args.model)
    gen = Generator(model, tok)
    items, dev_items = read_tasks(TASKS / "arith_test.jsonl"), read_tasks(TASKS / "arith_dev.jsonl")
    t_start = time.perf_counter()

    routed = routing(gen, items, dev_items, console)
    runs = routed["runs"]
    slow = runs["slow"]
    table = Table(title=f"reasoner on arith_test.jsonl ({len(items)} items, greedy, CPU {args.threads} threads)")
    for col in ("mode", "accuracy", "mean tokens", "tokens ÷ slow", "answered slow", "wall s"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for name, r in runs.items():
        table.add_row(name, f"{r['accuracy']:.1%}", f"{r['mean_tokens']:.1f}",
                      f"{r['mean_tokens'] / slow['mean_tokens']:.0%}", f"{r['slow_share']:.0%}",
                      "" if r["wall_s"] is None else f"{r['wall_s']:.1f}")
    console.print(table)
    checks = {}
    for label, name in (("default router", "(a+b) both"), ("router fit for 40% tokens", "(a+b) dev budget 40% tokens")):
        r = runs[name]
        checks[f"{label}: auto accuracy ≥ slow − 1 point"] = r["accuracy"] >= slow["accuracy"] - 0.01 - 1e-9
        checks[f"{label}: auto tokens ≤ 40% of slow"] = r["mean_tokens"] <= 0.4 * slow["mean_tokens"]

    front = None
    if args.pool_items:
        pool_items = read_tasks(TASKS / "arith_train.jsonl", args.pool_items) + dev_items
        front = frontier(gen, items, pool_items, console)
        table = Table(title=f"router frontier on {len(pool_items)} labelled items (train + dev): accuracy lost "
                            f"vs slow ({front['pool']['slow']['accuracy']:.1%}) at a share of slow's tokens")
        for col in ("token budget", "(b) confidence: points lost", "tokens", "(a+b) both: points lost", "tokens"):
            table.add_column(col, justify="right")
        for p in front["points"]:
            table.add_row(f"{p['token_share']:.0%}", f"{100 * p['confidence']['accuracy_drop']:.2f}",
                          f"{p['confidence']['tokens_share']:.1%}", f"{100 * p['both']['accuracy_drop']:.2f}",
                          f"{p['both']['tokens_share']:.1%}")
        console.print(table)
        r = front["test_run"]
        console.print(f"pool thresholds for 40% of slow's tokens, on test: {r['accuracy']:.1%} "
                      f"(slow {slow['accuracy']:.1%}) at {r['mean_tokens'] / slow['mean_tokens']:.0%} of slow's tokens")
        checks["router fit on train+dev for 40% tokens: auto accuracy ≥ slow − 1 point"] = \
            r["accuracy"] >= slow["accuracy"] - 0.01 - 1e-9
        checks["router fit on train+dev for 40% tokens: auto tokens ≤ 40% of slow"] = \
            r["mean_tokens"] <= 0.4 * slow["mean_tokens"]

    levels = [int(b) for b in args.budgets.split(",")] + [None]
    sweep = budgets(gen, items[:args.budget_items], levels)
    table = Table(title=f"thinking budget (slow mode, first {args.budget_items} test items)")
    for col in ("closing", "budget", "accuracy", "mean tokens", "thinking tokens", "budget hit"):
        table.add_column(col, justify="left" if col == "closing" else "right")
    for r in sweep:
        table.add_row(r["variant"], "unlimited" if r["budget"] is None else str(r["budget"]), f"{r['accuracy']:.1%}",
                      f"{r['mean_tokens']:.1f}", f"{r['mean_thinking_tokens']:.1f}", f"{r['budget_hit_share']:.0%}")
    console.print(table)

    rep = self_repair(200, 128)
    console.print(f"self-repair, tiny, {rep['prompts']} prompts × {rep['new_tokens']} tokens: outputs with a loop "
                  f"{rep['loop_share_before']:.0%} → {rep['loop_share_after']:.0%} ({rep['repairs']} repairs, "
                  f"{rep['rolled_back_tokens']} tokens rolled back); the {rep['unrepaired_outputs']} never-repaired "
                  f"outputs identical: {rep['unrepaired_identical']}")
    checks["never-repaired outputs identical"] = rep["unrepaired_identical"]
    checks["fewer looping outputs after repair"] = rep["loop_share_after"] < rep["loop_share_before"]
    for name, ok in checks.items():
        console.print(f"{'PASS' if ok else 'MISS'}  {name}")
    wall = time.perf_counter() - t_start
    path = write_result("reason_reasoner", {
        "device": "cpu", "wall_s": wall, "router": {k: v for k, v in routed.items() if k != "runs"},
        "modes": {name: summary(r) for name, r in runs.items()},
        "rows_auto_both": runs["(a+b) both"]["rows"],
        "frontier": None if front is None else {"pool": front["pool"], "points": front["points"],
                                                "test_run": summary(front["test_run"])},
        "thinking_budget": sweep, "self_repair": rep, "checks": checks})
    console.print(f"wall time {wall / 60:.1f} min · wrote {path}")


if __name__ == "__main__":
    main()
