"""The multi-source adaptive reward (after Pangu Embedded's MARS).

A reward source is a plain function `(prompt, completion, item) -> float | None` (None: does not apply
to this item). Sources here:
- correctness: the item's checker (by its `kind`) on the answer after the think block: 1 or 0;
- format: 1 for one closed think block at the start followed by a non-empty answer that ended with the
  stop token, else 0;
- cost: -(generated tokens) / max_tokens, in [-1, 0];
- repetition: -1 when the completion ends in a loop (runtime/repair.py's detector), else 0.

The rule (documented in the README): each source is divided by its running standard deviation over
recent steps (so a source's weight, not its units, sets its pull; a source that does not vary adds a
constant, which group normalization removes), multiplied by its weight, and summed over the sources
that apply. The cost weight adapts by dual ascent on the constraint "the policy's own choices are accurate enough":
    w_cost <- clip(w_cost + cost_lr * (acc_own - target), w_cost_0, cost_max)
acc_own: running accuracy of the samples whose decision was not forced; target: target_accuracy, or
the running accuracy of the forced-thinking samples minus accuracy_margin. Once choosing loses no more
than the margin against always thinking, answering shorter pays more. The floor w_cost_0 (the
configured weight) is AdaptThink's fixed margin: within a group, not thinking keeps a constant bonus,
so thinking pays only on prompts where it raises the chance of a right answer by more than that
margin. (With a floor of 0 the weight fell to 0 whenever sampled accuracies dipped, and the think rate
swung between always and never: the README's RL section.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from ..errors import DataError
from ..eval.quality import extract_answer
from ..runtime.repair import find_loop
from .config import SOURCES, RLConfig


@dataclasses.dataclass
class Completion:
    """A sampled completion as the reward sources see it."""

    text: str            # decoded, special tokens kept (the think block is visible)
    tokens: list[int]    # generated ids, the stop token included when it came
    stopped: bool        # ended with the stop token (not cut by max_tokens)
    max_tokens: int

    @property
    def answer(self) -> str:
        return clean(self.text.rsplit("</think>", 1)[-1])


def clean(text: str) -> str:
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        text = text.replace(special, "")
    return text.strip()


def numeric_match(answer: str, expected: str) -> bool:
    """The last number of the answer equals the expected number."""
    got = extract_answer(answer)
    try:
        return got != "" and float(got) == float(expected)
    except ValueError:
        return False


def exact_match(answer: str, expected: str) -> bool:
    return answer.strip().lower() == str(expected).strip().lower()


CHECKERS: dict[str, Callable[[str, str], bool]] = {"numeric": numeric_match, "exact": exact_match}
# Task kinds (an item's `kind`) and their checkers; the arithmetic sets' kinds are numeric.
KIND_CHECKERS = {"add": "numeric", "sub": "numeric", "mul": "numeric", "chain": "numeric", "arith": "numeric",
                 "math": "numeric", "qa": "exact"}


def checker_for(item: dict) -> Callable[[str, str], bool]:
    """The item's own `checker` (numeric or exact), else the one of its `kind`."""
    kind = item.get("kind")
    name = item.get("checker") or KIND_CHECKERS.get(kind)
    if name not in CHECKERS:
        raise DataError(f"task kind '{kind}' has no answer checker",
                        f"give items a kind among {', '.join(sorted(KIND_CHECKERS))}, or map it with --checker "
                        f"KIND=numeric|exact")
    return CHECKERS[name]


def correctness(prompt: str, c: Completion, item: dict) -> float | None:
    return float(checker_for(item)(c.answer, item["answer"]))


def format_ok(prompt: str, c: Completion, item: dict) -> float | None:
    closed = c.text.lstrip().startswith("<think>") and c.text.count("<think>") == 1 and c.text.count("</think>") == 1
    return float(closed and c.stopped and c.answer != "")


def cost(prompt: str, c: Completion, item: dict) -> float | None:
    return -len(c.tokens) / c.max_tokens


def repetition(prompt: str, c: Completion, item: dict) -> float | None:
    return -1.0 if find_loop(c.tokens) is not None else 0.0


SOURCE_FUNCS: dict[str, Callable] = {"correctness": correctness, "format": format_ok, "cost": cost,
                                     "repetition": repetition}


def score(prompt: str, c: Completion, item: dict) -> dict[str, float | None]:
    """Every source's raw value for one completion."""
    return {name: fn(prompt, c, item) for name, fn in SOURCE_FUNCS.items()}


class AdaptiveReward:
    """Combines raw source values into one reward with running normalization and adaptive weights."""

    def __init__(self, cfg: RLConfig, decay: float = 0.9):
        self.weights = {s: getattr(cfg, f"w_{s}") for s in SOURCES}
        self.cfg, self.decay = cfg, decay
        self.var: dict[str, float | None] = {s: None for s in SOURCES}  # running variance per source
        self.acc: dict[str, float | None] = {"own": None, "think": None}  # running accuracies (see adapt)

    def observe(self, raws: Sequence[dict[str, float | None]]) -> None:
        """Update each source's running variance with one step's raw values."""
        for s in SOURCES:
            vals = [r[s] for r in raws if r.get(s) is not None]
            if len(vals) < 2:
                continue
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
            self.var[s] = var if self.var[s] is None else self.decay * self.var[s] + (1 - self.decay) * var

    def combine(self, raw: dict[str, float | None]) -> float:
        """sum over applicable sources of weight * value / running std (std floored at 0.05)."""
        total = 0.0
        for s in SOURCES:
            v = raw.get(s)
            if v is None or self.weights[s] == 0:
                continue
            std = math.sqrt(self.var[s]) if self.var[s] is not None else 1.0
            total += self.weights[s] * v / max(std, 0.05)
        return total

    def adapt(self, samples) -> None:
        """Dual ascent on the accuracy constraint (module doc) with one step's samples."""
        for key, forced in (("own", None), ("think", "slow")):
            vals = [s.raw["correctness"] for s in samples if s.forced == forced and s.raw["correctness"] is not None]
            if vals:
                acc = sum(vals) / len(vals)
                self.acc[key] = acc if self.acc[key] is None else self.decay * self.acc[key] + (1 - self.decay) * acc
        if self.cfg.w_cost == 0 or self.acc["own"] is None:  # cost switched off (ablation): stays off
            return
        target = self.target()
        if target is None:
            return
        w = self.weights["cost"] + self.cfg.cost_lr * (self.acc["own"] - target)
        self.weights["cost"] = min(max(w, self.cfg.w_cost), self.cfg.cost_max)

    def target(self) -> float | None:
        if self.cfg.target_accuracy is not None:
            return self.cfg.target_accuracy
        return None if self.acc["think"] is None else self.acc["think"] - self.cfg.accuracy_margin

    def state(self) -> dict:
        return {"weights": dict(self.weights), "var": dict(self.var), "acc": dict(self.acc)}

    def load_state(self, state: dict) -> None:
        self.weights, self.var, self.acc = dict(state["weights"]), dict(state["var"]), dict(state["acc"])
