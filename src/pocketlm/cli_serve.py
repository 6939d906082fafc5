"""`pocketlm serve`: the OpenAI-compatible server (registered on cli.app)."""
from __future__ import annotations

import ipaddress
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .cli import _threads, app
from .cli_moe_options import EXPERT_BITS, EXPERT_MEMORY, MOE_THRESHOLD, MOE_TOP_P, RESIDENT, moe_overrides
from .errors import ConfigError, DataError


def _api_keys(keys: list[str], key_file: Optional[Path]) -> tuple[str, ...]:
    found = list(keys)
    if key_file is not None:
        if not key_file.is_file():
            raise DataError(f"API key file '{key_file}' does not exist", "pass a file with one key per line")
        found += [line.strip() for line in key_file.read_text().splitlines() if line.strip()]
        if not found:
            raise DataError(f"API key file '{key_file}' holds no key", "write one key per line")
    return tuple(found)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command("serve")
def serve_cmd(
    model: str = typer.Argument(..., help="Model directory, artifact, GGUF file, embedded name or cached hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless you say otherwise)."),
    port: int = typer.Option(8000, help="TCP port."),
    model_id: Optional[str] = typer.Option(None, help="Model name the API reports and accepts (default: MODEL)."),
    parallel: int = typer.Option(4, help="Slots: requests decoded together (continuous batching)."),
    ctx_size: Optional[int] = typer.Option(None, help="Tokens per slot, prompt + output (default: min(2048, model's))."),
    queue_size: int = typer.Option(16, help="Requests that may wait for a slot; beyond them: 429 + Retry-After."),
    max_tokens_limit: int = typer.Option(2048, help="Most new tokens one request may ask for."),
    max_body_bytes: int = typer.Option(1_000_000, help="Largest request body (413 above it)."),
    api_key: list[str] = typer.Option([], help="Require this key (Authorization: Bearer KEY); repeatable."),
    api_key_file: Optional[Path] = typer.Option(None, help="Require one of the keys in this file (one per line)."),
    thinking: Optional[str] = typer.Option(None, help="Default mode of a thinking model: fast, slow or auto."),
    thinking_budget: Optional[int] = typer.Option(None, help="Default most thinking tokens per request."),
    router: Optional[Path] = typer.Option(None, help="A fitted router (pocketlm router fit) for auto mode."),
    router_policy: str = typer.Option("both", help="Auto mode's rule: probe, confidence or both."),
    repair: bool = typer.Option(True, "--repair/--no-repair", help="Repetition self-repair."),
    native: bool = typer.Option(False, "--native", help="Decode on the native step (CPU, fp32/int8/int4 Llama-family)."),
    escalate_to: Optional[str] = typer.Option(None, help="Base URL of an OpenAI-compatible server for hard "
                                              "requests (auto mode), e.g. http://server:8000/v1."),
    escalate_model: Optional[str] = typer.Option(None, help="Model name on the escalation server."),
    escalate_api_key: Optional[str] = typer.Option(None, help="API key of the escalation server."),
    escalate_timeout: float = typer.Option(30.0, help="Seconds before a hard request is answered locally."),
    resident_experts: Optional[str] = RESIDENT,
    expert_memory_mb: Optional[float] = EXPERT_MEMORY,
    expert_bits_mb: Optional[float] = EXPERT_BITS,
    moe_top_p: Optional[float] = MOE_TOP_P,
    moe_threshold: Optional[float] = MOE_THRESHOLD,
    shadow: Optional[str] = typer.Option(None, help="A candidate model that answers every request too, for "
                                         "comparison only (see --shadow-log and /metrics)."),
    shadow_log: Optional[Path] = typer.Option(None, help="JSONL file: each shadowed request's two answers, "
                                              "agreement and latencies."),
    canary: Optional[str] = typer.Option(None, help="A candidate model that answers --canary-share of the requests."),
    canary_share: float = typer.Option(0.1, help="Share of requests the --canary model answers."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    log_level: str = typer.Option("warning", help="uvicorn's log level."),
):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics) with continuous batching, thinking modes and escalation."""
    import uvicorn

    from .io import resolve
    from .serve import ServeConfig, create_app

    err = Console(stderr=True)
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port", "use 1-65535")
    moe = moe_overrides(resident_experts, expert_memory_mb, expert_bits_mb, moe_top_p, moe_threshold)
    if shadow is not None and canary is not None:
        raise ConfigError("both --shadow and --canary given", "run one pilot at a time")
    for pilot in (shadow, canary):
        if pilot is not None:
            resolve(pilot)
    if router is not None and not router.is_dir():
        raise DataError(f"router '{router}' does not exist", "fit one with `pocketlm router fit MODEL -o DIR`")
    resolve(model)  # a missing model fails here, in one line, before the server starts
    cfg = ServeConfig(model=model, model_id=model_id, dtype=dtype, device=device, parallel=parallel,
                      ctx_size=ctx_size, queue_size=queue_size, max_tokens_limit=max_tokens_limit,
                      max_body_bytes=max_body_bytes, api_keys=_api_keys(api_key, api_key_file), thinking=thinking,
                      thinking_budget=thinking_budget, router=str(router) if router else None,
                      router_policy=router_policy, repair=repair, native=native, escalate_to=escalate_to,
                      escalate_model=escalate_model, escalate_api_key=escalate_api_key,
                      escalate_timeout=escalate_timeout, moe=moe, candidate=shadow or canary,
                      shadow=shadow is not None, shadow_log=str(shadow_log) if shadow_log else None,
                      canary_share=canary_share if canary else 0.0)
    _threads(threads)
    if not _loopback(host) and not cfg.api_keys:
        err.print(f"[yellow]warning: serving on {host} without --api-key: anyone who reaches it can use it[/yellow]")
    application = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level=log_level))
    engine = application.state.engine

    def watch() -> None:  # a model that fails to load ends the server with its error
        while engine.state == "loading" and not server.should_exit:
            threading.Event().wait(0.2)
        if engine.state == "failed":
            server.should_exit = True
        elif engine.state == "ready":
            err.print(f"serving {engine.model_id} on http://{host}:{port}/v1 "
                      f"({parallel} slots of {engine.scheduler.ctx} tokens)")

    threading.Thread(target=watch, daemon=True).start()
    server.run()
    if engine.state == "failed":
        err.print(Text.assemble(("error: ", "bold red"), engine.error), soft_wrap=True)
        sys.exit(2)
