"""The distillation commands of the `pocketlm` app: distill, merge (registered on cli.app)."""
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
    protect = tuple(resolve(m).path for m in [*models, *([base] if base else [])])
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
    protect = (resolve(teacher).path, resolve(student).path)
    check_output(output, overwrite, protect)  # before the long work
    _threads(threads)
    path, corpus = read_text(text or DEFAULT_CALIB)
    t_model, t_tok = load(teacher)
    s_model, s_tok = load(student)
    check_same_tokenizer(s_tok, t_tok)
    data = packed_sequences(s_tok, corpus, seq_len)
    result = distill(s_model, t_model, data, cfg, workdir=workdir, resume=resume)
    if PartialState().is_main_process:
        curve = result["loss_curve"]
        save(s_model, s_tok, output, overwrite=overwrite,
             recipe=[{**cfg.to_dict(), "teacher": teacher, "text": str(path), "final_loss": curve[-1] if curve else None}])
        out.print(f"distilled {steps} steps on {result['processes']} process(es): loss {curve[0]:.3f} → {curve[-1]:.3f} "
                  f"in {result['wall_s']:.0f} s · wrote {output}" if curve else f"nothing left to train · wrote {output}")
