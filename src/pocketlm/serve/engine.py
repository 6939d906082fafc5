"""What a server runs: the loaded model, its scheduler, its thinking support and router, built from a
ServeConfig. Loading happens in a background thread so that /health can answer 503 meanwhile."""
from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

from ..config import BaseConfig, check, register_config
from ..errors import ConfigError, UnsupportedModelError
from ..runtime.dual import BUDGET_CLOSE, SWITCHES, check_thinking_template, split_switch
from .protocol import RequestError, bad
from .scheduler import Job, Scheduler, Thinking


@register_config
@dataclasses.dataclass(frozen=True)
class ServeConfig(BaseConfig):
    """How `pocketlm serve` runs a model.

    parallel: slots decoded together (continuous batching); ctx_size: tokens per slot (prompt + output;
    default min(2048, the model's context)); queue_size: requests that may wait for a slot beyond those
    (more get 429 with Retry-After); max_tokens_limit: most new tokens one request may ask for;
    max_body_bytes: largest request body. thinking: the default mode of a thinking model (fast, slow,
    auto; default: auto with a router, else slow); thinking_budget: default most thinking tokens; router:
    a fitted router directory (auto mode), router_policy: probe, confidence or both. repair: repetition
    self-repair (on). native: decode steps on the native step (runtime/native.py). escalate_to: base URL of an OpenAI-compatible server for hard requests (auto mode),
    escalate_model / escalate_api_key for it, escalate_timeout seconds before answering locally.
    moe: MoEDeployConfig fields (resident, expert_memory_mb, bits_budget_mb, top_p, threshold, ...)
    changed on the artifact's saved MoE deployment (see `pocketlm.load`'s moe).
    candidate: a second model served beside this one: with `shadow` it answers every request too, for
    comparison only (each pair logged to `shadow_log` as JSONL); with `canary_share` it answers that
    share of the requests itself.
    """

    model: str = "tiny"
    model_id: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    parallel: int = 4
    ctx_size: int | None = None
    queue_size: int = 16
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1_000_000
    api_keys: tuple[str, ...] = ()
    thinking: str | None = None
    thinking_budget: int | None = None
    router: str | None = None
    router_policy: str = "both"
    repair: bool = True
    native: bool = False
    escalate_to: str | None = None
    escalate_model: str | None = None
    escalate_api_key: str | None = None
    escalate_timeout: float = 30.0
    moe: dict | None = None
    candidate: str | None = None
    canary_share: float = 0.0
    shadow: bool = False
    shadow_log: str | None = None
    retry_after_s: int = 1

    kind: ClassVar[str] = "serve"

    def validate(self) -> None:
        check(self.parallel >= 1, f"--parallel {self.parallel} is below 1", "use 1 or more slots")
        check(self.queue_size >= 0, f"--queue-size {self.queue_size} is negative", "use 0 or more")
        check(self.ctx_size is None or self.ctx_size >= 16, f"--ctx-size {self.ctx_size} is too small",
              "use 16 or more tokens per slot")
        check(self.max_tokens_limit >= 1, "--max-tokens-limit is below 1", "use 1 or more")
        check(self.max_body_bytes >= 1024, "--max-body-bytes is below 1024", "use 1024 or more")
        check(self.thinking in (None, "fast", "slow", "auto"), f"--thinking '{self.thinking}' is unknown",
              "use fast, slow or auto")
        check(self.router_policy in ("probe", "confidence", "both"), f"--router-policy '{self.router_policy}' "
              "is unknown", "use probe, confidence or both")
        check(self.thinking_budget is None or self.thinking_budget >= 0, "--thinking-budget is negative",
              "use 0 or more tokens")
        check(self.escalate_timeout > 0, "--escalate-timeout is not positive", "use a number of seconds above 0")
        check(0 <= self.canary_share <= 1, f"--canary-share {self.canary_share} is outside [0, 1]", "use e.g. 0.1")
        check(self.candidate is not None or (not self.shadow and not self.canary_share),
              "shadow or canary without a candidate model", "pass --shadow MODEL or --canary MODEL")
        check(not (self.shadow and self.canary_share), "both --shadow and --canary given", "run one pilot at a time")
        check(all(self.api_keys), "an API key is empty", "give non-empty keys")
        check(self.escalate_to is None or self.escalate_to.startswith(("http://", "https://")),
              f"--escalate-to '{self.escalate_to}' is not an http(s) URL", "pass e.g. http://server:8000/v1")


