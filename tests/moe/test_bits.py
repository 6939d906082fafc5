"""Expert-wise bit widths: quantized experts, the error measurement and the greedy allocation."""
import copy

import pytest
import torch

import pocketlm
from pocketlm.errors import ConfigError
from pocketlm.moe.bits import allocate_bits, expert_errors
from pocketlm.moe.experts import Expert, expert_bytes, quantize_expert
from pocketlm.moe.runtime import fused_experts, moe_blocks, offload_experts
from pocketlm.runtime import Generator


@pytest.fixture(scope="module")
def moe():
    return pocketlm.load("moe")


def test_quantized_expert_is_close_and_sized(moe):
    model, _ = moe
    block = moe_blocks(model)[0][2]
    w = fused_experts(block)[3]
    x = torch.randn(5, 256)
    exact = Expert(w)(x, block.experts.act_fn)
    errs = {}
    for bits in (8, 4):
        q = quantize_expert(w, bits, 32)
        assert q.nbytes == expert_bytes(256, 256, bits, 32)
        errs[bits] = ((q(x, block.experts.act_fn) - exact).norm() / exact.norm()).item()
    assert errs[8] < 0.02 and errs[8] < errs[4] < 0.2


def test_allocation_meets_budget_and_upgrades_the_worst_first():
    errors = torch.tensor([[[0.0, 10.0], [0.0, 1.0], [0.0, 5.0], [0.0, 0.1]]], dtype=torch.float64)
    sizes = torch.tensor([[[100, 60]] * 4])
    assert allocate_bits(errors, sizes, 240) == [[4, 4, 4, 4]]
    assert allocate_bits(errors, sizes, 320) == [[8, 4, 8, 4]]  # two upgrades fit: the two worst
    assert allocate_bits(errors, sizes, 10_000) == [[8, 8, 8, 8]]
    with pytest.raises(ConfigError, match="below the experts at 4 bits"):
        allocate_bits(errors, sizes, 239)


def test_errors_rank_experts_and_mixed_model_runs(moe):
    model, tok = moe
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    errors, counts = expert_errors(model, tokens, show_progress=False)
    assert errors.shape == (6, 8, 2) and counts.shape == (6, 8)
    assert counts.sum() == 6 * 2 * 128  # every token reaches two experts in every layer
    assert (errors[..., 0] <= errors[..., 1]).all()  # 8 bits never worse than 4
    assert (errors[counts == 0] == 0).all()
    sizes = torch.tensor([expert_bytes(256, 256, b, 64) for b in (8, 4)]).expand(6, 8, 2)
    plan = allocate_bits(errors, sizes, int(sizes[..., 1].sum() + 10 * (sizes[0, 0, 0] - sizes[0, 0, 1])))
    assert sum(row.count(8) for row in plan) == 10
    m = copy.deepcopy(model)
    rt = offload_experts(m, resident=1.0, bits=plan, group_size=64)
    assert rt.cache.store.stored_bytes() == sum(expert_bytes(256, 256, b, 64) for row in plan for b in row)
    ids = tok("In the beginning God created the heaven", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = model(ids).logits, m(ids).logits
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.8
    small = copy.deepcopy(model)  # the same mix with a quarter of its bytes resident: the same tokens
    rt_small = offload_experts(small, resident=0.25, bits=plan, group_size=64)
    prompt = tok("And the earth was without form").input_ids
    assert [int(t) for t, _ in Generator(small, tok).generate_step([prompt], 16)] == \
        [int(t) for t, _ in Generator(m, tok).generate_step([prompt], 16)]
    assert rt_small.stats()["misses"] > 0
    rt.close()
    rt_small.close()
    with pytest.raises(ConfigError, match="plan does not match"):
        offload_experts(copy.deepcopy(model), resident=1.0, bits=plan[:2])
