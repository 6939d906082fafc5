"""Pruning configs: frozen, self-validating, registered so recipes can load them."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import check, register_config
from ..api import PassConfig

SCOPES = ("layer", "global")
IMPORTANCE = ("activation", "taylor")


def _check_nm(nm) -> tuple[int, int] | None:
    if nm is None:
        return None
    nm = tuple(nm)
    check(len(nm) == 2 and all(isinstance(v, int) for v in nm) and 0 < nm[0] < nm[1],
          f"N:M pattern {nm} is not two integers with 0 < N < M", "use e.g. --nm 2:4 (keep 2 of every 4)")
    return nm


def _check_sparsity(sparsity: float) -> None:
    check(0 <= sparsity < 1, f"sparsity {sparsity} is outside [0, 1)", "use a fraction such as 0.5")


def _check_ratio(ratio: float, what: str) -> None:
    check(0 < ratio < 1, f"{what} ratio {ratio} is outside (0, 1)", "use a fraction such as 0.25")


@dataclasses.dataclass(frozen=True)
class _Unstructured(PassConfig):
    """sparsity: fraction of each matrix's weights set to zero (ignored with nm); nm: (N, M) keeps N
    of every M consecutive inputs; scope: 'layer' (each matrix at `sparsity`) or 'global' (one threshold)."""

    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    scope: str = "layer"

    def validate(self) -> None:
        _check_sparsity(self.sparsity)
        object.__setattr__(self, "nm", _check_nm(self.nm))
        check(self.scope in SCOPES, f"scope '{self.scope}' is not one of {SCOPES}", "use layer or global")
        check(not (self.nm and self.scope == "global"), "N:M masks are per group, not global",
              "drop --scope global with --nm")


@register_config
@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(_Unstructured):
    """Remove the smallest |W| in every linear layer of the decoder (embeddings and head untouched)."""

    kind: ClassVar[str] = "prune_magnitude"


@register_config
@dataclasses.dataclass(frozen=True)
class WandaConfig(_Unstructured):
    """Wanda: remove the lowest |W|·‖X‖ within each output row, from calibration activations."""

    kind: ClassVar[str] = "prune_wanda"
    needs_calibration: ClassVar[bool] = True


@register_config
@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(_Unstructured):
    """SparseGPT: OBS pruning with the calibration Hessian, layer by layer; blocksize columns at a
    time; percdamp: Hessian dampening as a fraction of its mean diagonal. Layer scope only."""

    kind: ClassVar[str] = "prune_sparsegpt"
    needs_calibration: ClassVar[bool] = True
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        super().validate()
        check(self.scope == "layer", "SparseGPT prunes layer by layer", "use scope layer")
        check(self.blocksize >= 1, f"blocksize {self.blocksize} must be positive", "use e.g. 128")
        check(0 < self.percdamp < 1, f"percdamp {self.percdamp} is outside (0, 1)", "use e.g. 0.01")


@dataclasses.dataclass(frozen=True)
class _Structured(PassConfig):
    needs_calibration: ClassVar[bool] = True
    importance: str = "activation"

    def validate(self) -> None:
        check(self.importance in IMPORTANCE, f"importance '{self.importance}' is not one of {IMPORTANCE}",
              "use activation or taylor")


@register_config
@dataclasses.dataclass(frozen=True)
class HeadPruneConfig(_Structured):
    """Remove attention heads. unit 'query': the same number of query heads from every KV group
    (GQA stays consistent); 'kv_group': whole KV groups with their query heads. scope 'layer' removes
    the same share in every layer (a plain HF config); 'global' ranks across layers (per-layer shapes)."""

    kind: ClassVar[str] = "prune_heads"
    ratio: float = 0.25
    unit: str = "query"
    scope: str = "layer"

    def validate(self) -> None:
        super().validate()
        _check_ratio(self.ratio, "head")
        check(self.unit in ("query", "kv_group"), f"unit '{self.unit}' is not query or kv_group", "use query or kv_group")
        check(self.scope in SCOPES, f"scope '{self.scope}' is not one of {SCOPES}", "use layer or global")


@register_config
@dataclasses.dataclass(frozen=True)
class MlpPruneConfig(_Structured):
    """Remove MLP intermediate channels (rows of gate/up, columns of down) by importance."""

    kind: ClassVar[str] = "prune_mlp"
    ratio: float = 0.5
    scope: str = "layer"

    def validate(self) -> None:
        super().validate()
        _check_ratio(self.ratio, "MLP channel")
        check(self.scope in SCOPES, f"scope '{self.scope}' is not one of {SCOPES}", "use layer or global")


@register_config
@dataclasses.dataclass(frozen=True)
class LayerDropConfig(PassConfig):
    """Remove `drop` whole decoder layers: metric 'block_influence' (ShortGPT: lowest 1 − cos(input,
    output) first) or 'last' (the last layers, a baseline)."""

    kind: ClassVar[str] = "prune_layers"
    needs_calibration: ClassVar[bool] = True
    drop: int = 1
    metric: str = "block_influence"

    def validate(self) -> None:
        check(isinstance(self.drop, int) and self.drop >= 1, f"--drop {self.drop} must be a positive integer",
              "use e.g. --drop 2")
        check(self.metric in ("block_influence", "last"), f"metric '{self.metric}' is not block_influence or last",
              "use block_influence or last")


@register_config
@dataclasses.dataclass(frozen=True)
class WidthPruneConfig(_Structured):
    """Minitron width pruning: remove hidden (embedding) channels and MLP channels by activation
    importance, the same fraction of each, chosen so the model has at most `target_params` parameters
    (or `target_ratio` of its parameters, which is how a recipe says it for any model)."""

    kind: ClassVar[str] = "prune_width"
    target_params: int = 0
    target_ratio: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(self.importance == "activation", "width pruning ranks channels by activation importance",
              "use importance activation")
        check((self.target_params > 0) != (self.target_ratio > 0), "width pruning needs one target: target_params "
              "or target_ratio", "give e.g. --target-params 8M (or target_ratio: 0.5 in a recipe)")
        check(isinstance(self.target_params, int) and self.target_params >= 0,
              f"target_params {self.target_params} must be a positive parameter count", "use e.g. --target-params 8M")
        check(0 <= self.target_ratio < 1, f"target_ratio {self.target_ratio} is outside (0, 1)", "use e.g. 0.5")
