"""`pocketlm demo`: the embedded tiny model in fp32, bf16 and fp16 and with half its MLP channels
pruned, each measured against the fp32 model, and a report with the Pareto plots."""
from __future__ import annotations

import copy
from pathlib import Path

from rich.console import Console

from .compress import MlpPruneConfig, compress_
from .eval.protocol import EvalProtocol, evaluate
from .eval.report import render_report, render_table
from .io import atomic_dir, load

DTYPES = ("float32", "bfloat16", "float16")
PRUNED = "tiny-mlp50"


def run_demo(output: str | Path, *, tokens: int = 65536, overwrite: bool = False,
             protocol: EvalProtocol | None = None, console: Console | None = None) -> Path:
    """Evaluate the tiny variants against the fp32 model; write results/*.json and the report.

    Args:
        output: directory to create (atomically); `overwrite` replaces an existing one.
        tokens: evaluation tokens when no `protocol` is given (default protocol otherwise).
    Returns the output directory.
    """
    console = console or Console()
    protocol = protocol or EvalProtocol(tokens=tokens)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        base = load("tiny", dtype="float32")
        variants = [(f"tiny-{d}", base if d == "float32" else load("tiny", dtype=d)) for d in DTYPES]
        pruned = copy.deepcopy(base[0])
        compress_(pruned, MlpPruneConfig(ratio=0.5), tok=base[1], calib_samples=32, show_progress=False)
        variants.append((PRUNED, (pruned, base[1])))
        reports = []
        for label, (model, tok) in variants:
            console.print(f"[bold]{label}[/] vs tiny-float32")
            report = evaluate(model, tok, protocol, baseline=base, label=label)
            report.save(tmp / "results" / f"{label}.json")
            reports.append(report.to_dict())
        render_report(reports, tmp)
    console.print(render_table(reports))
    return Path(output)
