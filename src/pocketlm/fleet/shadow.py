"""Shadow run: a candidate answers the incumbent's requests beside it, without affecting any answer.

For each request (JSONL: `prompt` or chat `messages`, optional `answer` for the task checker and
`max_tokens`) both models decode greedily, in alternating order (shared machines drift); the report
holds, per model, task accuracy, latency p50/p95, tokens/s, weights and resident memory, perplexity
on held-out text; and for the candidate its agreement with the incumbent (exact output match), the
mean KL(incumbent ‖ candidate) over the incumbent's own output tokens, and its perplexity ratio.
The report's `candidate` / `incumbent` sections are what `pocketlm gate` checks.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import psutil
import torch

from ..errors import DataError
from ..progress import progress_bar


def read_requests(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        rows = [json.loads(x) for x in lines]
    except OSError:
        raise DataError(f"requests file '{path}' cannot be read", "pass a JSONL file, one request per line") from None
    except ValueError as e:
        raise DataError(f"requests file '{path}' is not JSONL ({e})", "write one JSON object per line") from None
    if not rows:
        raise DataError(f"requests file '{path}' is empty", "give at least one request")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not (isinstance(r.get("prompt"), str) or isinstance(r.get("messages"), list)):
            raise DataError(f"request {i + 1} of '{path}' has neither a 'prompt' string nor 'messages'",
                            'write e.g. {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}')
    return rows


def prompt_ids(tok, request: dict) -> list[int]:
    if "messages" in request:
        text = tok.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(request["prompt"])["input_ids"]


class _Side:
    """One model of the pair, loaded, with its generator and measurements."""

    def __init__(self, name: str):
        import pocketlm
        from ..eval.efficiency import disk_bytes
        from ..runtime import Generator
        before = psutil.Process().memory_info().rss
        self.model, self.tok = pocketlm.load(name)
        self.rss_mb = (psutil.Process().memory_info().rss - before) / 2**20
        self.name, self.gen = name, Generator(self.model, self.tok)
        self.disk_mb = (disk_bytes(self.model.pocketlm_source.path) or 0) / 2**20
        self.rows: list[dict] = []

    def answer(self, request: dict, max_tokens: int) -> dict:
        ids = prompt_ids(self.tok, request)
        t0 = time.perf_counter()
        tokens = [r.token for r in self.gen.stream_generate(ids, request.get("max_tokens", max_tokens))]
        latency = time.perf_counter() - t0
        if tokens and tokens[-1] in self.gen.stop_tokens:
            tokens = tokens[:-1]
        return {"ids": ids, "tokens": tokens, "text": self.tok.decode(tokens, skip_special_tokens=True),
                "latency_ms": latency * 1000}


@torch.inference_mode()
def _kl_on(inc: _Side, cand: _Side, ids: list[int], tokens: list[int]) -> float | None:
    """Mean KL(incumbent ‖ candidate) over the positions that predicted the incumbent's output."""
    if not tokens:
        return None
    x = torch.tensor([ids + tokens])
    P = len(ids)
    p = inc.model(input_ids=x).logits[0, P - 1:-1].float().log_softmax(-1)
    q = cand.model(input_ids=x).logits[0, P - 1:-1].float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _summary(side: _Side, requests: list[dict], ppl: float | None) -> dict:
    from ..eval.quality import extract_answer
    lat = sorted(r["latency_ms"] for r in side.rows)
    tokens = sum(len(r["tokens"]) for r in side.rows)
    out = {"model": side.name, "requests": len(lat), "p50_latency_ms": statistics.median(lat),
           "p95_latency_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
           "tokens_per_s": tokens / (sum(lat) / 1000), "mean_tokens": tokens / len(lat),
           "disk_mb": side.disk_mb, "rss_mb": side.rss_mb, "ppl": ppl}
    checked = [(r, q) for r, q in zip(side.rows, requests) if "answer" in q]
    if checked:
        out["task_accuracy"] = sum(extract_answer(r["text"]) == str(q["answer"]) for r, q in checked) / len(checked)
    return out


def run_shadow(incumbent: str, candidate: str, requests: list[dict], *, max_tokens: int = 64,
               ppl_tokens: int = 8192, show_progress: bool = True) -> dict:
    """Both models on every request; the report described in the module docstring."""
    from ..eval.data import read_text, token_windows
    from ..eval.quality import score_windows
    t0 = time.perf_counter()
    inc, cand = _Side(incumbent), _Side(candidate)
    rows = []
    for i, req in enumerate(progress_bar(requests, "shadow requests", show=show_progress)):
        order = (inc, cand) if i % 2 == 0 else (cand, inc)
        got = {id(s): s.answer(req, max_tokens) for s in order}
        a, b = got[id(inc)], got[id(cand)]
        inc.rows.append(a)
        cand.rows.append(b)
        rows.append({"request": i, "incumbent": a["text"], "candidate": b["text"], "exact": a["tokens"] == b["tokens"],
                     "kl": _kl_on(inc, cand, a["ids"], a["tokens"]),
                     "latency_ms": {"incumbent": a["latency_ms"], "candidate": b["latency_ms"]}})
    ppl = {}
    if ppl_tokens:
        path, text = read_text(None)
        for side in (inc, cand):
            windows = token_windows(side.tok, text, path, ppl_tokens, 512)
            ppl[id(side)] = score_windows(side.model, windows, show_progress=False)["ppl"]
    report = {"incumbent": _summary(inc, requests, ppl.get(id(inc))),
              "candidate": _summary(cand, requests, ppl.get(id(cand)))}
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    report["candidate"].update(agreement=sum(r["exact"] for r in rows) / len(rows),
                               kl_mean=statistics.mean(kls) if kls else None,
                               ppl_ratio=ppl[id(cand)] / ppl[id(inc)] if ppl else None)
    report["incumbent"].update(agreement=1.0, kl_mean=0.0, ppl_ratio=1.0 if ppl else None)
    report.update(rows=rows, max_tokens=max_tokens, ppl_tokens=ppl_tokens, wall_s=time.perf_counter() - t0,
                  threads=torch.get_num_threads())
    return report
