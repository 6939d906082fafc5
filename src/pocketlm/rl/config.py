"""RLConfig: every setting of the GRPO stage, validated on construction."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import BaseConfig, check, register_config

SOURCES = ("correctness", "format", "cost", "repetition")
BACKENDS = ("inprocess", "ray")


@register_config
@dataclasses.dataclass(frozen=True)
class RLConfig(BaseConfig):
    """GRPO with a multi-source adaptive reward and a bounded-staleness scheduler.

    Sampling: steps learner updates, each on prompts_per_step groups of group_size completions sampled
    from the policy itself at `temperature` with at most max_tokens new tokens; the policy trained is
    that tempered distribution (the learner's log-probabilities use the same temperature). At 1.0 a
    small model's long think traces go wrong far more often than at greedy decoding (on `reasoner`,
    forced thinking ~80% right when sampled against 99% greedy, fast answers ~75% against 78%), which
    teaches it that thinking barely pays; 0.6 is Qwen3's advice for thinking mode. explore: share of each
    group whose think/no-think decision is forced, half each way (AdaptThink's importance sampling; the
    forced decision's behaviour probability is 1/2 and enters the truncated IS weight).
    Loss: clipped policy loss (clip) on group-normalized advantages, truncated importance weights
    min(pi_prox / pi_behaviour, is_cap) for stale or forced tokens, k3 KL to the reference (kl_coef);
    AdamW at lr, gradient norm clipped at 1; epochs passes over each batch; micro_batch rows per forward.
    Reward: weights per source (see rewards.py); the cost weight adapts by dual ascent on the constraint
    "accuracy of the policy's own choices >= target" at cost_lr per step, within [w_cost, cost_max]
    (the configured weight is its floor: not thinking always earns that margin); target:
    target_accuracy, or (None) the accuracy of the same steps' forced-thinking samples minus
    accuracy_margin (thinking less may cost at most that much accuracy).
    Scheduler: staleness s (0 = synchronous GRPO; s >= 1 lets rollouts run up to s policy versions
    ahead of the learner, older samples are dropped); workers rollout workers; backend inprocess or ray.
    Prompt: the user turn ends with `switch`, the soft switch that asks the model to choose (openPangu's
    /auto_think; '' = none). Warm-up: warmup_items items whose own switched-mode answers teach the
    choosing prompt, before RL (0 = off); warmup_epochs over them at warmup_lr; replay: train the same
    answers under their switched prompts too, so /think and /no_think keep working; warmup_correct_only:
    keep only the answers the item's checker accepts.
    time_limit_s: stop after this wall time (None = after `steps`); checkpoint_every steps; seed.
    """

    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 192
    temperature: float = 0.6
    explore: float = 0.25
    lr: float = 2e-5
    clip: float = 0.2
    is_cap: float = 2.0
    kl_coef: float = 0.02
    epochs: int = 1
    micro_batch: int = 16
    w_correctness: float = 1.0
    w_format: float = 0.2
    w_cost: float = 0.1
    w_repetition: float = 0.2
    target_accuracy: float | None = None
    accuracy_margin: float = 0.01
    cost_lr: float = 0.5
    cost_max: float = 1.0
    staleness: int = 0
    workers: int = 1
    backend: str = "inprocess"
    warmup_items: int = 2048
    warmup_epochs: int = 2
    warmup_lr: float = 5e-5
    switch: str = "/auto_think"
    replay: bool = True
    warmup_correct_only: bool = True
    time_limit_s: float | None = None
    checkpoint_every: int = 10
    seed: int = 0

    kind: ClassVar[str] = "rl"

    def validate(self) -> None:
        for name in ("steps", "prompts_per_step", "max_tokens", "epochs", "micro_batch", "workers",
                     "checkpoint_every"):
            check(getattr(self, name) >= 1, f"{name} {getattr(self, name)} is below 1", "use 1 or more")
        check(self.group_size >= 2, f"group_size {self.group_size} is below 2",
              "use 2 or more completions per prompt: GRPO compares them")
        check(0 < self.temperature <= 2, f"temperature {self.temperature} is outside (0, 2]",
              "use a sampling temperature in (0, 2], e.g. 0.6")
        check(0 <= self.explore <= 1, f"explore {self.explore} is outside [0, 1]", "use a share in [0, 1]")
        check(self.lr > 0 and self.warmup_lr > 0, "a learning rate is not positive", "use a positive lr")
        check(0 < self.clip < 1, f"clip {self.clip} is outside (0, 1)", "use e.g. 0.2")
        check(self.is_cap >= 1, f"is_cap {self.is_cap} is below 1", "use 1 or more (e.g. 2)")
        check(self.kl_coef >= 0, f"kl_coef {self.kl_coef} is negative", "use 0 (off) or more")
        for s in SOURCES:
            check(getattr(self, f"w_{s}") >= 0, f"w_{s} is negative", "use 0 (off) or a positive weight")
        check(self.w_correctness > 0, "w_correctness is 0", "correctness must count: use a positive weight")
        check(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
              f"target_accuracy {self.target_accuracy} is outside (0, 1]", "use a share in (0, 1], or none")
        check(self.target_accuracy is not None or self.explore > 0 or self.w_cost == 0,
              "the accuracy target follows forced-thinking samples, and explore is 0",
              "set explore above 0 or give target_accuracy")
        check(0 <= self.accuracy_margin < 1, f"accuracy_margin {self.accuracy_margin} is outside [0, 1)",
              "use e.g. 0.01")
        check(self.cost_lr >= 0 and self.cost_max >= self.w_cost, "cost_lr is negative or cost_max below w_cost",
              "use cost_lr >= 0 and cost_max >= w_cost")
        check(self.staleness >= 0, f"staleness {self.staleness} is negative", "use 0 (synchronous) or more")
        check(self.backend in BACKENDS, f"unknown backend '{self.backend}'", "use inprocess or ray")
        check(self.warmup_items >= 0 and self.warmup_epochs >= 1, "warm-up items negative or epochs below 1",
              "use warmup_items >= 0 and warmup_epochs >= 1")
        check(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s is not positive",
              "use a positive number of seconds, or none")
        check(self.prompts_per_step % self.workers == 0,
              f"prompts_per_step {self.prompts_per_step} is not a multiple of workers {self.workers}",
              "make each worker's share of a step whole")
