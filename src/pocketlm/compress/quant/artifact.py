"""How a quantized model is described in config.json (`quantization_config`) and rebuilt on load.

The description names every quantized module and its scheme:
    {"quant_method": "pocketlm", "modules": {"model.layers.0.self_attn.q_proj":
        {"type": "weight_only", "bits": 4, "group_size": 128, "sym": false}, ...,
        "model.embed_tokens": {"type": "embedding", "table": "lm_head"}}}
A loader builds the float model from its config, `install_shells` swaps in empty quantized modules,
the weights fill them (load_state_dict, or transformers' loader through the registered quantizer),
then `finish` converts them to the kernels' layout.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import CorruptModelError
from .linear import QuantEmbedding, QuantLinear, W8A8Linear
from .primitives import Scheme
from .swap import set_module

QUANT_METHOD = "pocketlm"


def describe(model) -> dict | None:
    """The `quantization_config` of a model with quantized modules, None for a float model."""
    names = {id(m): n for n, m in model.named_modules()}
    modules: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            s = m.scheme
            modules[name] = {"type": "weight_only", "bits": s.bits, "group_size": s.group_size, "sym": s.sym}
        elif isinstance(m, W8A8Linear):
            modules[name] = {"type": "w8a8"}
        elif isinstance(m, QuantEmbedding):
            modules[name] = {"type": "embedding", "table": names[id(m.table[0])]}
    return {"quant_method": QUANT_METHOD, "modules": modules} if modules else None


def install_shells(model, qconfig: dict, dtype: torch.dtype) -> None:
    """Replace every module named in `qconfig` with an empty quantized shell of the same shape."""
    modules = qconfig.get("modules") if isinstance(qconfig, dict) else None
    if not isinstance(modules, dict) or not modules:
        raise CorruptModelError("config.json has a pocketlm quantization_config without modules",
                                "re-create the artifact with `pocketlm compress`")
    embeddings = {}
    for name, spec in modules.items():
        if spec.get("type") == "embedding":
            embeddings[name] = spec
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if old is None and name.endswith("embed_table"):  # an untied embedding's own int8 table
            emb = model.get_input_embeddings()
            in_f, out_f, bias = emb.embedding_dim, emb.num_embeddings, False
        elif isinstance(old, nn.Linear):
            in_f, out_f, bias = old.in_features, old.out_features, old.bias is not None
        else:
            raise CorruptModelError(f"quantization_config names '{name}', which is not a linear layer of this model",
                                    "check that config.json and the weights belong together")
        if spec.get("type") == "w8a8":
            shell = W8A8Linear(in_f, out_f, bias, dtype)
        else:
            shell = QuantLinear(in_f, out_f, Scheme(spec["bits"], spec.get("group_size"), spec.get("sym", False)),
                                bias, dtype)
        set_module(model, name, shell)
    for name, spec in embeddings.items():
        old = model.get_submodule(name)
        set_module(model, name, QuantEmbedding(model.get_submodule(spec["table"]), getattr(old, "padding_idx", None)))


def finish(model) -> None:
    """Convert every filled shell to the kernels' layout."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.to_kernel_layout()
