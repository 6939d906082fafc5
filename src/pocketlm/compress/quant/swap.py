"""Which modules a quantization pass covers, the checks made before any is changed, and the swap
of float modules for quantized ones (shared by RTN, GPTQ, AWQ, SmoothQuant and mixed precision).

Covered: every plain nn.Linear inside the decoder layers (fused MoE expert tensors are not linears
and stay float). The LM head and the embedding are quantized only on request, to an int8 table that
both use when they are tied, so a tied model stays tied.
"""
from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ..calibration import decoder_layers
from .linear import QuantEmbedding, QuantLinear
from .primitives import Scheme


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The plain float linears of one decoder layer by name relative to it (router gates excluded)."""
    return {name: m for name, m in layer.named_modules() if type(m) is nn.Linear and not name.endswith("mlp.gate")}


def decoder_linears(model) -> dict[str, nn.Linear]:
    """Every plain float linear of the decoder, by its full module name."""
    return {f"model.layers.{i}.{name}": m for i, layer in enumerate(decoder_layers(model))
            for name, m in layer_linears(layer).items()}


def check_head(model) -> None:
    """Refuse head quantization of a model whose head/embedding are not plain layers."""
    if type(model.get_output_embeddings()) is not nn.Linear or type(model.get_input_embeddings()) is not nn.Embedding:
        raise ConfigError("the LM head or the embedding is not a plain linear/embedding layer",
                          "quantize without the head option")


def check_targets(model, scheme: Scheme, names: list[str] | None = None, head: bool = False) -> dict[str, nn.Linear]:
    """The linears to quantize (all, or `names`), refusing a model with none, a group size that does
    not divide an input width, or (with `head`) a head that cannot be quantized, before any change."""
    if head:
        check_head(model)
    linears = decoder_linears(model)
    if names is not None:
        linears = {n: linears[n] for n in names}
    if not linears:
        raise ConfigError("the model has no plain linear layers in its decoder to quantize",
                          "quantize a model with linear projections (fused MoE experts are not covered)")
    for m in linears.values():  # raises when no kernel group size divides a width
        scheme.fit(m.in_features)
    bad = sorted({m.in_features for m in linears.values() if scheme.bits == 3 and m.in_features % 8})
    if bad:
        raise ConfigError(f"int3 codes need input widths that are multiples of 8, not {bad}",
                          "use --bits 4")
    return linears


def scheme_stats(model, head: bool) -> dict:
    """What an artifact states about its quantization beyond the codes: the group sizes the layers
    took (a requested size that does not divide a width is lowered, `Scheme.fit`) and the LM head."""
    groups = sorted({m.scheme.group_size for m in model.modules()
                     if isinstance(m, QuantLinear) and m.scheme.group_size is not None and m is not model.lm_head})
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = isinstance(in_emb, QuantEmbedding) and in_emb.table[0] is out_emb or (
        hasattr(out_emb, "weight") and hasattr(in_emb, "weight") and out_emb.weight is in_emb.weight)
    if head:
        group = getattr(getattr(out_emb, "scheme", None), "group_size", None)
        kind = f"int8 per group of {group}" if group else "int8 per row"
    else:
        kind = f"float ({str(out_emb.weight.dtype).removeprefix('torch.')}, not quantized)"
    return {**({"group_sizes": groups} if groups else {}),
            "lm_head": kind + ("; tied to the embedding: one table" if tied else "; embedding separate")}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_head_(model, group_size: int | None = None) -> dict:
    """Quantize the LM head to an int8 table (a scale per row, or per group of `group_size`) and make
    the embedding look up its rows from the same table when the two are tied (else from its own)."""
    check_head(model)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    scheme = Scheme(8, group_size).fit(head.in_features)
    table = QuantLinear.from_linear(head, scheme)
    model.lm_head = table
    if tied:
        emb_table = table
    else:
        lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, dtype=emb.weight.dtype)
        lin.weight = emb.weight
        emb_table = QuantLinear.from_linear(lin, scheme)
    model.set_input_embeddings(QuantEmbedding(emb_table, emb.padding_idx))
    if not tied:
        model.model.embed_table = emb_table  # registered here so that it is saved
    return {"head_bytes": table.stored_bytes() + (0 if tied else emb_table.stored_bytes()), "head_tied": tied}
