import copy
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pocketlm.errors import ConfigError, UnsupportedModelError
from pocketlm.eval.data import read_tasks
from pocketlm.io import ASSETS
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem, split_switch
from pocketlm.runtime.reason import run_tasks
from pocketlm.runtime.router import Router

TASKS = ASSETS / "data" / "arith_test.jsonl"


@pytest.fixture(scope="module")
def dual(reasoner):
    return DualSystem(Generator(*reasoner), mode="fast")


@pytest.mark.parametrize("message, expected", [
    ("What is 2+3? /think", ("What is 2+3?", "slow")),
    ("What is 2+3? /no_think", ("What is 2+3?", "fast")),
    ("What is 2+3?\n/auto_think  ", ("What is 2+3?", "auto")),
    ("What is 2+3?", ("What is 2+3?", None)),
    ("say x/think", ("say x/think", None)),  # a switch is a word of its own
])
def test_soft_switches(message, expected):
    assert split_switch(message) == expected


def test_mode_precedence(dual):
    assert dual.requested("q /think")[1:] == ("slow", "soft switch")
    assert dual.requested("q /think", "fast")[1:] == ("fast", "requested")
    assert dual.requested("q")[1:] == ("fast", "default")
    with pytest.raises(ConfigError):
        dual.requested("q", "medium")


def test_fast_skips_thinking_and_slow_thinks(dual):
    items = read_tasks(TASKS, 8)
    fast = dual.answer([it["question"] for it in items], "fast")
    slow = dual.answer([it["question"] + " /think" for it in items])
    assert all(r.mode == "fast" and r.thinking == "" and r.thinking_tokens == 0 for r in fast)
    assert all(r.mode == "slow" and r.thinking_tokens > 0 and r.thinking for r in slow)
    assert all(0 < r.confidence <= 1 for r in fast) and all(r.confidence is None for r in slow)
    assert sum(r.tokens for r in slow) > 3 * sum(r.tokens for r in fast)
    # the reference model answers in slow mode almost always right
    assert sum(r.answer == it["answer"] for r, it in zip(slow, items)) >= 7
    # the fast prompt holds the empty think block; the slow one leaves thinking to the model
    fast_text = dual.tok.decode(dual.prompt("q", "fast"))
    assert fast_text.endswith("<think>\n\n</think>\n\n") and "/no_think" in fast_text
    assert dual.tok.decode(dual.prompt("q", "slow")).endswith("assistant\n")


def test_batched_answers_equal_one_by_one(dual):
    questions = [it["question"] for it in read_tasks(TASKS, 4)]
    together = dual.answer(questions, "slow")
    alone = [dual.answer([q], "slow")[0] for q in questions]
    assert [(r.answer, r.tokens) for r in together] == [(r.answer, r.tokens) for r in alone]


@pytest.mark.parametrize("fallback", ["answer", "fast"])
def test_thinking_budget_closes_the_block(reasoner, fallback):
    gen = Generator(*reasoner)
    long_q = "What is 59472419+87243484?"  # an 8-digit sum: its trace is far longer than 8 tokens
    unlimited = DualSystem(gen).answer([long_q], "slow")[0]
    assert unlimited.thinking_tokens > 40 and not unlimited.budget_hit
    cut = DualSystem(gen, think_budget=8, budget_close="\n</think>\n\n", budget_fallback=fallback).answer([long_q], "slow")[0]
    assert cut.budget_hit and cut.thinking_tokens == 8 and cut.answer
    assert cut.mode == ("slow" if fallback == "answer" else "fast")
    zero = DualSystem(gen, think_budget=0).answer([long_q + " /think"])[0]
    assert zero.mode == "fast" and zero.reason == "thinking budget 0" and zero.thinking_tokens == 0


def _router(dim: int, probe: float | None, confidence: float | None, bias: float = 0.0) -> Router:
    policy = {"probe": probe, "confidence": confidence}
    return Router(torch.zeros(dim), bias, torch.zeros(dim), torch.ones(dim),
                  {p: dict(policy) for p in ("probe", "confidence", "both")})


