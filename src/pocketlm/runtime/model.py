"""FastDecoder: the decode path of an HF Llama-family model, written for a static KV cache.

It drives the HF model's own modules and weights (no copy): linear layers are called directly
(plain `nn.Linear` packed, fp32 on cpu_linear's kernels, anything else — quantized — through its module), RMSNorms
are recomputed with the same arithmetic, and MLP blocks that are not the plain gated MLP (MoE blocks)
are called as modules. What it drops is the per-token framework work of `generate`: cache objects,
mask building, output dataclasses and hooks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from . import cpu_linear
from .cache import StaticCache


def _plain(mods) -> bool:
    """Plain nn.Linear layers on one input, all with or all without bias: these can share one matmul.
    Not fp16 on CPU: its matmul falls off a fast path with input-major weights (5x slower here)."""
    if not all(type(m) is nn.Linear for m in mods):
        return False
    w = mods[0].weight
    if w.dtype == torch.float16 and w.device.type == "cpu":
        return False
    return len({(m.in_features, m.weight.dtype) for m in mods}) == 1 and len({m.bias is None for m in mods}) == 1


def _pack(mods: list[nn.Linear]) -> "PackedLinear":
    """One matmul for several plain linears on the same input.

    The weights move into one buffer and each module's weight becomes a view of it, so the HF model
    still computes the same thing and no memory is duplicated. fp32 on CPU keeps the (out, in) layout
    for cpu_linear's kernels; otherwise the buffer is input-major, (in, sum(out)): `x @ Wt` is MKL's
    faster layout for single-token matmuls."""
    prior = getattr(mods[0], "_pocketlm_packed", None)
    if prior is not None and _still_views(mods, *prior):  # packed by an earlier Generator: share it
        return PackedLinear(*prior)
    w = mods[0].weight
    out_major = cpu_linear.available(w)
    if len(mods) == 1 and out_major and w.is_contiguous():
        packed = w.detach()  # already in place (and a tied head stays the embedding itself)
    else:
        packed = torch.cat([m.weight.detach() for m in mods])
        packed = packed.contiguous() if out_major else packed.t().contiguous()
    bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
    for m, view, b in zip(mods, *_views(mods, packed, out_major, bias)):
        m.weight.data = view
        if b is not None:
            m.bias.data = b
    mods[0]._pocketlm_packed = (packed, bias, out_major)
    return PackedLinear(packed, bias, out_major)


def _views(mods, packed: torch.Tensor, out_major: bool, bias: torch.Tensor | None):
    """Each module's weight (out, in) and bias as slices of the packed buffers."""
    weights, biases, start = [], [], 0
    for m in mods:
        n = m.out_features
        weights.append(packed[start:start + n] if out_major else packed[:, start:start + n].t())
        biases.append(bias[start:start + n] if bias is not None else None)
        start += n
    return weights, biases


def _still_views(mods, packed: torch.Tensor, bias: torch.Tensor | None, out_major: bool) -> bool:
    """Every module's weight (and bias) is still its slice of the buffers (not replaced since, e.g. by pruning)."""
    if sum(m.out_features for m in mods) != packed.shape[0 if out_major else 1]:
        return False
    weights, biases = _views(mods, packed, out_major, bias)
    return all(_same_view(m.weight, w) and _same_view(m.bias, b) for m, w, b in zip(mods, weights, biases))


def _same_view(t: torch.Tensor | None, v: torch.Tensor | None) -> bool:
    if t is None or v is None:
        return t is None and v is None
    return t.data_ptr() == v.data_ptr() and t.shape == v.shape and t.stride() == v.stride()


