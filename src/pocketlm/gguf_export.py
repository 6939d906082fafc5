"""GGUF export of dense Llama-architecture models (F32, F16, Q8_0, Q4_0), with the tokenizer, for llama.cpp.

Uses the `gguf` package for the file format and its reference quantizers. llama.cpp's `llama`
architecture rotates interleaved pairs while HF Llama rotates halves, so Q and K rows are permuted
on the way out, as llama.cpp's own converter does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import UnsupportedModelError
from .io import atomic_write_path

QTYPES = ("F32", "F16", "Q8_0", "Q4_0")


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-rotation layout → llama.cpp pair layout, per head: rows (h, 2, hd/2) → (h, hd/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check(model) -> None:
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise UnsupportedModelError(f"GGUF export supports llama/mistral models, not {cfg.model_type}",
                                    "export a Llama-architecture model")
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise UnsupportedModelError("GGUF export takes the float model; this one is already quantized",
                                    "export the float model with qtype Q8_0 or Q4_0")
    if getattr(model, "pocketlm_record", {}).get("layer_shapes"):
        raise UnsupportedModelError("GGUF export needs equal layer shapes; this model's layers differ",
                                    "prune with --scope layer for a GGUF-exportable model")


def _tensors(model):
    """(gguf name, fp32 numpy array) in llama.cpp's naming."""
    cfg = model.config
    sd = {k: v.detach().float().contiguous().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = _permute_rope(w, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                w = _permute_rope(w, cfg.num_key_value_heads)
            yield f"blk.{i}.{gg}.weight", w


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
    (llama.cpp's own recipe keeps a few tensors at higher precision; this one does not)."""
    import gguf
    if qtype not in QTYPES:
        raise UnsupportedModelError(f"GGUF type {qtype} is not supported", f"use one of {', '.join(QTYPES)}")
    _check(model)
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
