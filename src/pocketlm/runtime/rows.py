"""Decode a batch row by row: stop tokens, forced tokens and self-repair on top of a `Decoding`.

This is the loop that the dual-system runtime and `generate --repair` share; `Generator.generate_step`
stays the plain loop (no per-row bookkeeping) that the speed benchmarks time.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch

from .generate import Generator
from .repair import RepairConfig, find_loop
from .sampling import SamplingConfig


@dataclasses.dataclass
class Row:
    """One request's output so far."""

    tokens: list[int] = dataclasses.field(default_factory=list)    # kept tokens (stop token excluded)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish: str | None = None        # 'stop', 'length', 'aborted', 'skipped' (never decoded) or None while running
    repairs: int = 0                 # loops rolled back
    dropped: int = 0                 # tokens thrown away by rollbacks
    forced: int = 0                  # tokens written by the caller's `force` hook, not chosen by the model
    queue: list[int] = dataclasses.field(default_factory=list)    # forced tokens still to write
    ban: dict[int, float] = dataclasses.field(default_factory=dict)  # token → logit penalty (inf = banned)
    ban_left: int = 0                # steps the penalties stay on
    stop_logprob: float | None = None  # log-probability of the stop token, once it came
    stop_token: int | None = None      # which stop token it was

    @property
    def generated(self) -> int:
        """Tokens the model produced for this row, the stop token and rolled-back tokens included."""
        return len(self.tokens) + self.dropped + (self.finish == "stop")


def decode_rows(gen: Generator, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int],
                sampling: SamplingConfig = SamplingConfig(), *, repair: RepairConfig | None = None,
                force: Callable[[int, Row], list[int] | None] | None = None,
                capture: list | None = None,
                on_start: Callable[[list[Row]], None] | None = None,
                stops: set[int] | None = None,
                abort: Callable[[int, Row], bool] | None = None,
                start: Sequence[Row] | None = None) -> Iterator[list[Row]]:
    """Decode `prompts` as one batch; yield the rows after every step (the last yield has all finished).

    max_tokens: per batch or per row (kept tokens). repair: roll loops back (None: off). force(i, row):
    called after each kept token, returns tokens to write next in place of the model's choices (e.g. the
    close of a think block). capture: the prompts' hidden states (see FastDecoder), filled at the
    prefill; on_start(rows) runs right after it, and may mark rows finished 'skipped' (e.g. a router
    that sends them elsewhere). stops: tokens that end a row (default: the
    generator's end-of-sequence tokens). abort(i, row): called after each kept token; True ends
    the row at once with finish 'aborted' (the token stays counted). start: the rows to begin from, e.g.
    with forced first tokens in `queue` or a first-step `ban` (ban_left=1); default empty rows.
    """
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    most = max(limits)
    slack = most * repair.max_repairs if repair is not None else 0  # rolled-back slots stay used
    steps = min(most + slack, gen.max_context - max(len(p) for p in prompts))
    rows = list(start) if start is not None else [Row() for _ in prompts]
    edits = repair is not None or any(r.ban for r in rows)
    run = gen.start(prompts, steps, sampling, logits=edits, capture=capture)
    if on_start is not None:
        on_start(rows)
    stops = gen.stop_tokens if stops is None else stops
    while True:
        tokens, logprobs = run.choose(_penalized(run, rows) if edits else None)
        feed, chosen, chosen_lp = tokens.clone(), tokens.tolist(), logprobs.tolist()
        for i, row in enumerate(rows):
            if row.finish is not None:
                continue
            token, lp = chosen[i], chosen_lp[i]
            if row.queue:
                token, lp = row.queue.pop(0), 0.0
                row.forced += 1
            feed[i] = token
            if row.ban_left:  # the ban held for this choice; afterwards only the penalty, then nothing
                row.ban_left -= 1
                row.ban = {t: min(p, repair.penalty) for t, p in row.ban.items()} if row.ban_left else {}
            if token in stops:
                row.finish, row.stop_logprob, row.stop_token = "stop", lp, token
                continue
            row.tokens.append(token)
            row.logprobs.append(lp)
            if abort is not None and abort(i, row):
                row.finish = "aborted"
                continue
            start = find_loop(row.tokens, repair) if repair is not None and row.repairs < repair.max_repairs \
                else None
            if start is not None:
                looped = row.tokens[start:]
                run.forget(i, len(row.tokens) - start)  # the fed copy of tokens[start-1:] goes too ...
                feed[i] = row.tokens[start - 1]          # ... and tokens[start-1] is fed again
                row.dropped += len(looped)
                del row.tokens[start:], row.logprobs[start:]
                row.repairs += 1
                row.ban = {t: repair.penalty for t in looped}
                row.ban[looped[0]] = float("inf")
                row.ban_left = repair.penalty_tokens + 1  # the banned choice, then the penalized ones
                continue
            if len(row.tokens) >= limits[i]:
                row.finish = "length"
            elif force is not None and not row.queue:
                row.queue.extend(force(i, row) or [])
        if all(r.finish is not None for r in rows) or run.room < 1:
            for r in rows:
                r.finish = r.finish or "length"
            yield rows
            return
        yield rows
        run.advance(feed)


def _penalized(run, rows: list[Row]) -> torch.Tensor | None:
    """The current logits with each row's repair penalties applied (None when no row has any)."""
    if not any(r.ban for r in rows):
        return None
    logits = run.logits().clone()
    for i, r in enumerate(rows):
        for t, pen in r.ban.items():
            logits[i, t] = float("-inf") if pen == float("inf") else logits[i, t] - pen
    return logits