class PackedLinear:
    """The packed linears' outputs side by side: cpu_linear on (out, in) weights, or MKL on input-major ones."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, out_major: bool):
        self.packed, self.bias, self.out_major = packed, bias, out_major

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_major:
            return cpu_linear.linear(x, self.packed, self.bias)
        if self.bias is not None:
            return torch.addmm(self.bias, x.flatten(0, -2), self.packed).view(*x.shape[:-1], -1)
        return x @ self.packed


def _linear(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if _plain([mod]):
        return _pack([mod])
    if type(mod) is nn.Linear:
        w, b = mod.weight, mod.bias
        return lambda x: F.linear(x, w, b)
    return mod


def _rms_norm(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF RMSNorm arithmetic (fp32 statistics, weight applied in the input dtype) without the module call."""
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    w = getattr(mod, "weight", None)
    if eps is None or w is None or not type(mod).__name__.endswith("RMSNorm"):
        return mod

    def norm(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)
    return norm


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _mlp(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP (down(act(gate(x)) * up(x))) called without module overhead; other blocks as modules."""
    parts = [getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if any(p is None for p in parts) or not type(mod).__name__.endswith("MLP"):
        return mod  # MoE blocks and unknown MLPs run as the model defines them
    act = F.silu if type(parts[3]).__name__ == "SiLUActivation" or isinstance(parts[3], nn.SiLU) else parts[3]
    down = _linear(parts[2])
    if _plain(parts[:2]):
        gate_up, n = _pack(parts[:2]), parts[0].out_features

        def fused(x):
            gu = gate_up(x)
            return down(act(gu[..., :n]) * gu[..., n:])
        return fused
    gate, up = _linear(parts[0]), _linear(parts[1])
    return lambda x: down(act(gate(x)) * up(x))


def _attend_one(q, keys, values, mask, scale):
    """Attention of one query position: q (B, H, 1, hd), keys/values (B, KV, S, hd), mask (B, 1, 1, S) or None.

    Grouped heads, no repeated KV. Eager: two batched matmuls (beat the SDPA kernel's fixed cost at one
    query). Compiled: the same sums written as broadcast-multiply-reduce, which inductor fuses into
    two loops over the cache instead of many tiny batched GEMMs."""
    B, H, _, hd = q.shape
    KV = keys.shape[1]
    qg = q.view(B, KV, H // KV, hd)
    if torch.compiler.is_compiling():
        scores = (qg[:, :, :, None, :] * keys[:, :, None]).sum(-1, dtype=torch.float32) * scale  # (B, KV, G, S)
    else:
        scores = (qg @ keys.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    if torch.compiler.is_compiling():
        out = (probs[..., None] * values[:, :, None]).sum(-2)  # (B, KV, G, hd)
    else:
        out = probs @ values
    return out.view(B, H, 1, hd)


class _Layer:
    def __init__(self, layer: nn.Module):
        a = layer.self_attn
        self.head_dim = a.head_dim
        self.n_heads = a.q_proj.out_features // a.head_dim
        self.n_kv = a.k_proj.out_features // a.head_dim
        self.scaling = getattr(a, "scaling", a.head_dim ** -0.5)
        self.window = getattr(a, "sliding_window", None)
        qkv = [a.q_proj, a.k_proj, a.v_proj]
        self.qkv = _pack(qkv) if _plain(qkv) else None
        self.q, self.k, self.v = (_linear(m) for m in qkv) if self.qkv is None else (None, None, None)
        self.o = _linear(a.o_proj)
        self.q_norm = _rms_norm(a.q_norm) if getattr(a, "q_norm", None) is not None else None
        self.k_norm = _rms_norm(a.k_norm) if getattr(a, "k_norm", None) is not None else None
        self.in_norm = _rms_norm(layer.input_layernorm)
        self.post_norm = _rms_norm(layer.post_attention_layernorm)
        self.mlp = _mlp(layer.mlp)

    def __call__(self, x, i, cos, sin, cache: StaticCache, slots, mask, kv_len):
        B, T, _ = x.shape
        h = self.in_norm(x)
        if self.qkv is not None:
            q, k, v = self.qkv(h).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                         self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rotate(q.transpose(1, 2), cos, sin)  # (B, n_heads, T, hd)
        k = _rotate(k.transpose(1, 2), cos, sin)  # (B, n_kv, T, hd)
        cache.write(i, slots, k, v)
        keys, values = cache.keys[i][:, :, :kv_len], cache.values[i][:, :, :kv_len]
        if T == 1:
            attn = _attend_one(q, keys, values, mask, self.scaling)
        else:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                  is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv)
        x = x + self.o(attn.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return x + self.mlp(self.post_norm(x))


class FastDecoder:
    """Forward over new tokens with a StaticCache; returns the logits of each row's last token."""

    def __init__(self, model: nn.Module, max_positions: int):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(model, "lm_head") or not hasattr(layers[0], "self_attn"):
            raise UnsupportedModelError(f"the fast runtime does not know the layout of {type(model).__name__}",
                                        "use a Llama, Mistral, Qwen2/3 or Mixtral/Qwen-MoE model")
        self.model = model
        self.embed = inner.embed_tokens
        self.layers = [_Layer(layer) for layer in layers]
        self.norm = _rms_norm(inner.norm)
        # A tied head is the embedding's own Parameter: packing it leaves the tie intact (input-major
        # packing makes the embedding a strided view, still fine for row lookups).
        self.head = _linear(model.lm_head)
        self.max_positions = max_positions
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.cpu_kernels = cpu_linear.available(p)  # plain linears on cpu_linear (compiled: its C++ kernel)
        # Rotary tables from the model's own rotary module (covers llama3/yarn/... scaling), in its dtype.
        pos = torch.arange(max_positions, device=self.device)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self.cos, self.sin = cos[0], sin[0]  # (max_positions, hd)

    def kv_shapes(self) -> list[tuple[int, int]]:
        return [(layer.n_kv, layer.head_dim) for layer in self.layers]

    def new_cache(self, batch: int, max_len: int) -> StaticCache:
        return StaticCache(self.kv_shapes(), batch, max_len, self.dtype, self.device)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: StaticCache,
                mask: torch.Tensor | None, kv_len: int, capture: list | None = None) -> torch.Tensor:
        """ids, positions (B, T); slots (T,) cache slots to fill; mask (B, 1, T, kv_len) bool or None
        (None: causal over the first kv_len slots, no padding). Returns float logits (B, vocab).
        capture: a list that receives each layer's output at the last position, (B, hidden) float."""
        x = self.embed(ids)
        cos = self.cos[positions].unsqueeze(1)  # (B, 1, T, hd)
        sin = self.sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cos, sin, cache, slots, mask, kv_len)
            if capture is not None:
                capture.append(x[:, -1].float())
        return self.head(self.norm(x[:, -1:]))[:, 0].float()

    __call__ = forward
