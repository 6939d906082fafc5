"""The OpenAI request fields pocketlm reads, checked with one clear message per problem, and the
response objects it writes (chat.completion, text_completion and their stream chunks)."""
from __future__ import annotations

import time
import uuid
from typing import Any

from ..runtime.sampling import SamplingConfig


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable_error"}
        return {"error": {"message": self.message, "type": kinds.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


# Effort → thinking: none/minimal skip it; low and medium think under a budget; high thinks freely.
EFFORT = {"none": ("fast", None), "minimal": ("fast", None), "low": ("slow", 128), "medium": ("slow", 512),
          "high": ("slow", None)}
THINKING_MODES = ("fast", "slow", "auto")


def number(body: dict, key: str, default, kind=float, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise bad(f"'{key}' must be {'an integer' if kind is int else 'a number'}, not {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"'{key}' is {value}; it must be between {lo} and {hi}", key)
    return kind(value)


def sampling(body: dict) -> SamplingConfig:
    """temperature (default 1.0, as OpenAI's), top_p, top_k (0 = off), seed, repetition_penalty."""
    return SamplingConfig(temperature=number(body, "temperature", 1.0, lo=0, hi=2),
                          top_p=number(body, "top_p", 1.0, lo=1e-9, hi=1),
                          top_k=number(body, "top_k", 0, int, lo=0, hi=10**6),
                          repetition_penalty=number(body, "repetition_penalty", 1.0, lo=1e-3, hi=10),
                          seed=number(body, "seed", None, int, lo=-2**63, hi=2**63 - 1))


def stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > 4:
        raise bad("'stop' must be a string or a list of at most 4 strings", "stop")
    return tuple(s for s in items if s)


def common(body: dict) -> dict:
    """The fields every completion request shares: n, stream, stream_options."""
    if number(body, "n", 1, int, lo=1) != 1:
        raise bad("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return {"stream": stream, "include_usage": bool(opts.get("include_usage", False))}


def max_tokens(body: dict, limit: int) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        if body.get(key) is not None:
            return number(body, key, None, int, lo=1, hi=limit)
    return None


def messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"messages[{i}] needs a role of system, user, assistant or tool", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content has a part that is not text; this model reads text only",
                          f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def thinking(body: dict) -> tuple[str | None, int | None, str]:
    """(mode or None for the server's default, thinking budget or None, where the mode came from)."""
    budget = number(body, "thinking_budget_tokens", None, int, lo=0, hi=10**6)
    mode = body.get("thinking")
    if mode is not None:
        if mode not in THINKING_MODES:
            raise bad(f"'thinking' is {mode!r}; use fast, slow or auto", "thinking")
        return mode, budget, "requested"
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise bad("'chat_template_kwargs.enable_thinking' must be true or false", "chat_template_kwargs")
        return ("slow" if kwargs["enable_thinking"] else "fast"), budget, "requested"
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORT:
            raise bad(f"'reasoning_effort' is {effort!r}; use none, minimal, low, medium or high", "reasoning_effort")
        mode, effort_budget = EFFORT[effort]
        return mode, budget if budget is not None else effort_budget, f"reasoning_effort {effort}"
    return None, budget, "default"


def completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(tokenizer) for t in prompt):
            raise bad("'prompt' holds a token id outside the vocabulary", "prompt")
        return list(prompt)
    raise bad("'prompt' must be a non-empty string (one prompt) or a list of token ids", "prompt")


# ---- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "completion_tokens_details": {"reasoning_tokens": done["reasoning_tokens"]}}


def chat_logprob(tokenizer, piece: dict) -> dict:
    text = tokenizer.decode([piece["token"]])
    return {"token": text, "logprob": piece["logprob"], "bytes": list(text.encode()),
            "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.decode([t]).encode())}
                             for t, lp in piece.get("top", [])]}


def chat_response(rid: str, model: str, content: str, reasoning: str, logprobs: list | None, done: dict,
                  extra: dict) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": done["finish_reason"],
                         "logprobs": {"content": logprobs} if logprobs is not None else None}],
            "usage": usage(done), "pocketlm": extra}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": {"content": logprobs} if logprobs else None}]}


def text_logprobs(tokenizer, pieces: list[dict]) -> dict:
    tokens = [tokenizer.decode([p["token"]]) for p in pieces]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [p["logprob"] for p in pieces],
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in p.get("top", [])} for p in pieces],
            "text_offset": offsets}


def text_response(rid: str, model: str, text: str, logprobs: dict | None, done: dict, extra: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": done["finish_reason"], "logprobs": logprobs}],
            "usage": usage(done), "pocketlm": extra}


def text_chunk(rid: str, model: str, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}
