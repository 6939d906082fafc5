import math

import pytest
import torch

import pocketlm
from pocketlm.eval import data
from pocketlm.eval.protocol import EvalProtocol
from pocketlm.eval.quality import extract_answer, score_windows, task_accuracy, word_tables

FAST = EvalProtocol(tokens=4096, speed=False)


def hf_perplexity(model, windows):
    """Plain transformers: the mean of each window's own loss (labels = inputs, shifted inside)."""
    losses = []
    with torch.no_grad():
        for w in windows:
            losses.append(model(input_ids=w[None], labels=w[None]).loss.item())
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="module")
def windows(tiny):
    _, tok = tiny
    path, text = data.read_text(None)
    return data.token_windows(tok, text, path, 4096, 512)


def perturbed(scale):
    model, _ = pocketlm.load("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return model


def test_perplexity_matches_transformers(tiny, windows):
    model, _ = tiny
    ours = score_windows(model, windows, show_progress=False)
    assert ours["tokens_scored"] == windows.shape[0] * 511
    assert abs(ours["ppl"] / hf_perplexity(model, windows) - 1) < 0.01


def test_kl_zero_and_top1_full_against_itself(tiny):
    model, tok = tiny
    report = pocketlm.evaluate(model, tok, FAST, baseline=tiny, show_progress=False)
    assert report.quality["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report.quality["top1"] == 1.0


def test_kl_and_top1_move_with_perturbation(tiny):
    _, tok = tiny
    small, large = perturbed(0.05), perturbed(0.3)
    r_small = pocketlm.evaluate(small, tok, FAST, baseline=tiny, show_progress=False)
    r_large = pocketlm.evaluate(large, tok, FAST, baseline=tiny, show_progress=False)
    assert 0 < r_small.quality["kl"] < r_large.quality["kl"]
    assert 1 > r_small.quality["top1"] > r_large.quality["top1"]
    assert r_large.quality["ppl"] > r_small.quality["ppl"]
    assert r_large.quality["cloze"] < r_small.quality["cloze"]


def test_cloze_counts_whole_words(tiny):
    _, tok = tiny
    starts, conts = word_tables(tok, 8192)
    ids = tok(" hello world", add_special_tokens=False)["input_ids"]  # Ġhell o Ġworld
    assert starts[ids[0]] and conts[ids[1]] and starts[ids[2]]
    from pocketlm.eval.quality import _cloze_counts
    # Positions: 0 Ġhell, 1 o, 2 Ġworld, 3 Ġhell, 4 o, 5 Ġworld. The first word has no context and the
    # last may continue past the window, so two words count: "world" (2) and "hello" (3-4).
    window = torch.tensor([ids + ids])
    all_right = torch.ones(1, 5, dtype=torch.bool)
    assert _cloze_counts(window, all_right, (starts, conts), 1) == (2, 2)
    one_piece_wrong = all_right.clone()
    one_piece_wrong[0, 3] = False  # the "o" at position 4 was not the argmax after position 3
    assert _cloze_counts(window, one_piece_wrong, (starts, conts), 1) == (1, 2)
    assert _cloze_counts(window, all_right, (starts, conts), 3) == (1, 1)


@pytest.mark.parametrize("text,thinking,expected", [
    ("The answer is 1,234.<|im_end|>", False, "1234"),
    ("<think>\n3+4=7 7\n</think>\n\n-17<|im_end|>", True, "-17"),
    ("<think>\n3+4=7 7\n", True, ""),
    ("no number here", False, ""),
])
def test_extract_answer(text, thinking, expected):
    assert extract_answer(text, thinking) == expected


def test_task_accuracy_on_reasoner_easy_items():
    model, tok = pocketlm.load("reasoner")
    items = [i for i in data.read_tasks(data.DEFAULT_TASKS) if i["difficulty"] <= 2][:12]
    fast = task_accuracy(model, tok, items, max_new_tokens=16, show_progress=False)
    assert fast["task_items"] == 12
    assert fast["task_accuracy"] >= 0.75  # fast mode is right on nearly all easy items (reference README)
    assert 1 < fast["task_mean_tokens"] < 16
    assert all(r["correct"] == (r["predicted"] == r["answer"]) for r in fast["rows"])


def test_named_baseline_is_loaded_in_fp32():
    model, tok = pocketlm.load("tiny", dtype="bfloat16")
    report = pocketlm.evaluate(model, tok, FAST, baseline="tiny", show_progress=False)
    assert report.baseline["dtype"] == "float32" and report.model["dtype"] == "bfloat16"
    assert 0 < report.quality["kl"] < 0.01 and report.quality["top1"] > 0.95


def test_evaluate_with_tasks_reports_accuracy_and_rows():
    model, tok = pocketlm.load("reasoner")
    report = pocketlm.evaluate(model, tok, FAST.replace(tasks=str(data.DEFAULT_TASKS), task_limit=6,
                                                        task_max_new_tokens=24), show_progress=False)
    q = report.quality
    assert q["task_items"] == 6 == len(report.task_rows)
    assert q["task_accuracy"] == sum(r["correct"] for r in report.task_rows) / 6
    assert report.protocol["tasks_hash"].startswith("sha256:")
