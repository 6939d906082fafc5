"""Structured pruning that physically removes parameters: heads, MLP channels, layers, hidden width.

Surgery functions take the indices to keep; handlers rank structures by importance (importance.py)
and call them. After a pass the config is synced to the modules: uniform shapes give a plain HF
config, per-layer shapes are recorded in `pocketlm_record["layer_shapes"]` for `pocketlm.load`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ...errors import ConfigError, UnsupportedModelError
from ..api import PassContext, register_pass
from ..calibration import decoder_layers
from .configs import HeadPruneConfig, LayerDropConfig, MlpPruneConfig, WidthPruneConfig
from .importance import (activation_importance, block_influence, head_dim, hidden_norms, is_moe, kept_rms_ratio,
                         n_heads, taylor_importance)
from .sparsify import fused_experts

# --- surgery ---------------------------------------------------------------------------------------


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(like.weight.requires_grad)
    return new


def keep_rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    """A Linear with only the output features `idx`."""
    idx = idx.to(lin.weight.device)
    return _linear(lin.weight[idx], lin.bias[idx] if lin.bias is not None else None, lin)


def keep_cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    """A Linear with only the input features `idx` (the bias is per output, unchanged)."""
    idx = idx.to(lin.weight.device)
    return _linear(lin.weight[:, idx], lin.bias, lin)


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    return torch.tensor([h * hd + j for h in heads for j in range(hd)], dtype=torch.long)


def prune_heads_(attn: nn.Module, keep_q: list[int], keep_kv: list[int]) -> None:
    """Keep query heads `keep_q` and KV heads `keep_kv`; every kept KV head must keep the same number
    of its own query heads, since HF attention maps query head i to KV head i // groups."""
    hd = head_dim(attn)
    nq, nkv = n_heads(attn)
    groups = nq // nkv
    per_kv = {kv: sorted(q for q in keep_q if q // groups == kv) for kv in keep_kv}
    sizes = {len(v) for v in per_kv.values()}
    if len(sizes) != 1 or 0 in sizes or len(keep_q) != sum(len(v) for v in per_kv.values()):
        raise ConfigError("kept query heads are not the same number in every kept KV group",
                          "prune query heads per KV group (unit query) or whole groups (unit kv_group)")
    q_order = [q for kv in sorted(keep_kv) for q in per_kv[kv]]
    q_rows, kv_rows = _head_rows(q_order, hd), _head_rows(sorted(keep_kv), hd)
    attn.q_proj = keep_rows(attn.q_proj, q_rows)
    attn.k_proj = keep_rows(attn.k_proj, kv_rows)
    attn.v_proj = keep_rows(attn.v_proj, kv_rows)
    attn.o_proj = keep_cols(attn.o_proj, q_rows)
    attn.num_key_value_groups = len(q_order) // len(keep_kv)


def prune_mlp_(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate channels `keep` of a gated MLP (gate_proj, up_proj, down_proj)."""
    keep = keep.sort().values
    mlp.gate_proj = keep_rows(mlp.gate_proj, keep)
    mlp.up_proj = keep_rows(mlp.up_proj, keep)
    mlp.down_proj = keep_cols(mlp.down_proj, keep)


def prune_experts_(experts: nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate channels `keep` (E, I') of every expert of a fused expert block, gate_up_proj
    (E, 2I, H) with gate rows then up rows, down_proj (E, H, I): the same count in every expert, so
    the tensors stay fused, each expert with its own channels."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    keep = keep.sort(dim=-1).values.to(gate_up.device)
    inter = down.shape[-1]
    rows = torch.cat([keep, keep + inter], dim=1)  # gate rows, then the matching up rows
    with torch.no_grad():
        new_gate_up = gate_up.gather(1, rows[:, :, None].expand(-1, -1, gate_up.shape[2])).contiguous()
        new_down = down.gather(2, keep[:, None, :].expand(-1, down.shape[1], -1)).contiguous()
    experts.gate_up_proj = nn.Parameter(new_gate_up, requires_grad=gate_up.requires_grad)
    experts.down_proj = nn.Parameter(new_down, requires_grad=down.requires_grad)
    experts.intermediate_dim = keep.shape[1]


def drop_layers_(model, drop: list[int]) -> None:
    """Remove decoder layers and renumber the rest (their KV-cache slots follow `layer_idx`)."""
    layers = decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.model.layers = nn.ModuleList(kept)
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    cfg.num_hidden_layers = len(kept)


def _slice_norm_(norm: nn.Module, keep: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.data[keep.to(norm.weight.device)].clone(),
                               requires_grad=norm.weight.requires_grad)


def prune_hidden_(model, keep: torch.Tensor) -> None:
    """Keep hidden (residual-stream) channels `keep` everywhere: embeddings, norms, every projection,
    and in MoE layers the router, every expert and the shared expert with its gate."""
    keep = keep.sort().values
    emb = model.model.embed_tokens
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.data[:, keep.to(emb.weight.device)].clone())
    emb.embedding_dim = len(keep)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, keep_cols(getattr(attn, name), keep))
        attn.o_proj = keep_rows(attn.o_proj, keep)
        if hasattr(mlp, "down_proj"):
            _hidden_of_mlp_(mlp, keep)
        else:
            _hidden_of_moe_(mlp, fused_experts(layer), _shared_expert(layer), keep)
        _slice_norm_(layer.input_layernorm, keep)
        _slice_norm_(layer.post_attention_layernorm, keep)
    _slice_norm_(model.model.norm, keep)
    head = model.get_output_embeddings()
    if tied:
        head.weight = emb.weight
    else:
        model.lm_head = keep_cols(head, keep)
    model.config.hidden_size = len(keep)


def _hidden_of_mlp_(mlp: nn.Module, keep: torch.Tensor) -> None:
    mlp.gate_proj, mlp.up_proj = keep_cols(mlp.gate_proj, keep), keep_cols(mlp.up_proj, keep)
    mlp.down_proj = keep_rows(mlp.down_proj, keep)


def _hidden_of_moe_(block: nn.Module, experts: nn.Module, shared: nn.Module | None, keep: torch.Tensor) -> None:
    keep = keep.to(experts.gate_up_proj.device)
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[:, :, keep].contiguous(),
                                        requires_grad=experts.gate_up_proj.requires_grad)
    experts.down_proj = nn.Parameter(experts.down_proj.data[:, keep, :].contiguous(),
                                     requires_grad=experts.down_proj.requires_grad)
    experts.hidden_dim = len(keep)
    router = block.gate  # an (E, H) weight: transformers' TopKRouter, or an nn.Linear in older layouts
    if isinstance(router, nn.Linear):
        block.gate = keep_cols(router, keep)
    else:
        router.weight = nn.Parameter(router.weight.data[:, keep].contiguous(), requires_grad=router.weight.requires_grad)
        router.hidden_dim = len(keep)
    if shared is not None:
        _hidden_of_mlp_(shared, keep)
    if getattr(block, "shared_expert_gate", None) is not None:
        block.shared_expert_gate = keep_cols(block.shared_expert_gate, keep)


# --- shapes: plain HF config when uniform, recorded per layer otherwise -----------------------------

def _shared_expert(layer: nn.Module) -> nn.Module | None:
    shared = getattr(layer.mlp, "shared_expert", None)
    return shared if shared is not None and hasattr(shared, "down_proj") else None


def layer_shapes(model) -> list[dict]:
    """Per layer: query and KV heads, the dense MLP's channels, and in MoE layers each expert's and the
    shared expert's channels (None where the layer has no such part)."""
    shapes = []
    for layer in decoder_layers(model):
        nq, nkv = n_heads(layer.self_attn)
        experts, shared = fused_experts(layer), _shared_expert(layer)
        shapes.append({"q_heads": nq, "kv_heads": nkv,
                       "intermediate": layer.mlp.down_proj.in_features if hasattr(layer.mlp, "down_proj") else None,
                       "expert_intermediate": experts.down_proj.shape[-1] if experts is not None else None,
                       "shared_intermediate": shared.down_proj.in_features if shared is not None else None})
    return shapes


def _set_largest(cfg, field: str, values: list) -> None:
    values = [v for v in values if v is not None]
    if values and hasattr(cfg, field):
        setattr(cfg, field, max(values))


def sync_config(model) -> list[dict] | None:
    """Write the modules' shapes into the HF config; return per-layer shapes when they differ
    (the config then holds the largest, which transformers alone cannot load)."""
    shapes = layer_shapes(model)
    cfg = model.config
    cfg.head_dim = head_dim(decoder_layers(model)[0].self_attn)  # explicit: hidden/heads no longer gives it
    cfg.num_attention_heads = max(s["q_heads"] for s in shapes)
    cfg.num_key_value_heads = max(s["kv_heads"] for s in shapes)
    _set_largest(cfg, "intermediate_size", [s["intermediate"] for s in shapes])
    # Mixtral names its experts' width intermediate_size; Qwen-MoE moe_intermediate_size.
    expert_field = "moe_intermediate_size" if hasattr(cfg, "moe_intermediate_size") else "intermediate_size"
    _set_largest(cfg, expert_field, [s["expert_intermediate"] for s in shapes])
    _set_largest(cfg, "shared_expert_intermediate_size", [s["shared_intermediate"] for s in shapes])
    uniform = all(s == shapes[0] for s in shapes)
    record = getattr(model, "pocketlm_record", None)
    if record is None:
        record = model.pocketlm_record = {}
    if uniform:
        record.pop("layer_shapes", None)
        return None
    record["layer_shapes"] = shapes
    return shapes


def apply_layer_shapes(model, shapes: list[dict]) -> None:
    """Shrink a freshly built model's layers to recorded shapes (weights are loaded afterwards)."""
    for layer, shape in zip(decoder_layers(model), shapes):
        attn = layer.self_attn
        nq, nkv = n_heads(attn)
        groups = shape["q_heads"] // shape["kv_heads"]
        keep_kv = list(range(shape["kv_heads"]))
        keep_q = [kv * (nq // nkv) + j for kv in keep_kv for j in range(groups)]
        prune_heads_(attn, keep_q, keep_kv)
        if shape["intermediate"] is not None:
            prune_mlp_(layer.mlp, torch.arange(shape["intermediate"]))
        if shape.get("expert_intermediate") is not None:  # absent in records written before MoE pruning
            experts = fused_experts(layer)
            prune_experts_(experts, torch.arange(shape["expert_intermediate"]).expand(experts.gate_up_proj.shape[0], -1))
        if shape.get("shared_intermediate") is not None:
            prune_mlp_(_shared_expert(layer), torch.arange(shape["shared_intermediate"]))


# --- handlers ---------------------------------------------------------------------------------------


def _scores(model, cfg, ctx: PassContext, **kw) -> dict:
    if cfg.importance == "taylor":
        return taylor_importance(model, ctx.tokens, show_progress=ctx.show_progress)
    return activation_importance(model, ctx.tokens, show_progress=ctx.show_progress, **kw)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@register_pass(HeadPruneConfig)
def _prune_heads(model, cfg: HeadPruneConfig, ctx: PassContext) -> dict:
    if cfg.scope == "global" and is_moe(model):
        raise UnsupportedModelError("per-layer head counts (scope global) are not supported for mixture-of-experts models",
                                    "use scope layer")
    before = _params(model)
    scores = _scores(model, cfg, ctx, mlp=False)["heads"]
    layers = decoder_layers(model)
    nq, nkv = n_heads(layers[0].self_attn)
    if any(n_heads(layer.self_attn) != (nq, nkv) for layer in layers):
        raise ConfigError("head pruning needs the same head counts in every layer, and an earlier global pass made them differ",
                          "prune heads once, or with scope layer before any global head pruning")
    groups = nq // nkv
    if cfg.unit == "kv_group":
        # A group's importance is the sum of its query heads'.
        units, total_units = [s.view(nkv, groups).sum(1) for s in scores], nkv
    else:
        units, total_units = [s.view(nkv, groups) for s in scores], groups  # ranked within their group
    n_remove = round(cfg.ratio * total_units)
    if n_remove < 1 or n_remove >= total_units:
        raise ConfigError(f"removing {cfg.ratio:.0%} of {'KV groups' if cfg.unit == 'kv_group' else 'query heads per group'} "
                          f"rounds to {n_remove} of {total_units}", "choose a ratio that removes at least one and keeps one")
    removed = _choose(units, n_remove, cfg.scope)
    for layer, rm in zip(layers, removed):
        if cfg.unit == "kv_group":
            keep_kv = [g for g in range(nkv) if g not in rm]
            keep_q = [g * groups + j for g in keep_kv for j in range(groups)]
        else:
            keep_kv = list(range(nkv))
            keep_q = [g * groups + j for g in range(nkv) for j in range(groups) if (g, j) not in rm]
        prune_heads_(layer.self_attn, keep_q, keep_kv)
    sync_config(model)
    return {"params_before": before, "params_after": _params(model)}


def _choose(units: list[torch.Tensor], n_remove: int, scope: str) -> list[set]:
    """Per layer, the units to remove. units[l] is (nkv,) for groups or (nkv, groups) for query heads
    (ranked within each group, the same count removed from every group). 'global' ranks across layers
    at the same total, keeping at least one unit per layer."""
    grouped = units[0].ndim == 2
    if scope == "layer":
        if grouped:
            return [{(g, int(j)) for g in range(u.shape[0]) for j in u[g].argsort()[:n_remove]} for u in units]
        return [set(u.argsort()[:n_remove].tolist()) for u in units]
    # Global: score a unit (a group's j-th weakest head across its groups, or a KV group) per layer,
    # normalised by the layer's total so layers of different scale compare.
    flat = []
    for li, u in enumerate(units):
        u = u / u.sum()
        ranked = u.sort(dim=-1).values.sum(0) if grouped else u.sort().values  # weakest first
        flat += [(float(v), li, k) for k, v in enumerate(ranked[:-1])]  # the strongest always stays
    flat.sort()
    count = [0] * len(units)
    for _, li, _k in flat[: n_remove * len(units)]:
        count[li] += 1
    if grouped:
        return [{(g, int(j)) for g in range(u.shape[0]) for j in u[g].argsort()[:c]} for u, c in zip(units, count)]
    return [set(u.argsort()[:c].tolist()) for u, c in zip(units, count)]


def _check_fused(layers, what: str) -> None:
    """Refuse an MoE block whose experts are not stored fused (the only expert layout surgery knows)."""
    unknown = [i for i, layer in enumerate(layers) if not hasattr(layer.mlp, "down_proj") and fused_experts(layer) is None]
    if unknown:
        raise UnsupportedModelError(f"{what} needs dense MLPs or fused experts (gate_up_proj, down_proj), and layer "
                                    f"{unknown[0]}'s MoE block has neither", "prune heads or layers, or unstructured")


def _prune_layer_mlps_(layer: nn.Module, i: int, scores: dict, n_keep: Callable[[int], int]) -> None:
    """Keep the n_keep(channels) strongest channels of layer i's dense MLP, or of each of its experts
    (every expert its own, widths aligned for the grouped matmul) and of its shared expert."""
    if hasattr(layer.mlp, "down_proj"):
        s = scores["mlp"][i]
        prune_mlp_(layer.mlp, s.argsort(descending=True)[:n_keep(len(s))])
        return
    per_expert = scores["experts"][i]  # (E, I)
    n = _aligned(n_keep(per_expert.shape[1]))
    prune_experts_(fused_experts(layer), per_expert.argsort(dim=1, descending=True)[:, :n])
    if scores["shared"][i] is not None:
        s = scores["shared"][i]
        prune_mlp_(_shared_expert(layer), s.argsort(descending=True)[:n_keep(len(s))])


def _aligned(n: int) -> int:
    """Expert widths in multiples of 8: transformers' grouped expert matmul needs 16-byte aligned rows."""
    return max(8, n // 8 * 8) if n >= 8 else n


@register_pass(MlpPruneConfig)
def _prune_mlp(model, cfg: MlpPruneConfig, ctx: PassContext) -> dict:
    """Dense MLPs lose `ratio` of their channels; in MoE layers every expert (and a shared expert) loses
    `ratio` of its own, chosen per expert (scope layer only: experts of a layer stay one fused tensor)."""
    layers = decoder_layers(model)
    if is_moe(model):
        _check_fused(layers, "structured MLP pruning")
        if cfg.scope == "global" or cfg.importance == "taylor":
            raise ConfigError("MoE models take structured MLP pruning with scope layer and activation importance",
                              "use --scope layer --importance activation")
    before = _params(model)
    scores = _scores(model, cfg, ctx, heads=False)
    if cfg.scope == "layer":
        for i, layer in enumerate(layers):
            _prune_layer_mlps_(layer, i, scores, lambda n: max(1, round(n * (1 - cfg.ratio))))
    else:  # dense models only: one threshold on channel scores normalised by their layer's mean
        normed = torch.cat([s / s.mean() for s in scores["mlp"]])
        n_keep = round(len(normed) * (1 - cfg.ratio))
        threshold = normed.sort(descending=True).values[n_keep - 1]
        for layer, s in zip(layers, scores["mlp"]):
            keep = (s / s.mean() >= threshold).nonzero().flatten()
            prune_mlp_(layer.mlp, keep if len(keep) else s.argmax().view(1))
    sync_config(model)
    return {"params_before": before, "params_after": _params(model)}


@register_pass(LayerDropConfig)
def _drop_layers(model, cfg: LayerDropConfig, ctx: PassContext) -> dict:
    n = len(decoder_layers(model))
    if cfg.drop >= n:
        raise ConfigError(f"--drop {cfg.drop} would remove all {n} layers", f"drop at most {n - 1}")
    before = _params(model)
    if cfg.metric == "last":
        drop, bi = list(range(n - cfg.drop, n)), None
    else:
        bi = block_influence(model, ctx.tokens, show_progress=ctx.show_progress)
        drop = sorted(sorted(range(n), key=lambda i: bi[i])[: cfg.drop])
    drop_layers_(model, drop)
    sync_config(model)  # per-layer shapes recorded by an earlier pass lose the dropped layers too
    return {"dropped": drop, "block_influence": bi, "params_before": before, "params_after": _params(model)}


def _mlp_groups(layer: nn.Module) -> list[tuple[int, int]]:
    """(copies, channels) of each gated MLP in a layer: the dense MLP, or the experts and a shared expert."""
    if hasattr(layer.mlp, "down_proj"):
        return [(1, layer.mlp.down_proj.in_features)]
    experts, shared = fused_experts(layer), _shared_expert(layer)
    return [(experts.gate_up_proj.shape[0], experts.down_proj.shape[-1])] + \
        ([(1, shared.down_proj.in_features)] if shared is not None else [])


def _router_rows(layer: nn.Module) -> int:
    """Weights per hidden channel outside the MLPs of an MoE block: the router's E rows, the shared gate's."""
    if hasattr(layer.mlp, "down_proj"):
        return 0
    gate = getattr(layer.mlp, "shared_expert_gate", None)
    return layer.mlp.gate.weight.shape[0] + (gate.out_features if gate is not None else 0)


def kept_channels(channels: int, fraction: float) -> int:
    """MLP channels kept at `fraction`: multiples of 32 (quantization groups, SIMD) where the MLP is wide
    enough, else of 8 (transformers' grouped expert matmul needs 16-byte aligned rows)."""
    step = 32 if channels >= 8 * 32 else 8 if channels >= 8 else 1
    return max(step, int(channels * fraction) // step * step)


def width_params(model, hidden: int, fraction: float) -> int:
    """Parameter count after width pruning to `hidden` channels and `fraction` of every MLP's channels."""
    layers = decoder_layers(model)
    total = model.model.embed_tokens.weight.shape[0] * hidden
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.model.embed_tokens.weight:
        total += head.weight.shape[0] * hidden
    for layer in layers:
        a = layer.self_attn
        total += hidden * (a.q_proj.out_features + a.k_proj.out_features + a.v_proj.out_features)
        total += sum(p.bias.numel() for p in (a.q_proj, a.k_proj, a.v_proj) if p.bias is not None)
        total += a.o_proj.in_features * hidden + (hidden if a.o_proj.bias is not None else 0)
        total += sum(copies * 3 * hidden * kept_channels(c, fraction) for copies, c in _mlp_groups(layer))
        total += _router_rows(layer) * hidden + 2 * hidden
        total += sum(p.numel() for n, p in a.named_parameters() if "norm" in n)  # q_norm/k_norm (Qwen3)
    return total + hidden  # final norm


@register_pass(WidthPruneConfig)
def _prune_width(model, cfg: WidthPruneConfig, ctx: PassContext) -> dict:
    before = _params(model)
    target = cfg.target_params or int(before * cfg.target_ratio)
    layers = decoder_layers(model)
    _check_fused(layers, "width pruning")
    hidden = model.config.hidden_size
    if target >= before:
        raise ConfigError(f"target of {target:,} parameters is not below the model's {before:,}",
                          "choose a --target-params smaller than the model")
    # The hidden size stays a multiple of the head count, which HF configs require, and of 32 (or 8)
    # where the model is wide enough; MLP channels as in kept_channels.
    heads = model.config.num_attention_heads
    h_step = next((step for step in (math.lcm(heads, 32), math.lcm(heads, 8)) if hidden >= 8 * step), heads)
    if any(not hasattr(layer.mlp, "down_proj") for layer in layers):
        h_step = math.lcm(h_step, 8)  # the experts' grouped matmul: 16-byte aligned rows
    width = lambda f: max(h_step, int(hidden * f) // h_step * h_step)  # noqa: E731
    # Largest kept fraction f (same for hidden and MLP channels) whose model fits the target.
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width_params(model, width(mid), mid) <= target else (lo, mid)
    new_hidden, reached = width(lo), width_params(model, width(lo), lo)
    if reached > target:
        raise ConfigError(f"target of {target:,} parameters is below what width pruning can reach ({reached:,})",
                          "raise --target-params or also prune heads and layers")
    scores = activation_importance(model, ctx.tokens, heads=False, hidden=True, show_progress=ctx.show_progress)
    for i, layer in enumerate(layers):
        _prune_layer_mlps_(layer, i, scores, lambda n: kept_channels(n, lo))
    model.config.head_dim = head_dim(layers[0].self_attn)
    keep = scores["hidden"].argsort(descending=True)[:new_hidden]
    ratios = kept_rms_ratio(model, ctx.tokens, keep, show_progress=ctx.show_progress)
    prune_hidden_(model, keep)
    with torch.no_grad():
        for norm, ratio in zip(hidden_norms(model), ratios):
            norm.weight.mul_(ratio)
    sync_config(model)
    return {"params_before": before, "params_after": _params(model), "hidden": new_hidden,
            "intermediate": _mlp_groups(layers[0])[0][1]}
