import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pocketlm
from pocketlm.compress import HeadPruneConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig, compress_
from pocketlm.compress.prune.sparsify import layer_matrices
from pocketlm.errors import ConfigError

CALIB = dict(calib_samples=16, calib_len=256, show_progress=False)
EVAL = pocketlm.EvalProtocol(tokens=4096, speed=False)


def matrix_sparsities(model):
    return [float((m.weight == 0).float().mean()) for layer in model.model.layers for m in layer_matrices(layer)]


@pytest.mark.parametrize("cfg", [MagnitudeConfig(0.5), WandaConfig(0.5), SparseGPTConfig(0.5)], ids=lambda c: c.kind)
def test_each_matrix_reaches_the_sparsity_and_zeros_survive_save(tmp_path, tiny, cfg):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    embed_before = model.model.embed_tokens.weight.clone()
    stats = compress_(model, cfg, tok=tok, **CALIB)[0]["stats"]
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert all(s == pytest.approx(0.5, abs=1e-3) for s in matrix_sparsities(model))
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # embeddings and tied head stay dense
    pocketlm.save(model, tok, tmp_path / "art")
    reloaded, _ = pocketlm.load(tmp_path / "art")
    x = torch.randint(0, 8192, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    assert matrix_sparsities(reloaded) == matrix_sparsities(model)


@pytest.mark.parametrize("cls", [MagnitudeConfig, WandaConfig, SparseGPTConfig])
def test_two_four_pattern(tiny, cls):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    compress_(model, cls(nm=(2, 4)), tok=tok, **CALIB)
    for layer in model.model.layers:
        for m in layer_matrices(layer):
            nonzero_per_group = (m.weight != 0).view(m.weight.shape[0], -1, 4).sum(-1)
            assert int(nonzero_per_group.max()) <= 2


def test_global_scope_spreads_sparsity_unevenly(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    stats = compress_(model, MagnitudeConfig(0.5, scope="global"), tok=tok, **CALIB)[0]["stats"]
    per_matrix = matrix_sparsities(model)
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert max(per_matrix) - min(per_matrix) > 0.05


def test_calibrated_methods_lose_less_than_magnitude(tiny):
    _, tok = tiny
    ppl = {}
    for cfg in (MagnitudeConfig(0.5), WandaConfig(0.5), SparseGPTConfig(0.5)):
        model = copy.deepcopy(tiny[0])
        compress_(model, cfg, tok=tok, **CALIB)
        ppl[cfg.kind] = pocketlm.evaluate(model, tok, EVAL, show_progress=False).quality["ppl"]
    assert ppl["prune_sparsegpt"] < ppl["prune_wanda"] < ppl["prune_magnitude"]


def test_moe_experts_are_pruned_per_expert():
    model, tok = pocketlm.load("moe")
    compress_(model, WandaConfig(0.5), tok=tok, calib_samples=8, calib_len=128, show_progress=False)
    experts = model.model.layers[0].mlp.experts
    for e in range(experts.gate_up_proj.shape[0]):
        assert float((experts.gate_up_proj[e] == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
        assert float((experts.down_proj[e] == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert float((model.model.layers[0].mlp.gate.weight == 0).float().mean()) < 0.01  # the router stays dense


FAMILIES = {
    "qwen2": {}, "qwen3": {}, "mistral": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_passes_run_on_other_families(tmp_path, tiny, model_type):
    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=8192, **FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tok = tiny[1]
    stats = compress_(model, SparseGPTConfig(0.5), tok=tok, calib_samples=4, calib_len=64, show_progress=False)
    assert stats[0]["stats"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    compress_(model, HeadPruneConfig(ratio=0.5), tok=tok, calib_samples=4, calib_len=64, show_progress=False)
    pocketlm.save(model, tok, tmp_path / "art")
    reloaded, _ = pocketlm.load(tmp_path / "art")
    x = torch.randint(0, 8192, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_nm_that_does_not_divide_is_refused_before_work(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    before = [m.weight.clone() for m in layer_matrices(model.model.layers[0])]
    with pytest.raises(ConfigError, match="divisible by 3"):
        compress_(model, WandaConfig(nm=(2, 3)), tok=tok, **CALIB)
    assert all(torch.equal(a, m.weight) for a, m in zip(before, layer_matrices(model.model.layers[0])))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sparsity=1.0), "outside"), (dict(sparsity=-0.1), "outside"), (dict(nm=(4, 2)), "0 < N < M"),
    (dict(nm=(2, 4), scope="global"), "per group"),
])
def test_bad_configs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        WandaConfig(**kwargs)
