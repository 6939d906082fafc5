"""QuantLinear: a packed weight-only int8/int4 linear layer with torch's fused CPU kernels.

int8: int8 weights (N, K) with a scale per output channel → `aten._weight_int8pack_mm`.
int4: two codes per byte in the kernel's tiled layout, (scale, zero) per group of K inputs →
`aten._weight_int4pack_mm_for_cpu`. Both kernels run with bf16 activations and scales (their fp32
paths are 8-25x slower here), so inputs are cast to bf16 and outputs back. Other devices take the
named fallback: dequantize, then matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P

KERNEL_DTYPE = torch.bfloat16


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear holding quantized weights; `bits` 8 or 4, `group_size` for int4."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.out_dtype = dtype

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int | None = None) -> "QuantLinear":
        w = lin.weight.detach().contiguous()  # may be a packed view left by the runtime
        q = cls(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, w.dtype)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.detach())
        if bits == 8:
            codes, scale = P.int8_per_channel(w)
            q.register_buffer("qweight", codes)
            q.register_buffer("scales", scale.to(KERNEL_DTYPE))
        else:
            codes, scale, zero = P.int4_groupwise(w, group_size)
            # packed codes (N, K/2) uint8 and (K/group, N, 2) [scale, zero] as the kernel takes them
            q.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            q.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(KERNEL_DTYPE).contiguous())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type != "cpu":
            y = F.linear(x2, self.dequantize().to(x.dtype))  # named fallback: no fused kernel here
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.qweight, self.scales).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self.qweight, self.group_size,
                                                           self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float weight these codes stand for."""
        if self.bits == 8:
            return P.dequant_int8(self.qweight, self.scales.float())
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        # the kernel's own product with the identity reads its packed layout back exactly
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight.cpu(), self.group_size,
                                                       self.scales_zeros.cpu()).t().float()
        return w.to(self.qweight.device)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"
