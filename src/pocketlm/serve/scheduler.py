"""Continuous batching: requests join and leave the running batch between decode steps.

One engine thread owns the model. Each loop: drop cancelled requests, admit waiting ones into free
slots (each prefilled in its own row), choose one token per running row, then one batched decode step.
Per row it applies the request's sampling, stop tokens and strings, the thinking budget (the close of
the think block is forced after N thinking tokens), repetition self-repair (a loop is rolled back
and blocked), and auto mode (the router's probe at the prefill, or a fast answer held back until its
confidence is known; a hard request is answered in slow mode, or handed back for escalation).
Events go back to each request's `emit` callback; an error in one request ends only that request.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Callable

import torch

from ..runtime.generate import Generator, _TextStream
from ..runtime.repair import RepairConfig, find_loop, rollback_floor
from ..runtime.sampling import SamplingConfig, sample
from .slots import SlotBatch


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


@dataclasses.dataclass
class Thinking:
    """How a request's think block is handled: the tokens that open and close it, the budget."""

    open_id: int
    close_id: int
    close_ids: list[int]          # forced when the budget is spent (a closing phrase, then </think>)
    budget: int | None = None     # most thinking tokens (None: unlimited)


@dataclasses.dataclass
class Job:
    """One request as the engine runs it. `emit(kind, data)` receives, in order: ('think' | 'content',
    piece) per final token, ('hard', reason) when auto mode hands the request back for escalation,
    then ('done', summary) or ('error', message)."""

    ids: list[int]
    max_tokens: int
    emit: Callable[[str, dict], None]
    sampling: SamplingConfig = SamplingConfig()
    stop_strings: tuple[str, ...] = ()
    stops: frozenset[int] = frozenset()
    repair: RepairConfig | None = None
    thinking: Thinking | None = None
    mode: str = "fast"                      # 'fast' or 'slow' (what `ids` renders), or 'auto'
    slow_ids: list[int] | None = None       # auto: the slow-mode prompt a hard request switches to
    probe: Callable[[list], float] | None = None  # auto: p_fast from the prompt's hidden states
    probe_threshold: float = -math.inf
    confidence_threshold: float | None = None     # auto: a fast token below this makes it hard
    escalate: bool = False                  # auto: hand a hard request back instead of thinking locally
    top_logprobs: int = 0
    want_logprobs: bool = False
    source: str = "default"                 # where the mode came from (requested, soft switch, ...)
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


class _Row:
    """A running job's decoding state."""

    def __init__(self, job: Job, ids: list[int], mode: str, tokenizer):
        self.job, self.ids, self.mode = job, ids, mode
        self.tokens: list[int] = []
        self.info: list[dict] = []            # per kept token: logprob (and top alternatives)
        self.queue: list[int] = []            # forced tokens still to write
        self.ban: dict[int, float] = {}
        self.ban_left = 0
        self.repairs = self.dropped = self.forced = 0
        self.spent = 0                        # tokens of an abandoned fast attempt
        self.sent = 0                         # tokens already emitted
        # Fast-mode prompts close the think block themselves; slow ones let the model open it.
        self.phase = "content"
        self.streams = {"think": _TextStream(tokenizer, ()), "content": _TextStream(tokenizer, job.stop_strings)}
        # auto mode's fast attempt is shown only once its confidence is known
        self.hold = mode == "auto-fast" and job.confidence_threshold is not None
        self.reason = job.source
        self.budget_hit = False
        self.finish: str | None = None
        self.last_emit: float | None = None
        self.rng: torch.Generator | None = None

    def think_tokens(self) -> int:
        t = self.job.thinking
        if t is None or t.open_id not in self.tokens:
            return 0
        start = self.tokens.index(t.open_id) + 1
        end = self.tokens.index(t.close_id) if t.close_id in self.tokens else len(self.tokens)
        forced = min(self.forced, t.close_ids.index(t.close_id))  # the budget's closing phrase is not thought
        return max(0, end - start - forced)


