"""`pocketlm demo`: the embedded tiny model in fp32, bf16 and fp16, measured against fp32, and a report."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .eval.protocol import EvalProtocol, evaluate
from .eval.report import render_report, render_table
from .io import atomic_dir, load

VARIANTS = ("float32", "bfloat16", "float16")


def run_demo(output: str | Path, *, tokens: int = 65536, overwrite: bool = False,
             protocol: EvalProtocol | None = None, console: Console | None = None) -> Path:
    """Evaluate `tiny` in each dtype against the fp32 model; write results/*.json and the report.

    Args:
        output: directory to create (atomically); `overwrite` replaces an existing one.
        tokens: evaluation tokens when no `protocol` is given (default protocol otherwise).
    Later compression issues add their variants here. Returns the output directory.
    """
    console = console or Console()
    protocol = protocol or EvalProtocol(tokens=tokens)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        base = load("tiny", dtype="float32")
        reports = []
        for dtype in VARIANTS:
            console.print(f"[bold]tiny[/] in {dtype} vs tiny float32")
            model, tok = base if dtype == "float32" else load("tiny", dtype=dtype)
            report = evaluate(model, tok, protocol, baseline=base, label=f"tiny-{dtype}")
            report.save(tmp / "results" / f"tiny-{dtype}.json")
            reports.append(report.to_dict())
        render_report(reports, tmp)
    console.print(render_table(reports))
    return Path(output)
