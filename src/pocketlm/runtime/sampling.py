"""Sampling: a validated config and one function from logits to next tokens (transformers' semantics)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import BaseConfig, check, register_config


@register_config
@dataclasses.dataclass(frozen=True)
class SamplingConfig(BaseConfig):
    """How the next token is chosen.

    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = all). top_p: keep the smallest set whose probability
    reaches p (1.0 = all). repetition_penalty: divide positive and multiply negative logits of tokens
    already in the row, prompt included, as transformers does (1.0 = off). seed: makes sampling repeatable.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    kind: ClassVar[str] = "sampling"

    def validate(self) -> None:
        check(self.temperature >= 0, f"temperature {self.temperature} is negative", "use 0 (greedy) or more")
        check(self.top_k >= 0, f"top_k {self.top_k} is negative", "use 0 (off) or a positive count")
        check(0 < self.top_p <= 1, f"top_p {self.top_p} is outside (0, 1]", "use a value in (0, 1]; 1 = off")
        check(self.repetition_penalty > 0, f"repetition_penalty {self.repetition_penalty} is not positive",
              "use 1.0 (off) or a value above 1")


def penalize_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); history (B, N) token ids (padding may be any id that the row also holds)."""
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (at least one token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) float → (tokens (B,), log-probabilities of those tokens under the model (B,))."""
    logprobs = logits.log_softmax(-1)
    if cfg.repetition_penalty != 1.0 and history is not None:
        logits = penalize_repeats(logits, history, cfg.repetition_penalty)
    if cfg.temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scores = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