class Scheduler:
    """The engine thread over `gen` with `n_slots` slots of `ctx` tokens and a waiting queue of `queue_size`."""

    def __init__(self, gen: Generator, *, n_slots: int = 4, ctx: int = 2048, queue_size: int = 16,
                 metrics=None):
        self.gen, self.tok = gen, gen.tokenizer
        self.slots = SlotBatch(gen, n_slots, ctx)
        self.queue_size, self.metrics = queue_size, metrics
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[_Row] = []            # rows[r] runs in slot r
        self.logits: list[torch.Tensor] = []  # next-token logits per running row
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="pocketlm-engine", daemon=True)

    @property
    def ctx(self) -> int:
        return self.slots.ctx

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when every slot is busy and the queue is full."""
        with self.cond:
            if len(self.rows) + len(self.waiting) >= self.slots.n_slots + self.queue_size:
                raise QueueFull()
            self.waiting.append(job)
            self.cond.notify_all()
        self._gauges()

    def load(self) -> dict:
        return {"processing": len(self.rows), "deferred": len(self.waiting), "slots": self.slots.n_slots}

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.rows and not self.waiting:
                    self.cond.wait(timeout=0.5)
                if self.stopping:
                    for job in [*self.waiting, *(r.job for r in self.rows)]:
                        job.emit("error", {"message": "the server is shutting down", "status": 503})
                    return
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)
                admit = []
                while self.waiting and len(self.rows) + len(admit) < self.slots.n_slots:
                    admit.append(self.waiting.popleft())
            for r in [r for r, row in enumerate(self.rows) if row.job.cancelled][::-1]:
                self._release(r)
            for job in admit:
                self._admit(job)
            if self.rows:
                self._choose_and_step()
            self._gauges()

    def _admit(self, job: Job) -> None:
        mode = "auto-fast" if job.mode == "auto" else job.mode
        row = _Row(job, job.ids, mode, self.tok)
        self.rows.append(row)
        self.logits.append(None)
        self.slots.active += 1
        r = len(self.rows) - 1
        try:
            capture = [] if job.probe is not None else None
            self._prefill(r, job.ids, capture)
            if job.probe is not None:
                p = job.probe(capture)
                row.reason = f"router: p_fast={p:.2f}"
                if p < job.probe_threshold:
                    self._hard(r, f"router: p_fast={p:.2f} below {job.probe_threshold:.2f}")
        except Exception as e:  # noqa: BLE001  (one bad request must not stop the engine)
            self._fail(r, e)

    def _prefill(self, r: int, ids: list[int], capture=None) -> None:
        t0 = time.perf_counter()
        self.logits[r] = self.slots.prefill(r, ids, capture)
        if self.metrics is not None:
            self.metrics.prompt(len(ids), time.perf_counter() - t0)

    def _hard(self, r: int, reason: str) -> None:
        """Auto mode judged the request hard: escalate it, or answer it in slow mode from the start."""
        row = self.rows[r]
        spent = row.spent + len(row.tokens) + row.dropped
        if row.job.escalate:
            row.job.emit("hard", {"reason": reason, "fast_tokens": spent})
            row.finish = "escalated"
            return
        job = row.job
        new = _Row(job, job.slow_ids, "slow", self.tok)
        new.spent, new.reason = spent, reason
        self.rows[r] = new
        self._prefill(r, job.slow_ids)

    def _fail(self, r: int, e: Exception) -> None:
        row = self.rows[r]
        row.job.emit("error", {"message": f"{type(e).__name__}: {e}", "status": 500})
        row.finish = "error"

    def _choose_and_step(self) -> None:
        feed = []
        for r, row in enumerate(self.rows):
            token = None
            if row.finish is None:
                try:
                    token = self._advance_row(r, row)
                except Exception as e:  # noqa: BLE001
                    self._fail(r, e)
            row = self.rows[r]  # _hard may have replaced it
            if row.finish is not None and row.finish not in ("escalated", "error"):
                self._finish(row)
            feed.append(token)
        for r in [r for r, row in enumerate(self.rows) if row.finish is not None][::-1]:
            self._release(r)
            feed[r] = feed[-1]
            feed.pop()
        if not self.rows:
            return
        t0 = time.perf_counter()
        try:
            out = self.slots.step(feed)
        except Exception as e:  # noqa: BLE001  (a failed batched step ends the requests in it)
            for r in range(len(self.rows) - 1, -1, -1):
                self._fail(r, e)
                self._release(r)
            return
        for r in range(len(self.rows)):
            self.logits[r] = out[r]
        if self.metrics is not None:
            self.metrics.decode(len(self.rows), time.perf_counter() - t0)

    def _release(self, r: int) -> None:
        moved = self.slots.release(r)
        if moved is not None:
            self.rows[r], self.logits[r] = self.rows[moved], self.logits[moved]
        self.rows.pop()
        self.logits.pop()

    # ---- one row's token ---------------------------------------------------------------------
    def _advance_row(self, r: int, row: _Row) -> int | None:
        """Choose row r's next token and apply every per-request rule; the token to feed (None: finished)."""
        job = row.job
        logits = self.logits[r]
        if row.ban:
            logits = logits.clone()
            for t, pen in row.ban.items():
                logits[t] = float("-inf") if pen == float("inf") else logits[t] - pen
        history = None
        if job.sampling.repetition_penalty != 1.0:
            history = torch.tensor([row.ids + row.tokens], device=logits.device)
        if row.rng is None and job.sampling.seed is not None:
            row.rng = torch.Generator(device=logits.device).manual_seed(job.sampling.seed)
        token_t, lp_t = sample(logits[None], job.sampling, history, row.rng)
        token, lp = int(token_t[0]), float(lp_t[0])
        if row.queue:
            token, lp = row.queue.pop(0), 0.0
            row.forced += 1
        if row.ban_left:
            row.ban_left -= 1
            row.ban = {t: min(p, job.repair.penalty) for t, p in row.ban.items()} if row.ban_left else {}
        if token in job.stops:
            if row.hold and math.exp(lp) < job.confidence_threshold:  # the stop token counts too
                self._hard(r, f"fast answer confidence {math.exp(lp):.2f} below {job.confidence_threshold:.2f}")
                return None if self.rows[r].finish else self._advance_row(r, self.rows[r])
            row.finish = "stop"
            return None
        info = {"logprob": lp}
        if job.top_logprobs:
            top = self.logits[r].float().log_softmax(-1).topk(job.top_logprobs)
            info["top"] = list(zip(top.indices.tolist(), top.values.tolist()))
        row.tokens.append(token)
        row.info.append(info)
        if row.hold and math.exp(lp) < job.confidence_threshold:
            self._hard(r, f"fast answer confidence {math.exp(lp):.2f} below {job.confidence_threshold:.2f}")
            return None if self.rows[r].finish else self._advance_row(r, self.rows[r])  # slow from its start
        feed = token
        start = (find_loop(row.tokens, job.repair)
                 if job.repair is not None and row.repairs < job.repair.max_repairs else None)
        if start is not None and start > row.sent:
            looped = row.tokens[start:]
            self.slots.forget(r, len(row.tokens) - start)  # the fed copy of tokens[start-1:] goes ...
            feed = row.tokens[start - 1]                   # ... and tokens[start-1] is fed again
            row.dropped += len(looped)
            del row.tokens[start:], row.info[start:]
            row.repairs += 1
            row.ban = {t: job.repair.penalty for t in looped}
            row.ban[looped[0]] = float("inf")
            row.ban_left = job.repair.penalty_tokens + 1
        elif len(row.tokens) >= job.max_tokens or self.slots.lengths[r] + 1 >= self.ctx:
            row.finish = "length"
        elif (job.thinking is not None and job.thinking.budget is not None and not row.queue
              and job.thinking.close_id not in row.tokens and row.think_tokens() >= job.thinking.budget):
            row.queue.extend(job.thinking.close_ids)
            row.budget_hit = True
        self._emit_final(row)
        return None if row.finish else feed

    def _emit_final(self, row: _Row, everything: bool = False) -> None:
        """Emit the tokens no later repair can roll back (all of them once the row is finished)."""
        if row.hold and not everything:
            return
        job = row.job
        final = len(row.tokens)
        if not everything and job.repair is not None and row.repairs < job.repair.max_repairs:
            final = rollback_floor(row.tokens, job.repair)
        t = job.thinking
        while row.sent < final and row.finish != "stop-string":
            token, info = row.tokens[row.sent], row.info[row.sent]
            row.sent += 1
            if t is not None and token == t.open_id:
                row.phase = "think"
                continue
            if t is not None and token == t.close_id:
                row.phase = "content"
                continue
            stream = row.streams[row.phase]
            piece = stream.add(token)
            if stream.stopped:
                row.finish = "stop-string"
            self._send(row, row.phase, piece, token, info)

    def _send(self, row: _Row, phase: str, piece: str, token: int, info: dict) -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            if row.last_emit is None:
                self.metrics.first_token(now - row.job.submitted)
            else:
                self.metrics.inter_token(now - row.last_emit)
        row.last_emit = now
        row.job.emit(phase, {"text": piece, "token": token, **info})

    def _finish(self, row: _Row) -> None:
        if row.finish != "stop-string":
            self._emit_final(row, everything=True)
        if row.finish == "stop-string":
            row.finish = "stop"
        for phase, stream in row.streams.items():
            rest = stream.flush()
            if rest:
                row.job.emit(phase, {"text": rest, "token": None, "logprob": 0.0})
        # usage counts the tokens of the output (as OpenAI's does); the cost of rolled-back and abandoned
        # attempts is reported apart
        decoded = row.spent + len(row.tokens) + row.dropped + (row.finish == "stop")
        row.job.emit("done", {"finish_reason": row.finish, "prompt_tokens": len(row.ids),
                              "completion_tokens": len(row.tokens), "decoded_tokens": decoded,
                              "reasoning_tokens": row.think_tokens(),
                              "repairs": row.repairs, "mode": row.mode.removeprefix("auto-"),
                              "reason": row.reason, "budget_hit": row.budget_hit})

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.load(len(self.rows), len(self.waiting),
                              sum(self.slots.lengths[:len(self.rows)]), self.slots.n_slots * self.ctx)
