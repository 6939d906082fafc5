"""The RL command of the `pocketlm` app: `pocketlm rl POLICY --tasks FILE -o OUT` (registered on cli.app)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import _threads, app, out
from .errors import ConfigError


@app.command("rl")
def rl_cmd(
    policy: str = typer.Argument(..., help="Chat model with a Qwen3-style thinking switch (e.g. reasoner)."),
    tasks: Path = typer.Option(..., help="JSONL items: question, answer, kind (its checker: numeric or exact)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory for the trained policy."),
    steps: int = typer.Option(60, help="Learner updates."),
    prompts_per_step: int = typer.Option(8, help="Prompts (groups) per update."),
    group_size: int = typer.Option(8, help="Completions sampled per prompt."),
    max_tokens: int = typer.Option(192, help="Most new tokens per completion."),
    lr: float = typer.Option(2e-5, help="AdamW learning rate."),
    kl_coef: float = typer.Option(0.02, help="Weight of KL to the reference (the policy after warm-up)."),
    clip: float = typer.Option(0.2, help="PPO clip range of the policy ratio."),
    temperature: float = typer.Option(0.6, help="Sampling temperature of the rollouts (the policy trained)."),
    explore: float = typer.Option(0.25, help="Share of each group whose think/no-think decision is forced."),
    w_format: float = typer.Option(0.2, help="Weight of the format reward."),
    w_cost: float = typer.Option(0.1, help="Cost reward weight: its floor; it rises once accuracy is at target (0: off)."),
    w_repetition: float = typer.Option(0.2, help="Weight of the repetition reward."),
    target_accuracy: Optional[float] = typer.Option(None, help="Accuracy above which the cost weight rises (default: "
                                                    "forced-thinking samples' accuracy minus 1 point)."),
    staleness: int = typer.Option(0, help="Policy versions a rollout may lag the learner (0: synchronous)."),
    workers: int = typer.Option(1, help="Rollout workers."),
    backend: str = typer.Option("inprocess", help="inprocess (threads) or ray (Ray actors)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: start a local one)."),
    warmup_items: int = typer.Option(2048, help="Items of the format warm-up before RL (0: none)."),
    warmup_correct_only: bool = typer.Option(True, "--warmup-correct-only/--warmup-all",
                                             help="Warm up only on the model's answers the checker accepts."),
    time_limit: Optional[float] = typer.Option(None, help="Stop after this many seconds of training."),
    checker: list[str] = typer.Option([], help="KIND=numeric|exact: the answer checker of a task kind."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N task items."),
    seed: int = typer.Option(0, help="Seed of sampling and data order."),
    workdir: Optional[Path] = typer.Option(None, help="Checkpoint directory (with --resume: continue from it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --workdir."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
):
    """Teach a chat model when to think: GRPO with a multi-source adaptive reward (see docs in rl/)."""
    from rich.table import Table

    from .eval.data import read_tasks
    from .rl.config import RLConfig
    from .rl.trainer import train_rl

    cfg = RLConfig(steps=steps, prompts_per_step=prompts_per_step, group_size=group_size, max_tokens=max_tokens,
                   temperature=temperature, lr=lr, kl_coef=kl_coef, clip=clip, explore=explore, w_format=w_format,
                   w_cost=w_cost, w_repetition=w_repetition, target_accuracy=target_accuracy, staleness=staleness,
                   workers=workers, backend=backend, warmup_items=warmup_items,
                   warmup_correct_only=warmup_correct_only, time_limit_s=time_limit, seed=seed)
    kinds = _checkers(checker)
    items = [{**it, "checker": kinds[it.get("kind")]} if it.get("kind") in kinds else it
             for it in read_tasks(tasks, limit)]
    _threads(threads)
    result = train_rl(policy, items, cfg, output, workdir=workdir, resume=resume, overwrite=overwrite,
                      ray_address=ray_address)
    last = result["final"]
    table = Table(title=f"pocketlm rl · {result['steps']} steps in {result['wall_s']:.0f} s")
    for col in ("accuracy", "think rate", "tokens", "reward", "w_cost", "KL", "dropped stale"):
        table.add_column(col, justify="right")
    if last is not None:
        table.add_row(f"{last['accuracy']:.3f}", f"{last['think_rate']:.2f}", f"{last['tokens']:.1f}",
                      f"{last['reward']:.3f}", f"{last['w_cost']:.3f}", f"{last['kl']:.4f}",
                      str(result["dropped_stale"]))
    out.print(table)
    out.print(f"wrote {output} (per-step metrics in rl_metrics.jsonl)")


def _checkers(values: list[str]) -> dict[str, str]:
    kinds = {}
    for v in values:
        kind, _, name = v.partition("=")
        if not kind or name not in ("numeric", "exact"):
            raise ConfigError(f"--checker '{v}' is not KIND=numeric or KIND=exact", "write e.g. --checker qa=exact")
        kinds[kind] = name
    return kinds
