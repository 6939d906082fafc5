import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pocketlm
from pocketlm.compress.quant.awq import AWQConfig, fake_quant, fold_scale_, input_sites, search_scale
from pocketlm.compress.quant.linear import QuantLinear
from pocketlm.compress.quant.primitives import Scheme
from pocketlm.compress.quant.rtn import RTNConfig
from pocketlm.errors import ConfigError
from pocketlm.io import ASSETS


def _text_ids(tok, n=256):
    return torch.tensor(tok((ASSETS / "data" / "test.txt").read_text()[:8000])["input_ids"][:n]).view(2, -1)


def _kl(ref, model, x):
    with torch.no_grad():
        logp = model(x).logits.log_softmax(-1)
    return (ref.exp() * (ref - logp)).sum(-1).mean().item()


def _mha_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("which", ["tiny", "mha"])
def test_folding_scales_keeps_the_float_function(tiny, which):
    model = copy.deepcopy(tiny[0]) if which == "tiny" else _mha_llama()
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
    g = torch.Generator().manual_seed(0)
    folded = []
    for layer in model.model.layers:
        for site in input_sites(layer):
            if site.prev is not None:
                k = layer.get_submodule(site.names[0]).in_features
                fold_scale_(layer, site, torch.exp(torch.empty(k).uniform_(-2, 2, generator=g)))
                folded.append(site.names)
    # tiny has GQA: o_proj is folded into v_proj only in the MHA model
    assert (("self_attn.o_proj",) in folded) == (which == "mha")
    assert ("mlp.down_proj",) in folded and ("mlp.gate_proj", "mlp.up_proj") in folded
    assert not torch.equal(model.model.layers[0].input_layernorm.weight,
                           (tiny[0] if which == "tiny" else _mha_llama()).model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("awq", [AWQConfig(bits=3, group_size=32),
                                 AWQConfig(bits=3, group_size=32, then="gptq", clip=False)], ids=["rtn", "gptq"])
def test_awq_int3_beats_rtn_on_real_text(tiny, awq):
    tok = tiny[1]
    x = _text_ids(tok, 1024)  # 256 tokens measured KL too noisily: AWQ's margin moved ±2% across CPUs
    with torch.no_grad():
        ref = tiny[0](x).logits.log_softmax(-1)
    kl = {}
    for cfg in (RTNConfig(bits=3, group_size=32), awq):
        model = copy.deepcopy(tiny[0])
        stats = pocketlm.compress_(model, cfg, tok=tok, calib_samples=8, calib_len=64, show_progress=False)[0]["stats"]
        assert stats["layers"] == 7 * model.config.num_hidden_layers
        kl[cfg.kind] = _kl(ref, model, x)
    assert 0 <= stats["mean_alpha"] < 1
    assert kl["awq"] < 0.9 * kl["rtn"], kl


def test_scale_search_protects_salient_channels_and_restores_the_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30  # a few salient input channels, as LLM activations have
    w = torch.nn.Parameter(torch.randn(32, 64, generator=g))
    w0 = w.detach().clone()
    scheme = Scheme(4, 32)
    s, alpha = search_scale(lambda: x @ w.T, x.abs().mean(0), [w], scheme)
    assert torch.equal(w, w0)
    assert alpha > 0 and s[:4].min() > s[4:].max()

    def err(scale):
        return (x @ (fake_quant(w0 * scale, scheme) / scale).T - x @ w0.T).square().mean()

    assert err(s) < 0.8 * err(torch.ones(64))


def test_defaults_follow_the_rounding():
    assert (AWQConfig().clips, AWQConfig().ranges) == (True, 0)
    assert (AWQConfig(then="gptq").clips, AWQConfig(then="gptq").ranges) == (False, 20)
    assert (AWQConfig(then="gptq", clip=True, range_search=0).clips, AWQConfig(range_search=5).ranges) == (True, 5)


def test_bad_settings_change_nothing(tiny):
    with pytest.raises(ConfigError, match=r"\(4, 3\) bits, not 8"):
        AWQConfig(bits=8)
    with pytest.raises(ConfigError, match="unknown rounding"):
        AWQConfig(then="hqq")
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    norm = model.model.layers[0].input_layernorm.weight.clone()
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        pocketlm.compress_(model, AWQConfig(group_size=32))
    assert all(type(m) is not QuantLinear for m in model.modules())
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)


def test_awq_artifact_reloads_bit_exactly(tmp_path, tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    pocketlm.compress_(model, AWQConfig(bits=4, group_size=32, head=True), tok=tok, calib_samples=8, calib_len=64,
                       show_progress=False)
    out = pocketlm.save(model, tok, tmp_path / "awq")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["modules"]["model.layers.0.mlp.down_proj"] == {"type": "weight_only", "bits": 4, "group_size": 32,
                                                               "sym": False}
    again, _ = pocketlm.load(out)
    x = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
