"""Expert store, cache and MoE blocks: offloaded decoding is the all-resident model, within its budget."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pocketlm
from pocketlm.errors import ConfigError, CorruptModelError, UnsupportedModelError
from pocketlm.moe.block import Routing
from pocketlm.moe.experts import Expert
from pocketlm.moe.runtime import fused_experts, moe_blocks, offload_experts
from pocketlm.moe.store import FILE, ExpertStore
from pocketlm.runtime import Generator


@pytest.fixture(scope="module")
def moe():
    return pocketlm.load("moe")


def greedy(model, tok, prompt, n=24):
    return [int(t) for t, _ in Generator(model, tok).generate_step([tok(prompt).input_ids], n)]


PROMPTS = ["In the beginning God created", "The following functions are", "Q: What is the answer"]


def test_all_resident_block_matches_transformers(moe):
    model, tok = moe
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    m = copy.deepcopy(model)
    rt = offload_experts(m, resident=1.0, prefetch=False)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert rt.cache.stats.loads == 0  # warmed up front: nothing loaded while running
    rt.close()


@pytest.mark.parametrize("policy,prefetch,page_cache", [("lru", True, True), ("lfu", True, False), ("lru", False, True)])
def test_offloaded_decoding_is_identical_and_within_budget(moe, policy, prefetch, page_cache):
    model, tok = moe
    resident = copy.deepcopy(model)
    rt_all = offload_experts(resident, resident=1.0, prefetch=False)
    offloaded = copy.deepcopy(model)
    rt = offload_experts(offloaded, resident=0.25, policy=policy, prefetch=prefetch, page_cache=page_cache)
    seen = []
    original = rt.cache._landed

    def landed(key, ex, prefetched=False):  # record the memory in use at every load
        original(key, ex, prefetched)
        seen.append(rt.cache.used + rt.cache.spare_bytes)
    rt.cache._landed = landed
    for p in PROMPTS:
        assert greedy(offloaded, tok, p) == greedy(resident, tok, p)
    s = rt.stats()
    assert s["misses"] > 0 and s["hits"] > 0  # the budget really forced loads and reuse
    assert s["hits"] + s["misses"] == s["requests"]
    assert s["loads"] == s["misses"] + s["prefetched"] - len(rt.cache.loading)
    assert s["bytes_loaded"] == s["loads"] * rt.cache.sizes[(0, 0)]
    assert max(seen) <= rt.cache.budget and len(rt.cache.resident) <= 12
    assert (s["prefetched"] > 0) == prefetch
    rt.close()
    rt_all.close()
    assert not rt.store_dir.exists()  # the temporary store is removed


def test_store_round_trip_and_corruption(moe, tmp_path):
    model, _ = moe
    block = moe_blocks(model)[0][2]
    experts = [[Expert(w) for w in fused_experts(block)]]
    store = ExpertStore.write(tmp_path, experts)
    for e, ex in enumerate(experts[0]):
        got = store.read(0, e)
        for name, t in ex.tensors.items():
            assert torch.equal(got.tensors[name], t)
    assert store.stored_bytes() == sum(ex.nbytes for ex in experts[0])
    store.close()
    data = (tmp_path / FILE).read_bytes()
    (tmp_path / FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="truncated"):
        ExpertStore(tmp_path).read(0, 7)
    (tmp_path / FILE).write_bytes(b"\x00garbage")
    with pytest.raises(CorruptModelError, match="cannot be read"):
        ExpertStore(tmp_path)


def test_budget_errors(moe):
    model, _ = moe
    for kwargs, needle in [(dict(resident=0), "between 1"), (dict(resident=1.5), "outside"),
                           (dict(resident=49), "between 1"), (dict(expert_memory_mb=0.01), "holds no expert"),
                           (dict(resident=0.5, expert_memory_mb=4), "exactly one"), (dict(), "exactly one"),
                           (dict(resident=0.5, policy="fifo"), "policy")]:
        with pytest.raises(ConfigError, match=needle):
            offload_experts(copy.deepcopy(model), **kwargs)
    tiny = pocketlm.load("tiny")[0]
    with pytest.raises(UnsupportedModelError, match="moefy"):
        offload_experts(tiny, resident=0.5)


def test_dynamic_top_k(moe):
    model, tok = moe
    ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
    results = {}
    for name, routing in {"static": Routing(), "p1": Routing(top_p=1.0), "p0.5": Routing(top_p=0.5),
                          "t0.99": Routing(threshold=0.99), "t0": Routing(threshold=0.0)}.items():
        m = copy.deepcopy(model)
        rt = offload_experts(m, resident=1.0, prefetch=False, routing=routing)
        with torch.no_grad():
            logits = m(ids).logits
        results[name] = (logits, rt.stats()["routing"]["mean_active_experts"])
    assert results["static"][1] == 2 and results["p1"][1] == 2  # k_max defaults to the model's top-k
    torch.testing.assert_close(results["p1"][0], results["static"][0])  # p=1 keeps both: the same sums
    assert 1 < results["p0.5"][1] < 2  # some tokens need one expert, some two
    assert results["t0.99"][1] == 1  # no router probability reaches 0.99 → k_min
    assert results["t0"][1] == 2
    assert not torch.equal(results["p0.5"][0], results["static"][0])
    for bad in [dict(top_p=0.0), dict(top_p=0.5, threshold=0.1), dict(threshold=1.0), dict(k_min=3, k_max=2)]:
        with pytest.raises(ConfigError):
            Routing(**bad)


def test_qwen2_moe_with_shared_expert_offloads_exactly(moe):
    tok = moe[1]
    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=8192, num_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                               norm_topk_prob=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    want = greedy(model, tok, PROMPTS[1], 12)
    rt = offload_experts(model, resident=0.25)
    assert moe_blocks(model) == []  # every sparse block was replaced
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert greedy(model, tok, PROMPTS[1], 12) == want
    rt.close()
