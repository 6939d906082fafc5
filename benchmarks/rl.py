"""The RL stage on the reference `reasoner` (the RL issue's "Must show"), CPU.

1. Baselines on arith_test.jsonl, greedy: fast, slow, router auto (router fit on arith_dev, the CLI's
   default policy and thresholds).
2. Format warm-up (once; every RL run starts from it): the unswitched prompt learns both modes from the
   model's own switched answers; its own-choice auto mode is reported too (what RL starts from).
3. RL runs from the warmed model on arith_train.jsonl, each for a fixed wall time:
   main (default settings, --main-s), then s = 0, 1, 2 at equal wall time (--compare-s) and the
   ablations without the cost source and without the format source (same wall time, s = 0).
   Each run's artifact answers arith_test in auto mode (its own choice, no router): accuracy, mean
   generated tokens, think rate overall and by difficulty; its per-step curves are kept.
4. Ray vs in-process: the same short fixed-seed run (one thread each) on both backends.

    python benchmarks/rl.py [--threads 2] [--main-s 900] [--compare-s 300]   (curves: results/rl_reasoner_curves.png)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.eval.data import read_tasks
from pocketlm.rl.config import RLConfig
from pocketlm.rl.trainer import train_rl
from pocketlm.rl.warmup import warmup
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem
from pocketlm.runtime.reason import run_tasks
from pocketlm.runtime.router import fit_router
from common import RESULTS, SHARED, write_result

TASKS = SHARED / "tasks"


def own_choice(model, tok, items, switch: str) -> dict:
    """Auto mode on the model's own choice: accuracy, tokens, think rate overall and by difficulty."""
    model.pocketlm_record = {**(model.pocketlm_record or {}), "rl": {"mode_choice": True, "switch": switch}}
    result = run_tasks(DualSystem(Generator(model, tok), mode="auto"), items, "auto", show_progress=False)
    by = {}
    for it, row in zip(items, result["rows"]):
        d = by.setdefault(str(it.get("difficulty")), {"items": 0, "think": 0, "correct": 0})
        d["items"] += 1
        d["think"] += row["mode"] == "slow"
        d["correct"] += row["correct"]
    result["by_difficulty"] = {k: {"items": v["items"], "think_rate": v["think"] / v["items"],
                                   "accuracy": v["correct"] / v["items"]} for k, v in sorted(by.items(), key=lambda x: int(x[0]) if x[0].isdigit() else 0)}
    return result


def summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "rows"}


def rl_run(name: str, warm: Path, train, test, cfg: RLConfig, work: Path, console) -> dict:
    t0 = time.perf_counter()
    res = train_rl(str(warm), train, cfg, work / name, show_progress=False)
    wall = time.perf_counter() - t0
    model, tok = pocketlm.load(work / name)
    ev = own_choice(model, tok, test, cfg.switch)
    curve = [{k: m[k] for k in ("step", "wall_s", "reward", "accuracy", "accuracy_own", "accuracy_think", "tokens",
                                "think_rate", "think_rate_free", "w_cost", "kl", "mean_age", "dropped_stale",
                                "learn_s", "rollout_wait_s")} for m in res["metrics"]]
    console.print(f"{name}: {res['steps']} steps in {wall:.0f} s → test accuracy {ev['accuracy']:.1%}, "
                  f"{ev['mean_tokens']:.1f} tokens, think rate {ev['slow_share']:.0%}")
    return {"config": cfg.to_dict(), "steps": res["steps"], "train_wall_s": wall,
            "steps_per_min": 60 * res["steps"] / wall, "samples_per_s": res["steps"] * cfg.prompts_per_step * cfg.group_size / wall,
            "test": summary(ev), "curve": curve}


