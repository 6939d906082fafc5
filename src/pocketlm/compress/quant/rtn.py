"""Round-to-nearest weight-only quantization of every decoder linear layer (no calibration data)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ...config import check, register_config
from ...errors import ConfigError
from ..api import PassConfig, register_pass
from ..calibration import decoder_layers
from .linear import QuantLinear

GROUP_SIZES = (32, 64, 128, 256)


@register_config
@dataclasses.dataclass(frozen=True)
class RTNConfig(PassConfig):
    """bits: 8 (symmetric, per output channel) or 4 (asymmetric, per group of `group_size` inputs).
    head: also quantize the LM head (as llama.cpp does); a head tied to the embedding is untied
    first, the embedding stays float for its row lookups. Embeddings are never quantized."""

    bits: int = 8
    group_size: int = 128
    head: bool = False

    kind: ClassVar[str] = "rtn"

    def validate(self) -> None:
        check(self.bits in (4, 8), f"RTN supports 8 or 4 bits, not {self.bits}", "use --bits 8 or --bits 4")
        check(self.group_size in GROUP_SIZES, f"group size {self.group_size} is not one of {GROUP_SIZES}",
              "use --group-size 32, 64, 128 or 256")


def _linears(layer: nn.Module):
    for name, mod in layer.named_modules():
        if type(mod) is nn.Linear:
            yield name, mod


@register_pass(RTNConfig)
def _rtn(model, cfg: RTNConfig, ctx) -> dict:
    layers = decoder_layers(model)
    targets = [(layer, name, mod) for layer in layers for name, mod in _linears(layer)]
    if not targets:
        raise ConfigError("the model has no nn.Linear layers in its decoder to quantize",
                          "quantize a model with linear projections (MoE experts are fused and not covered yet)")
    if cfg.bits == 4:  # check every layer before changing any
        bad = sorted({m.in_features for _, _, m in targets if m.in_features % cfg.group_size})
        if bad:
            raise ConfigError(f"group size {cfg.group_size} does not divide input width(s) {bad}",
                              "choose a group size that divides every linear layer's input width")
    if cfg.head:
        head = model.get_output_embeddings()
        if type(head) is not nn.Linear or head.in_features % (cfg.group_size if cfg.bits == 4 else 1):
            raise ConfigError("the LM head is not a plain linear layer divisible by the group size",
                              "quantize without head=True")
        targets.append((model, "lm_head", head))
        model.config.tie_word_embeddings = False  # the embedding keeps the float rows
    before = after = 0
    for layer, name, mod in targets:
        q = QuantLinear.from_linear(mod, cfg.bits, cfg.group_size if cfg.bits == 4 else None)
        parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
        setattr(parent, name.rsplit(".", 1)[-1], q)
        before += mod.weight.numel() * mod.weight.element_size()
        after += q.weight_bytes()
    return {"layers": len(targets), "linear_bytes_before": before, "linear_bytes_after": after}
