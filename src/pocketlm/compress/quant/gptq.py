"""GPTQ (Frantar et al. 2022): weight-only quantization that rounds one input column at a time and
moves each column's rounding error onto the columns not yet rounded, weighted by the calibration
Hessian H = 2XᵀX/N, so that the layer's output XWᵀ changes as little as possible.

`gptq_quantize_weight` is the math on one (N, K) matrix (as the reference IST-DASLab/gptq: dead
columns, dampening, upper Cholesky factor of H⁻¹, column blocks with lazy batch updates, act-order
with static groups); `quantize_layer_` feeds it one decoder layer's linears; the pass walks the model.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import torch
from torch import nn

from ...config import check, register_config
from ...progress import progress_bar
from ..api import register_pass
from ..calibration import decoder_layers, run_layer, walk_layers
from ..prune.unstructured import InputStats
from . import primitives as P
from .linear import QuantLinear
from .primitives import Scheme
from .rtn import WeightQuantConfig, finish_head
from .swap import check_targets, layer_linears, set_module


# The calibration walk holds inputs in bf16 (half of fp32) and runs one sequence per forward: peak RAM
# is the limit here, not speed (the Hessians are sums over tokens, so batching does not change them;
# one sequence instead of 4 costs ~25% more time and saves ~55 MB on the reference `small`).
WALK_BATCH = 1


def _upper_cholesky_of_inverse(H: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H⁻¹ in the column order `perm`: row i holds the update for
    rounding column i once the columns before it are fixed, so one left-to-right pass needs no
    re-inversion. H is not changed; at most two (K, K) matrices are held besides it."""
    H = H[perm][:, perm]
    H.diagonal()[dead[perm]] = 1.0  # inputs that were always zero: their weights cannot matter
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    del H
    if info == 0:
        L = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(L, upper=True)
    if info != 0:
        raise ValueError(f"GPTQ: the Hessian is not positive definite after dampening with damp={damp}; "
                         "raise damp (e.g. 0.1) or use more calibration data")
    return U


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                         act_order: bool = False, block: int = 128, range_search: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes of one weight matrix.

    Args:
        W: (N, K) weight; H: (K, K) input Hessian 2XᵀX/N (neither is changed).
        scheme: bits, group size, symmetry (primitives.Scheme).
        damp: added to H's diagonal as a fraction of its mean (default 0.01).
        act_order: round columns in order of descending H_ii (default False); groups are then
            "static": each contiguous group's (scale, zero) comes from the original W before any
            update, so the codes keep the contiguous group layout the kernel reads.
        block: columns per lazy-update block (default 128; widened to whole groups).
        range_search: narrower ranges tried per group for the least rounding error (primitives.params).
    Returns: codes (N, K) int32, scale and zero (N, K // group) as QuantLinear.from_codes takes them.
    """
    N, K = W.shape
    g = scheme.group(K)
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float32)
    dead = H.diagonal() == 0
    W[:, dead] = 0.0
    static = act_order or g == K  # int8 (one group per row): its parameters come from the full W once
    if static:
        scale, zero = P.params(W.reshape(N, K // g, g), scheme, range_search)  # (N, G) each
    else:
        scale, zero = W.new_zeros(N, K // g), W.new_zeros(N, K // g)
        block = -(-block // g) * g  # whole groups per block, so a group's parameters see every earlier update
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K, device=W.device)
    W = W[:, perm]
    group_of = (perm // g).tolist()  # each (permuted) column's contiguous group
    Hinv = _upper_cholesky_of_inverse(H, perm, dead, damp)  # (K, K)

    Q = torch.zeros(N, K, dtype=torch.int32, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()  # (N, b)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % g == 0:  # a group starts: its parameters from the updated weights
                scale[:, j // g], zero[:, j // g] = P.params(W1[:, i:i + g], scheme, range_search)
            s, z = scale[:, group_of[j]], zero[:, group_of[j]]  # (N,) each
            w = W1[:, i:i + 1]  # (N, 1)
            q = P.quantize(w, s, z, scheme.bits)
            Q[:, j] = q[:, 0]
            err = (w - P.dequantize(q, s, z, scheme.bits))[:, 0] / Hinv1[i, i]  # (N,)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # in place: no (N, b) temporary per column
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the later columns
    return Q[:, torch.argsort(perm)], scale, zero


def proxy_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error of a quantized weight on the calibration inputs,
    ‖(W−Ŵ)Xᵀ‖² / ‖WXᵀ‖² = tr(ΔHΔᵀ) / tr(WHWᵀ) with H = 2XᵀX/N."""
    W, D, H = W.float(), (W.float() - W_hat.float()), H.float()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp(min=1e-30))


