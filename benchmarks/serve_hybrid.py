"""Hybrid device/server on arith_test: `reasoner` on the "device" answers in fast mode and escalates the
requests its router judges hard to a slow-mode `reasoner` server; then the server goes away.

1. A router is fitted on arith_dev (probe + fast-answer confidence, policy "both"), and re-thresholded
   on the same dev runs for more operating points (token budgets as shares of slow mode's tokens).
2. Two `pocketlm serve` processes on loopback: the server (`--thinking slow`) and, per operating point,
   the device (`--router R --escalate-to SERVER`). Every arith_test item goes to the device as a chat
   request (greedy) at the given concurrency; also all to the device in fast mode (nothing escalated)
   and all straight to the server (everything "escalated").
3. Reported per run: accuracy, share escalated, share answered by the local fallback, mean and p99
   latency (client clock), errors. Then the server is stopped and the default operating point runs
   again: every hard request must come back answered locally, saying so.

Both processes share this machine's cores, so an escalated request's latency here includes no network
but does include the server competing with the device for CPU.

    python benchmarks/serve_hybrid.py [--items 500] [--dev-items 500] [--concurrency 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine, write_result  # noqa: E402
from serve_load import free_port, start  # noqa: E402

console = Console(width=160)
MODEL = str(SHARED / "models" / "reasoner")


def fit_routers(dev_items: list[dict], budgets: list[float], work: Path) -> tuple[dict, dict]:
    """{label: router dir} for the default fit and each token budget (share of slow's mean tokens)."""
    import pocketlm
    from pocketlm.runtime import Generator
    from pocketlm.runtime.dual import DualSystem
    from pocketlm.runtime.router import choose_thresholds, fit_router
    model, tok = pocketlm.load(MODEL)
    t0 = time.perf_counter()
    router, dev = fit_router(DualSystem(Generator(model, tok), mode="fast"), dev_items)
    dev["fit_s"] = time.perf_counter() - t0
    dirs = {"auto (slow − 0.5 pt on dev)": router.save(work / "router-default")}
    for share in budgets:
        budget = share * dev["slow"]["mean_tokens"]
        other = router.with_thresholds(choose_thresholds(router.dev_runs, token_budget=budget))
        dirs[f"auto ({share:.0%} of slow's tokens)"] = other.save(work / f"router-{share:.2f}")
    return dirs, dev


async def ask(client: httpx.AsyncClient, url: str, item: dict, thinking: str | None) -> dict:
    from pocketlm.eval.quality import extract_answer
    body = {"messages": [{"role": "user", "content": item["question"]}], "temperature": 0,
            "max_tokens": 384}
    if thinking:
        body["thinking"] = thinking
    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/v1/chat/completions", json=body)
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}"}
    data = r.json()
    extra = data.get("pocketlm", {})
    return {"latency": latency, "correct": extract_answer(data["choices"][0]["message"]["content"] or "") == item["answer"],
            "answered_by": extra.get("answered_by", "local"), "mode": extra.get("mode"),
            "escalation_error": (extra.get("escalation") or {}).get("error")}


