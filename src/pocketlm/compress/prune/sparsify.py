"""Unstructured and N:M pruning passes: walk the decoder, feed each weight matrix to the math in
unstructured.py, zero the pruned weights in place (zeros survive save/load as plain values).

Matrices are every nn.Linear inside the decoder layers and, in MoE models, every expert's slice of
the fused expert tensors; embeddings, the LM head and router gates are left dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import ConfigError
from ...progress import progress_bar
from ..api import PassContext, register_pass
from ..calibration import decoder_layers, linear_layers, run_layer, walk_layers
from .configs import MagnitudeConfig, SparseGPTConfig, WandaConfig
from .unstructured import InputStats, global_keep_masks, magnitude_mask, sparsegpt_prune_, wanda_mask


@dataclass
class Matrix:
    """One prunable (out, in) weight: a Linear's weight or one expert's slice of a fused tensor."""

    name: str
    weight: torch.Tensor  # a view into the parameter's data
    stats: InputStats | None = field(default=None, repr=False)


def fused_experts(layer: nn.Module) -> nn.Module | None:
    """The layer's experts when stored fused, gate_up_proj (E, 2I, H) and down_proj (E, H, I); else None."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    fused = experts is not None and getattr(experts, "gate_up_proj", None) is not None
    return experts if fused and experts.gate_up_proj.ndim == 3 else None


def layer_matrices(layer: nn.Module) -> list[Matrix]:
    mats = [Matrix(name, lin.weight.data) for name, lin in linear_layers(layer).items()]
    experts = fused_experts(layer)
    if experts is not None:
        for e in range(experts.gate_up_proj.shape[0]):
            mats.append(Matrix(f"mlp.experts.{e}.gate_up_proj", experts.gate_up_proj.data[e]))
            mats.append(Matrix(f"mlp.experts.{e}.down_proj", experts.down_proj.data[e]))
    return mats


def _attach_stats(layer: nn.Module, mats: list[Matrix], hessian: bool) -> list:
    """Hooks that feed every matrix's InputStats while the layer runs; returns the hook handles."""
    by_name = {m.name: m for m in mats}
    for m in mats:
        m.stats = InputStats(m.weight.shape[1], hessian=hessian)
    hooks = [lin.register_forward_pre_hook(lambda _mod, args, m=by_name[name]: m.stats.add(args[0]))
             for name, lin in linear_layers(layer).items()]
    experts = fused_experts(layer)
    if experts is not None:
        def expert_inputs(mod, args, kwargs):
            hidden, top_k = (list(args) + [kwargs.get("hidden_states"), kwargs.get("top_k_index")])[:2]
            with torch.no_grad():
                for e in range(mod.gate_up_proj.shape[0]):
                    x = hidden[(top_k == e).any(-1)]  # (tokens routed to e, hidden)
                    if len(x) == 0:
                        continue
                    by_name[f"mlp.experts.{e}.gate_up_proj"].stats.add(x)
                    gate, up = nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                    by_name[f"mlp.experts.{e}.down_proj"].stats.add(mod.act_fn(gate) * up)
        hooks.append(experts.register_forward_pre_hook(expert_inputs, with_kwargs=True))
    return hooks


def _check_nm(model, nm: tuple[int, int] | None) -> None:
    """Refuse an N:M pattern that does not divide every matrix's input width, before any work."""
    if nm is None:
        return
    widths = sorted({m.weight.shape[1] for layer in decoder_layers(model) for m in layer_matrices(layer)})
    bad = [w for w in widths if w % nm[1]]
    if bad:
        raise ConfigError(f"N:M {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}, and {bad[0]} is not",
                          f"choose M dividing {', '.join(map(str, widths))} (e.g. 2:4)")


def _apply(mats: list[Matrix], masks: list[torch.Tensor]) -> None:
    for m, keep in zip(mats, masks):
        m.weight.mul_(keep.to(m.weight.device, m.weight.dtype))


def _sparsity_stats(model) -> dict:
    zeros = total = 0
    for layer in decoder_layers(model):
        for m in layer_matrices(layer):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return {"sparsity": zeros / total, "pruned_weights": zeros, "prunable_weights": total}


@register_pass(MagnitudeConfig)
@torch.no_grad()
def _magnitude(model, cfg: MagnitudeConfig, ctx: PassContext) -> dict:
    _check_nm(model, cfg.nm)
    mats = [m for layer in decoder_layers(model) for m in layer_matrices(layer)]
    if cfg.scope == "global":
        masks = global_keep_masks([m.weight.abs().float() for m in mats], cfg.sparsity)
    else:
        masks = [magnitude_mask(m.weight, cfg.sparsity, cfg.nm) for m in mats]
    _apply(mats, masks)
    return _sparsity_stats(model)


def _calibrated_layers(model, ctx: PassContext, what: str, hessian: bool):
    """Walk the decoder layer by layer, yielding each layer's matrices with their input statistics
    gathered from the calibration inputs (which earlier, already pruned layers produced)."""
    for _i, layer, inputs, kwargs in progress_bar(walk_layers(model, ctx.tokens), what, show=ctx.show_progress,
                                                   total=len(decoder_layers(model))):
        mats = layer_matrices(layer)
        hooks = _attach_stats(layer, mats, hessian=hessian)
        run_layer(layer, inputs, kwargs)
        for h in hooks:
            h.remove()
        yield mats


def _wanda_scores(m: Matrix) -> torch.Tensor:
    # An expert no calibration token reached has no activation norms: rank its weights by magnitude.
    norm = m.stats.col_norm.to(m.weight.device) if m.stats.n_rows else torch.ones(m.weight.shape[1], device=m.weight.device)
    return m.weight.abs().float() * norm[None, :]


@register_pass(WandaConfig)
@torch.no_grad()
def _wanda(model, cfg: WandaConfig, ctx: PassContext) -> dict:
    _check_nm(model, cfg.nm)
    if cfg.scope == "global":
        # One threshold over all layers: scores from the dense model in one walk, then prune.
        mats_all, scores = [], []
        for mats in _calibrated_layers(model, ctx, "wanda scores", hessian=False):
            mats_all += mats
            scores += [_wanda_scores(m) for m in mats]
        _apply(mats_all, global_keep_masks(scores, cfg.sparsity))
        return _sparsity_stats(model)
    for mats in _calibrated_layers(model, ctx, "wanda", hessian=False):
        _apply(mats, [wanda_mask(m.weight, m.stats.col_norm.to(m.weight.device), cfg.sparsity, cfg.nm)
                      if m.stats.n_rows else magnitude_mask(m.weight, cfg.sparsity, cfg.nm) for m in mats])
    return _sparsity_stats(model)


@register_pass(SparseGPTConfig)
@torch.no_grad()
def _sparsegpt(model, cfg: SparseGPTConfig, ctx: PassContext) -> dict:
    _check_nm(model, cfg.nm)
    for mats in _calibrated_layers(model, ctx, "sparsegpt", hessian=True):
        for m in mats:
            if m.stats.n_rows:
                sparsegpt_prune_(m.weight, m.stats.hessian_matrix.to(m.weight.device), cfg.sparsity, cfg.nm,
                                 blocksize=cfg.blocksize, percdamp=cfg.percdamp)
            else:  # an expert no calibration token reached: no Hessian, fall back to magnitude
                _apply([m], [magnitude_mask(m.weight, cfg.sparsity, cfg.nm)])
            m.stats = None  # free the Hessian before the next matrix's
    return _sparsity_stats(model)