def _hessian_hooks(linears: dict[str, nn.Linear]) -> tuple[dict[str, InputStats], list]:
    """Forward hooks accumulating each linear's input Hessian; linears called on the same input
    tensor (q/k/v, gate/up) share one accumulator. Returns (accumulators by name, hook handles)."""
    acc: dict[str, InputStats] = {}
    last: list = [lambda: None, None]  # (weakref to the last input seen, its accumulator)

    def hook(name: str, lin: nn.Linear):
        def fn(_mod, args):
            x = args[0]
            if last[0]() is x:  # same input as the linear before: already added
                acc.setdefault(name, last[1])
                if acc[name] is last[1]:
                    return
            stats = acc.setdefault(name, InputStats(lin.in_features, hessian=True))
            stats.add(x)
            last[:] = [weakref.ref(x), stats]
        return fn

    return acc, [lin.register_forward_pre_hook(hook(n, lin)) for n, lin in linears.items()]


@torch.no_grad()
def quantize_layer_(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, scheme: Scheme | dict[str, Scheme],
                    damp: float = 0.01, act_order: bool = False, block: int = 128,
                    range_search: int = 0) -> list[float]:
    """GPTQ every plain linear of one decoder layer in place: their Hessians from one pass over
    `inputs` (held (B, L, hidden) batches), then each is rounded and swapped for a QuantLinear.
    `scheme`: one for all, or one per linear by its name in the layer (mixed precision).
    A linear no input reached (an unused expert) is rounded to nearest. Returns proxy errors."""
    linears = layer_linears(layer)
    schemes = scheme if isinstance(scheme, dict) else {name: scheme for name in linears}
    acc, hooks = _hessian_hooks(linears)
    try:
        for h in inputs:
            run_layer(layer, [h], kwargs)  # one batch at a time: outputs are not kept
    finally:
        for hk in hooks:
            hk.remove()
    errors = []
    for name, lin in linears.items():
        stats, scheme = acc.get(name), schemes[name]
        if stats is None or stats.n_rows == 0:
            set_module(layer, name, QuantLinear.from_linear(lin, scheme))
            continue
        H = stats.hessian_matrix.to(lin.weight.device)
        q, s, z = gptq_quantize_weight(lin.weight, H, scheme, damp, act_order, block, range_search)
        errors.append(proxy_error(lin.weight, P.dequantize_matrix(q, s, z, scheme.bits), H))
        set_module(layer, name, QuantLinear.from_codes(q, s, z, scheme, lin.bias, lin.weight.dtype))
    return errors


def check_gptq_options(damp: float, block: int = 128) -> None:
    check(0 < damp < 1, f"damp {damp} is outside (0, 1)", "use e.g. 0.01 (a fraction of the mean Hessian diagonal)")
    check(block >= 1, f"block {block} must be positive", "use e.g. 128")


def linear_bytes(targets: dict[str, nn.Linear]) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in targets.values())


def check_and_count(model, cfg: WeightQuantConfig) -> tuple[int, int]:
    """Check the pass's targets (swap.check_targets); return how many and their float bytes, keeping no
    reference to them: holding the float linears would keep their weights alive after each swap."""
    targets = check_targets(model, cfg.scheme, head=cfg.head)
    return len(targets), linear_bytes(targets)


def quant_bytes(model) -> int:
    return sum(m.stored_bytes() for m in decoder_layers(model).modules() if isinstance(m, QuantLinear))


@register_config
@dataclasses.dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig):
    """GPTQ with calibration data (see WeightQuantConfig for bits, group_size, sym, head).

    damp: Hessian dampening as a fraction of its mean diagonal (default 0.01).
    act_order: round columns by descending activation energy, with static groups (default True).
    block: columns per lazy-update block (default 128).
    range_search: narrower ranges tried per group, keeping the least rounding error (default 20; 0: min/max).
    """

    bits: int = 4
    damp: float = 0.01
    act_order: bool = True
    block: int = 128
    range_search: int = 20

    kind: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        check_gptq_options(self.damp, self.block)
        check(self.range_search >= 0, f"range_search {self.range_search} is negative", "use e.g. 20 (0: min/max)")


@register_pass(GPTQConfig)
@torch.no_grad()
def _gptq(model, cfg: GPTQConfig, ctx) -> dict:
    n_layers, bytes_before = check_and_count(model, cfg)
    errors: list[float] = []
    walk = walk_layers(model, ctx.tokens, batch_size=WALK_BATCH, store_dtype=torch.bfloat16)
    for _i, layer, inputs, kwargs in progress_bar(walk, "gptq", show=ctx.show_progress,
                                                   total=len(decoder_layers(model))):
        errors += quantize_layer_(layer, inputs, kwargs, cfg.scheme, cfg.damp, cfg.act_order, cfg.block,
                                  cfg.range_search)
    stats = {"layers": n_layers, "linear_bytes_before": bytes_before, "linear_bytes_after": quant_bytes(model),
             "mean_relative_output_error": sum(errors) / max(len(errors), 1)}
    return finish_head(model, cfg, stats)
