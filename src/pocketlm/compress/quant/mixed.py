"""Mixed precision under a budget: bits per linear layer chosen for the least total sensitivity.

1. Sensitivity: for every decoder linear and every candidate bit width, the mean KL(float ‖ model)
   on calibration text when only that layer is quantized (round-to-nearest), all others float.
2. Allocation: a multiple-choice knapsack — one width per layer, total bytes within the budget,
   least summed sensitivity — solved exactly by dynamic programming over bytes in small units.
3. The chosen widths are applied with RTN or GPTQ.

The budget is `max_size_mb` (the whole artifact's weights: quantized layers, the int8 head table or
the float head, norms) or `target_bits` (mean stored bits per decoder-linear weight, scales included).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...config import check, register_config
from ...errors import ConfigError
from ...progress import progress_bar
from ..api import PassConfig, register_pass
from .linear import QuantLinear
from .primitives import Scheme, dequantize_matrix, quantize_matrix
from ..calibration import decoder_layers, walk_layers
from .gptq import WALK_BATCH, quantize_layer_
from .primitives import GROUP_SIZES
from .swap import check_targets, quantize_head_, scheme_stats, set_module

UNITS = 4096  # the knapsack's resolution: the budget in this many steps


@register_config
@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig(PassConfig):
    """target_bits or max_size_mb (exactly one): the budget. candidates: bit widths to choose from per
    layer; group_size and sym as for RTN; head: the LM head and embedding become one int8 table (it
    counts in max_size_mb either way); method: "rtn" or "gptq" for the final rounding;
    sensitivity_samples: calibration sequences the KL is measured on."""

    target_bits: float | None = None
    max_size_mb: float | None = None
    candidates: tuple[int, ...] = (3, 4, 8)
    group_size: int = 128
    sym: bool = False
    head: bool = True
    method: str = "rtn"
    sensitivity_samples: int = 8

    kind: ClassVar[str] = "mixed"
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        object.__setattr__(self, "candidates", tuple(sorted(set(self.candidates))))
        check((self.target_bits is None) != (self.max_size_mb is None),
              "mixed precision needs exactly one budget", "pass --target-bits or --max-size-mb (one of them)")
        check(len(self.candidates) >= 2 and set(self.candidates) <= {3, 4, 8},
              f"candidates {self.candidates} must be two or more of 3, 4, 8", "use e.g. 3,4,8")
        check(self.group_size in GROUP_SIZES, f"group size {self.group_size} is not one of {GROUP_SIZES}",
              "use --group-size 32, 64, 128 or 256")
        check(self.method in ("rtn", "gptq"), f"unknown method '{self.method}' for mixed precision", "use rtn or gptq")
        check(self.target_bits is None or self.target_bits > 0, "--target-bits must be positive", "use e.g. 4.5")
        check(self.max_size_mb is None or self.max_size_mb > 0, "--max-size-mb must be positive", "use e.g. 10")
        check(self.sensitivity_samples >= 1, "sensitivity_samples must be at least 1", "use e.g. 8")

    def scheme(self, bits: int) -> Scheme:
        return Scheme(bits, self.group_size if bits != 8 else None, self.sym)  # int8 layers: per channel


def _kl(base_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logp = logits.float().log_softmax(-1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1).mean().item()


@torch.no_grad()
def layer_sensitivity(model, linears: dict[str, nn.Linear], schemes: dict[int, Scheme], tokens: torch.Tensor,
                      show_progress: bool = True) -> dict[str, dict[int, float]]:
    """KL(float ‖ model) on `tokens` with only one layer quantized, per layer and bit width."""
    base = [model(input_ids=t[None]).logits.float().log_softmax(-1) for t in tokens]
    sens: dict[str, dict[int, float]] = {}
    for name, lin in progress_bar(linears.items(), "sensitivity", show=show_progress, total=len(linears)):
        w = lin.weight.data
        orig = w.clone()
        sens[name] = {}
        for bits, scheme in schemes.items():
            w.copy_(dequantize_matrix(*quantize_matrix(orig, scheme), bits))
            sens[name][bits] = sum(_kl(b, model(input_ids=t[None]).logits) for b, t in zip(base, tokens)) / len(tokens)
        w.copy_(orig)
    return sens


def allocate(costs: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int) -> dict[str, int]:
    """One choice per layer minimizing the summed cost with summed size ≤ budget (bytes).

    Sizes are rounded up to units of budget/UNITS, so the result always fits. Raises ValueError when
    even the smallest choices do not fit."""
    unit = max(1, budget // UNITS)
    cap = budget // unit
    names = list(costs)
    inf = float("inf")
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []  # per layer: for each capacity, the choice that reached it
    for name in names:
        new = torch.full_like(best, inf)
        pick = torch.full((cap + 1,), -1, dtype=torch.int64)
        for bits, cost in costs[name].items():
            u = -(-sizes[name][bits] // unit)  # ceil
            if u > cap:
                continue
            cand = torch.full_like(best, inf)
            cand[u:] = best[:cap + 1 - u] + cost
            better = cand < new
            new[better], pick[better] = cand[better], bits
        best = new
        picks.append(pick)
    end = int(torch.argmin(best))
    if best[end] == inf:
        raise ValueError("the budget is below the smallest choice for every layer")
    chosen = {}
    for name, pick in zip(reversed(names), reversed(picks)):
        bits = int(pick[end])
        chosen[name] = bits
        end -= -(-sizes[name][bits] // unit)
    return dict(reversed(list(chosen.items())))


def _fixed_bytes(model, linears: dict[str, nn.Linear], head: bool) -> int:
    """Bytes of everything but the decoder linears, as the artifact will store them."""
    skip = {id(lin.weight) for lin in linears.values()}
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if head:
        tied = emb.weight.data_ptr() == out.weight.data_ptr()
        table = out.weight.shape[0] * (out.weight.shape[1] + 2)  # int8 rows + a bf16 scale each
        skip |= {id(emb.weight), id(out.weight)}
        total = table * (1 if tied else 2)
    else:
        total = 0
    seen = set()
    for p in model.parameters():
        if id(p) not in skip and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _budget(cfg: MixedPrecisionConfig, linears: dict[str, nn.Linear], fixed: int) -> int:
    if cfg.max_size_mb is not None:
        budget = int(cfg.max_size_mb * 1e6) - fixed
        if budget <= 0:
            raise ConfigError(f"--max-size-mb {cfg.max_size_mb} leaves nothing for the decoder: the embedding, head "
                              f"and norms alone take {fixed / 1e6:.2f} MB", "raise --max-size-mb")
        return budget
    return int(cfg.target_bits * sum(lin.weight.numel() for lin in linears.values()) / 8)


@register_pass(MixedPrecisionConfig)
@torch.no_grad()
def _mixed(model, cfg: MixedPrecisionConfig, ctx) -> dict:
    schemes = {b: cfg.scheme(b) for b in cfg.candidates}
    linears = check_targets(model, schemes[min(cfg.candidates)], head=cfg.head)
    fixed = _fixed_bytes(model, linears, cfg.head)
    budget = _budget(cfg, linears, fixed)
    sizes = {n: {b: round(lin.weight.numel() * s.bits_per_weight(lin.in_features) / 8) for b, s in schemes.items()}
             for n, lin in linears.items()}
    smallest = sum(min(s.values()) for s in sizes.values())
    if smallest > budget:
        need = (smallest + fixed) / 1e6 if cfg.max_size_mb is not None else 8 * smallest / sum(
            lin.weight.numel() for lin in linears.values())
        what = "--max-size-mb" if cfg.max_size_mb is not None else "--target-bits"
        raise ConfigError(f"the budget is below the smallest mix ({what} {need:.2f} with every layer at "
                          f"{min(cfg.candidates)} bits)", f"raise {what} to at least {need:.2f}")
    tokens = ctx.tokens[:cfg.sensitivity_samples]
    sens = layer_sensitivity(model, linears, schemes, tokens, ctx.show_progress)
    chosen = allocate(sens, sizes, budget)
    apply_bits_(model, linears, {n: schemes[b] for n, b in chosen.items()}, cfg, ctx)
    stats = {"bits": chosen, "sensitivity": sens, "linear_bytes_after": sum(sizes[n][b] for n, b in chosen.items()),
             "mean_bits": 8 * sum(sizes[n][b] for n, b in chosen.items()) / sum(
                 lin.weight.numel() for lin in linears.values()),
             "predicted_kl": sum(sens[n][b] for n, b in chosen.items())}
    if cfg.head:
        stats.update(quantize_head_(model))
    return {**stats, **scheme_stats(model, cfg.head)}


def apply_bits_(model, linears: dict[str, nn.Linear], schemes: dict[str, Scheme], cfg, ctx) -> None:
    """Quantize each linear with its own scheme, by RTN or GPTQ."""
    if cfg.method == "gptq":
        walk = walk_layers(model, ctx.tokens, batch_size=WALK_BATCH, store_dtype=torch.bfloat16)  # as GPTQ
        for i, layer, inputs, kwargs in progress_bar(walk, "gptq", show=ctx.show_progress,
                                                      total=len(decoder_layers(model))):
            prefix = f"model.layers.{i}."
            quantize_layer_(layer, inputs, kwargs, {n[len(prefix):]: s for n, s in schemes.items()
                                                    if n.startswith(prefix)}, act_order=True, range_search=20)
        return
    for name, lin in linears.items():
        set_module(model, name, QuantLinear.from_linear(lin, schemes[name]))
