"""AWQ (Lin et al. 2023; as mit-han-lab/llm-awq and AutoAWQ): activation-aware weight quantization.

Per decoder layer, for each set of linears that read one input (a "site"):
1. Scale search: s = mean|x|^α per input channel, normalized by sqrt(max·min); α from a grid of
   n_grid points in [0, 1) minimizing the output error of the module the site feeds, as AutoAWQ:
   the whole attention for (q, k, v), the whole MLP for (gate, up), else the linear itself; on the
   first SAMPLE_SEQS calibration sequences, with the site's weights replaced by Q(W·s)/s. α = 0
   gives s = 1, plain rounding, so the search never loses to RTN on its sample. (AutoAWQ's "duo"
   scaling, s = mean|x|^α / mean|w|^(1−α), was worse on `small`: +1.59% ppl vs +1.43%.)
2. Fold: the op before the site divides its output by s (RMSNorm weight, or rows of up_proj /
   v_proj), the site's weight columns take ·s: the float function is unchanged.
3. Clip search (all but q/k, as AutoAWQ): per output row and group, the max |w| shrunk over a grid,
   minimizing the group's partial output error on 512 tokens.
4. Round with RTN or GPTQ, swap in QuantLinear.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import torch
from torch import nn

from ...config import check, register_config
from ...progress import progress_bar
from ..api import register_pass
from ..calibration import decoder_layers, run_layer, walk_layers
from . import primitives as P
from .gptq import gptq_quantize_weight
from .linear import QuantLinear
from .primitives import Scheme
from .rtn import WeightQuantConfig, finish_head
from .swap import check_targets, layer_linears, set_module

SAMPLE_SEQS = 16  # calibration sequences the scale search runs each inspected module on
SAMPLE_TOKENS = 4096  # random input rows held per site for the clip search (mean |x| uses all)
CLIP_TOKENS = 512  # of those, the clip search's (AutoAWQ's n_sample_token)
MAX_SHRINK = 0.5  # the clip search tries max |w| · (1 − i/n_grid) down to this fraction


@register_config
@dataclasses.dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    """AWQ: bits 4 or 3 per group of `group_size` inputs (see WeightQuantConfig for bits, group_size,
    sym, head).

    n_grid: α grid points of the scale search (and of the clip search).
    then: "rtn" or "gptq", the rounding after scaling.
    clip: also search clipping ranges (default: with RTN only; before GPTQ it hurt on `small`, AWQ+GPTQ
        int4 g128 +0.97% ppl with it vs +0.78% without, as GPTQ's own range search and error feedback
        do that job).
    range_search: narrower ranges tried per group by the rounding (primitives.params; default: 0 with
        RTN, where the clip search chose them, and it made AWQ worse on `small`, +2.07% vs +1.47%;
        20 with GPTQ, as GPTQConfig).
    """

    bits: int = 4
    n_grid: int = 20
    then: str = "rtn"
    clip: bool | None = None
    range_search: int | None = None

    kind: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    allowed_bits: ClassVar[tuple[int, ...]] = (4, 3)

    def validate(self) -> None:
        super().validate()
        check(self.n_grid >= 2, f"n_grid must be at least 2, not {self.n_grid}", "use e.g. 20")
        check(self.then in ("rtn", "gptq"), f"unknown rounding '{self.then}' after AWQ", "use rtn or gptq")
        check(self.range_search is None or self.range_search >= 0, f"range_search {self.range_search} is negative",
              "use e.g. 20 (0: min/max)")

    @property
    def clips(self) -> bool:
        return self.then == "rtn" if self.clip is None else self.clip

    @property
    def ranges(self) -> int:
        return (20 if self.then == "gptq" else 0) if self.range_search is None else self.range_search


# --- math ------------------------------------------------------------------------------------------

def fake_quant(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(N, K) weight → the float values its codes stand for."""
    return P.dequantize_matrix(*P.quantize_matrix(w, scheme), scheme.bits)