async def run_items(url: str, items: list[dict], concurrency: int, thinking: str | None = None) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def bounded(item):
            async with sem:
                return await ask(client, url, item, thinking)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(it) for it in items))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    n = len(items)
    return {"items": n, "errors": n - len(ok), "wall_s": wall,
            "accuracy": sum(r["correct"] for r in ok) / n,
            "escalated_share": sum(r["answered_by"] == "escalated" for r in ok) / n,
            "fallback_share": sum(r["answered_by"].startswith("local (") for r in ok) / n,
            "slow_share": sum(r["mode"] == "slow" for r in ok) / n,
            "mean_latency_s": statistics.mean(lat) if lat else None,
            "p99_latency_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "fallback_errors": sorted({r["escalation_error"][:80] for r in ok if r.get("escalation_error")})[:3]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=500, help="arith_test items per run")
    ap.add_argument("--dev-items", type=int, default=500, help="arith_dev items the router is fitted on")
    ap.add_argument("--budgets", default="0.3,0.6", help="more operating points: token budgets, share of slow's")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--escalate-timeout", type=float, default=60.0)
    args = ap.parse_args()
    read = lambda name, n: [json.loads(x) for x in (SHARED / "tasks" / name).read_text().splitlines()[:n]]  # noqa: E731
    items, dev_items = read("arith_test.jsonl", args.items), read("arith_dev.jsonl", args.dev_items)
    t0 = time.perf_counter()
    opts = argparse.Namespace(threads=args.threads, concurrency=[args.concurrency], ctx=512, requests=len(items))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        routers, dev = fit_routers(dev_items, [float(x) for x in args.budgets.split(",")], Path(tmp))
        console.print(f"router fitted on {len(dev_items)} dev items in {dev['fit_s']:.0f} s "
                      f"(dev: fast {dev['fast']['accuracy']:.1%}, slow {dev['slow']['accuracy']:.1%})")
        server_port = free_port()
        server = start("pocketlm", Path(MODEL), server_port, opts, ["--thinking", "slow"])
        server_url = f"http://127.0.0.1:{server_port}"

        def device(router: str | None, escalate_to: str):
            port = free_port()
            extra = ["--escalate-timeout", str(args.escalate_timeout)]
            extra += ["--router", router, "--escalate-to", escalate_to + "/v1"] if router else ["--thinking", "fast"]
            return start("pocketlm", Path(MODEL), port, opts, extra), f"http://127.0.0.1:{port}"

        def record(label: str, r: dict) -> None:
            rows.append({"run": label, **r})
            console.print(f"  {label}: accuracy {r['accuracy']:.1%}, escalated {r['escalated_share']:.0%}, "
                          f"fallback {r['fallback_share']:.0%}, mean latency {r['mean_latency_s']:.2f} s, "
                          f"errors {r['errors']}")
        try:
            proc, url = device(None, server_url)
            try:
                record("device fast only", asyncio.run(run_items(url, items, args.concurrency)))
            finally:
                proc.terminate()
                proc.wait(60)
            direct = asyncio.run(run_items(server_url, items, args.concurrency))
            record("server slow only (all sent to it)", {**direct, "escalated_share": 1.0, "direct": True})
            for label, router in routers.items():
                proc, url = device(str(router), server_url)
                try:
                    record(label, asyncio.run(run_items(url, items, args.concurrency)))
                finally:
                    proc.terminate()
                    proc.wait(60)
        finally:
            server.terminate()
            server.wait(60)
        label, router = next(iter(routers.items()))  # the server is down now: the offline fallback
        proc, url = device(str(router), server_url)
        try:
            record(f"{label}, server down", asyncio.run(run_items(url, items, args.concurrency)))
        finally:
            proc.terminate()
            proc.wait(60)
    down, up = rows[-1], rows[2]
    checks = {"errors_zero": all(r["errors"] == 0 for r in rows),
              "fallback_answers_every_hard_request": down["escalated_share"] == 0
              and abs(down["fallback_share"] - up["escalated_share"]) < 0.05,
              "hybrid_beats_fast": up["accuracy"] > rows[0]["accuracy"]}
    t = Table(title=f"hybrid device/server on arith_test ({len(items)} items, concurrency {args.concurrency}, "
                    f"greedy, {args.threads} threads per server)")
    for col in ("run", "accuracy", "escalated", "local fallback", "answered slow", "mean latency s",
                "p99 latency s", "errors"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        t.add_row(r["run"], f"{r['accuracy']:.1%}", f"{r['escalated_share']:.0%}", f"{r['fallback_share']:.0%}",
                  f"{r['slow_share']:.0%}", f"{r['mean_latency_s']:.2f}", f"{r['p99_latency_s']:.2f}", str(r["errors"]))
    console.print(t)
    console.print(f"checks: {checks}")
    out = write_result("serve_hybrid", {"rows": rows, "router_dev": dev, "checks": checks, "settings": vars(args),
                                        "wall_s": time.perf_counter() - t0, "machine": machine()})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
