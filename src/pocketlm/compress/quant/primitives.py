"""Quantization arithmetic on one weight matrix: parameters, rounding, dequantization."""
from __future__ import annotations

import torch

INT4_MID = 8  # int4 codes 0..15 are stored unsigned; the kernels subtract 8


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w ≈ q · scale.  w (N, K) → q int8 (N, K), scale fp32 (N,)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-10) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs: w ≈ (q − 8) · scale + zero, q in 0..15.

    w (N, K) → q int32 (N, K), scale and zero fp32 (N, K // group). `zero` is the value of code 8
    (the layout of torch's int4 kernels), so min maps to code 0 and max to code 15."""
    N, K = w.shape
    wg = w.float().view(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(N, K), scale, lo + INT4_MID * scale


def dequant_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def dequant_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    N, K = q.shape
    qg = q.view(N, K // group, group).float()
    return ((qg - INT4_MID) * scale[..., None] + zero[..., None]).view(N, K)
