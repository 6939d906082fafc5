"""The distillation commands of the `pocketlm` app: distill, merge, search (registered on cli.app)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import _threads, app, out
from .errors import ConfigError


@app.command("merge")
def merge_cmd(
    models: list[str] = typer.Argument(..., help="Two or more models of one architecture and tokenizer."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    method: str = typer.Option("linear", help="linear, slerp (two models) or ties (needs --base)."),
    weights: Optional[str] = typer.Option(None, help="linear: one weight per model, comma-separated."),
    t: float = typer.Option(0.5, help="slerp: 0 is the first model, 1 the second."),
    base: Optional[str] = typer.Option(None, help="ties: the model the others were fine-tuned from."),
    density: float = typer.Option(0.5, help="ties: share of each task vector's entries kept."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Merge checkpoints into one artifact (the merge is recorded in its pocketlm.json)."""
    from .compress.distill.merge import merge_models
    from .io import check_output, resolve, save

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise ConfigError(f"--weights '{weights}' is not a comma-separated list of numbers", "use e.g. 0.7,0.3") from None
    protect = tuple(p for m in [*models, *([base] if base else [])] for p in resolve(m).inputs)
    check_output(output, overwrite, protect)  # before loading anything
    model, tok, entry = merge_models(models, method, weights=w, t=t, base=base, density=density)
    save(model, tok, output, recipe=[entry], overwrite=overwrite)
    out.print(f"merged {len(models)} models ({method}) · wrote {output}")


