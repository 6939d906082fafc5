"""The dual-system commands of the `pocketlm` app: chat, reason, router fit (registered on cli.app)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .cli import _threads, app, out
from .cli_moe_options import EXPERT_BITS, EXPERT_MEMORY, MOE_THRESHOLD, MOE_TOP_P, RESIDENT, moe_overrides
from .errors import ConfigError, PocketError

router_app = typer.Typer(no_args_is_help=True, help="Fit the auto-mode router of a chat model.")
app.add_typer(router_app, name="router")


def _dual(model: str, *, mode: str, router: Optional[Path], policy: str, think_budget: Optional[int],
          repair: bool, threads: Optional[int], dtype: str, device: str, moe: dict | None = None,
          native: bool = False, **options):
    """Load the model and build its DualSystem (errors in options are raised before the model loads)."""
    from .io import load
    from .runtime import Generator
    from .runtime.choice import chooses_mode
    from .runtime.dual import DualSystem
    from .runtime.repair import RepairConfig
    from .runtime.router import Router

    if mode not in ("fast", "slow", "auto"):
        raise ConfigError(f"unknown mode '{mode}'", "use fast, slow or auto")
    fitted = Router.load(router) if router is not None else None
    _threads(threads)
    m, tok = load(model, dtype=dtype, device=device, moe=moe)
    if mode == "auto" and router is None and not chooses_mode(m):
        raise ConfigError("auto mode needs a router or an RL-trained model", "fit one with `pocketlm router fit MODEL "
                          "--tasks DEV -o ROUTER` and pass --router ROUTER, train with `pocketlm rl`, or choose "
                          "--mode fast|slow")
    return DualSystem(Generator(m, tok, native=native), mode=mode, router=fitted, policy=policy, think_budget=think_budget,
                      repair=RepairConfig() if repair else None, **options)


MODE_HELP = "fast (answer directly), slow (think first) or auto (the router decides)."


@app.command("chat")
def chat_cmd(
    model: str = typer.Argument(..., help="Chat model with a thinking switch (e.g. reasoner)."),
    mode: str = typer.Option("auto", help=MODE_HELP + " Turns may end with /think, /no_think or /auto_think."),
    router: Optional[Path] = typer.Option(None, help="Router directory from `pocketlm router fit` (auto mode)."),
    policy: str = typer.Option("both", help="Router rule for auto: probe, confidence or both."),
    think_budget: Optional[int] = typer.Option(None, help="Most thinking tokens; then the think block is closed."),
    budget_fallback: str = typer.Option("answer", help="At the budget: answer (after the cut thinking) or fast."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Generate the thinking but do not print it."),
    repair: bool = typer.Option(True, "--repair/--no-repair", help="Repetition self-repair while decoding."),
    max_tokens: int = typer.Option(384, help="Most new tokens in slow mode."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    resident_experts: Optional[str] = RESIDENT,
    expert_memory_mb: Optional[float] = EXPERT_MEMORY,
    expert_bits_mb: Optional[float] = EXPERT_BITS,
    moe_top_p: Optional[float] = MOE_TOP_P,
    moe_threshold: Optional[float] = MOE_THRESHOLD,
):
    """Chat on stdin: each line is a user turn; answers stream, with the chosen mode and why."""
    import sys

    moe = moe_overrides(resident_experts, expert_memory_mb, expert_bits_mb, moe_top_p, moe_threshold)
    dual = _dual(model, mode=mode, router=router, policy=policy, think_budget=think_budget, repair=repair,
                 threads=threads, dtype=dtype, device=device, moe=moe, slow_tokens=max_tokens,
                 budget_fallback=budget_fallback)
    err = Console(stderr=True)
    history: list[tuple[str, str]] = []
    for line in sys.stdin:
        message = line.strip()
        if not message:
            continue
        try:
            history.append(_chat_turn(dual, message, history, hide_thinking, err))
        except PocketError as e:  # e.g. /auto_think without a router: say so, keep chatting
            err.print(f"[red]error:[/red] {e}")


def _chat_turn(dual, message: str, history: list[tuple[str, str]], hide_thinking: bool, err: Console):
    """Stream one answer and its summary line; return the (question, answer) turn for the history."""
    shown = None  # the phase whose text is being printed; each starts without leading blank lines
    for phase, item in dual.stream(message, history=history):
        if phase == "done":
            thinking = "skipped" if item.thinking_tokens == 0 and not item.budget_hit else (
                f"{item.thinking_tokens} tokens, {'hidden' if hide_thinking else 'shown'}"
                + (", cut by the budget" if item.budget_hit else ""))
            print(flush=True)
            err.print(f"[dim]mode {item.mode} ({item.reason}) · {item.tokens} tokens · thinking {thinking}"
                      + (f" · {item.repairs} repairs" if item.repairs else "") + "[/dim]", soft_wrap=True)
            return item.question, item.answer
        if phase == "repair":
            print(" [loop rolled back] ", end="", flush=True)  # the text since the loop began is dropped
        elif phase == "answer" or not hide_thinking:
            text = item.text if shown == phase else item.text.lstrip()
            if text:
                print(("\n" if shown else "") + text if shown != phase else text, end="", flush=True)
                shown = phase


@app.command("reason")
def reason_cmd(
    model: str = typer.Argument(..., help="Chat model with a thinking switch (e.g. reasoner)."),
    tasks: Path = typer.Option(..., help="JSONL of question/answer items."),
    mode: str = typer.Option("auto", help=MODE_HELP),
    router: Optional[Path] = typer.Option(None, help="Router directory from `pocketlm router fit` (auto mode)."),
    policy: str = typer.Option("both", help="Router rule for auto: probe, confidence or both."),
    think_budget: Optional[int] = typer.Option(None, help="Most thinking tokens; then the think block is closed."),
    budget_fallback: str = typer.Option("answer", help="At the budget: answer (after the cut thinking) or fast."),
    limit: Optional[int] = typer.Option(None, help="Answer only the first N items."),
    repair: bool = typer.Option(False, "--repair", help="Repetition self-repair while decoding."),
    native: bool = typer.Option(False, "--native", help="Decode on the native step (CPU, fp32/int8/int4)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary and per-item rows here."),
):
    """Answer a task file in one mode: accuracy, mean generated tokens, wall time, per-item rows."""
    from .eval.data import read_tasks
    from .io import atomic_write_text
    from .runtime.reason import auto_policy, run_tasks

    items = read_tasks(tasks, limit)
    dual = _dual(model, mode=mode, router=router, policy=policy, think_budget=think_budget, repair=repair,
                 threads=threads, dtype=dtype, device=device, budget_fallback=budget_fallback, native=native)
    result = run_tasks(dual, items, mode)
    result.update(model=model, tasks=str(tasks))
    table = Table(title=f"pocketlm reason {model} · {tasks.name}")
    for col in ("mode", "items", "accuracy", "mean tokens", "thinking tokens", "slow share", "wall s"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    label = mode + (f" ({auto_policy(dual)})" if mode == "auto" else "") + (f", budget {think_budget}" if think_budget is not None else "")
    table.add_row(label, str(result["items"]), f"{result['accuracy']:.1%}", f"{result['mean_tokens']:.1f}",
                  f"{result['mean_thinking_tokens']:.1f}", f"{result['slow_share']:.0%}", f"{result['wall_s']:.1f}")
    out.print(table)
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=1) + "\n")
        out.print(f"wrote {json_out}")


@router_app.command("fit")
def router_fit_cmd(
    model: str = typer.Argument(..., help="Chat model with a thinking switch (e.g. reasoner)."),
    tasks: Path = typer.Option(..., help="Labelled JSONL dev items (question/answer), not the test set."),
    output: Path = typer.Option(..., "-o", "--output", help="Router directory to write."),
    max_drop: float = typer.Option(0.5, help="Accuracy points below slow mode (on the dev items) auto may lose."),
    token_budget: Optional[float] = typer.Option(None, help="Instead: most mean generated tokens per item."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N items."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
):
    """Fit the hidden-state probe and choose the auto thresholds (probe, confidence, both) on dev items."""
    from .eval.data import read_tasks
    from .io import check_output, resolve
    from .runtime.router import fit_router

    if max_drop < 0:
        raise ConfigError(f"--max-drop {max_drop} is negative", "use 0 or more accuracy points")
    if token_budget is not None and token_budget <= 0:
        raise ConfigError(f"--token-budget {token_budget} is not positive", "use a positive mean token count")
    protect = resolve(model).inputs
    check_output(output, overwrite, protect)  # before the long work
    items = read_tasks(tasks, limit)
    dual = _dual(model, mode="fast", router=None, policy="both", think_budget=None, repair=False,
                 threads=threads, dtype=dtype, device=device)
    router, report = fit_router(dual, items, max_drop=max_drop, token_budget=token_budget)
    router.save(output, overwrite=overwrite, protect=protect)
    table = Table(title=f"router for {model} on {tasks.name} ({report['items']} items, dev set)")
    for col in ("policy", "probe threshold", "confidence threshold", "accuracy", "mean tokens"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for name in ("fast", "slow", "oracle"):
        table.add_row(name, "", "", f"{report[name]['accuracy']:.1%}", f"{report[name]['mean_tokens']:.1f}")
    for name, t in report["policies"].items():
        table.add_row(name, "" if t["probe"] is None else f"{t['probe']:.3f}",
                      "" if t["confidence"] is None else f"{t['confidence']:.3f}",
                      f"{t['dev_accuracy']:.1%}", f"{t['dev_mean_tokens']:.1f}")
    out.print(table)
    out.print(f"probe AUC {report['probe_auc']:.3f} · confidence AUC {report['confidence_auc']:.3f} · wrote {output}")
