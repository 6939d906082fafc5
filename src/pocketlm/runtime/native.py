"""The native decode step: one C++ call per token for a whole Llama-family decoder (cpu_step.cpp).

The eager step pays Python and dispatcher costs per op (~10 ops per layer, 30 layers on SmolLM2) and
the compiled one its region entry and inductor's small kernels; both are fixed costs paid per token
that weigh most at batch 1 on small models. The native step runs every layer in one call on the
same kernels the eager path uses for its linears (cpu_kernels.h: fp32, int8, int4 with fp32
activations), so its logits match the eager path's within float rounding. With
`activations="int8"` the int8/int4 linears quantize their inputs to 8 bits per block of 32 and use
integer dot products (llama.cpp's approach: faster at batch 1, ~0.5–1% relative error per layer
output, so greedy tokens may differ from the eager path's).

It takes the decoder as FastDecoder holds it (weights are not copied): plain layers only — RMSNorm,
q/k/v (optional bias), rotate-half rope, grouped attention without q/k norms or sliding window, a
gated SiLU MLP — whose linears are fp32 `nn.Linear` or pocketlm int8/int4 `QuantLinear` on CPU in
fp32. Anything else (MoE blocks, int3, bf16 models, CUDA) is refused with the reason: the native
path is chosen explicitly (`Generator(native=True)`, `--native`), never by silent fallback.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from . import cpu_linear

_FIX = "run the eager or compiled step instead (drop --native)"


class NativeStep:
    """Decode-step logits (B, vocab) for tokens (B, 1) at rope positions (B, 1) into StaticCache slots."""

    def __init__(self, decoder, activations: str = "fp32"):
        if activations not in ("fp32", "int8"):
            raise ConfigError(f"unknown native activations '{activations}'", "use fp32 or int8")
        reason = _unsupported(decoder, activations == "int8")
        if reason:
            raise UnsupportedModelError(f"the native decode step does not run this model: {reason}", _FIX)
        cpu_linear.build_kernel()  # its ConfigError names the fix
        first = decoder.layers[0]
        tensors, meta = [], [len(decoder.layers), first.n_heads, first.n_kv, first.head_dim,
                             decoder.model.config.hidden_size]
        for mods, layer in zip(_layer_modules(decoder.model), decoder.layers):
            tensors += [mods["in_norm"].weight.detach(), mods["post_norm"].weight.detach()]
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                _add_linear(mods[name], tensors, meta)
        tensors.append(decoder.model.model.norm.weight.detach())
        _add_linear(decoder.model.lm_head, tensors, meta)
        tensors += [decoder.cos.contiguous(), decoder.sin.contiguous(), *_embedding(decoder.embed)]
        self.activations = activations
        self.step = torch.classes.pocketlm_cpu.DecodeStep(tensors, meta, _eps(decoder.model), float(first.scaling),
                                                          activations == "int8")

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, cache,
                 valid: torch.Tensor | None) -> torch.Tensor:
        """tokens, pos, slots (B, 1); valid (B, max_len) marks the slots each row attends (None: those up
        to its own slot). Cache rows are contiguous views (StaticCache or its `rows`)."""
        return self.step.step(tokens[:, 0].contiguous(), pos[:, 0].contiguous(), slots[:, 0].contiguous(), cache.keys,
                              cache.values, _EMPTY if valid is None else valid)


_EMPTY = torch.empty(0, dtype=torch.bool)


def _embedding(embed: nn.Module) -> list[torch.Tensor]:
    """The table the step looks tokens up in (in C++: the Python lookup cost ~0.1 ms per token on
    `small`): fp32 rows, or the int8 codes and scales of a QuantEmbedding (the tied head's)."""
    from ..compress.quant.linear import QuantEmbedding  # here: compress imports the runtime
    if isinstance(embed, QuantEmbedding):
        t = embed.table[0]
        return [t.qweight, t.scales.contiguous()]
    return [embed.weight.detach().contiguous(), torch.empty(0)]


def _layer_modules(model) -> list[dict[str, nn.Module]]:
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out.append({"in_norm": layer.input_layernorm, "post_norm": layer.post_attention_layernorm,
                    "q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                    "gate": getattr(m, "gate_proj", None), "up": getattr(m, "up_proj", None),
                    "down": getattr(m, "down_proj", None)})
    return out


def _unsupported(decoder, act8: bool) -> str | None:
    """Why the native step cannot run this decoder (with 8-bit activations: `act8`), or None."""
    model = decoder.model
    if decoder.device.type != "cpu" or decoder.dtype != torch.float32:
        return f"it runs fp32 models on CPU (this one is {decoder.dtype} on {decoder.device.type})"
    from ..compress.quant.linear import QuantEmbedding  # here: compress imports the runtime
    if not isinstance(decoder.embed, (nn.Embedding, QuantEmbedding)):
        return f"its embedding is a {type(decoder.embed).__name__}"
    if isinstance(decoder.embed, nn.Embedding) and decoder.embed.weight.dtype != torch.float32:
        return f"its embedding table is {decoder.embed.weight.dtype}, not fp32"
    for i, (mods, layer) in enumerate(zip(_layer_modules(model), decoder.layers)):
        if layer.q_norm is not None or layer.window:
            return f"layer {i} has q/k norms or a sliding window"
        if layer.n_heads != decoder.layers[0].n_heads or layer.n_kv != decoder.layers[0].n_kv \
                or layer.head_dim != decoder.layers[0].head_dim:
            return f"layer {i} has its own head counts (a pruned model)"
        for name, mod in mods.items():
            if mod is None:
                return f"layer {i} has no plain gated MLP (an MoE block?)"
            if "norm" in name:
                if not type(mod).__name__.endswith("RMSNorm"):
                    return f"layer {i}'s {name} is a {type(mod).__name__}"
            elif _kind(mod) is None:
                return f"layer {i}'s {name} projection is a {_describe(mod)}"
            elif act8 and _kind(mod) != 32 and (mod.in_features % 32 or mod.scheme.group(mod.in_features) % 32):
                return f"layer {i}'s {name} projection's width or group is no multiple of 32 (8-bit activations)"
    acts = {type(getattr(layer.mlp, "act_fn", None)).__name__ for layer in model.model.layers}
    if not acts <= {"SiLU", "SiLUActivation"}:
        return f"its MLP activation is {', '.join(sorted(acts))}, not SiLU"
    if _kind(model.lm_head) is None:
        return f"its LM head is a {_describe(model.lm_head)}"
    return None


def _kind(mod: nn.Module) -> int | None:
    """The kernel bit width of a linear the native step runs (32: fp32), or None."""
    from ..compress.quant.linear import QuantLinear
    if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.is_contiguous():
        return 32
    if isinstance(mod, QuantLinear) and mod.bits in (8, 4) and not mod.tiled:
        return mod.bits
    return None


def _describe(mod: nn.Module) -> str:
    if hasattr(mod, "tiled"):  # a QuantLinear
        return f"int{mod.bits} layer in torch's tiled layout" if mod.tiled else f"int{mod.bits} layer"
    return type(mod).__name__


def _add_linear(mod: nn.Module, tensors: list, meta: list) -> None:
    bits, empty = _kind(mod), torch.empty(0)
    bias = mod.bias.detach().float().contiguous() if mod.bias is not None else empty
    if bits == 32:
        w = mod.weight.detach()
        tensors += [w, empty, empty, bias]
        meta += [32, w.shape[0], w.shape[1], 1]
        return
    zeros = mod.zeros if bits == 4 else empty
    tensors += [mod.qweight, mod.scales.contiguous(), zeros.contiguous(), bias]
    meta += [bits, mod.out_features, mod.in_features, mod.scales.shape[1]]


def _eps(model) -> float:
    norm = model.model.norm
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