class Engine:
    """The model behind a server; `state` is loading, ready or failed (with `error`)."""

    def __init__(self, cfg: ServeConfig, metrics):
        self.cfg, self.metrics = cfg, metrics
        self.state, self.error = "loading", None
        self.model_id = cfg.model_id or cfg.model
        self.scheduler: Scheduler | None = None
        self.moe = None

    def start_loading(self, after: threading.Thread | None = None) -> threading.Thread:
        """Load in a background thread, once `after` (another engine's load) has finished: transformers'
        model construction is not safe to run in two threads at once."""
        def run() -> None:
            if after is not None:
                after.join()
            self._load_safely()
        t = threading.Thread(target=run, name="pocketlm-load", daemon=True)
        t.start()
        return t

    def _load_safely(self) -> None:
        try:
            self.load()
            self.state = "ready"
        except Exception as e:  # noqa: BLE001  (reported by /health and every request)
            self.state, self.error = "failed", str(e)

    def load(self) -> None:
        from ..eval.quality import stop_token_ids
        from ..io import load
        from ..runtime import Generator
        cfg = self.cfg
        model, tok = load(cfg.model, dtype=cfg.dtype, device=cfg.device, moe=cfg.moe, show_progress=False)
        self.moe = getattr(model, "pocketlm_moe", None)
        limit = int(getattr(model.config, "max_position_embeddings", 2048))
        ctx = min(cfg.ctx_size or 2048, limit)
        if cfg.ctx_size is not None and cfg.ctx_size > limit:
            raise ConfigError(f"--ctx-size {cfg.ctx_size} exceeds the model's context of {limit}",
                              f"use at most {limit}")
        gen = Generator(model, tok, max_context=ctx, native=cfg.native)
        self.tok = tok
        self.stops = frozenset(stop_token_ids(tok)) | gen.stop_tokens
        self.has_template = bool(getattr(tok, "chat_template", None))
        self.think = self._thinking_tokens(tok)
        self.router = None
        if cfg.router is not None:
            from ..runtime.router import Router
            self.router = Router.load(cfg.router)
            self.router.check_model(model)
        if self.router is not None and self.think is None:
            raise ConfigError("a router was given but the model cannot think", "serve a thinking chat model")
        self.default_mode = cfg.thinking or ("auto" if self.router is not None else "slow")
        if self.default_mode == "auto" and self.router is None:
            raise ConfigError("--thinking auto needs a router", "fit one with `pocketlm router fit` and pass --router")
        self.scheduler = Scheduler(gen, n_slots=cfg.parallel, ctx=ctx, queue_size=cfg.queue_size,
                                   metrics=self.metrics)
        self.scheduler.start()

    def _thinking_tokens(self, tok) -> tuple[int, int, list[int]] | None:
        """(open id, close id, the budget's closing ids) when the model has think blocks its template
        switches on and off; None otherwise."""
        vocab = tok.get_vocab()
        if "<think>" not in vocab or "</think>" not in vocab or not self.has_template:
            return None
        try:
            check_thinking_template(tok)
        except UnsupportedModelError:
            return None
        return vocab["<think>"], vocab["</think>"], tok(BUDGET_CLOSE, add_special_tokens=False)["input_ids"]

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.moe is not None:
            self.moe.close()

    # ---- requests → jobs -----------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.state == "loading":
            raise RequestError(503, "the model is still loading; retry shortly", headers={"Retry-After": "2"})
        if self.state == "failed":
            raise RequestError(503, f"the model failed to load: {self.error}")

    def _limit(self, ids: list[int], asked: int | None) -> int:
        ctx = self.scheduler.ctx
        room = ctx - len(ids) - 1
        if room < 1:
            raise bad(f"the prompt has {len(ids)} tokens; this server's context is {ctx} per request",
                      "messages" if asked is None else "max_tokens")
        if asked is not None and asked > room:
            raise bad(f"{len(ids)} prompt tokens + max_tokens {asked} exceed the context of {ctx}; "
                      f"ask for at most {room} tokens or shorten the prompt", "max_tokens")
        return asked if asked is not None else min(room, self.cfg.max_tokens_limit)

    def completion_job(self, ids: list[int], asked: int | None, **kw) -> Job:
        return Job(ids, self._limit(ids, asked), emit=None, stops=self.stops, repair=self._repair(), **kw)

    def chat_job(self, msgs: list[dict], asked: int | None, mode: str | None, budget: int | None, source: str,
                 **kw) -> Job:
        if not self.has_template:
            raise bad("this model has no chat template; use /v1/completions with a plain prompt", "messages")
        last = next((m for m in reversed(msgs) if m["role"] == "user"), None)
        if last is not None and mode is None and self.think is not None:  # a soft switch, as in chat
            stripped, switched = split_switch(last["content"])
            if switched:
                last["content"], mode, source = stripped, switched, "soft switch"
        if self.think is None:
            if mode in ("slow", "auto") and source != "default":
                raise bad(f"thinking mode '{mode}' was asked for but this model has no think blocks", "thinking")
            mode = "fast"
        mode = mode or self.default_mode
        budget = budget if budget is not None else self.cfg.thinking_budget
        if budget == 0:
            mode = "fast"
        if mode == "auto" and self.router is None:
            raise bad("auto thinking needs a router; start the server with --router", "thinking")
        ids = self._render(msgs, mode)
        job = Job(ids, self._limit(ids, asked), emit=None, stops=self.stops, repair=self._repair(), mode=mode,
                  source=source, **kw)
        if self.think is not None:
            job.thinking = Thinking(*self.think[:2], close_ids=self.think[2], budget=budget)
        if mode == "auto":
            job.slow_ids = self._render(msgs, "slow")
            self._limit(job.slow_ids, asked)
            policy = self.cfg.router_policy
            if policy in ("probe", "both"):
                job.probe = lambda capture: float(self.router.p_fast(capture)[0])
                job.probe_threshold = self.router.probe_threshold(policy)
            job.confidence_threshold = self.router.confidence_threshold(policy)
            job.escalate = self.cfg.escalate_to is not None
        return job

    def _render(self, msgs: list[dict], mode: str) -> list[int]:
        msgs = [dict(m) for m in msgs]
        if self.think is not None and mode in ("fast", "slow", "auto"):
            # the reasoner family is trained with the switch at the end of the user turn
            last = next((m for m in reversed(msgs) if m["role"] == "user"), None)
            if last is not None:
                switch = next(s for s, m in SWITCHES.items() if m == ("slow" if mode == "slow" else "fast"))
                last["content"] = f"{last['content']} {switch}"
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=mode == "slow")
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _repair(self):
        if not self.cfg.repair:
            return None
        from ..runtime.repair import RepairConfig
        return RepairConfig()
