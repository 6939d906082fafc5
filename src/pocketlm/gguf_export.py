"""GGUF export of dense Llama-architecture models (F32, F16, Q8_0, Q4_0), with the tokenizer, for llama.cpp.

Uses the `gguf` package for the file format and its reference quantizers. llama.cpp's `llama`
architecture rotates interleaved pairs while HF Llama rotates halves, so Q and K rows are permuted
on the way out, as llama.cpp's own converter does.

pocketlm's quantized modules (QuantLinear, W8A8Linear, QuantEmbedding) are written by dequantizing
their codes to float and quantizing again to the file's type: int8 rows or groups become Q8_0 blocks
and int4/int3 groups Q4_0 blocks of 32 weights (one fp16 scale each, no offset), a second rounding,
except for int8 in groups of 32 (Q8_0's own layout), whose codes come back unchanged wherever a
group's largest code is ±127 (always with RTN). `auto_qtype` picks the type a model's bits fit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from torch import nn

from .compress.quant.linear import QuantEmbedding, QuantLinear, W8A8Linear
from .errors import UnsupportedModelError
from .io import atomic_write_path

QTYPES = ("F32", "F16", "Q8_0", "Q4_0")
BLOCK = {"Q8_0": 32, "Q4_0": 32}  # weights per quantization block (along a row)


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-rotation layout → llama.cpp pair layout, per head: rows (h, 2, hd/2) → (h, hd/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantized_bits(model) -> list[int]:
    """The bits of every quantized module (W8A8: 8); empty for a float model."""
    return [m.bits if isinstance(m, QuantLinear) else 8 for m in model.modules()
            if isinstance(m, (QuantLinear, W8A8Linear))]


def auto_qtype(model) -> str:
    """The GGUF type a model's quantization fits: Q8_0 when every quantized layer is 8-bit, Q4_0 when
    any has fewer bits, F32 for a float model."""
    bits = quantized_bits(model)
    return "F32" if not bits else "Q8_0" if min(bits) == 8 else "Q4_0"


# per decoder block: HF module → llama.cpp tensor name
BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_MATRICES = (nn.Linear, nn.Embedding, QuantLinear, W8A8Linear, QuantEmbedding)  # what _float_weights reads


def _matrix_modules(model) -> list[str]:
    """Names of the modules whose 2-D weights the file holds."""
    cfg = model.config
    names = ["model.embed_tokens", *([] if cfg.tie_word_embeddings else ["lm_head"])]
    return names + [f"model.layers.{i}.{hf}" for i in range(cfg.num_hidden_layers) for hf in BLOCK_NAMES
                    if hf.endswith("_proj")]


def check_exportable(model, qtype: str | None = None) -> None:
    """Raise UnsupportedModelError unless `model` can be written as GGUF `qtype` (None: check only
    the architecture, before a model is compressed). Writes nothing."""
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise UnsupportedModelError(f"GGUF export supports llama/mistral models, not {cfg.model_type}",
                                    "export a Llama-architecture model")
    if qtype is None:
        return
    if qtype not in QTYPES:
        raise UnsupportedModelError(f"GGUF type {qtype} is not supported", f"use one of {', '.join(QTYPES)}")
    if getattr(model, "pocketlm_record", {}).get("layer_shapes"):
        raise UnsupportedModelError("GGUF export needs equal layer shapes; this model's layers differ",
                                    "prune with --scope layer for a GGUF-exportable model")
    for name in _matrix_modules(model):
        m = model.get_submodule(name)
        if not isinstance(m, _MATRICES):
            raise UnsupportedModelError(f"GGUF export cannot express '{name}' ({type(m).__name__})",
                                        "export a model whose layers are float, QuantLinear or W8A8Linear")
        width = getattr(m, "in_features", None) or m.embedding_dim
        if qtype in BLOCK and width % BLOCK[qtype]:
            raise UnsupportedModelError(f"GGUF {qtype} stores blocks of {BLOCK[qtype]} weights, but '{name}' has rows "
                                        f"of {width}", "export with --gguf-type F16 or F32")


def _tensors(model):
    """(gguf name, fp32 numpy array) in llama.cpp's naming."""
    cfg = model.config
    sd = _float_weights(model)
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in BLOCK_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = _permute_rope(w, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                w = _permute_rope(w, cfg.num_key_value_heads)
            yield f"blk.{i}.{gg}.weight", w


def _float_weights(model) -> dict[str, np.ndarray]:
    """Every parameter as fp32 numpy by its state-dict name; a quantized module's `weight` is its
    dequantized codes (a QuantEmbedding's: its int8 table's rows)."""
    weights = dict(model.named_parameters(remove_duplicate=False))  # tied names both present
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, W8A8Linear)):
            weights[f"{name}.weight"] = m.dequantize()
        elif isinstance(m, QuantEmbedding):
            weights[f"{name}.weight"] = m.table[0].dequantize()
    return {k: v.detach().float().cpu().contiguous().numpy() for k, v in weights.items()}


def _tokenizer(writer, tok) -> None:
    import gguf
    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # byte-level BPE with digits split one by one
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for tid, add in ((tok.bos_token_id, writer.add_bos_token_id), (tok.eos_token_id, writer.add_eos_token_id),
                     (tok.pad_token_id, writer.add_pad_token_id)):
        if tid is not None:
            add(tid)
    writer.add_add_bos_token(False)


def export_gguf(model, tok, out: str | os.PathLike, qtype: str = "F32") -> Path:
    """Write `model` as one GGUF file. Norms stay F32; with Q8_0/Q4_0 every 2-D weight is quantized
    (llama.cpp's own recipe keeps a few tensors at higher precision; this one does not).

    qtype: F32 (default), F16, Q8_0, Q4_0, or "auto" (`auto_qtype`: the type the model's quantization
    fits). A quantized model is dequantized and re-quantized to `qtype` (see the module docstring)."""
    import gguf
    qtype = auto_qtype(model) if qtype == "auto" else qtype
    check_exportable(model, qtype)
    cfg = model.config
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]
    with atomic_write_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(getattr(cfg, "_name_or_path", "") or "pocketlm-model")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(ftype)
        _tokenizer(w, tok)
        for name, arr in _tensors(model):
            if arr.ndim == 1 or qtype == "F32":
                w.add_tensor(name, arr.astype(np.float32))
            elif qtype == "F16":
                w.add_tensor(name, arr.astype(np.float16))
            else:
                q = getattr(gguf.GGMLQuantizationType, qtype)
                w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)
