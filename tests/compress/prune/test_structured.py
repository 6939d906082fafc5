import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import pocketlm
from pocketlm.compress import HeadPruneConfig, LayerDropConfig, MlpPruneConfig, WidthPruneConfig, compress_
from pocketlm.compress.prune.structured import drop_layers_, prune_experts_, prune_heads_, prune_mlp_
from pocketlm.errors import ConfigError

CALIB = dict(calib_samples=8, calib_len=128, show_progress=False)
X = torch.randint(0, 8192, (2, 24))


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def tiny_copy(tiny):
    model, tok = tiny
    return copy.deepcopy(model), tok


def test_removing_heads_equals_zeroing_their_output(tiny, tiny_copy):
    ref, _ = tiny_copy
    pruned = copy.deepcopy(ref)
    hd = ref.config.head_dim
    # tiny: 4 query heads, 2 KV heads (groups of 2); remove query head 1 (group 0) and 2 (group 1) in layer 0.
    with torch.no_grad():
        for h in (1, 2):
            ref.model.layers[0].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    prune_heads_(pruned.model.layers[0].self_attn, keep_q=[0, 3], keep_kv=[0, 1])
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 2 * hd
    assert torch.allclose(logits(pruned), logits(ref), atol=1e-5)


def test_removing_a_kv_group_equals_zeroing_its_heads(tiny_copy):
    ref, _ = tiny_copy
    pruned = copy.deepcopy(ref)
    hd = ref.config.head_dim
    with torch.no_grad():
        ref.model.layers[1].self_attn.o_proj.weight[:, 2 * hd:4 * hd] = 0  # query heads 2, 3 use KV head 1
    prune_heads_(pruned.model.layers[1].self_attn, keep_q=[0, 1], keep_kv=[0])
    assert pruned.model.layers[1].self_attn.k_proj.out_features == hd
    assert torch.allclose(logits(pruned), logits(ref), atol=1e-5)


def test_inconsistent_gqa_heads_are_refused(tiny_copy):
    model, _ = tiny_copy
    with pytest.raises(ConfigError, match="same number"):
        prune_heads_(model.model.layers[0].self_attn, keep_q=[0, 1, 2], keep_kv=[0, 1])


def test_removing_mlp_channels_equals_zeroing_them(tiny_copy):
    ref, _ = tiny_copy
    pruned = copy.deepcopy(ref)
    keep = torch.arange(0, 352, 2)
    with torch.no_grad():
        ref.model.layers[2].mlp.down_proj.weight[:, 1::2] = 0
    prune_mlp_(pruned.model.layers[2].mlp, keep)
    assert pruned.model.layers[2].mlp.down_proj.in_features == 176
    assert torch.allclose(logits(pruned), logits(ref), atol=1e-5)


def test_dropped_layers_renumber_and_cache_still_works(tiny_copy):
    model, tok = tiny_copy
    drop_layers_(model, [1])
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_block_influence_drops_the_least_influential_layers(tiny_copy):
    model, tok = tiny_copy
    stats = compress_(model, LayerDropConfig(drop=2), tok=tok, **CALIB)[0]["stats"]
    bi = stats["block_influence"]
    assert stats["dropped"] == sorted(sorted(range(4), key=lambda i: bi[i])[:2])
    assert stats["params_after"] < stats["params_before"]


@pytest.mark.parametrize("cfg", [HeadPruneConfig(ratio=0.5), HeadPruneConfig(ratio=0.5, unit="kv_group"),
                                 MlpPruneConfig(ratio=0.5), MlpPruneConfig(ratio=0.25, importance="taylor"),
                                 LayerDropConfig(drop=1), WidthPruneConfig(target_params=1_300_000)],
                         ids=lambda c: c.kind)
def test_uniform_pruning_saves_a_plain_hf_model(tmp_path, tiny_copy, cfg):
    model, tok = tiny_copy
    stats = compress_(model, cfg, tok=tok, **CALIB)[0]["stats"]
    assert stats["params_after"] < stats["params_before"]
    if isinstance(cfg, WidthPruneConfig):
        assert stats["params_after"] <= cfg.target_params
    pocketlm.save(model, tok, tmp_path / "art")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "art")
    assert sum(p.numel() for p in hf.parameters()) == stats["params_after"]
    assert torch.equal(logits(hf), logits(model))


