"""Quantized modules with torch's fused CPU kernels, stored in a portable layout.

- QuantLinear, weight-only: int8 (N, K) with a scale per output channel or group → `pocketlm_cpu::qlinear8`;
  int4 two codes per byte, (scale, zero) per group → `pocketlm_cpu::qlinear4` (both
  runtime/cpu_qlinear.cpp, fp32 activations, on the stored layout). int3 codes (and int4 on a
  machine where that kernel cannot be built) in torch's int4 tiling → `aten._weight_int4pack_mm_for_cpu`
  with bf16 activations (its fp32 path is 8-25x slower here). Other devices take the named
  fallback: dequantize, then matmul.
- W8A8Linear (SmoothQuant): int8 weights and dynamic per-token int8 activations → `torch._int_mm`.
- QuantEmbedding: row lookups from an int8 table, which a tied LM head shares.

Saved state is the portable layout of primitives.pack (the kernel's tiling depends on the machine);
`_save_to_state_dict` / `_load_from_state_dict` convert, and a module built as an empty shell (the
loaders' path) is converted by `to_kernel_layout()` once its buffers are filled.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...runtime import cpu_linear
from . import primitives as P
from .primitives import PARAM_DTYPE, Scheme

KERNEL_DTYPE = torch.bfloat16


@functools.lru_cache(maxsize=64)
def _int4_layout(n: int, k: int) -> torch.Tensor:
    """Where each code of an (n, k) matrix lands among the kernel layout's nibbles (low nibble first):
    found by packing codes that spell out their own index, four bits at a time."""
    idx = torch.arange(n * k).reshape(n, k)
    where = torch.zeros(n * k, dtype=torch.int64)
    for b in range(math.ceil(math.log2(max(n * k, 2)) / 4)):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((idx >> (4 * b)) & 15).to(torch.int32), 1)
        where |= _nibbles(packed).long() << (4 * b)
    return where


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int32)
    return torch.stack([b & 0xF, b >> 4], -1).reshape(-1)


def kernel_matmul(x2: torch.Tensor, bits: int, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    """x2 (M, K) @ codes.T on the CPU kernels. int8: codes (N, K), scales (N, G); int4 with `zeros`:
    stored codes (N, K/2), scales and zeros (N, G) — both on pocketlm's kernels, fp32 activations;
    otherwise (int3, or a machine where they cannot be built) torch's int8 kernel, or its int4 kernel
    on tiled codes and (K/group, N, 2) scales_zeros, with bf16 activations."""
    if bits == 8:
        y = cpu_linear.qlinear8(x2.float(), qweight, scales)
        if y is not None:
            return y
        if scales.shape[1] > 1:  # torch's int8 kernel takes one scale per row: named fallback
            return x2.float() @ P.dequantize_matrix(qweight.to(torch.int32), scales.float(),
                                                    torch.zeros_like(scales, dtype=torch.float32), 8).t()
        pad = -x2.shape[1] % 16
        if pad:  # torch 2.13's int8 kernel segfaults (AVX-512, 2+ rows) when K is not a multiple of 16;
            # only odd (pruned) widths pay this per-call copy of the codes
            x2, qweight = F.pad(x2, (0, pad)), F.pad(qweight, (0, pad))
        return torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), qweight, scales[:, 0])
    if zeros is not None:
        return torch.ops.pocketlm_cpu.qlinear4(x2.float(), qweight, scales, zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), qweight, group_size, scales)


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear with weight-only int8/int4/int3 codes (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        scheme = scheme.fit(in_features)  # the group size this layer's width takes
        G = in_features // scheme.group(in_features)
        self.in_features, self.out_features, self.scheme, self.out_dtype = in_features, out_features, scheme, dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        # an empty shell in the stored layout; a loader fills it, then calls to_kernel_layout()
        code_dtype = torch.int8 if scheme.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, P.packed_width(scheme.bits, in_features),
                                                    dtype=code_dtype))
        self.register_buffer("scales", torch.zeros(out_features, G, dtype=PARAM_DTYPE))
        if scheme.bits != 8:
            self.register_buffer("zeros", torch.zeros(out_features, G, dtype=PARAM_DTYPE))
        self.kernel_layout = False
        self.tiled = False  # codes in torch's int4 tiling (int3; int4 where pocketlm's kernel is unavailable)

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """From codes (N, K) and per-group scale/zero (N, G) as primitives.quantize_matrix returns them."""
        N, K = q.shape
        m = cls(K, N, scheme, bias is not None, dtype)
        m.qweight.copy_(P.pack(q, scheme.bits))
        m.scales.copy_(scale)
        if scheme.bits != 8:
            m.zeros.copy_(zero)
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m.to_kernel_layout()

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: Scheme) -> "QuantLinear":
        """Round-to-nearest of a float linear layer."""
        w = lin.weight.detach().contiguous()  # may be a packed view left by the runtime
        q, scale, zero = P.quantize_matrix(w, scheme)
        return cls.from_codes(q, scale, zero, scheme, lin.bias, w.dtype)

    @torch.no_grad()
    def to_kernel_layout(self) -> "QuantLinear":
        """Stored layout → the kernel's: int8 and int4 (pocketlm's kernels) run on it as stored; int3,
        and int4 without them, take torch's int4 tiling and (K/group, N, 2) scales and zeros."""
        if self.kernel_layout:
            return self
        own = self.bits == 4 and self.scheme.group(self.in_features) % 32 == 0 and cpu_linear.kernels_built()
        if self.bits != 8 and not own:
            codes = P.unpack(self.qweight.cpu(), self.bits, self.in_features)
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).to(self.scales.device)
            self.register_buffer("scales_zeros", torch.stack([self.scales.t(), self.zeros.t()], -1).contiguous(),
                                 persistent=False)  # derived: not saved
            self.tiled = True
        self.kernel_layout = True
        return self

    def codes(self) -> torch.Tensor:
        """The (N, K) int32 codes, from whichever layout the module holds."""
        if not self.tiled:
            return P.unpack(self.qweight.cpu(), self.bits, self.in_features)
        nib = _nibbles(self.qweight.cpu())
        out = torch.empty_like(nib)
        out[_int4_layout(self.out_features, self.in_features)] = nib
        return out.reshape(self.out_features, self.in_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            destination[prefix + "qweight"] = P.pack(self.codes(), self.bits).to(self.qweight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.tiled:  # loading stored codes into a module already in use
            self.qweight = torch.zeros(self.out_features, P.packed_width(self.bits, self.in_features),
                                       dtype=torch.uint8, device=self.qweight.device)
            self.tiled = False
        self.kernel_layout = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.to_kernel_layout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type != "cpu":
            y = F.linear(x2, self.dequantize().to(x.dtype))  # named fallback: no fused kernel here
        else:
            y = kernel_matmul(x2, self.bits, self.qweight, self.scales_zeros if self.tiled else self.scales,
                              None if self.tiled or self.bits == 8 else self.zeros, self.scheme.group_size).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float weight these codes stand for."""
        zero = self.zeros.float() if self.bits != 8 else torch.zeros_like(self.scales, dtype=torch.float32)
        w = P.dequantize_matrix(self.codes(), self.scales.float().cpu(), zero.cpu(), self.bits)
        return w.to(self.scales.device)

    def stored_bytes(self) -> int:
        """Bytes this layer takes in the saved artifact (portable layout)."""
        n = self.out_features * P.packed_width(self.bits, self.in_features) + self.scales.numel() * 2
        n += self.zeros.numel() * 2 if self.bits != 8 else 0
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        s = self.scheme
        g = "" if s.group_size is None else f", group_size={s.group_size}" + (f", sym={s.sym}" if s.bits != 8 else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}{g}"


class QuantEmbedding(nn.Module):
    """Embedding rows looked up from an int8 QuantLinear's table (the LM head's, when they are tied):
    one table in memory and on disk, so a tied model stays tied."""

    def __init__(self, table: QuantLinear, padding_idx: int | None = None):
        super().__init__()
        if table.bits != 8:
            raise ValueError("QuantEmbedding needs an int8 table (rows are looked up whole)")
        self.table = [table]  # a plain list: the table is saved once, as the head's
        self.num_embeddings, self.embedding_dim, self.padding_idx = table.out_features, table.in_features, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table[0]
        rows = F.embedding(ids, t.qweight).to(t.out_dtype)
        G = t.scales.shape[1]  # a scale per row, or per group of the row's inputs
        scaled = rows.unflatten(-1, (G, -1)) * t.scales[ids].to(t.out_dtype)[..., None]
        return scaled.flatten(-2)


class W8A8Linear(nn.Module):
    """SmoothQuant linear: int8 weights (N, K) with a scale per output channel; each input row is
    quantized to int8 on the fly with its own scale (dynamic per-token), then `torch._int_mm`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, 1, dtype=torch.float32))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "W8A8Linear":
        w = lin.weight.detach().float()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.dtype)
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        m.qweight.copy_(torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        m.scales.copy_(scale)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        xs = x2.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127  # (M, 1) per-token scale
        xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
        if x.device.type == "cpu":
            acc = torch._int_mm(xq, self.qweight.t()).float()  # (M, N) int32 → fp32
        else:  # named fallback: _int_mm's CUDA shape rules (M > 16, multiples of 8) do not fit decode
            acc = xq.float() @ self.qweight.t().float()
        y = (acc * xs * self.scales.t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales

    def stored_bytes(self) -> int:
        n = self.qweight.numel() + self.scales.numel() * 4
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)
