import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pocketlm.errors import UnsupportedModelError  # noqa: E402
from pocketlm.gguf_export import _permute_rope, export_gguf  # noqa: E402


def _unpermute(w, n_heads):
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype, tol", [("F32", 0.0), ("Q8_0", 0.01), ("Q4_0", 0.2)])
def test_round_trip_through_the_reader(tmp_path, tiny, qtype, tol):
    model, tok = tiny
    path = export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers  # embeddings, final norm, 9 per block (head tied)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == len(tok.get_vocab())

    def weight(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1])
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    ref_q = sd["model.layers.0.self_attn.q_proj.weight"]
    got_q = _unpermute(weight("blk.0.attn_q.weight"), cfg.num_attention_heads)
    got_down = weight("blk.1.ffn_down.weight")
    ref_down = sd["model.layers.1.mlp.down_proj.weight"]
    for got, ref in ((got_q, ref_q), (got_down, ref_down)):
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= tol if tol else np.array_equal(got, ref)


def test_rope_permutation_is_a_per_head_pair_interleave():
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    p = _permute_rope(w, 2)
    assert p[1, 0] == w[4, 0] and p[2, 0] == w[1, 0]  # rows (0, 4, 1, 5, ...) within each head
    assert np.array_equal(_unpermute(p, 2), w)


def test_refuses_other_architectures_and_leaves_nothing(tmp_path, tiny):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=8192)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        export_gguf(model, tiny[1], tmp_path / "q.gguf")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UnsupportedModelError, match="Q5"):
        export_gguf(tiny[0], tiny[1], tmp_path / "q.gguf", "Q5_K")
    assert torch.is_tensor(tiny[0].lm_head.weight)