def ray_check(warm: Path, train, work: Path, switch: str) -> dict:
    cfg = dict(steps=3, prompts_per_step=4, group_size=4, max_tokens=96, warmup_items=0, micro_batch=8, seed=7,
               switch=switch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        local = train_rl(str(warm), train, RLConfig(**cfg), work / "ray_local", show_progress=False)
        t_local = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t0 = time.perf_counter()
        remote = train_rl(str(warm), train, RLConfig(**cfg, backend="ray"), work / "ray_remote", show_progress=False)
        t_ray = time.perf_counter() - t0
    finally:
        ray.shutdown()
    keys = ("reward", "accuracy", "tokens", "think_rate", "kl")
    rows = [{"step": a["step"], **{f"inprocess_{k}": a[k] for k in keys}, **{f"ray_{k}": b[k] for k in keys}}
            for a, b in zip(local["metrics"], remote["metrics"])]
    same = all(abs(r[f"inprocess_{k}"] - r[f"ray_{k}"]) <= 1e-4 * max(1.0, abs(r[f"inprocess_{k}"]))
               for r in rows for k in keys)
    return {"config": cfg, "steps": rows, "same_within_1e-4": same, "inprocess_s": t_local, "ray_s": t_ray}


def plot_curves(result: dict, path: Path) -> Path:
    """Reward, training accuracy and think rate against wall time for every run (one PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in result["runs"].items():
        t = [m["wall_s"] for m in run["curve"]]
        for ax, key in zip(axes, ("reward", "accuracy", "think_rate_free")):
            ax.plot(t, [m[key] for m in run["curve"]], label=name, lw=1)
    for ax, title in zip(axes, ("reward (normalized sources)", "training accuracy (sampled)", "think rate (unforced)")):
        ax.set_title(title)
        ax.set_xlabel("wall s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "reasoner"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-items", type=int, default=2048)
    ap.add_argument("--main-s", type=float, default=900)
    ap.add_argument("--compare-s", type=float, default=300)
    ap.add_argument("--test-items", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: compare, ablation, ray")
    ap.add_argument("--lr", type=float, default=RLConfig.lr)
    ap.add_argument("--plot-only", action="store_true", help="redraw the curves from the committed JSON")
    ap.add_argument("--switch", default="/any_think",
                    help="the choosing soft switch (5 tokens, as /no_think: see the README)")
    args = ap.parse_args()
    if args.plot_only:
        print(plot_curves(json.loads((RESULTS / "rl_reasoner.json").read_text()), RESULTS / "rl_reasoner_curves.png"))
        return
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    console = Console(width=160)
    t_start = time.perf_counter()
    test = read_tasks(TASKS / "arith_test.jsonl", args.test_items)
    dev = read_tasks(TASKS / "arith_dev.jsonl")
    train = read_tasks(TASKS / "arith_train.jsonl")
    model, tok = pocketlm.load(args.model)
    gen = Generator(model, tok)
    base = DualSystem(gen, mode="fast")
    router, _ = fit_router(base, dev)
    modes = {"fast": run_tasks(base, test, "fast", show_progress=False),
             "slow": run_tasks(base, test, "slow", show_progress=False),
             "router auto": run_tasks(DualSystem(gen, mode="auto", router=router), test, "auto", show_progress=False)}
    slow = modes["slow"]
    console.print(f"baselines done in {time.perf_counter() - t_start:.0f} s")

    work = Path(tempfile.mkdtemp(prefix="pocketlm-rl-bench-"))
    warm_dir = work / "warm"
    cfg0 = RLConfig(warmup_items=args.warmup_items, lr=args.lr, switch=args.switch)
    t0 = time.perf_counter()
    import random
    pool = random.Random(cfg0.seed).sample(train, min(args.warmup_items, len(train)))
    warm_stats = warmup(model, tok, pool, cfg0, show_progress=False)
    pocketlm.save(model, tok, warm_dir)
    console.print(f"warm-up on {warm_stats['items']} items in {time.perf_counter() - t0:.0f} s")
    wm, wt = pocketlm.load(warm_dir)
    modes["warm-up only (own choice)"] = own_choice(wm, wt, test, args.switch)

    common = dict(warmup_items=0, steps=100_000, lr=args.lr, switch=args.switch)
    runs = {"main": rl_run("main", warm_dir, train, test, RLConfig(**common, time_limit_s=args.main_s), work, console)}
    if "compare" not in skip:
        for s in (0, 1, 2):
            runs[f"s={s}"] = rl_run(f"s{s}", warm_dir, train, test,
                                    RLConfig(**common, staleness=s, time_limit_s=args.compare_s), work, console)
    if "ablation" not in skip:
        runs["no cost"] = rl_run("no_cost", warm_dir, train, test,
                                 RLConfig(**common, w_cost=0.0, time_limit_s=args.compare_s), work, console)
        runs["no format"] = rl_run("no_format", warm_dir, train, test,
                                   RLConfig(**common, w_format=0.0, time_limit_s=args.compare_s), work, console)
    modes["RL auto (own choice, main run)"] = runs["main"]["test"]
    ray = ray_check(warm_dir, train, work, args.switch) if "ray" not in skip else None

    table = Table(title=f"reasoner on arith_test ({len(test)} items, greedy, CPU {args.threads} threads)")
    for col in ("mode", "accuracy", "mean tokens", "tokens ÷ slow", "think rate"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for name, r in modes.items():
        table.add_row(name, f"{r['accuracy']:.1%}", f"{r['mean_tokens']:.1f}",
                      f"{r['mean_tokens'] / slow['mean_tokens']:.0%}", f"{r['slow_share']:.0%}")
    console.print(table)
    table = Table(title="RL runs (each from the same warm-up; test = own-choice auto mode on arith_test)")
    for col in ("run", "wall s", "steps", "samples/s", "train reward (last 5)", "train acc (last 5)", "test accuracy",
                "test tokens", "think rate"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in runs.items():
        tail = r["curve"][-5:]
        table.add_row(name, f"{r['train_wall_s']:.0f}", str(r["steps"]), f"{r['samples_per_s']:.2f}",
                      f"{sum(m['reward'] for m in tail) / len(tail):.3f}",
                      f"{sum(m['accuracy'] for m in tail) / len(tail):.1%}", f"{r['test']['accuracy']:.1%}",
                      f"{r['test']['mean_tokens']:.1f}", f"{r['test']['slow_share']:.0%}")
    console.print(table)
    rl = runs["main"]["test"]
    checks = {"RL auto accuracy ≥ slow − 1 point": rl["accuracy"] >= slow["accuracy"] - 0.01 - 1e-9,
              "RL auto tokens ≤ 40% of slow": rl["mean_tokens"] <= 0.4 * slow["mean_tokens"]}
    if ray is not None:
        checks["Ray backend = in-process (same seed, within 1e-4)"] = ray["same_within_1e-4"]
        console.print(f"Ray vs in-process: same within 1e-4: {ray['same_within_1e-4']} "
                      f"({ray['inprocess_s']:.0f} s in-process, {ray['ray_s']:.0f} s on Ray)")
    for k, v in checks.items():
        console.print(f"{'PASS' if v else 'FAIL'}  {k}")
    path = write_result("rl_reasoner", {
        "wall_s": time.perf_counter() - t_start, "threads": args.threads,
        "modes": {k: summary(v) for k, v in modes.items()}, "warmup": warm_stats, "runs": runs, "ray": ray,
        "checks": checks})
    console.print(f"wrote {path}, {plot_curves(json.loads(path.read_text()), RESULTS / 'rl_reasoner_curves.png')}")


if __name__ == "__main__":
    main()
