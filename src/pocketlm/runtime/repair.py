"""Repetition self-repair: find a loop at the end of a decoded row, roll the row back to where the loop
began and continue with the looping continuation blocked (Pangu Embedded's repetition self-repair).

Two detectors, both on generated tokens only (the prompt may repeat itself freely):
- a span of p ≤ max_period tokens repeated `min_repeats` times in a row at the end (p·k ≥ min_span);
- the last `ngram` tokens already occurred earlier in the output (a long exact repeat, not adjacent).
A row that never loops is decoded exactly as without repair: the detectors only read it.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import BaseConfig, check, register_config


@register_config
@dataclasses.dataclass(frozen=True)
class RepairConfig(BaseConfig):
    """When a decoded row counts as looping, and how often it may be repaired.

    min_repeats: copies of a span in a row that make a loop (3); max_period: longest span checked (32);
    min_span: fewest tokens the repeated copies must cover, so '000' in a number is no loop (12);
    ngram: length of an exact earlier repeat that counts as a loop (24; 0 = off); max_repairs: per row (4);
    penalty_tokens: after a repair, the looped span's tokens are banned at the repaired position and
    down-weighted (logit − penalty) for this many next tokens (8; 0 = ban only); penalty: 4.0.
    """

    min_repeats: int = 3
    max_period: int = 32
    min_span: int = 12
    ngram: int = 24
    max_repairs: int = 4
    penalty_tokens: int = 8
    penalty: float = 4.0

    kind: ClassVar[str] = "repair"

    def validate(self) -> None:
        check(self.min_repeats >= 2, f"min_repeats {self.min_repeats} is below 2", "use 2 or more copies")
        check(self.max_period >= 1, f"max_period {self.max_period} is below 1", "use 1 or more tokens")
        check(self.min_span >= 1, f"min_span {self.min_span} is below 1", "use 1 or more tokens")
        check(self.ngram == 0 or self.ngram >= 4, f"ngram {self.ngram} is too short to mean a loop",
              "use 0 (off) or 4 or more tokens")
        check(self.max_repairs >= 0, f"max_repairs {self.max_repairs} is negative", "use 0 or more")
        check(self.penalty_tokens >= 0 and self.penalty >= 0, "the repair penalty is negative", "use 0 or more")


def find_loop(tokens: list[int], cfg: RepairConfig = RepairConfig()) -> int | None:
    """Index where the loop at the end of `tokens` began (the first token of the first repeat), or None.

    Only loops that end at the last token are found, so calling this after every new token finds a
    loop as soon as it is complete."""
    n = len(tokens)
    for p in range(1, min(cfg.max_period, n // cfg.min_repeats) + 1):
        k = max(cfg.min_repeats, -(-cfg.min_span // p))
        if p * k > n:
            continue
        tail = tokens[n - p * k:]
        if all(tail[i] == tail[i - p] for i in range(p, p * k)):
            return n - p * (k - 1)
    if cfg.ngram and n > cfg.ngram:
        gram = tokens[n - cfg.ngram:]
        first = gram[0]
        for s in range(n - cfg.ngram - 1, -1, -1):  # latest earlier occurrence first
            if tokens[s] == first and tokens[s:s + cfg.ngram] == gram:
                return n - cfg.ngram
    return None


def has_loop(tokens: list[int], cfg: RepairConfig = RepairConfig()) -> bool:
    """Whether any prefix of `tokens` ends in a loop (the measure of 'an output with a loop')."""
    return any(find_loop(tokens[:end], cfg) is not None for end in range(1, len(tokens) + 1))


def rollback_floor(tokens: list[int], cfg: RepairConfig = RepairConfig()) -> int:
    """The first index that a later repair could still roll back: tokens before it are final.

    A repair drops tokens[start:], where start begins a stretch that repeats the p tokens before it, or
    a suffix (shorter than `ngram`) that already occurred earlier. Streams send only the final tokens,
    so ordinary text goes out at once and only a repeat in the making is held back."""
    n = len(tokens)
    floor = n
    for p in range(1, min(cfg.max_period, n) + 1):  # longest p-periodic suffix
        m = n
        while m - 1 >= p and tokens[m - 1] == tokens[m - 1 - p]:
            m -= 1
        floor = min(floor, m)
    if cfg.ngram and n:
        last, longest = tokens[-1], 0
        for q in range(n - 2, -1, -1):  # earlier copies of the last token, and how far back they match
            if tokens[q] == last:
                length = 1
                while length < cfg.ngram - 1 and q - length >= 0 and tokens[q - length] == tokens[n - 1 - length]:
                    length += 1
                longest = max(longest, length)
                if longest == cfg.ngram - 1:
                    break
        floor = min(floor, n - longest)
    return floor
