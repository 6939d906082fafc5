"""Quantization arithmetic on one weight matrix: schemes, parameters, rounding, packing.

Every scheme writes a weight as w ≈ (q − MID[bits]) · s + z with an integer code q per weight and a
scale s and offset z per group of inputs (for int8: per output row, or per group):

- int8: symmetric, q in −127..127, z = 0; one scale per output channel (torch's int8 kernel layout),
  or per group of `group_size` inputs (llama.cpp's Q8_0 layout at 32: a Q8_0 source is then kept
  exactly, and a channel's few large inputs no longer coarsen the steps of all its other weights).
- int4/int3: per group of `group_size` inputs, q in 0..2^bits−1, MID = 8 (torch's int4 kernel
  subtracts 8 and adds z, so int3 codes run on the same kernel). Asymmetric maps the group's min to
  code 0 and its max to the top code; symmetric centres the codes on zero.

s and z are rounded to bf16 before rounding the weights, because the kernels take them in bf16:
the codes are then exact for the values the kernels use.

A group size that does not divide a layer's input width (real models: hidden 576 is no multiple of
128) is lowered for that layer to the largest kernel group size that does (`Scheme.fit`); the
artifact records each layer's group size.
"""
from __future__ import annotations

import dataclasses

import torch

PARAM_DTYPE = torch.bfloat16
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel takes
MID = {8: 0, 4: 8, 3: 8}
CODES = {8: (-127, 127), 4: (0, 15), 3: (0, 7)}  # (lowest, highest) code


@dataclasses.dataclass(frozen=True)
class Scheme:
    """bits 8 (symmetric), 4 or 3, with a scale per group of `group_size` inputs."""

    bits: int
    group_size: int | None = None  # None: one group per output row
    sym: bool = False

    def __post_init__(self) -> None:
        if self.bits == 8:  # the int8 kernels take no offset
            object.__setattr__(self, "sym", True)

    def fit(self, in_features: int) -> "Scheme":
        """This scheme for a layer of `in_features` inputs: the group size lowered to the largest of
        GROUP_SIZES that divides the width (unchanged when the requested one does)."""
        if self.group_size is None or in_features % self.group_size == 0:
            return self
        fits = [g for g in GROUP_SIZES if g <= self.group_size and in_features % g == 0]
        if not fits:
            from ...errors import ConfigError
            raise ConfigError(f"no group size up to {self.group_size} divides input width {in_features}",
                              f"input widths must be multiples of {GROUP_SIZES[0]} for int{self.bits} groups; "
                              "use --bits 8 (per channel)")
        return dataclasses.replace(self, group_size=fits[-1])

    def group(self, in_features: int) -> int:
        return self.fit(in_features).group_size or in_features

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight, parameters included (bf16 scale, and zero when asymmetric)."""
        params = 16 if self.sym else 32
        return self.bits + params / self.group(in_features)


def params(w: torch.Tensor, scheme: Scheme, search: int = 0, max_shrink: float = 0.2
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of each row of `w` (..., g): every row is one group. Returned in fp32 holding
    bf16-representable values.

    search: also try this many narrower ranges, down to (1 − max_shrink) of min/max, and keep per
    group the one with the least rounding error (‖·‖^2.4, GPTQ's `mse` option: clipping a rare
    extreme weight buys finer steps for all the others). 0: min/max (or max |w|) only.
    """
    w = w.float()
    scale, zero = _range_params(w, scheme, 1.0)
    if not search:
        return scale, zero
    best = _rounding_error(w, scale, zero, scheme.bits)
    for i in range(1, search + 1):
        s, z = _range_params(w, scheme, 1 - max_shrink * i / search)
        err = _rounding_error(w, s, z, scheme.bits)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero


def _range_params(w: torch.Tensor, scheme: Scheme, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo_code, hi_code = CODES[scheme.bits]
    if scheme.sym:
        centre = (lo_code + hi_code + 1) // 2
        scale = w.abs().amax(-1) * shrink / (hi_code - centre)
        zero = (MID[scheme.bits] - centre) * scale
    else:
        lo, hi = w.amin(-1) * shrink, w.amax(-1) * shrink
        scale = (hi - lo) / (hi_code - lo_code)
        zero = lo - (lo_code - MID[scheme.bits]) * scale
    scale = scale.clamp(min=1e-8).to(PARAM_DTYPE).float()
    return scale, zero.to(PARAM_DTYPE).float()


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (dequantize(quantize(w, scale, zero, bits), scale, zero, bits) - w).abs().pow(2.4).sum(-1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `w` (..., g) under per-row `scale`, `zero` (...,): int32."""
    lo_code, hi_code = CODES[bits]
    q = torch.round((w.float() - zero[..., None]) / scale[..., None]) + MID[bits]
    return q.clamp(lo_code, hi_code).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (q.float() - MID[bits]) * scale[..., None] + zero[..., None]


def quantize_matrix(w: torch.Tensor, scheme: Scheme, search: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole (N, K) matrix → codes (N, K), scale and zero (N, K // group);
    `search` as in `params`."""
    N, K = w.shape
    wg = w.float().reshape(N, K // scheme.group(K), scheme.group(K))
    scale, zero = params(wg, scheme, search)
    return quantize(wg, scale, zero, scheme.bits).reshape(N, K), scale, zero


def dequantize_matrix(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    N, K = q.shape
    G = scale.shape[-1]
    return dequantize(q.reshape(N, G, K // G), scale, zero, bits).reshape(N, K)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (N, K) → the stored bytes: int8 as is; int4 two per byte (low nibble first); int3 eight
    codes in three bytes (little-endian 24-bit words)."""
    if bits == 8:
        return q.to(torch.int8)
    N, K = q.shape
    q = q.to(torch.int32)
    if bits == 4:
        pairs = q.reshape(N, K // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    octets = q.reshape(N, K // 8, 8)
    word = sum(octets[..., i] << (3 * i) for i in range(8))  # (N, K/8) 24-bit
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(3)], -1).reshape(N, K // 8 * 3).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: codes (N, K) int32."""
    if bits == 8:
        return packed.to(torch.int32)
    N = packed.shape[0]
    b = packed.to(torch.int32)
    if bits == 4:
        return torch.stack([b & 0xF, b >> 4], -1).reshape(N, in_features)
    trip = b.reshape(N, in_features // 8, 3)
    word = trip[..., 0] | (trip[..., 1] << 8) | (trip[..., 2] << 16)
    return torch.stack([(word >> (3 * i)) & 0x7 for i in range(8)], -1).reshape(N, in_features)


def packed_width(bits: int, in_features: int) -> int:
    return {8: in_features, 4: in_features // 2, 3: in_features // 8 * 3}[bits]
