"""SmoothQuant W8A8 (Xiao et al. 2022; as mit-han-lab/smoothquant).

Activation outliers sit in a few input channels, which per-token int8 rounding handles badly;
weights are easy. Per input channel j of the linears after a norm, s_j = max|X_j|^α / max|W_j|^(1−α)
(max over tokens, and over the rows of every linear sharing the input): the norm's weight takes /s,
the linears' columns ·s (the float function is unchanged), moving part of the range into the weights.
Then every decoder linear becomes a W8A8Linear (int8 per-channel weights, dynamic per-token int8
activations). Sites smoothed, as the reference for Llama: (q, k, v) after input_layernorm and
(gate, up) after post_attention_layernorm.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...config import check, register_config
from ...progress import progress_bar
from ..api import PassConfig, register_pass
from ..calibration import decoder_layers, run_layer, walk_layers
from .awq import Site, fold_scale_, input_sites
from .linear import W8A8Linear
from .primitives import Scheme
from .swap import check_targets, layer_linears, quantize_head_, scheme_stats, set_module

TINY = 1e-5  # floor of activation/weight maxima and of scales: dead channels must not divide by zero


@register_config
@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(PassConfig):
    """alpha: migration strength in [0, 1] (0.5 default; higher moves more of the activations' range
    into the weights). head: also quantize the LM head and embedding to one int8 weight-only table."""

    alpha: float = 0.5
    head: bool = False

    kind: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        check(0 <= self.alpha <= 1, f"alpha must be in [0, 1], not {self.alpha}", "use e.g. --alpha 0.5")


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (K,) from the per-channel activation max (K,) and the weights (N_i, K) that read the input."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=TINY)
    return (act_max.float().clamp(min=TINY).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=TINY)


def smooth_sites(layer: nn.Module) -> list[Site]:
    """The sites whose input comes straight from a norm."""
    return [s for s in input_sites(layer) if s.prev is not None and type(layer.get_submodule(s.prev)) is not nn.Linear]


def activation_max(layer: nn.Module, sites: list[Site], inputs: list, kwargs: dict) -> list[torch.Tensor]:
    """max |x| per input channel (K,) of each site over the held inputs."""
    maxes: list = [0] * len(sites)

    def hook(j):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            maxes[j] = torch.maximum(maxes[j], x) if torch.is_tensor(maxes[j]) else x
        return record

    hooks = [layer.get_submodule(s.names[0]).register_forward_pre_hook(hook(j)) for j, s in enumerate(sites)]
    try:
        run_layer(layer, inputs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return maxes


@torch.no_grad()
def smooth_layer_(layer: nn.Module, inputs: list, kwargs: dict, alpha: float) -> int:
    """Smooth one layer's norm sites from its held inputs; returns the number of sites."""
    sites = smooth_sites(layer)
    for site, act in zip(sites, activation_max(layer, sites, inputs, kwargs)):
        fold_scale_(layer, site, smooth_scales(act, [layer.get_submodule(n).weight for n in site.names], alpha))
    return len(sites)


@torch.no_grad()
def smooth_(model, tokens: torch.Tensor, alpha: float = 0.5, show_progress: bool = False) -> int:
    """Smoothing alone (float model, function unchanged): returns the number of sites smoothed."""
    walk = walk_layers(model, tokens, store_dtype=torch.bfloat16)
    return sum(smooth_layer_(layer, inputs, kwargs, alpha) for _i, layer, inputs, kwargs in
               progress_bar(walk, "smooth", show=show_progress, total=len(decoder_layers(model))))


@register_pass(SmoothQuantConfig)
@torch.no_grad()
def _smoothquant(model, cfg: SmoothQuantConfig, ctx) -> dict:
    check_targets(model, Scheme(8), head=cfg.head)
    smoothed, before, after, count = 0, 0, 0, 0
    walk = walk_layers(model, ctx.tokens, store_dtype=torch.bfloat16)
    for _i, layer, inputs, kwargs in progress_bar(walk, "smoothquant", show=ctx.show_progress,
                                                   total=len(decoder_layers(model))):
        smoothed += smooth_layer_(layer, inputs, kwargs, cfg.alpha)
        for name, lin in layer_linears(layer).items():  # the walk then feeds the next layer int8 outputs
            q = W8A8Linear.from_linear(lin).to(lin.weight.device)
            set_module(layer, name, q)
            before += lin.weight.numel() * lin.weight.element_size()
            after += q.stored_bytes()
            count += 1
    stats = {"layers": count, "smoothed_sites": smoothed, "linear_bytes_before": before, "linear_bytes_after": after}
    if cfg.head:
        stats.update(quantize_head_(model))
    return {**stats, **scheme_stats(model, cfg.head)}