@app.command("distill")
def distill_cmd(
    teacher: str = typer.Argument(..., help="Teacher model."),
    student: str = typer.Argument(..., help="Student model with the teacher's tokenizer (e.g. a pruned teacher)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory for the trained student."),
    text: Optional[Path] = typer.Option(None, help="Training text (default: the embedded train-split slice)."),
    steps: int = typer.Option(300, help="Optimizer steps."),
    batch_size: int = typer.Option(8, help="Sequences per step (split over processes under accelerate launch)."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    lr: float = typer.Option(5e-4, help="Peak learning rate (AdamW, warm-up, cosine to 10%)."),
    temperature: float = typer.Option(2.0, help="KD temperature."),
    alpha: float = typer.Option(0.9, help="Share of the KD loss; the rest is the LM loss."),
    hidden_weight: float = typer.Option(0.0, help="Weight of hidden-state MSE (0: off)."),
    workdir: Optional[Path] = typer.Option(None, help="Checkpoint directory (with --resume: continue from it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --workdir."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
):
    """Distill a teacher into a student (logit KL + LM loss); runs under `accelerate launch` / torchrun too."""
    from accelerate import PartialState

    from .compress.calibration import DEFAULT_CALIB
    from .compress.distill.trainer import KDConfig, check_same_tokenizer, distill, packed_sequences
    from .eval.data import read_text
    from .io import check_output, load, resolve, save

    cfg = KDConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, temperature=temperature, alpha=alpha,
                   hidden_weight=hidden_weight)
    if resume and workdir is None:
        raise ConfigError("--resume needs the --workdir that holds the checkpoint", "pass --workdir DIR")
    protect = (*resolve(teacher).inputs, *resolve(student).inputs)
    check_output(output, overwrite, protect)  # before the long work
    _threads(threads)
    path, corpus = read_text(text or DEFAULT_CALIB)
    t_model, t_tok = load(teacher, moe=False)
    s_model, s_tok = load(student, moe=False)
    check_same_tokenizer(s_tok, t_tok)
    data = packed_sequences(s_tok, corpus, seq_len)
    result = distill(s_model, t_model, data, cfg, workdir=workdir, resume=resume)
    if PartialState().is_main_process:
        curve = result["loss_curve"]
        save(s_model, s_tok, output, overwrite=overwrite,
             recipe=[{**cfg.to_dict(), "teacher": teacher, "text": str(path), "final_loss": curve[-1] if curve else None}])
        out.print(f"distilled {steps} steps on {result['processes']} process(es): loss {curve[0]:.3f} → {curve[-1]:.3f} "
                  f"in {result['wall_s']:.0f} s · wrote {output}" if curve else f"nothing left to train · wrote {output}")


def _floats(value: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} '{value}' is not a comma-separated list of numbers", "use e.g. 0.25,0.5") from None


@app.command("search")
def search_cmd(
    model: str = typer.Argument(..., help="Model directory, embedded name or cached hub id."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the report, search.json and best/."),
    max_size_mb: float = typer.Option(..., help="Budget: stored weights in MB."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Budget: ms per decoded token at batch 1."),
    w_time: float = typer.Option(0.2, help="Score weight of normalized time per token."),
    w_energy: float = typer.Option(0.2, help="Score weight of normalized energy per token."),
    prune_ratios: str = typer.Option("0.25,0.5", help="Parameter shares removed by width pruning ('' for none)."),
    quant: str = typer.Option("none,int8,int4", help="Quantization choices: none, int8, int4."),
    kd_steps: int = typer.Option(100, help="KD recovery steps after each pruning (0: none)."),
    tokens: int = typer.Option(32768, help="Test-text tokens each candidate's perplexity is measured on."),
    calib: Optional[Path] = typer.Option(None, help="Calibration and KD text (default: embedded train slice)."),
    gates: Optional[Path] = typer.Option(None, help="Quality floor: acceptance gates (YAML) every chosen candidate's "
                                         "EvalReport passes, e.g. 'quality.ppl <= 1.05 * incumbent' (the original)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
):
    """Measure recipes over width pruning × KD × quantization; the Pareto set and the best within budget."""
    from rich.table import Table

    from .compress.distill.trainer import KDConfig
    from .compress.search import SearchBudget, SearchSpace, run_search
    from .eval.protocol import EvalProtocol
    from .io import check_output, load, resolve

    from .fleet.gates import load_gates
    budget = SearchBudget(max_size_mb=max_size_mb, max_latency_ms=max_latency_ms, w_time=w_time, w_energy=w_energy,
                          gates=tuple(g.text for g in load_gates(gates)) if gates else ())
    if kd_steps < 0:
        raise ConfigError(f"--kd-steps {kd_steps} is negative", "use 0 (no recovery) or more")
    space = SearchSpace(prune_ratios=_floats(prune_ratios, "--prune-ratios"),
                        quant=tuple(q.strip() for q in quant.split(",") if q.strip()),
                        kd=KDConfig(steps=kd_steps, lr=1e-3) if kd_steps else None)
    protocol = EvalProtocol(tokens=tokens, decode_batch_sizes=(1,), repeats=3, threads=threads)
    check_output(output, overwrite, protect=resolve(model).inputs)  # before the long work
    _threads(threads)
    m, tok = load(model, moe=False)
    result = run_search(m, tok, output, budget, space, protocol=protocol, calib=calib, overwrite=overwrite)
    table = Table(title=f"pocketlm search (≤ {max_size_mb:g} MB" + (f", ≤ {max_latency_ms:g} ms/token" if max_latency_ms
                                                                    else "") + f"): {result['score_formula']}")
    for col in ("candidate", "ppl", "weights MB", "decode tok/s", "score", "budget", "Pareto"):
        table.add_column(col, justify="right")
    for c in result["candidates"]:
        table.add_row(("→ " if c["name"] == result["best"] else "") + c["name"], f"{c['ppl']:.3f}",
                      f"{c['weights_mb']:.2f}", f"{c['decode_tok_s'] or 0:.1f}", f"{c['score']:.3f}",
                      "fits" if c["within_budget"] else "over", "yes" if c["pareto"] else "")
    out.print(table)
    for s in result["skipped"]:
        out.print(f"skipped {s['name']}: {s['reason']}")
    out.print(f"best within budget: {result['best']} · wrote {output}" if result["best"] else
              f"no candidate fits the budget · wrote {output} (see the Pareto front)")
