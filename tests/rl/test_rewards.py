import pytest

from pocketlm.errors import DataError
from pocketlm.rl.config import RLConfig
from pocketlm.rl.rewards import AdaptiveReward, Completion, checker_for, correctness, cost, format_ok, repetition
from pocketlm.rl.rollout import Sample

ITEM = {"question": "What is 2+3?", "answer": "5", "kind": "add"}


def comp(text, tokens=(1, 2, 3), stopped=True):
    return Completion(text, list(tokens), stopped, 10)


@pytest.mark.parametrize("text, right", [
    ("<think>\n2+3=5\n</think>\n\n5<|im_end|>", 1.0),
    ("<think>\n\n</think>\n\n6<|im_end|>", 0.0),
    ("<think>\n5\n</think>\n\n", 0.0),             # the number inside the thinking is not the answer
    ("<think>\n\n</think>\n\n5.0<|im_end|>", 1.0),  # numeric, not string equality
])
def test_correctness_checks_the_answer_after_the_block(text, right):
    assert correctness("", comp(text), ITEM) == right


@pytest.mark.parametrize("text, stopped, ok", [
    ("<think>\n2+3=5\n</think>\n\n5<|im_end|>", True, 1.0),
    ("<think>\n\n</think>\n\n5<|im_end|>", True, 1.0),
    ("<think>\n2+3=5 2+3=5", False, 0.0),             # never closed, cut by max_tokens
    ("<think>\n\n</think>\n\n<|im_end|>", True, 0.0),  # no answer
    ("<think>\n</think><think>\n</think>5<|im_end|>", True, 0.0),
    ("<think>\n\n</think>\n\n5", False, 0.0),          # did not end its turn
])
def test_format(text, stopped, ok):
    assert format_ok("", comp(text, stopped=stopped), ITEM) == ok


def test_cost_and_repetition():
    assert cost("", comp("x", tokens=range(5)), ITEM) == -0.5
    assert repetition("", comp("x", tokens=[7, 8] * 10), ITEM) == -1.0
    assert repetition("", comp("x", tokens=range(20)), ITEM) == 0.0


def test_checker_by_kind_or_item():
    assert checker_for({"kind": "qa"})("Paris", "paris")
    assert checker_for({"kind": "poem", "checker": "exact"})("a", "a")
    with pytest.raises(DataError, match="task kind 'poem' has no answer checker"):
        checker_for({"kind": "poem"})


def _sample(correct, forced=None, tokens=3):
    raw = {"correctness": correct, "format": 1.0, "cost": -tokens / 10, "repetition": 0.0}
    return Sample([0] * tokens, [0.0] * tokens, forced, forced == "slow", raw)


def test_sources_are_scaled_by_their_running_spread():
    r = AdaptiveReward(RLConfig(w_format=0.0, w_repetition=0.0, w_cost=0.5))
    raws = [{"correctness": c, "format": 1.0, "cost": k, "repetition": 0.0}
            for c, k in [(1.0, -0.1), (0.0, -0.2), (1.0, -0.3), (0.0, -0.4)]]
    r.observe(raws)
    sd_c, sd_k = r.var["correctness"] ** 0.5, r.var["cost"] ** 0.5
    assert r.combine(raws[0]) == pytest.approx(1.0 / sd_c + 0.5 * -0.1 / sd_k)
    assert r.combine({"correctness": 1.0, "format": None, "cost": None, "repetition": None}) == pytest.approx(1 / sd_c)


def test_cost_weight_follows_the_accuracy_constraint():
    r = AdaptiveReward(RLConfig(w_cost=0.1, cost_lr=0.5, accuracy_margin=0.05))
    # own choices as accurate as forced thinking: the cost weight rises
    r.adapt([_sample(1.0), _sample(1.0), _sample(1.0, "slow")])
    assert r.weights["cost"] > 0.1
    # own choices lose accuracy: it falls back, never below its configured weight (the fixed margin)
    for _ in range(20):
        r.adapt([_sample(0.0), _sample(0.0), _sample(1.0, "slow")])
    assert r.weights["cost"] == pytest.approx(0.1)
    off = AdaptiveReward(RLConfig(w_cost=0.0))
    off.adapt([_sample(1.0), _sample(1.0, "slow")])
    assert off.weights["cost"] == 0.0  # an ablated source stays off
    fixed = AdaptiveReward(RLConfig(w_cost=0.1, target_accuracy=0.5, cost_lr=1.0))
    fixed.adapt([_sample(1.0)])
    assert fixed.weights["cost"] == pytest.approx(0.6)
