"""Round-to-nearest weight-only quantization of every decoder linear layer (no calibration data)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...config import check, register_config
from ..api import PassConfig, register_pass
from .linear import QuantLinear
from .primitives import GROUP_SIZES, Scheme
from .swap import check_targets, quantize_head_, scheme_stats, set_module



@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(PassConfig):
    """Fields every weight-only method shares.

    bits: 8 (symmetric, per output channel), 4 or 3 (per group of `group_size` inputs).
    sym: int4/int3 codes centred on zero (no offset); default asymmetric (min and max of each group).
    head: also quantize the LM head and the embedding to one int8 table (shared when they are tied).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    head: bool = False

    kind: ClassVar[str] = "weight_quant"
    allowed_bits: ClassVar[tuple[int, ...]] = (8, 4, 3)

    def validate(self) -> None:
        check(self.bits in self.allowed_bits, f"{self.kind} supports {self.allowed_bits} bits, not {self.bits}",
              f"use --bits {' or '.join(map(str, self.allowed_bits))}")
        check(self.group_size in GROUP_SIZES, f"group size {self.group_size} is not one of {GROUP_SIZES}",
              "use --group-size 32, 64, 128 or 256 (a layer whose width it does not divide takes the largest that does)")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size, self.sym)


@register_config
@dataclasses.dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest: each weight to its nearest code (see WeightQuantConfig for the fields)."""

    bits: int = 8
    kind: ClassVar[str] = "rtn"


def finish_head(model, cfg: WeightQuantConfig, stats: dict) -> dict:
    """Quantize the LM head and embedding when the config asks; add their bytes, the group sizes used
    and how the head is stored to `stats`."""
    if cfg.head:
        stats.update(quantize_head_(model))
    return {**stats, **scheme_stats(model, cfg.head)}


@register_pass(RTNConfig)
@torch.no_grad()
def _rtn(model, cfg: RTNConfig, ctx) -> dict:
    targets = check_targets(model, cfg.scheme, head=cfg.head)
    before = after = 0
    for name, lin in targets.items():
        q = QuantLinear.from_linear(lin, cfg.scheme)
        set_module(model, name, q)
        before += lin.weight.numel() * lin.weight.element_size()
        after += q.stored_bytes()
    return finish_head(model, cfg, {"layers": len(targets), "linear_bytes_before": before,
                                    "linear_bytes_after": after})
