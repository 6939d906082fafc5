"""One expert's FFN as the runtime holds it: float, or int8/int4 codes for the fused CPU kernels.

An expert is a small dict of tensors plus its bit width; the same names are the keys in the expert
store, so loading an expert is reading its tensors. Float experts compute exactly as transformers'
fused-expert modules do (`linear(x, gate_up)` split in two, `act(gate) * up`, `linear(·, down)`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..compress.quant.linear import QuantLinear, kernel_matmul
from ..compress.quant.primitives import Scheme, quantize_matrix

MATRICES = ("gate_up", "down")


class Expert:
    """Weights of one expert. bits None: float `gate_up` (2I, H) and `down` (H, I); bits 8/4: per matrix
    `{name}.q` (codes, kernel layout), `{name}.s` and `{name}.z` as QuantLinear holds them (int8: (N, 1)
    scales; int4: (N, G) scales and zeros, or torch's tiling with (K/g, N, 2) scales_zeros and no `.z`)."""

    __slots__ = ("tensors", "bits", "group_size", "nbytes", "slab")

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int | None = None, group_size: int | None = None,
                 slab: torch.Tensor | None = None):
        self.tensors, self.bits, self.group_size = tensors, bits, group_size
        self.slab = slab  # the one buffer the tensors view, when loaded from a store (the cache reuses it)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def _matmul(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.bits is None:
            return F.linear(x, self.tensors[name])
        t = self.tensors
        return kernel_matmul(x, self.bits, t[f"{name}.q"], t[f"{name}.s"], t.get(f"{name}.z"),
                             self.group_size).to(x.dtype)

    def __call__(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        gate, up = self._matmul(x, "gate_up").chunk(2, dim=-1)
        return self._matmul(act(gate) * up, "down")


def quantize_expert(weights: dict[str, torch.Tensor], bits: int, group_size: int = 64, search: int = 16) -> Expert:
    """Round-to-nearest of both matrices (with GPTQ's range search): int8 per channel, int4 per group."""
    scheme = Scheme(bits, group_size if bits != 8 else None)
    tensors = {}
    for name in MATRICES:
        w = weights[name].float()
        q, scale, zero = quantize_matrix(w, scheme, search=search)
        lin = QuantLinear.from_codes(q, scale, zero, scheme)
        tensors[f"{name}.q"] = lin.qweight
        tensors[f"{name}.s"] = lin.scales_zeros if lin.tiled else lin.scales
        if bits != 8 and not lin.tiled:
            tensors[f"{name}.z"] = lin.zeros
    return Expert(tensors, bits, scheme.group_size)


def expert_bytes(hidden: int, intermediate: int, bits: int | None, group_size: int = 64,
                 float_bytes: int = 2) -> int:
    """Bytes of one expert's weights (codes and their scales/zeros in bf16) at a bit width; None: float."""
    n = 3 * hidden * intermediate
    if bits is None:
        return n * float_bytes
    if bits == 8:
        return n + (2 * intermediate + hidden) * 2  # a bf16 scale per output row
    return n * bits // 8 + n // group_size * 4  # bf16 scale and zero per group
