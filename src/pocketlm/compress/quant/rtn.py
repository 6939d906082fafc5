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

    bits: 8 (symmetric), 4 or 3.
    group_size: inputs per scale group; None: one scale per output channel at int8, 128 at int4/int3.
    sym: int4/int3 codes centred on zero (no offset); default asymmetric (min and max of each group).
    head: also quantize the LM head and the embedding to one int8 table (shared when they are tied),
        in the int8 layers' groups (at int4/int3: one scale per row).
    """

    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    head: bool = False

    kind: ClassVar[str] = "weight_quant"
    allowed_bits: ClassVar[tuple[int, ...]] = (8, 4, 3)

    def validate(self) -> None:
        check(self.bits in self.allowed_bits, f"{self.kind} supports {self.allowed_bits} bits, not {self.bits}",
              f"use --bits {' or '.join(map(str, self.allowed_bits))}")
        check(self.group_size is None or self.group_size in GROUP_SIZES,
              f"group size {self.group_size} is not one of {GROUP_SIZES}",
              "use --group-size 32, 64, 128 or 256 (a layer whose width it does not divide takes the largest that does)")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size or (None if self.bits == 8 else 128), self.sym)

    @property
    def head_group_size(self) -> int | None:
        """The int8 head table's group size: the int8 layers' (a Q8_0 source's embedding stays exact)."""
        return self.group_size if self.bits == 8 else None


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
        stats.update(quantize_head_(model, cfg.head_group_size))
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
