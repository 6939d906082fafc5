"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Each request becomes a Job for the engine thread; its events come back through an asyncio queue and
are written as one JSON response or as server-sent events. A client that goes away cancels its job,
which frees its slot at the next decode step. Every failure is one OpenAI-style error object.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import random
import threading
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import PocketError
from . import protocol as P
from .engine import Engine, ServeConfig
from .escalate import escalate
from .metrics import Metrics
from .scheduler import Job, QueueFull

DONE_FIELDS = ("mode", "reason", "repairs", "budget_hit", "decoded_tokens")  # reported under "pocketlm"
OPEN_PATHS = ("/health",)  # answered without an API key (load balancers probe it)


def create_app(cfg: ServeConfig) -> FastAPI:
    metrics = Metrics()
    engine = Engine(cfg, metrics)
    # the pilot counts into its own registry (not served): /metrics keeps llama.cpp's series for the incumbent,
    # and pocketlm:candidate_requests counts the pilot's answers
    candidate = None if cfg.candidate is None else Engine(
        dataclasses.replace(cfg, model=cfg.candidate, model_id=engine.model_id, candidate=None, shadow=False,
                            canary_share=0.0, moe=None), Metrics())
    shadow_log = ShadowLog(cfg.shadow_log) if cfg.shadow and cfg.shadow_log else None
    shadows: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = engine.start_loading()
        if candidate is not None:
            candidate.start_loading(after=loading)
        yield
        await asyncio.to_thread(engine.close)
        if candidate is not None:
            await asyncio.to_thread(candidate.close)

    app = FastAPI(title="pocketlm", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.candidate = engine, metrics, candidate

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if cfg.api_keys and request.url.path not in OPEN_PATHS and not _authorized(request, cfg.api_keys):
            return _error(P.RequestError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'"))
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001  (one request's failure never takes the server down)
            metrics.count("error")
            return _error(P.RequestError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health():
        status = {"loading": 503, "ready": 200, "failed": 503}[engine.state]
        body = {"status": "ok" if status == 200 else engine.state}
        if engine.error:
            body["error"] = engine.error
        if engine.scheduler is not None:
            body.update(engine.scheduler.load())
        if candidate is not None:
            body["candidate"] = {"model": cfg.candidate, "state": candidate.state, "error": candidate.error}
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "owned_by": "pocketlm",
                                            "created": 0}]}

    async def handle(request: Request, build, chat: bool):
        """Read and check a completion request, build its Job with `build(engine, body)`, and run it on the
        incumbent (or, for a canary share, on the candidate); with --shadow the candidate answers it too."""
        try:
            body = await _body(request, cfg.max_body_bytes)
            engine.check_ready()
            _check_model(body, engine)
            opts = P.common(body)
            canary = (candidate is not None and cfg.canary_share > 0 and candidate.state == "ready"
                      and random.random() < cfg.canary_share)
            target = candidate if canary else engine
            job = build(target, body)
        except (P.RequestError, PocketError) as e:  # a PocketError here is a config check of the request's values
            metrics.count("invalid")
            return _error(e if isinstance(e, P.RequestError) else P.bad(str(e)))
        if canary:
            metrics.candidate.labels("canary", "-").inc()
        on_done = None
        if cfg.shadow and candidate is not None and candidate.state == "ready":
            def on_done(text: str, seconds: float) -> None:  # the incumbent's answer is out: now the candidate's
                task = asyncio.get_running_loop().create_task(
                    _shadow(candidate, build, body, text, seconds, metrics, shadow_log))
                shadows.add(task)
                task.add_done_callback(shadows.discard)
        return await _run(request, target, job, body, opts, chat=chat, tags={"served_by": "candidate"} if canary
                          else {}, on_done=on_done)

    def chat_job(eng: Engine, body: dict) -> Job:
        mode, budget, source = P.thinking(body)
        top = P.number(body, "top_logprobs", 0, int, lo=0, hi=5)
        return eng.chat_job(P.messages(body), P.max_tokens(body, cfg.max_tokens_limit), mode, budget, source,
                            sampling=P.sampling(body), stop_strings=P.stops(body), top_logprobs=top,
                            want_logprobs=body.get("logprobs", False) is True or top > 0)

    def completion_job(eng: Engine, body: dict) -> Job:
        return eng.completion_job(P.completion_prompt(body, eng.tok), P.max_tokens(body, cfg.max_tokens_limit),
                                  sampling=P.sampling(body), stop_strings=P.stops(body),
                                  top_logprobs=P.number(body, "logprobs", 0, int, lo=0, hi=5),
                                  want_logprobs=body.get("logprobs") is not None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat_job, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, completion_job, chat=False)

    return app


# ---- running one request ----------------------------------------------------------------------

async def _run(request: Request, engine: Engine, job: Job, body: dict, opts: dict, *, chat: bool,
               tags: dict | None = None, on_done=None):
    """tags: fields added to the response's "pocketlm" object; on_done(text, seconds): called with the
    answer's text once it is complete (not for failed, cancelled or escalated requests)."""
    started = time.perf_counter()
    events = _attach(job)
    try:
        engine.scheduler.submit(job)
    except QueueFull:
        engine.metrics.count("rejected")
        return _error(P.RequestError(429, "every slot is busy and the queue is full; retry later",
                                     headers={"Retry-After": str(engine.cfg.retry_after_s)}))
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    if opts["stream"]:
        return StreamingResponse(_stream(request, engine, job, events, body, rid, chat, opts["include_usage"],
                                         dict(tags or {}), on_done, started),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    parts = {"content": [], "think": []}
    pieces, extra, done = [], dict(tags or {}), None
    try:
        async for kind, data in _events(request, engine, job, events, body, extra):
            if kind in parts:
                parts[kind].append(data["text"])
                if job.want_logprobs and data.get("token") is not None and kind == "content":
                    pieces.append(data)
            elif kind == "remote":
                return JSONResponse({**data, "pocketlm": extra})
            elif kind == "done":
                done = data
    except _Failed as e:
        return _error(e.error)
    if done is None:  # the client went away; its job was cancelled
        return Response(status_code=499)
    extra.update({k: done[k] for k in DONE_FIELDS})
    extra.setdefault("answered_by", "local")
    if on_done is not None:
        on_done("".join(parts["content"]), time.perf_counter() - started)
    model = engine.model_id
    if chat:
        lps = [P.chat_logprob(engine.tok, p) for p in pieces] if job.want_logprobs else None
        return JSONResponse(P.chat_response(rid, model, "".join(parts["content"]).strip() if job.thinking else
                                            "".join(parts["content"]), "".join(parts["think"]).strip(), lps, done,
                                            extra))
    lps = P.text_logprobs(engine.tok, pieces) if job.want_logprobs else None
    return JSONResponse(P.text_response(rid, model, "".join(parts["content"]), lps, done, extra))


async def _stream(request, engine: Engine, job: Job, events, body, rid: str, chat: bool,
                  include_usage: bool, extra: dict, on_done, started: float) -> AsyncIterator[str]:
    model, text = engine.model_id, []
    try:
        if chat:
            yield _sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
        async for kind, data in _events(request, engine, job, events, body, extra):
            if kind in ("content", "think") and data["text"]:
                if kind == "content":
                    text.append(data["text"])
                lp = None
                if job.want_logprobs and data.get("token") is not None:
                    lp = [P.chat_logprob(engine.tok, data)] if chat else P.text_logprobs(engine.tok, [data])
                if chat:
                    delta = ({"content": data["text"]} if kind == "content"
                             else {"reasoning_content": data["text"], "reasoning": data["text"]})
                    yield _sse(P.chat_chunk(rid, model, delta, logprobs=lp))
                else:
                    yield _sse(P.text_chunk(rid, model, data["text"], logprobs=lp))
            elif kind == "remote":  # an escalated answer, sent whole
                msg = data["choices"][0]["message"]
                delta = {"content": msg.get("content") or ""}
                if msg.get("reasoning_content"):
                    delta["reasoning_content"] = msg["reasoning_content"]
                yield _sse(P.chat_chunk(rid, model, delta))
                yield _sse({**P.chat_chunk(rid, model, {}, data["choices"][0].get("finish_reason", "stop")),
                            "pocketlm": extra})
                break
            elif kind == "done":
                extra.update({k: data[k] for k in DONE_FIELDS})
                extra.setdefault("answered_by", "local")
                if on_done is not None:
                    on_done("".join(text), time.perf_counter() - started)
                last = (P.chat_chunk(rid, model, {}, data["finish_reason"]) if chat
                        else P.text_chunk(rid, model, "", data["finish_reason"]))
                yield _sse({**last, "pocketlm": extra})
                if include_usage:
                    yield _sse({**(P.chat_chunk(rid, model, {}) if chat else P.text_chunk(rid, model, "")),
                                "choices": [], "usage": P.usage(data)})
        yield "data: [DONE]\n\n"
    except _Failed as e:
        yield _sse(e.error.body())
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a no-op when it finished; frees the slot when the client went away


async def _shadow(candidate: Engine, build, body: dict, incumbent_text: str, incumbent_s: float, metrics: Metrics,
                  log: "ShadowLog | None") -> None:
    """The candidate's answer to a request the incumbent answered: compared, counted, logged; never sent."""
    t0 = time.perf_counter()
    try:
        job = build(candidate, body)
        queue = _attach(job)
        candidate.scheduler.submit(job)
    except QueueFull:
        metrics.candidate.labels("shadow", "skipped").inc()
        return
    except Exception:  # noqa: BLE001  (the candidate's failure never touches the served answer)
        metrics.candidate.labels("shadow", "error").inc()
        return
    text = []
    while True:
        kind, data = await queue.get()
        if kind == "content":
            text.append(data["text"])
        elif kind in ("done", "error", "hard"):
            break
    if kind != "done":
        job.cancelled = True
        metrics.candidate.labels("shadow", "error").inc()
        return
    answer = "".join(text)
    agreement = "match" if answer == incumbent_text else "differ"
    metrics.candidate.labels("shadow", agreement).inc()
    if log is not None:
        log.write({"time": time.time(), "agreement": agreement, "incumbent": incumbent_text, "candidate": answer,
                   "latency_ms": {"incumbent": incumbent_s * 1000, "candidate": (time.perf_counter() - t0) * 1000}})


class ShadowLog:
    """Appends one JSON line per shadowed request (lines are whole: one write under a lock)."""

    def __init__(self, path: str):
        self.path, self._lock = path, threading.Lock()

    def write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)


class _Failed(Exception):
    def __init__(self, error: P.RequestError):
        self.error = error


async def _events(request: Request, engine: Engine, job: Job, events: asyncio.Queue, body: dict, extra: dict):
    """The job's events; a 'hard' event is escalated (or, if the remote fails, answered locally in slow
    mode, and `extra` says so). Raises _Failed for an error; cancels the job when the client leaves."""
    while True:
        try:
            kind, data = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                engine.metrics.count("cancelled")
                return
            continue
        if kind == "error":
            engine.metrics.count("error")
            raise _Failed(P.RequestError(data.get("status", 500), data["message"]))
        if kind == "hard":
            extra["escalation"] = {"reason": data["reason"], "url": engine.cfg.escalate_to}
            answer, err = await escalate(engine.cfg, body)
            if answer is not None:
                engine.metrics.escalations.labels("ok").inc()
                engine.metrics.count("ok")
                extra["answered_by"] = "escalated"
                yield "remote", answer
                return
            engine.metrics.escalations.labels("fallback").inc()
            extra["answered_by"] = "local (escalation failed)"
            extra["escalation"]["error"] = err
            job.escalate, job.mode, job.ids = False, "slow", job.slow_ids
            job.probe, job.confidence_threshold, job.cancelled = None, None, False
            try:
                engine.scheduler.submit(job)
            except QueueFull:
                raise _Failed(P.RequestError(429, "escalation failed and the local queue is full; retry later",
                                             headers={"Retry-After": str(engine.cfg.retry_after_s)})) from None
            continue
        if kind == "done":
            engine.metrics.count("ok")
        yield kind, data
        if kind == "done":
            return


def _attach(job: Job) -> asyncio.Queue:
    """Route the engine thread's events for `job` into an asyncio queue of this event loop."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    job.emit = lambda kind, data: loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
    return queue


# ---- helpers ----------------------------------------------------------------------------------

def _authorized(request: Request, keys: tuple[str, ...]) -> bool:
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    # compare against every key, always: the time taken says nothing about which key nearly matched
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


async def _body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.RequestError(413, f"the request body of {declared} bytes is over the limit of {limit}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise P.RequestError(413, f"the request body is over the limit of {limit} bytes")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.bad(f"the request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(body, dict):
        raise P.bad("the request body must be a JSON object")
    return body


def _check_model(body: dict, engine: Engine) -> None:
    name = body.get("model")
    if name is not None and name not in (engine.model_id, engine.cfg.model):
        raise P.RequestError(404, f"model '{name}' is not served here; this server serves '{engine.model_id}' "
                             "(GET /v1/models)", "model")


def _error(e: P.RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