def test_global_ranking_records_layer_shapes_and_reloads(tmp_path, tiny_copy):
    model, tok = tiny_copy
    compress_(model, MlpPruneConfig(ratio=0.5, scope="global"), tok=tok, **CALIB)
    shapes = model.pocketlm_record["layer_shapes"]
    assert len({s["intermediate"] for s in shapes}) > 1
    pocketlm.save(model, tok, tmp_path / "art")
    reloaded, _ = pocketlm.load(tmp_path / "art")
    assert torch.equal(logits(reloaded), logits(model))
    with pytest.raises(Exception):  # one HF config cannot hold per-layer sizes
        AutoModelForCausalLM.from_pretrained(tmp_path / "art")


def test_activation_importance_beats_random_choice(tiny):
    """Keeping the most active channels hurts less than keeping a random half."""
    _, tok = tiny
    calib_ppl = {}
    for name in ("importance", "random"):
        model = copy.deepcopy(tiny[0])
        if name == "importance":
            compress_(model, MlpPruneConfig(ratio=0.5), tok=tok, **CALIB)
        else:
            g = torch.Generator().manual_seed(0)
            for layer in model.model.layers:
                prune_mlp_(layer.mlp, torch.randperm(352, generator=g)[:176])
        report = pocketlm.evaluate(model, tok, pocketlm.EvalProtocol(tokens=4096, speed=False), show_progress=False)
        calib_ppl[name] = report.quality["ppl"]
    assert calib_ppl["importance"] < calib_ppl["random"]


@pytest.mark.parametrize("cfg,error,needle", [
    (LayerDropConfig(drop=4), ConfigError, "remove all 4 layers"),
    (WidthPruneConfig(target_params=10**9), ConfigError, "not below the model"),
    (WidthPruneConfig(target_params=10), ConfigError, "below what width pruning can reach"),
    (HeadPruneConfig(ratio=0.1), ConfigError, "rounds to 0"),
])
def test_impossible_settings(tiny_copy, cfg, error, needle):
    model, tok = tiny_copy
    with pytest.raises(error, match=needle):
        compress_(model, cfg, tok=tok, **CALIB)


def test_removing_expert_channels_equals_zeroing_them():
    ref, _ = pocketlm.load("moe")
    pruned, zeroed = copy.deepcopy(ref), copy.deepcopy(ref)
    experts = ref.model.layers[1].mlp.experts
    n_exp, inter = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
    keep = torch.stack([torch.randperm(inter, generator=torch.Generator().manual_seed(e))[: inter // 2]
                        for e in range(n_exp)])  # different channels in every expert
    prune_experts_(pruned.model.layers[1].mlp.experts, keep)
    with torch.no_grad():
        for e in range(n_exp):
            gone = torch.ones(inter, dtype=torch.bool)
            gone[keep[e]] = False
            zeroed.model.layers[1].mlp.experts.down_proj[e][:, gone] = 0
    assert pruned.model.layers[1].mlp.experts.gate_up_proj.shape == (n_exp, inter, experts.gate_up_proj.shape[2])
    assert torch.allclose(logits(pruned), logits(zeroed), atol=1e-4)
    assert not torch.allclose(logits(pruned), logits(ref), atol=1e-2)


def test_moe_mlp_pruning_shrinks_every_expert_and_reloads(tmp_path):
    model, tok = pocketlm.load("moe")
    before = sum(p.numel() for p in model.parameters())
    stats = compress_(model, MlpPruneConfig(ratio=0.5), tok=tok, **CALIB)[0]["stats"]
    experts = model.model.layers[0].mlp.experts
    assert experts.down_proj.shape[-1] == 128 and model.config.intermediate_size == 128
    assert stats["params_after"] == sum(p.numel() for p in model.parameters()) < before
    pocketlm.save(model, tok, tmp_path / "art")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "art").eval()  # uniform: a plain HF config
    assert torch.equal(logits(plain), logits(model))


def test_qwen2_moe_experts_and_shared_expert_are_pruned(tmp_path, tiny):
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=8192, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    compress_(model, MlpPruneConfig(ratio=0.25), tok=tiny[1], **CALIB)
    assert (model.config.moe_intermediate_size, model.config.shared_expert_intermediate_size) == (24, 48)
    assert model.model.layers[1].mlp.shared_expert.down_proj.in_features == 48
    pocketlm.save(model, tiny[1], tmp_path / "art")
    again, _ = pocketlm.load(tmp_path / "art")
    assert torch.equal(logits(again), logits(model))


