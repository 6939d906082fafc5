"""Progressive quantization with layer-wise retraining: GPTQ block (decoder layer) by block, and after
each block a brief re-fit of its remaining float parameters (RMSNorm weights, biases, and the scales
and zeros of its QuantLinears; the integer codes stay) so that its output on calibration data matches
the original float block's.

Two streams of held inputs: the float model's (x_fp: the original block maps it to the target) and
the quantized model's (x_q: what the re-fitted earlier blocks produce). Only the current block's
float original is copied, never the whole model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check, register_config
from ...progress import progress_bar
from ..api import register_pass
from ..calibration import (advance_, copy_inputs, decoder_layers, first_layer_inputs, large_blocks_returned,
                           run_layer)
from . import primitives as P
from .gptq import check_and_count, check_gptq_options, quant_bytes, quantize_layer_
from .linear import QuantLinear
from .primitives import PARAM_DTYPE
from .rtn import WeightQuantConfig, finish_head
from .swap import set_module


class _FitLinear(nn.Module):
    """A QuantLinear made differentiable in its scale and zero (fp32), codes fixed:
    W = (q − MID)·s + z, used only while fitting."""

    def __init__(self, m: QuantLinear):
        super().__init__()
        self.scheme, self.out_dtype = m.scheme, m.out_dtype
        self.register_buffer("codes", m.codes().to(m.scales.device))  # (N, K) int32
        self.scale = nn.Parameter(m.scales.float().clone())  # (N, G)
        # int8 has no offset in its kernel: its zero stays 0
        self.zero = nn.Parameter(m.zeros.float().clone()) if m.bits != 8 else None
        self.bias = nn.Parameter(m.bias.detach().float().clone()) if m.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return F.linear(x, P.dequantize_matrix(self.codes, self.scale, zero, self.scheme.bits), self.bias)

    @torch.no_grad()
    def rebuild(self) -> QuantLinear:
        """The fitted values, rounded to bf16 as the kernels take them, in a new QuantLinear."""
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return QuantLinear.from_codes(self.codes.cpu(), self.scale.to(PARAM_DTYPE), zero.to(PARAM_DTYPE), self.scheme,
                                      self.bias, self.out_dtype).to(self.scale.device)


@torch.no_grad()
def block_mse(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict) -> float:
    """Mean squared error of the layer's outputs on `inputs` against `targets` (held batches)."""
    err = [F.mse_loss(run_layer(layer, [x], kwargs)[0].float(), y.float()).item() for x, y in zip(inputs, targets)]
    return sum(err) / len(err)


def refit_block_(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict,
                 steps: int = 100, lr: float = 1e-3) -> tuple[float, float]:
    """Fit the layer's float parameters and its QuantLinears' scales and zeros (Adam, MSE, one held
    batch per step, in fp32) so that layer(inputs) matches targets; keep the fit only if the block's
    real (kernel) output error went down. Returns (mse before, mse after)."""
    before = block_mse(layer, inputs, targets, kwargs)
    quants = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    kept = {n: p.detach().clone() for n, p in layer.named_parameters()}  # to restore when the fit does not help
    fits = {n: _FitLinear(m) for n, m in quants.items()}
    for n, f in fits.items():
        set_module(layer, n, f)
    # scales and zeros, and the vectors (norm weights, biases); float matrices (router gates) stay
    params = [p for f in fits.values() for p in (f.scale, f.zero) if p is not None]
    params += [p for p in layer.parameters() if p.ndim == 1 and p.is_floating_point()]
    saved = [(p.dtype, p.requires_grad) for p in params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            x, y = inputs[step % len(inputs)], targets[step % len(inputs)]
            out = layer(x.float(), **kwargs)
            loss = F.mse_loss((out[0] if isinstance(out, tuple) else out), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, (dt, grad) in zip(params, saved):
        p.requires_grad_(grad)
        p.data = p.data.to(dt)
    for n, f in fits.items():
        set_module(layer, n, f.rebuild())
    after = block_mse(layer, inputs, targets, kwargs)
    if after >= before:  # never make a block worse: put back the quantized block as it was
        for n, m in quants.items():
            set_module(layer, n, m)
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(kept[n])
        after = before
    return before, after


@register_config
@dataclasses.dataclass(frozen=True)
class ProgressiveConfig(WeightQuantConfig):
    """Progressive GPTQ with layer-wise re-fitting (see WeightQuantConfig for bits, group_size, sym, head).

    steps: Adam steps of the re-fit per block (default 100); lr: its learning rate (default 1e-3).
    damp, act_order, range_search: as GPTQConfig.
    """

    bits: int = 3
    steps: int = 100
    lr: float = 1e-3
    damp: float = 0.01
    act_order: bool = True
    range_search: int = 20

    kind: ClassVar[str] = "progressive"
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        check_gptq_options(self.damp)
        check(self.steps >= 0, f"steps {self.steps} is negative", "use e.g. 100 (0 is plain GPTQ)")
        check(self.lr > 0, f"lr {self.lr} must be positive", "use e.g. 1e-3")


@register_pass(ProgressiveConfig)
@torch.no_grad()
def _progressive(model, cfg: ProgressiveConfig, ctx) -> dict:
    n_layers, bytes_before = check_and_count(model, cfg)
    layers = decoder_layers(model)
    with large_blocks_returned():  # as walk_layers
        x_fp, kwargs = first_layer_inputs(model, ctx.tokens, store_dtype=torch.bfloat16)  # teacher stream
        x_q = copy_inputs(x_fp)  # student stream (advance_ overwrites each stream in place)
        errors, before, after = [], [], []
        for layer in progress_bar(layers, "progressive", show=ctx.show_progress, total=len(layers)):
            original = copy.deepcopy(layer)
            errors += quantize_layer_(layer, x_q, kwargs, cfg.scheme, cfg.damp, cfg.act_order,
                                      range_search=cfg.range_search)
            advance_(original, x_fp, kwargs)  # x_fp now holds the float block's outputs: the targets
            del original
            b, a = refit_block_(layer, x_q, x_fp, kwargs, cfg.steps, cfg.lr)
            before.append(b)
            after.append(a)
            advance_(layer, x_q, kwargs)
    stats = {"layers": n_layers, "linear_bytes_before": bytes_before,
             "linear_bytes_after": quant_bytes(model),
             "mean_relative_output_error": sum(errors) / max(len(errors), 1),
             "block_mse_before": before, "block_mse_after": after}
    return finish_head(model, cfg, stats)
