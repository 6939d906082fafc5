"""KD recovery as a compression pass: after pruning (Minitron) or after quantization.

A pruned student trains all its parameters. A quantized student keeps its integer codes and trains
every decoder QuantLinear's per-group scales (and zeros) and the norms. While it trains, each QuantLinear
is swapped for a `TrainableQuantLinear` that rebuilds W = (q − mid)·s + z from the fixed codes on
every forward, so the gradient reaches s and z; afterwards the trained scales go back into the
QuantLinear, in its storage precision.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..api import PassContext, register_pass
from ..calibration import DEFAULT_CALIB, decoder_layers
from ..quant.linear import QuantLinear, W8A8Linear
from ..quant.primitives import MID
from ..quant.swap import set_module
from .trainer import KDConfig, distill, packed_sequences

CHARS_PER_TOKEN = 8  # generous: tokenize only about what the steps consume (the reference BPE gives ~3.5)


class TrainableQuantLinear(nn.Module):
    """A QuantLinear with fixed codes and trainable scales (and zeros).

    They train relative to their start, s = s0 · scale and z = z0 + s0 · shift (scale from 1, shift
    from 0, in quantization steps), so one learning rate means the same relative change in every
    group, whatever its magnitude; raw scales (~1e-2) under Adam's lr-sized steps would not survive."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.inner = q
        g = q.scales.shape[1]
        codes = q.codes().to(torch.int16) - MID[q.bits]  # int16: the 8-bit codes span −128..127 after centring
        self.register_buffer("codes", codes.view(q.out_features, g, q.in_features // g))
        self.register_buffer("s0", q.scales.float())
        self.scale = nn.Parameter(torch.ones_like(self.s0))
        self.register_buffer("z0", q.zeros.float() if q.bits != 8 else None)
        self.shift = nn.Parameter(torch.zeros_like(self.s0)) if q.bits != 8 else None

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.s0 * self.scale
        return s, (self.z0 + self.s0 * self.shift if self.shift is not None else None)

    def weight(self) -> torch.Tensor:
        s, z = self.scales_zeros()
        w = self.codes.float() * s[..., None]
        if z is not None:
            w = w + z[..., None]
        return w.view(self.inner.out_features, self.inner.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.inner.bias)

    @torch.no_grad()
    def write_back(self) -> QuantLinear:
        q = self.inner
        s, z = self.scales_zeros()
        q.scales.copy_(s.to(q.scales.dtype))
        if z is not None:
            q.zeros.copy_(z.to(q.zeros.dtype))
            if q.tiled:  # torch's kernel takes a (K/group, N, 2) copy derived from scales and zeros
                q.scales_zeros.copy_(torch.stack([q.scales.t(), q.zeros.t()], -1))
        return q


@contextlib.contextmanager
def trainable_quantized(model) -> Iterator[int]:
    """Swap the decoder's QuantLinears for trainable ones; yields how many; writes them back on exit.

    With quantized layers only their scales and zeros and the norms train: the LM head and embedding
    stay as they are (float ones would drift on the small recovery set and undo more than the scales
    win; int8 ones may share one table). A model without QuantLinears is left untouched."""
    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        raise ConfigError("KD recovery cannot train through SmoothQuant's int8 activations",
                          "recover before smoothquant, or use a weight-only method (rtn, gptq, awq)")
    swapped = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, m in list(layer.named_modules()):
            if isinstance(m, QuantLinear):
                swapped[(i, name)] = TrainableQuantLinear(m)
                set_module(layer, name, swapped[(i, name)])
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):  # frozen, but the gradient must pass through it (the int8 kernel has none)
        model.set_output_embeddings(TrainableQuantLinear(head).requires_grad_(False))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if swapped:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n] and ("norm" in n or n.endswith((".scale", ".shift"))))
    try:
        yield len(swapped)
    finally:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        if isinstance(head, QuantLinear):
            model.set_output_embeddings(head)
        layers = decoder_layers(model)
        for (i, name), t in swapped.items():
            set_module(layers[i], name, t.write_back())


def training_rows(tok, text: str, cfg: KDConfig) -> torch.Tensor:
    """The token rows the KD steps consume (at most a few passes' worth of text is tokenized)."""
    need = cfg.steps * cfg.batch_size * cfg.seq_len
    return packed_sequences(tok, text[: need * CHARS_PER_TOKEN], cfg.seq_len)


@register_pass(KDConfig)
def _recover(model, cfg: KDConfig, ctx: PassContext) -> dict:
    from ...eval.data import read_text
    source = cfg.text or (ctx.calib if isinstance(ctx.calib, (str, Path)) else None) or DEFAULT_CALIB
    path, text = read_text(source)
    data = training_rows(ctx.tok, text, cfg)
    with trainable_quantized(model) as n_quant:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trained == 0:
            raise ConfigError("the model has no trainable parameters left for KD recovery",
                              "recover before quantizing the norms and embeddings")
        result = distill(model, ctx.teacher, data, cfg, show_progress=ctx.show_progress)
    curve = result["loss_curve"]
    return {"text": str(path), "trained_params": trained, "quantized_layers_trained": n_quant,
            "loss_first": curve[0], "loss_last": curve[-1], "wall_s": result["wall_s"]}