def test_moe_expert_widths_stay_aligned_for_the_grouped_matmul():
    model, tok = pocketlm.load("moe")
    compress_(model, MlpPruneConfig(ratio=0.3), tok=tok, **CALIB)  # 256 · 0.7 = 179.2 channels
    assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == 176
    assert torch.isfinite(logits(model)).all()  # unaligned widths fail in transformers' grouped matmul


def test_moe_global_mlp_scope_is_refused_before_any_change():
    model, tok = pocketlm.load("moe")
    before = logits(model)
    with pytest.raises(ConfigError, match="scope layer"):
        compress_(model, MlpPruneConfig(ratio=0.5, scope="global"), tok=tok, **CALIB)
    assert torch.equal(logits(model), before)


def test_width_pruning_of_moe_reaches_the_target_and_reloads(tmp_path):
    model, tok = pocketlm.load("moe")
    before = sum(p.numel() for p in model.parameters())
    stats = compress_(model, WidthPruneConfig(target_ratio=0.65), tok=tok, **CALIB)[0]["stats"]
    after = sum(p.numel() for p in model.parameters())
    # widths move in steps of 32 of 256: 3/4 of them gives 0.611 of the parameters, the largest that fits
    assert stats["params_after"] == after <= 0.65 * before and after > 0.6 * before
    hidden = model.config.hidden_size
    block = model.model.layers[0].mlp
    assert hidden == stats["hidden"] < 256 and block.gate.weight.shape == (8, hidden)
    assert block.experts.gate_up_proj.shape[2] == hidden and block.experts.down_proj.shape[1] == hidden
    assert torch.isfinite(logits(model)).all()
    pocketlm.save(model, tok, tmp_path / "art")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "art").eval()
    assert torch.equal(logits(plain), logits(model))


def test_width_pruning_of_qwen2_moe_prunes_the_shared_expert_and_its_gate(tiny):
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=8192, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    before = sum(p.numel() for p in model.parameters())
    compress_(model, WidthPruneConfig(target_ratio=0.7), tok=tiny[1], **CALIB)
    assert sum(p.numel() for p in model.parameters()) <= 0.7 * before
    block, hidden = model.model.layers[1].mlp, model.config.hidden_size
    assert block.shared_expert_gate.in_features == hidden == block.shared_expert.down_proj.out_features
    assert model.config.shared_expert_intermediate_size == block.shared_expert.down_proj.in_features < 128
    assert torch.isfinite(logits(model)).all()


def test_kept_rms_ratio_restores_norm_scale(tiny):
    from pocketlm.compress.prune.importance import activation_importance, kept_rms_ratio
    model, _ = tiny
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    everything = kept_rms_ratio(model, tokens, torch.arange(128), show_progress=False)
    assert everything == pytest.approx([1.0] * 9)  # 4 layers x 2 norms + the final norm
    strongest = activation_importance(model, tokens, heads=False, mlp=False, hidden=True,
                                      show_progress=False)["hidden"].argsort(descending=True)[:64]
    assert all(r > 1 for r in kept_rms_ratio(model, tokens, strongest, show_progress=False))


def test_dropping_layers_after_global_pruning_keeps_shapes_consistent(tmp_path, tiny_copy):
    model, tok = tiny_copy
    compress_(model, [MlpPruneConfig(ratio=0.5, scope="global"), LayerDropConfig(drop=1, metric="last")],
              tok=tok, **CALIB)
    assert len(model.pocketlm_record["layer_shapes"]) == 3
    pocketlm.save(model, tok, tmp_path / "art")
    reloaded, _ = pocketlm.load(tmp_path / "art")
    assert [k for k in ("prune_mlp", "prune_layers")] == [r["kind"] for r in reloaded.pocketlm_record["recipe"]]
    assert torch.equal(logits(reloaded), logits(model))


def test_head_pruning_after_uneven_heads_is_refused(tiny_copy):
    model, tok = tiny_copy
    prune_heads_(model.model.layers[0].self_attn, keep_q=[0, 2], keep_kv=[0, 1])
    with pytest.raises(ConfigError, match="same head counts"):
        compress_(model, HeadPruneConfig(ratio=0.5), tok=tok, **CALIB)
