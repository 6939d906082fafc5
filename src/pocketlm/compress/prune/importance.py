"""Importance of heads, MLP channels, hidden channels and whole layers, from calibration data.

Activation importance (Minitron): the L2 norm, over all calibration tokens, of each head's attention
output, each MLP channel's activation, and each hidden channel of the normalized residual stream.
In MoE layers each expert's channels are scored on the tokens routed to it, each activation scaled
by the token's routing weight (what the expert's output is multiplied by).
Taylor importance: |Σ w·∂L/∂w| over the weights of a structure (first-order loss change on removal).
Block Influence (ShortGPT): 1 − mean cos(layer input, layer output) per token.
Hooks hold one batch's activations at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from ...progress import progress_bar
from ..calibration import decoder_layers
from .sparsify import fused_experts


def _attn(layer):
    return layer.self_attn


def head_dim(attn) -> int:
    return attn.head_dim


def n_heads(attn) -> tuple[int, int]:
    """(query heads, kv heads) of an attention module, read from its projection shapes."""
    hd = head_dim(attn)
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd


def _batches(tokens: torch.Tensor, batch_size: int, what: str, show: bool):
    return progress_bar(tokens.split(batch_size), what, show=show)


@torch.no_grad()
def _run_with_hooks(model, tokens: torch.Tensor, hooks: list, batch_size: int, what: str, show: bool) -> int:
    """Forward every calibration batch while `hooks` (handles) record; remove them; return the token count."""
    dev = next(model.parameters()).device
    count = 0
    try:
        for batch in _batches(tokens, batch_size, what, show):
            model(input_ids=batch.to(dev), use_cache=False)
            count += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return count


@torch.no_grad()
def activation_importance(model, tokens: torch.Tensor, *, batch_size: int = 8, heads: bool = True,
                          mlp: bool = True, hidden: bool = False, show_progress: bool = True) -> dict:
    """Per layer: 'heads' (n_q,) and 'mlp' (intermediate,) norms (None for an MoE layer), 'experts'
    (E, expert intermediate) and 'shared' (shared expert's intermediate,) norms (None where the layer
    has none); 'hidden' (hidden,) summed over every normalization output. Float32 on the CPU."""
    layers = decoder_layers(model)
    sq = {key: [None] * len(layers) for key in ("heads", "mlp", "experts", "shared")}
    sq["hidden"] = None
    hooks = []

    def add(key, i, value):
        sq[key][i] = value if sq[key][i] is None else sq[key][i] + value

    def add_hidden(_m, _inp, out):
        value = out.detach().float().pow(2).flatten(0, -2).sum(0).cpu()
        sq["hidden"] = value if sq["hidden"] is None else sq["hidden"] + value

    for i, layer in enumerate(layers):
        attn = _attn(layer)
        if heads:
            hd = head_dim(attn)
            # o_proj input: the concatenated head outputs, (B, T, n_q·hd)
            hooks.append(attn.o_proj.register_forward_pre_hook(
                lambda _m, args, i=i, hd=hd: add("heads", i, args[0].detach().float().unflatten(-1, (-1, hd))
                                                  .pow(2).sum(-1).flatten(0, -2).sum(0).cpu())))
        if mlp and hasattr(layer.mlp, "down_proj"):
            # down_proj input: act(gate)·up, (B, T, intermediate)
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args, i=i: add("mlp", i, args[0].detach().float().pow(2).flatten(0, -2).sum(0).cpu())))
        if mlp and fused_experts(layer) is not None:
            hooks.append(fused_experts(layer).register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: add("experts", i, _expert_sq(mod, args, kwargs)), with_kwargs=True))
            shared = getattr(getattr(layer.mlp, "shared_expert", None), "down_proj", None)
            if shared is not None:
                hooks.append(shared.register_forward_pre_hook(
                    lambda _m, args, i=i: add("shared", i, args[0].detach().float().pow(2).flatten(0, -2).sum(0).cpu())))
        if hidden:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                hooks.append(norm.register_forward_hook(add_hidden))
    if hidden:
        hooks.append(model.model.norm.register_forward_hook(add_hidden))
    _run_with_hooks(model, tokens, hooks, batch_size, "importance", show_progress)
    sqrt = lambda t: None if t is None else t.sqrt()  # noqa: E731
    out = {key: [sqrt(t) for t in sq[key]] for key in ("heads", "mlp", "experts", "shared")}
    return {**out, "hidden": sqrt(sq["hidden"])}


def _expert_sq(experts, args, kwargs) -> torch.Tensor:
    """(E, I) sums of squared routing-weighted intermediate activations act(gate)·up, per expert channel."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    hidden, top_k, weights = (list(args) + [kwargs.get(n) for n in names[len(args):]])[:3]
    gate_up = experts.gate_up_proj
    out = torch.zeros(gate_up.shape[0], gate_up.shape[1] // 2)
    for e in range(gate_up.shape[0]):
        routed = top_k == e  # (tokens, k)
        rows = routed.any(-1)
        if not rows.any():
            continue  # no calibration token reached this expert: its channels score 0
        gate, up = F.linear(hidden[rows], gate_up[e]).chunk(2, dim=-1)
        w = (weights * routed).sum(-1)[rows, None]
        out[e] = (experts.act_fn(gate) * up * w).float().pow(2).sum(0).cpu()
    return out


def taylor_importance(model, tokens: torch.Tensor, *, batch_size: int = 8, show_progress: bool = True) -> dict:
    """Per layer: 'heads' and 'mlp' scores |Σ w·g| over each structure's weights, from LM-loss gradients."""
    layers = decoder_layers(model)
    dev = next(model.parameters()).device
    params = [p for layer in layers for p in layer.parameters()]
    was_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        for batch in _batches(tokens, batch_size, "gradients", show_progress):
            batch = batch.to(dev)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        out = {"heads": [], "mlp": []}
        with torch.no_grad():
            for layer in layers:
                attn = _attn(layer)
                hd = head_dim(attn)
                wg_q = (attn.q_proj.weight * attn.q_proj.weight.grad).float().unflatten(0, (-1, hd)).sum((1, 2))
                wg_o = (attn.o_proj.weight * attn.o_proj.weight.grad).float().unflatten(1, (-1, hd)).sum((0, 2))
                out["heads"].append((wg_q + wg_o).abs().cpu())
                if hasattr(layer.mlp, "down_proj"):
                    m = layer.mlp
                    wg = sum((lin.weight * lin.weight.grad).float().sum(1) for lin in (m.gate_proj, m.up_proj))
                    wg = wg + (m.down_proj.weight * m.down_proj.weight.grad).float().sum(0)
                    out["mlp"].append(wg.abs().cpu())
                else:
                    out["mlp"].append(None)
        return out
    finally:
        for p in params:
            p.grad = None
        for p, g in zip(model.parameters(), was_grad):
            p.requires_grad_(g)


@torch.no_grad()
def block_influence(model, tokens: torch.Tensor, *, batch_size: int = 8, show_progress: bool = True) -> list[float]:
    """ShortGPT's Block Influence per decoder layer: 1 − mean over tokens of cos(input, output)."""
    layers = decoder_layers(model)
    total = [0.0] * len(layers)

    def record(i):
        def hook(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            total[i] += F.cosine_similarity(x.float(), y.float(), dim=-1).sum().item()
        return hook

    hooks = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = _run_with_hooks(model, tokens, hooks, batch_size, "block influence", show_progress)
    return [1 - t / count for t in total]


def is_moe(model) -> bool:
    return any(not hasattr(layer.mlp, "down_proj") for layer in decoder_layers(model))


def hidden_norms(model) -> list:
    """Every normalization over the residual stream: each layer's two, then the final one."""
    norms = [n for layer in decoder_layers(model) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return norms + [model.model.norm]


@torch.no_grad()
def kept_rms_ratio(model, tokens: torch.Tensor, keep: torch.Tensor, *, batch_size: int = 8,
                   show_progress: bool = True) -> list[float]:
    """Per residual-stream norm (order of `hidden_norms`), the mean over tokens of
    rms(x[keep]) / rms(x) for its input x: an RMSNorm over fewer channels divides by the kept
    channels' RMS, so scaling its weight by this ratio restores the original output on average."""
    norms = hidden_norms(model)
    keep = keep.to(next(model.parameters()).device)
    total = [0.0] * len(norms)

    def record(i):
        def hook(_m, args):
            x = args[0].float()
            total[i] += (x[..., keep].pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt().clamp_min(1e-12)).sum().item()
        return hook

    hooks = [norm.register_forward_pre_hook(record(i)) for i, norm in enumerate(norms)]
    count = _run_with_hooks(model, tokens, hooks, batch_size, "norm scales", show_progress)
    return [t / count for t in total]

