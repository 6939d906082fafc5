"""Device → server escalation: send a hard request to a bigger OpenAI-compatible server.

The request goes as the client sent it (non-streaming; pocketlm's own fields dropped), with the remote
model's name. Any failure — refused connection, timeout, an error status, a reply that is not a chat
completion — returns the reason, and the caller answers locally instead."""
from __future__ import annotations

import httpx

LOCAL_FIELDS = ("thinking", "thinking_budget_tokens", "stream", "stream_options")


async def escalate(cfg, body: dict) -> tuple[dict | None, str | None]:
    """(the remote chat.completion, None) or (None, why it failed)."""
    payload = {k: v for k, v in body.items() if k not in LOCAL_FIELDS}
    if cfg.escalate_model is not None:
        payload["model"] = cfg.escalate_model
    else:
        payload.pop("model", None)
    headers = {"Authorization": f"Bearer {cfg.escalate_api_key}"} if cfg.escalate_api_key else {}
    url = cfg.escalate_to.rstrip("/") + "/chat/completions"
    try:
        async with httpx.AsyncClient(timeout=cfg.escalate_timeout) as client:
            r = await client.post(url, json=payload, headers=headers)
    except httpx.TimeoutException:
        return None, f"timed out after {cfg.escalate_timeout:g} s"
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}"
    if r.status_code != 200:
        return None, f"HTTP {r.status_code}: {r.text[:200]}"
    try:
        answer = r.json()
        answer["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None, "the reply is not a chat completion"
    return answer, None
