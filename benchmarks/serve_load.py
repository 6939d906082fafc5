"""Bounded load on loopback: `pocketlm serve` against llama-cpp-python's server on the same weights.

For each model pair (pocketlm artifact, llama.cpp GGUF made from the same fp32 weights) and each
concurrency level, both servers get the same streamed /v1/completions requests (greedy, fixed
max_tokens, prompts from the reference test split). Reported per run: request throughput, output
tok/s, TTFT and inter-token latency p50/p99 (from the client's clock), errors. Servers run one at a
time on --threads threads, each in its own process.

    python benchmarks/serve_load.py [--models smollm2-int8,smollm2-int4,small] [--concurrency 1,4,16]
                                    [--requests 32] [--max-tokens 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine, write_result  # noqa: E402

console = Console(width=160)
MODELS = {  # name → (pocketlm source, compression, llama.cpp quant type)
    "smollm2-int8": ("smollm2", {"bits": 8}, "Q8_0"),
    "smollm2-int4": ("smollm2", {"bits": 4, "group_size": 32}, "Q4_0"),
    "small": (str(SHARED / "models" / "small"), None, "F16"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(name: str, work: Path, threads: int) -> tuple[Path, Path]:
    """(pocketlm artifact dir, llama.cpp GGUF), both from the same fp32 weights."""
    import pocketlm
    import llamacpp
    from pocketlm.compress import RTNConfig, compress_
    from pocketlm.gguf_export import export_gguf
    source, quant, qtype = MODELS[name]
    model, tok = pocketlm.load(source)
    f16 = work / f"{name}-f16.gguf"
    export_gguf(model, tok, f16, "F16")
    gguf = f16
    if qtype != "F16":
        gguf = work / f"{name}-{qtype}.gguf"
        llamacpp.quantize(str(f16), str(gguf), qtype, threads)
    if quant is not None:
        compress_(model, RTNConfig(**quant, head=True), tok=tok, show_progress=False)
    art = work / name
    pocketlm.save(model, tok, art, overwrite=True)
    return art, gguf


def start(kind: str, path: Path, port: int, args, extra: list[str] = ()) -> subprocess.Popen:
    """A server process on 127.0.0.1:port, returned once it answers (pocketlm: once /health is 200)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if kind == "pocketlm":
        cmd = [sys.executable, "-m", "pocketlm.cli", "serve", str(path), "--port", str(port), "--threads",
               str(args.threads), "--parallel", str(max(args.concurrency)), "--ctx-size", str(args.ctx),
               "--queue-size", str(args.requests), "--model-id", "m", *extra]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx),
               "--model_alias", "m", "--interrupt_requests", "False"]  # its default cuts a stream when the next arrives
    log = open(Path(tempfile.gettempdir()) / f"serve_load-{kind}-{port}.log", "w+")  # a pipe left unread would block it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                if kind != "pocketlm" or httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            raise RuntimeError(f"{kind} server did not start: {log.read()[-2000:]}")
        time.sleep(0.25)


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"]
                if choice and choice[0].get("text"):
                    stamps.append(time.perf_counter())
                    tokens += 1  # one streamed piece per token on both servers
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    if not stamps:
        return {"error": "no tokens"}
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "latency": time.perf_counter() - t0}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def bounded(p):
            async with sem:
                return await one(client, url, p, max_tokens)
        await one(client, url, prompts[0], 4)  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    itl = sorted(x for r in ok for x in r["itl"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else None
    return {"requests": len(prompts), "errors": len(results) - len(ok), "wall_s": wall,
            "req_s": len(ok) / wall, "out_tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "itl_ms_p50": pct(itl, 0.5), "itl_ms_p99": pct(itl, 0.99),
            "mean_latency_s": statistics.mean(r["latency"] for r in ok) if ok else None,
            "mean_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0,
            "error_kinds": sorted({r["error"] for r in results if "error" in r})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-int8,smollm2-int4,small")
    ap.add_argument("--concurrency", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    text = (SHARED / "corpus" / "test.txt").read_text().split()
    prompts = [" ".join(text[i * 24:(i + 1) * 24]) for i in range(args.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            art, gguf = prepare(name, Path(tmp), args.threads)
            for kind, path in (("pocketlm", art), ("llama-cpp-python", gguf)):
                port = free_port()
                proc = start(kind, path, port, args)
                try:
                    for c in args.concurrency:
                        r = asyncio.run(load(f"http://127.0.0.1:{port}", prompts, c, args.max_tokens))
                        rows.append({"model": name, "server": kind, "concurrency": c, **r})
                        console.print(f"  {name} {kind} c={c}: {r['out_tok_s']:.1f} tok/s, "
                                      f"TTFT p99 {r['ttft_ms_p99']:.0f} ms, errors {r['errors']}")
                finally:
                    proc.terminate()
                    proc.wait(60)
    ratios = {}
    for r in rows:
        if r["server"] == "pocketlm":
            peer = next(x for x in rows if x["server"] != "pocketlm" and x["model"] == r["model"]
                        and x["concurrency"] == r["concurrency"])
            ratios[f"{r['model']} c={r['concurrency']}"] = {
                "out_tok_s": r["out_tok_s"] / peer["out_tok_s"],
                "ttft_p99": r["ttft_ms_p99"] / peer["ttft_ms_p99"]}
    t = Table(title=f"serve load on loopback ({args.requests} requests per run, {args.max_tokens} tokens each, "
                    f"greedy, {args.threads} threads)")
    for col in ("model", "server", "conc.", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                "ITL p99 ms", "errors", "× peer tok/s"):
        t.add_column(col, justify="right")
    for r in rows:
        ratio = ratios.get(f"{r['model']} c={r['concurrency']}", {}).get("out_tok_s") if r["server"] == "pocketlm" else None
        t.add_row(r["model"], r["server"], str(r["concurrency"]), f"{r['req_s']:.2f}", f"{r['out_tok_s']:.1f}",
                  f"{r['ttft_ms_p50']:.0f}", f"{r['ttft_ms_p99']:.0f}", f"{r['itl_ms_p50']:.0f}",
                  f"{r['itl_ms_p99']:.0f}", str(r["errors"]), f"{ratio:.2f}" if ratio else "")
    console.print(t)
    out = write_result("serve_load", {"rows": rows, "ratio_pocketlm_to_llamacpp": ratios, "settings": vars(args),
                                      "machine": machine()})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
