import copy
import math

import pytest
import torch

from pocketlm.rl.config import RLConfig
from pocketlm.rl.grpo import pack, token_logprobs
from pocketlm.rl.rollout import RolloutWorker

ITEMS = [{"question": "What is 12+7?", "answer": "19", "kind": "add"},
         {"question": "What is 3*4?", "answer": "12", "kind": "mul"}]


@pytest.fixture(scope="module")
def groups(tiny):
    model, tok = tiny
    worker = RolloutWorker(model, tok, RLConfig(group_size=4, explore=0.5, max_tokens=12, temperature=0.6))
    return worker, worker.rollout(ITEMS, seed=3)


def test_groups_and_forced_decisions(groups):
    worker, out = groups
    assert [g.item for g in out] == ITEMS and all(len(g.samples) == 4 for g in out)
    d = worker.choice.decision
    for g in out:
        assert g.prompt[-len(worker.choice.prefix):] == worker.choice.prefix  # no mode in the prompt
        assert [s.forced for s in g.samples] == ["fast", "slow", None, None]
        assert g.samples[0].tokens[0] == d and g.samples[0].behaviour[0] == pytest.approx(math.log(0.5))
        assert g.samples[1].tokens[0] != d
        assert set(g.samples[0].raw) == {"correctness", "format", "cost", "repetition"}


def test_behaviour_logprobs_match_the_learner(tiny, groups):
    """Free tokens: the behaviour log-probs equal the learner's at the sampling temperature; a forced
    think decision: log 1/2 plus the token's log-probability among the others."""
    model, tok = tiny
    worker, out = groups
    d, T = worker.choice.decision, worker.cfg.temperature
    samples = [(g.prompt, s) for g in out for s in g.samples]
    ids, attn, target = pack([p for p, _ in samples], [s.tokens for _, s in samples], pad=0)
    with torch.no_grad():
        lp = token_logprobs(model, ids, attn, T)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / T
    for b, (prompt, s) in enumerate(samples):
        learner = lp[b][target[b]]
        assert len(learner) == len(s.tokens)
        start = 1 if s.forced else 0
        assert torch.allclose(learner[start:], torch.tensor(s.behaviour[start:]), atol=1e-3)
        if s.forced == "slow":
            p = logits[b, len(prompt) - 1].softmax(-1)
            expected = math.log(0.5) + math.log(p[s.tokens[0]] / (1 - p[d]))
            assert s.behaviour[0] == pytest.approx(expected, abs=1e-3)


def test_same_seed_same_rollout(tiny, groups):
    model, tok = tiny
    _, out = groups
    again = RolloutWorker(model, tok, RLConfig(group_size=4, explore=0.5, max_tokens=12, temperature=0.6)
                          ).rollout(ITEMS, seed=3)
    assert [s.tokens for g in again for s in g.samples] == [s.tokens for g in out for s in g.samples]


def test_new_weights_reach_the_engine(tiny):
    """set_weights changes what the worker's engine samples with (its packed buffers included)."""
    model, tok = tiny
    mine = copy.deepcopy(model)
    worker = RolloutWorker(mine, tok, RLConfig(group_size=2, explore=0.0, max_tokens=6, w_cost=0.0))
    worker.rollout(ITEMS[:1], seed=0)  # the engine is built and has packed its weights
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    worker.set_weights(other.state_dict(), 1)
    g = worker.rollout(ITEMS[:1], seed=0)[0]
    ids, attn, target = pack([g.prompt] * 2, [s.tokens for s in g.samples], pad=0)
    with torch.no_grad():
        lp = token_logprobs(other, ids, attn, worker.cfg.temperature)
    for b, s in enumerate(g.samples):
        assert torch.allclose(lp[b][target[b]], torch.tensor(s.behaviour), atol=1e-3)
    assert g.version == 1
