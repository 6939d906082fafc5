"""The `pocketlm` command: a thin typer layer over the Python API; each command imports its work lazily."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .errors import ConfigError, PocketError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face causal LMs small and fast for edge machines, measure them, run them.")
out = Console()
if not out.is_terminal:  # piped output: keep the wide tables on one line per row
    out = Console(width=180)


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes '{value}' is not a comma-separated list of integers",
                          "use e.g. --batch-sizes 1,8") from None


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model directory, embedded name (tiny, reasoner, moe) or cached hub id."),
    baseline: Optional[str] = typer.Option(None, help="Reference model for KL and top-1 agreement."),
    baseline_dtype: str = typer.Option("float32", help="dtype of the baseline (float32: the exact reference)."),
    text: Optional[Path] = typer.Option(None, help="Evaluation text (default: embedded held-out test split)."),
    tokens: int = typer.Option(65536, help="Tokens of the text to score."),
    ctx: int = typer.Option(512, help="Window length in tokens."),
    tasks: Optional[Path] = typer.Option(None, help="JSONL of question/answer items (chat models)."),
    task_limit: Optional[int] = typer.Option(None, help="Score only the first N task items."),
    thinking: bool = typer.Option(False, "--thinking", help="Answer tasks in slow (thinking) mode."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip speed, memory and energy."),
    batch_sizes: str = typer.Option("1,8", help="Decode batch sizes, comma-separated."),
    repeats: int = typer.Option(5, help="Timed repeats (the median is reported)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    watts_per_core: float = typer.Option(10.0, help="Watts per busy core for the energy estimate."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    label: Optional[str] = typer.Option(None, help="Name in tables and plots."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the EvalReport JSON here."),
):
    """Evaluate a model under the one protocol: quality, size, memory, speed, energy."""
    from .eval.protocol import EvalProtocol, evaluate
    from .eval.report import render_table
    from .io import load

    protocol = EvalProtocol(text=str(text) if text else None, tokens=tokens, ctx=ctx,
                            tasks=str(tasks) if tasks else None, task_limit=task_limit, task_thinking=thinking,
                            speed=not no_speed, decode_batch_sizes=_batch_sizes(batch_sizes), repeats=repeats,
                            threads=threads, watts_per_core=watts_per_core)
    m, tok = load(model, dtype=dtype, device=device)
    report = evaluate(m, tok, protocol, baseline=baseline, baseline_dtype=baseline_dtype, label=label)
    out.print(render_table([report.to_dict()]))
    if json_out:
        report.save(json_out)
        out.print(f"wrote {json_out}")


@app.command("report")
def report_cmd(
    results: list[Path] = typer.Argument(..., help="EvalReport JSON files from `pocketlm eval --json`."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for report.md, report.html and plots."),
    w_time: float = typer.Option(0.2, help="Weight of normalized time per token in the score."),
    w_energy: float = typer.Option(0.2, help="Weight of normalized energy per token in the score."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Tables, weighted score and Pareto plots over several evaluation results."""
    from .eval.report import load_reports, render_table, write_report
    from .eval.score import ScoreWeights

    reports = load_reports(results)
    path = write_report(reports, output, weights=ScoreWeights(w_time=w_time, w_energy=w_energy), overwrite=overwrite)
    out.print(render_table(reports))
    out.print(f"wrote {path / 'report.html'}")


@app.command("demo")
def demo_cmd(
    output: Path = typer.Option(Path("pocketlm-demo"), "-o", "--output", help="Directory for results and report."),
    tokens: int = typer.Option(65536, help="Tokens of the embedded test text to score."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Evaluate the embedded tiny model against itself and its bf16/fp16 variants; write the report."""
    from .demo import run_demo

    path = run_demo(output, tokens=tokens, overwrite=overwrite, console=out)
    out.print(f"report: {path / 'report.html'}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: PocketErrors become one line on stderr and exit code 2 (`--debug` shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        # Standalone mode: typer reports usage errors itself (exit 2) and exits 0 on success.
        typer.main.get_command(app).main(args=argv, prog_name="pocketlm", standalone_mode=True)
    except PocketError as e:
        if debug:
            traceback.print_exc()
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        sys.exit(2)

if __name__ == "__main__":
    main()
