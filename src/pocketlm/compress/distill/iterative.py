"""Iterative distillation with checkpoint merging between rounds (Pangu Embedded).

Each round (1) ranks the teacher-written examples by the current student's loss on them and takes
the hardest `hard_share` of `per_round` plus a random rest (so easy skills are still rehearsed),
(2) distills on them from the teacher, and (3) merges the round's checkpoint with the merged model of
the previous rounds (`merge_weight` is the new checkpoint's share), which the next round starts from.
With `merge` None the rounds simply continue from each trained checkpoint: the baseline.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, ClassVar, Sequence

from ...config import BaseConfig, check, register_config
from .merge import merge_states
from .sequence import example_losses, pack_examples
from .trainer import KDConfig, distill


@register_config
@dataclasses.dataclass(frozen=True)
class IterativeConfig(BaseConfig):
    rounds: int = 3
    per_round: int = 2000
    hard_share: float = 0.75
    merge: str | None = "linear"
    merge_weight: float = 0.5
    kd: KDConfig = KDConfig(steps=150, batch_size=16, seq_len=256, lr=1e-3, alpha=0.5)

    kind: ClassVar[str] = "iterative_kd"

    def validate(self) -> None:
        check(self.rounds >= 1 and self.per_round >= 1, "rounds and examples per round must be at least 1",
              "use e.g. 3 rounds of 2000 examples")
        check(0 <= self.hard_share <= 1, f"hard_share {self.hard_share} is outside [0, 1]", "use e.g. 0.75")
        check(self.merge in (None, "linear", "slerp"), f"merge '{self.merge}' is not linear, slerp or none",
              "use linear or slerp (TIES needs a common base, which rounds of one model do not have)")
        check(0 < self.merge_weight < 1, f"merge_weight {self.merge_weight} is outside (0, 1)", "use e.g. 0.5")


def iterative_distill(student, teacher, examples: Sequence[dict], cfg: IterativeConfig, *, pad_id: int,
                      evaluate: Callable[[object], dict] | None = None, show_progress: bool = True) -> list[dict]:
    """Run the rounds on `student` in place; per round: the examples chosen, the loss curve ends, and
    `evaluate(student)` of the trained checkpoint and (when merging) of the merged one."""
    rng = random.Random(cfg.kd.seed)
    merged = None
    history = []
    for r in range(cfg.rounds):
        losses = example_losses(student, examples)
        order = sorted(range(len(examples)), key=lambda i: -losses[i])
        n = min(cfg.per_round, len(examples))
        hard = order[: int(n * cfg.hard_share)]
        rest = rng.sample(order[len(hard):], n - len(hard))
        chosen = [examples[i] for i in hard + rest]
        ids, mask = pack_examples(chosen, cfg.kd.seq_len, pad_id)
        run = distill(student, teacher, ids, cfg.kd.replace(seed=cfg.kd.seed + r), mask=mask,
                      show_progress=show_progress)
        row = {"round": r + 1, "examples": n, "rows": ids.shape[0],
               "chosen_mean_loss": sum(losses[i] for i in hard + rest) / n,
               "loss_first": run["loss_curve"][0], "loss_last": run["loss_curve"][-1], "wall_s": run["wall_s"]}
        if evaluate is not None:
            row["trained"] = evaluate(student)
        if cfg.merge is not None and merged is not None:
            state = student.state_dict()
            w = cfg.merge_weight
            mixed = merge_states([merged, state], cfg.merge, names=["merged", f"round {r + 1}"],
                                 weights=[1 - w, w] if cfg.merge == "linear" else None, t=w)
            student.load_state_dict(mixed)
            if evaluate is not None:
                row["merged"] = evaluate(student)
        merged = {k: v.detach().clone() for k, v in student.state_dict().items()}
        history.append(row)
    return history
