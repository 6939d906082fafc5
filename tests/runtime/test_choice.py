"""The model's own mode choice: prompts without a mode, and DualSystem's auto mode on an RL-trained model."""
import pytest
import torch

from pocketlm.eval.data import read_tasks
from pocketlm.io import ASSETS
from pocketlm.runtime import Generator
from pocketlm.runtime.choice import ModeChoice
from pocketlm.runtime.dual import DualSystem
from pocketlm.runtime.router import Router

TASKS = ASSETS / "data" / "arith_test.jsonl"


def test_prompt_has_no_mode_and_ends_at_the_decision(reasoner):
    _, tok = reasoner
    c = ModeChoice(tok)
    text = tok.decode(c.prompt("What is 2+2?"))
    assert "/think" not in text and "/no_think" not in text and text.endswith("<think>\n")
    assert tok.decode([c.decision]) == "\n"
    assert not c.thought(tok("\n</think>\n\n4<|im_end|>", add_special_tokens=False)["input_ids"])
    assert c.thought(tok("2+2=4\n</think>\n\n4", add_special_tokens=False)["input_ids"])
    assert c.thought(tok("2+2=4 and", add_special_tokens=False)["input_ids"])  # still thinking
    switched = tok.decode(ModeChoice(tok, "/auto_think").prompt("What is 2+2?"))
    assert "What is 2+2? /auto_think<|im_end|>" in switched and switched.endswith("<think>\n")


@pytest.fixture
def chooser(reasoner, monkeypatch):
    """The reasoner marked as RL-trained to choose its mode (the record `pocketlm rl` writes)."""
    model, tok = reasoner
    monkeypatch.setattr(model, "pocketlm_record", {"rl": {"mode_choice": True, "switch": "/auto_think"}},
                        raising=False)
    return Generator(model, tok)


def test_auto_uses_the_models_own_choice(chooser):
    dual = DualSystem(chooser, mode="auto", think_budget=40)
    questions = [it["question"] for it in read_tasks(TASKS, 6)]
    replies = dual.answer(questions)
    c = dual.choice
    assert c.switch == "/auto_think"  # the switch the artifact learned with
    rows = dual.decode([c.prompt(q) for q in questions], "own")
    for reply, row in zip(replies, rows):
        assert reply.reason == "model's own choice"
        assert reply.mode == ("slow" if c.thought(row.tokens) else "fast")
        assert reply.tokens == row.generated
        assert (reply.thinking_tokens > 0) == (reply.mode == "slow") and reply.thinking_tokens <= 40
    # a router on top escalates the own fast answers it is unsure of: a threshold above 1 escalates all
    dim = len(chooser.decoder.layers) * chooser.model.config.hidden_size
    router = Router(torch.zeros(dim), 0.0, torch.zeros(dim), torch.ones(dim), {"confidence": {"confidence": 1.01}})
    topped = DualSystem(chooser, mode="auto", router=router, policy="confidence").answer(questions)
    slow = DualSystem(chooser, mode="auto").answer(questions, "slow")  # no budget, as `topped`
    for own, top, s in zip(replies, topped, slow):
        assert top.mode == "slow"
        if own.mode == "fast":
            assert top.reason.startswith("own fast answer's confidence") and top.tokens == own.tokens + s.tokens


def test_stream_in_auto_gives_the_own_choice(chooser):
    dual = DualSystem(chooser, mode="auto")
    events = list(dual.stream("What is 3+4?"))
    phase, reply = events[-1]
    assert phase == "done" and reply.reason == "model's own choice"
    assert "".join(e.text for p, e in events[:-1] if p == "answer").strip() == reply.answer
