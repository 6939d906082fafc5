"""Answer a task file with the dual-system runtime and score it: accuracy, tokens, wall time, rows."""
from __future__ import annotations

import time
from typing import Sequence

from ..eval.quality import extract_answer
from ..progress import progress_bar
from .dual import DualSystem


def run_tasks(dual: DualSystem, items: Sequence[dict], mode: str | None = None, *, chunk: int = 256,
              show_progress: bool = True) -> dict:
    """Answer every item's question in `mode` (None: the runtime's default) and grade it.

    Returns accuracy, mean generated tokens (a rejected fast attempt included), mean thinking tokens,
    the share answered in each mode, wall time (s) and per-item rows."""
    rows = []
    t0 = time.perf_counter()
    chunks = [list(items[i:i + chunk]) for i in range(0, len(items), chunk)]
    for part in progress_bar(chunks, f"{mode or dual.mode} answers", show=show_progress):
        for it, reply in zip(part, dual.answer([it["question"] for it in part], mode)):
            got = extract_answer(reply.answer)
            rows.append({"question": it["question"], "expected": it["answer"], "mode": reply.mode,
                         "reason": reply.reason, "answer": reply.answer, "predicted": got,
                         "correct": got == it["answer"], "tokens": reply.tokens,
                         "thinking_tokens": reply.thinking_tokens, "budget_hit": reply.budget_hit,
                         "confidence": reply.confidence, "p_fast": reply.p_fast, "repairs": reply.repairs})
    wall = time.perf_counter() - t0
    n = len(rows)
    return {"mode": mode or dual.mode, "policy": auto_policy(dual) if (mode or dual.mode) == "auto" else None,
            "think_budget": dual.think_budget, "items": n,
            "accuracy": sum(r["correct"] for r in rows) / n,
            "mean_tokens": sum(r["tokens"] for r in rows) / n,
            "mean_thinking_tokens": sum(r["thinking_tokens"] for r in rows) / n,
            "slow_share": sum(r["mode"] == "slow" for r in rows) / n,
            "wall_s": wall, "rows": rows}


def auto_policy(dual: DualSystem) -> str:
    """What decides in auto mode: the model's own choice (RL-trained), a router rule, or both."""
    if dual.choice is None:
        return dual.policy
    return "own choice" if dual.router is None else f"own choice + router {dual.policy}"