def test_auto_follows_the_router(reasoner, dual):
    gen = dual.gen
    dim = len(gen.decoder.layers) * gen.model.config.hidden_size  # every layer's state is a feature
    questions = [it["question"] for it in read_tasks(TASKS, 6)]
    fast = dual.answer(questions, "fast")
    slow = dual.answer(questions, "slow")
    # p_fast = sigmoid(0) = 0.5 for every item: a probe threshold above it sends all to slow mode
    routed = DualSystem(gen, mode="auto", router=_router(dim, 0.6, None)).answer(questions)
    assert all(r.mode == "slow" and r.reason.startswith("probe") for r in routed)
    assert [r.tokens for r in routed] == [r.tokens for r in slow]  # no fast attempt was paid for
    # a confidence threshold above every probability escalates all: each fast attempt stops at its
    # first token, which is paid for, and so is the slow answer
    escalated = DualSystem(gen, mode="auto", router=_router(dim, None, 1.01), policy="confidence").answer(questions)
    assert all(r.mode == "slow" and r.reason.startswith("fast answer confidence") for r in escalated)
    assert [r.tokens for r in escalated] == [1 + s.tokens for s in slow]
    # a threshold between the answers' probabilities: the same escalations as judging the whole answer
    t = sorted(r.confidence for r in fast)[len(fast) // 2]
    mid = DualSystem(gen, mode="auto", router=_router(dim, None, t), policy="confidence").answer(questions)
    assert [r.mode for r in mid] == ["slow" if f.confidence < t else "fast" for f in fast]
    kept = DualSystem(gen, mode="auto", router=_router(dim, 0.4, 0.0)).answer(questions)
    assert [r.answer for r in kept] == [r.answer for r in fast] and all(r.p_fast == 0.5 for r in kept)


def test_auto_without_router_is_refused(dual):
    with pytest.raises(ConfigError, match="router"):
        dual.answer(["What is 1+1?"], "auto")


def test_stream_yields_the_same_answer(dual):
    q = "What is 452+78?"
    events = list(dual.stream(q + " /think"))
    phase, reply = events[-1]
    assert phase == "done" and reply.mode == "slow"
    answer = "".join(e.text for p, e in events[:-1] if p == "answer").strip()
    assert answer == reply.answer == dual.answer([q], "slow")[0].answer
    assert any(p == "think" for p, _ in events)


def test_run_tasks_scores_rows(dual):
    result = run_tasks(dual, read_tasks(TASKS, 6), "fast", show_progress=False)
    assert result["items"] == 6 and len(result["rows"]) == 6
    assert result["accuracy"] == sum(r["correct"] for r in result["rows"]) / 6
    assert result["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in result["rows"]) / 6)


def test_template_without_thinking_switch_is_refused(reasoner):
    model, tok = reasoner
    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UnsupportedModelError, match="enable_thinking"):
        DualSystem(Generator(model, plain))


def test_second_architecture_qwen2(reasoner):
    """A tiny random Qwen2 (q/k/v biases) with the same Qwen3-style template: modes, budget and the
    probe's hidden states work unchanged."""
    _, tok = reasoner
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    dual = DualSystem(Generator(model, tok), mode="slow", think_budget=4, slow_tokens=40, fast_tokens=6)
    fast, slow = dual.answer(["What is 1+1?"] * 2, "fast"), dual.answer(["What is 1+1?"], "slow")
    assert fast[0].mode == "fast" and fast[0].tokens <= 7 and fast[0].answer == fast[1].answer
    assert slow[0].mode == "slow" and slow[0].tokens <= 41
    capture: list = []
    dual.decode([dual.prompt("What is 1+1?", "fast")], "fast", capture)
    assert len(capture) == 2 and capture[0].shape == (1, 64)
    routed = DualSystem(Generator(model, tok), mode="auto", router=_router(128, 0.6, None),
                        slow_tokens=20).answer(["What is 1+1?"])
    assert routed[0].mode == "slow" and math.isclose(routed[0].p_fast, 0.5)