@torch.no_grad()
def search_scale(run: Callable[[], torch.Tensor], x_mean: torch.Tensor, weights: list[torch.Tensor],
                 scheme: Scheme, n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale for linears sharing one input, `weights` their parameters.

    run(): the inspected module's output on the sample, with the weights as they are set now.
    x_mean: (K,) mean |x| of the input. Returns s (K,) and its α: the weights become W·s and their
    input x/s. The weights are left as they were.
    """
    originals = [w.detach().clone() for w in weights]
    ref = run().float()

    def error(s: torch.Tensor) -> float:
        for w, w0 in zip(weights, originals):
            w.data.copy_((fake_quant(w0.float() * s, scheme) / s).to(w.dtype))
        return (run().float() - ref).square().mean().item()

    best = (math.inf, torch.ones_like(x_mean, dtype=torch.float32), 0.0)
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = x_mean.float().pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = error(s)
            if err < best[0]:
                best = (err, s, alpha)
    finally:
        for w, w0 in zip(weights, originals):
            w.data.copy_(w0)
    return best[1], best[2]


def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, n_grid: int = 20,
                max_shrink: float = MAX_SHRINK, rows: int = 1024) -> torch.Tensor:
    """Per (output row, group) clip value for weight `w` (N, K) with inputs `x` (T, K): the max |w|
    shrunk by the grid step that least changes x_g·w_g. Returns (N, G)."""
    N, K = w.shape
    g = scheme.group(K)
    xg = x.float().reshape(-1, K // g, g)  # (T, G, g)
    wg = w.detach().float().reshape(N, K // g, g)  # (N, G, g)
    top = wg.abs().amax(-1)  # (N, G)
    best, best_err = top.clone(), torch.full_like(top, math.inf)
    for i in range(int(max_shrink * n_grid)):
        mx = (top * (1 - i / n_grid))[..., None]
        c = torch.minimum(torch.maximum(wg, -mx), mx)
        scale, zero = P.params(c, scheme)
        delta = P.dequantize(P.quantize(c, scale, zero, scheme.bits), scale, zero, scheme.bits) - wg
        # mean over tokens of the group's partial output error, rows in chunks: (N, G)
        err = torch.cat([torch.einsum("tgk,ngk->ntg", xg, d).square().mean(1) for d in delta.split(rows)])
        better = err < best_err
        best_err[better], best[better] = err[better], mx[..., 0][better]
    return best


def clip_(w: torch.Tensor, max_val: torch.Tensor) -> None:
    """Clamp each group of `w` (N, K) to ± its `max_val` (N, G), in place."""
    N, K = w.shape
    mx = max_val.to(w.dtype)[..., None]
    wg = w.data.view(N, max_val.shape[1], -1)
    torch.minimum(torch.maximum(wg, -mx), mx, out=wg)


# --- which linears share an input, and folding scales --------------------------------------------

@dataclasses.dataclass(frozen=True)
class Site:
    """Linears of one decoder layer reading one input (names relative to the layer), and the op whose
    output that input is (a norm, or a linear whose rows a scale divides); prev None: no fold."""

    names: tuple[str, ...]
    prev: str | None = None
    inspect: str | None = None  # the module whose output the scale search scores (None: the one linear)

    @property
    def scored(self) -> str:
        return self.inspect or self.names[0]


def _foldable_norm(layer: nn.Module, name: str, width: int) -> bool:
    # Gemma-style norms scale by (1 + weight): dividing their weight would not divide the output
    m = getattr(layer, name, None)
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.shape == (width,) and "Gemma" not in type(m).__name__


def input_sites(layer: nn.Module) -> list[Site]:
    """AutoAWQ's rules: (q, k, v) after input_layernorm, scored on the attention's output; o after v
    when v's output is o's input (no GQA); (gate, up) after post_attention_layernorm, scored on the
    MLP's output; down after up. Other linears: a site each, no fold."""
    lins = layer_linears(layer)
    a, m = "self_attn.", "mlp."
    q, k, v, o = (a + n for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (m + n for n in ("gate_proj", "up_proj", "down_proj"))
    sites = []
    if {q, k, v} <= lins.keys():
        sites.append(Site((q, k, v), "input_layernorm" if _foldable_norm(layer, "input_layernorm",
                                                                          lins[q].in_features) else None,
                          "self_attn"))
    if o in lins:
        sites.append(Site((o,), v if v in lins and lins[v].out_features == lins[o].in_features else None))
    if {gate, up} <= lins.keys():
        sites.append(Site((gate, up), "post_attention_layernorm" if _foldable_norm(
            layer, "post_attention_layernorm", lins[gate].in_features) else None, "mlp"))
        if down in lins:
            sites.append(Site((down,), up))
    covered = {n for s in sites for n in s.names}
    return sites + [Site((n,)) for n in lins if n not in covered]


@torch.no_grad()
def fold_scale_(layer: nn.Module, site: Site, s: torch.Tensor) -> None:
    """Divide the output of `site.prev` by s (K,) and multiply the site's weight columns by s."""
    prev = layer.get_submodule(site.prev)
    div = s[:, None] if prev.weight.ndim == 2 else s  # a linear's rows, or a norm's weight
    prev.weight.data.copy_((prev.weight.float() / div).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    for name in site.names:
        w = layer.get_submodule(name).weight
        w.data.copy_((w.float() * s).to(w.dtype))


# --- the pass --------------------------------------------------------------------------------------

class SiteInputs:
    """What a site's input gives the search: mean |x| over all tokens, a random token subsample for
    the clip search, 2XᵀX/N when GPTQ rounds, and the inspected module's calls on the first
    SAMPLE_SEQS sequences (positional and keyword arguments) to replay in the scale search."""

    def __init__(self, keep: int, want_hessian: bool, seed: int = 0):
        self.abs_sum, self.xtx, self.n, self.keep, self.rows, self.want_h = 0, 0, 0, keep, [], want_hessian
        self.gen = torch.Generator().manual_seed(seed)
        self.calls, self.seqs = [], 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K), on the model's device
        self.abs_sum = self.abs_sum + x.abs().sum(0)
        self.n += len(x)
        self.rows.append(x[torch.randperm(len(x), generator=self.gen)[:self.keep].to(x.device)])
        if self.want_h:
            self.xtx = self.xtx + x.T @ x

    def add_call(self, args: tuple, kwargs: dict) -> None:
        if self.seqs < SAMPLE_SEQS:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.calls.append(((hidden.detach().clone(), *args[1:]),
                               {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            self.seqs += len(hidden)

    def replay(self, module: nn.Module) -> torch.Tensor:
        outs = [module(*args, **kwargs) for args, kwargs in self.calls]
        return torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])

    def done(self) -> "SiteInputs":
        self.mean, self.sample = self.abs_sum / self.n, torch.cat(self.rows)
        self.hessian = self.xtx * (2 / self.n) if self.want_h else None
        return self

    def rescale(self, s: torch.Tensor) -> None:
        """The site's input after a fold: x/s (the replayed calls are not used after the search)."""
        self.calls = []
        self.sample /= s
        if self.hessian is not None:
            self.hessian /= s[:, None] * s[None, :]


def capture(layer: nn.Module, sites: list[Site], inputs: list, kwargs: dict, hessian: bool) -> list[SiteInputs]:
    """Run the layer on the held inputs with hooks on each site's first linear and scored module."""
    keep = math.ceil(SAMPLE_TOKENS / len(inputs))
    feats = [SiteInputs(keep, hessian) for _ in sites]
    hooks = []
    for site, f in zip(sites, feats):
        hooks.append(layer.get_submodule(site.names[0]).register_forward_pre_hook(
            lambda _m, args, f=f: f.add(args[0])))
        hooks.append(layer.get_submodule(site.scored).register_forward_pre_hook(
            lambda _m, args, kw, f=f: f.add_call(args, kw), with_kwargs=True))
    try:
        run_layer(layer, inputs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [f.done() for f in feats]


@register_pass(AWQConfig)
@torch.no_grad()
def _awq(model, cfg: AWQConfig, ctx) -> dict:
    check_targets(model, cfg.scheme, head=cfg.head)
    gptq = gptq_quantize_weight if cfg.then == "gptq" else None
    alphas, before, after, count = [], 0, 0, 0
    walk = walk_layers(model, ctx.tokens, store_dtype=torch.bfloat16)
    for _i, layer, inputs, kwargs in progress_bar(walk, "awq", show=ctx.show_progress,
                                                   total=len(decoder_layers(model))):
        sites = input_sites(layer)
        feats = capture(layer, sites, inputs, kwargs, hessian=gptq is not None)
        for site, f in zip(sites, feats):  # fold every scale before rounding: a fold edits an earlier site
            if site.prev is not None:
                ws = [layer.get_submodule(n).weight for n in site.names]
                scored = layer.get_submodule(site.scored)
                s, alpha = search_scale(lambda: f.replay(scored), f.mean, ws, cfg.scheme, cfg.n_grid)
                fold_scale_(layer, site, s)
                f.rescale(s)
                alphas.append(alpha)
        for site, f in zip(sites, feats):
            for name in site.names:
                lin = layer.get_submodule(name)
                if cfg.clips and not name.endswith(("q_proj", "k_proj")):
                    clip_(lin.weight, search_clip(lin.weight, f.sample[:: max(1, len(f.sample) // CLIP_TOKENS)],
                                                  cfg.scheme, cfg.n_grid))
                w = lin.weight.detach().float()
                if gptq is None:
                    q, scale, zero = P.quantize_matrix(w, cfg.scheme, cfg.ranges)
                else:
                    q, scale, zero = gptq(w, f.hessian, cfg.scheme, damp=0.01, act_order=True, block=128,
                                          range_search=cfg.ranges)
                ql = QuantLinear.from_codes(q, scale, zero, cfg.scheme, lin.bias, lin.weight.dtype)
                set_module(layer, name, ql.to(lin.weight.device))
                before += lin.weight.numel() * lin.weight.element_size()
                after += ql.stored_bytes()
                count += 1
    stats = {"layers": count, "linear_bytes_before": before, "linear_bytes_after": after,
             "mean_alpha": sum(alphas) / len(alphas) if alphas else None}
    return finish_head(model, cfg, stats)
