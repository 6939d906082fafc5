import copy
import json

import pytest
import torch
from torch import nn

import pocketlm
from pocketlm.compress.quant.linear import QuantEmbedding, QuantLinear
from pocketlm.compress.quant.primitives import Scheme, quantize_matrix, unpack
from pocketlm.compress.quant.rtn import RTNConfig
from pocketlm.errors import ConfigError
from pocketlm.io import ASSETS
from pocketlm.runtime import Generator


def test_rtn_pass_quantizes_decoder_and_engine_matches_transformers(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    size = pocketlm.eval.efficiency.weight_bytes(model)
    stats = pocketlm.compress_(model, RTNConfig(bits=8), tok=tok)[0]["stats"]
    assert stats["layers"] == 7 * model.config.num_hidden_layers
    assert stats["linear_bytes_after"] < 0.3 * stats["linear_bytes_before"]
    assert pocketlm.eval.efficiency.weight_bytes(model) < size
    assert type(model.lm_head) is nn.Linear  # head and embeddings stay float unless asked
    x = torch.randint(0, 8192, (1, 24))
    ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                         min_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, 24:].tolist()
    ours = [int(t[0]) for t, _ in Generator(model, tok).generate_step([x[0].tolist()], 12, stop_tokens=set())]
    assert ours == ref
    compiled = Generator(model, tok, compile=True)  # the packed kernels also run inside the compiled step
    assert [int(t[0]) for t, _ in compiled.generate_step([x[0].tolist()], 12, stop_tokens=set())] == ref


def test_bad_settings_change_nothing(tiny):
    with pytest.raises(ConfigError, match=r"\(8, 4, 3\) bits, not 2"):
        RTNConfig(bits=2)
    with pytest.raises(ConfigError, match="group size 48"):
        RTNConfig(bits=4, group_size=48)
    with pytest.raises(ConfigError, match="no group size up to 128 divides input width 100"):
        Scheme(4, 128).fit(100)


def test_group_size_that_does_not_divide_a_width_is_lowered_for_that_layer(tmp_path, tiny):
    # tiny's MLP is 352 wide (11 x 32): its down_proj takes group 32, every other layer 128
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    [applied] = pocketlm.compress_(model, RTNConfig(bits=4, group_size=128), tok=tok)
    assert applied["stats"]["group_sizes"] == [32, 128]
    assert applied["stats"]["lm_head"].startswith("float")  # not asked for: the head stays float
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.scheme.group_size == 32 and layer.self_attn.q_proj.scheme.group_size == 128
    q32, _, _ = quantize_matrix(down, Scheme(4, 32))
    assert torch.equal(unpack(layer.mlp.down_proj.state_dict()["qweight"], 4, 352), q32)
    pocketlm.save(model, tok, tmp_path / "a")
    modules = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.0.mlp.down_proj"]["group_size"] == 32
    assert modules["model.layers.0.mlp.up_proj"]["group_size"] == 128


def test_fewer_bits_cost_more_fidelity_on_real_text(tiny):
    tok = tiny[1]
    x = torch.tensor([tok((ASSETS / "data" / "test.txt").read_text()[:2000])["input_ids"][:128]])
    with torch.no_grad():
        ref = tiny[0](x).logits.log_softmax(-1)
    kl, agree = {}, {}
    for bits in (8, 4, 3):
        model = copy.deepcopy(tiny[0])
        pocketlm.compress_(model, RTNConfig(bits=bits, group_size=32), tok=tok)
        with torch.no_grad():
            logp = model(x).logits.log_softmax(-1)
        kl[bits] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        agree[bits] = (logp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert 0 < kl[8] < kl[4] < kl[3]
    assert agree[8] > 0.95 and agree[4] > 0.8


def test_head_quantization_keeps_a_tied_model_tied(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    assert model.config.tie_word_embeddings
    stats = pocketlm.compress_(model, RTNConfig(bits=8, head=True), tok=tok)[0]["stats"]
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.model.embed_tokens.table[0] is model.lm_head and stats["head_tied"]
    x = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        agree = (model(x).logits.argmax(-1) == tiny[0](x).logits.argmax(-1)).float().mean()
    assert agree > 0.9


def test_grouped_int8_quantizes_the_head_in_the_same_groups_and_reloads(tmp_path, tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    stats = pocketlm.compress_(model, RTNConfig(bits=8, group_size=32, head=True), tok=tok)[0]["stats"]
    assert model.lm_head.scales.shape[1] == model.config.hidden_size // 32
    assert stats["lm_head"].startswith("int8 per group of 32") and stats["group_sizes"] == [32]
    per_channel = pocketlm.compress_(copy.deepcopy(tiny[0]), RTNConfig(bits=8, head=True), tok=tok)[0]["stats"]
    assert per_channel["lm_head"].startswith("int8 per row") and "group_sizes" not in per_channel
    x = torch.randint(0, 8192, (1, 16))
    pocketlm.save(model, tok, tmp_path / "q8g32")
    again, _ = pocketlm.load(tmp_path / "q8g32")
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
