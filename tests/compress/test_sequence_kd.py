"""Sequence-level KD data (teacher-written answers), packing with target masks, and iterative
distillation with checkpoint merging between rounds."""
import copy

import pytest
import torch

from pocketlm.compress.distill.iterative import IterativeConfig, iterative_distill
from pocketlm.compress.distill.sequence import example_losses, pack_examples, teacher_examples, turn_end_id
from pocketlm.compress.distill.trainer import KDConfig
from pocketlm.errors import ConfigError, DataError
from pocketlm.eval.data import read_tasks
from pocketlm.io import ASSETS
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem


def test_the_teacher_writes_targets_with_the_runtime_prompts(reasoner):
    model, tok = reasoner
    dual = DualSystem(Generator(copy.deepcopy(model), tok), mode="fast")
    items = read_tasks(ASSETS / "data" / "arith_test.jsonl", 12)
    kept = teacher_examples(dual, items, ("fast",), show_progress=False)
    every = teacher_examples(dual, items, ("fast",), keep_wrong=True, show_progress=False)
    assert 0 < len(kept) <= len(every) == len(items)  # fast mode stops well within its limit here
    assert all(e["correct"] for e in kept) and len(kept) == sum(e["correct"] for e in every)
    replies = dual.answer([it["question"] for it in items], "fast")
    for e, it, reply in zip(every, items, replies):
        assert e["prompt"] == dual.prompt(it["question"], "fast")
        assert e["target"][-1] == turn_end_id(tok)
        assert tok.decode(e["target"][:-1], skip_special_tokens=True).strip() == reply.answer


def test_packing_keeps_examples_whole_and_masks_only_targets():
    exs = [{"prompt": [1, 2, 3], "target": [4, 5]}, {"prompt": [6], "target": [7, 8, 9]},
           {"prompt": [1] * 9, "target": [2] * 3}, {"prompt": [3], "target": [4]}]
    ids, mask = pack_examples(exs, 10, pad_id=0)
    # first fit: [ex0 ex1] (9 tokens), ex2 is too long and dropped, ex3 does not fit row 0 (needs 2, has 1)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0], [3, 4] + [0] * 8]
    assert mask.tolist()[0] == [False, False, False, True, True, False, True, True, True, False]
    assert mask.tolist()[1] == [False, True] + [False] * 8
    with pytest.raises(DataError, match="no teacher example fits"):
        pack_examples(exs[2:3], 5, pad_id=0)


@pytest.fixture(scope="module")
def text_examples(tiny):
    """Examples cut from text (prompt: 12 tokens, target: the next 20), no generation needed."""
    _, tok = tiny
    ids = tok(open(ASSETS / "data" / "calib.txt").read()[:40_000], add_special_tokens=False)["input_ids"]
    return [{"prompt": ids[i:i + 12], "target": ids[i + 12:i + 32]} for i in range(0, 32 * 60, 32)]


def test_iterative_rounds_merge_each_checkpoint_with_the_previous(tiny, text_examples):
    teacher, _ = tiny
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before = sum(example_losses(student, text_examples))
    seen = []

    def evaluate(m):  # the state right after training (trained) and after merging (merged)
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"loss": sum(example_losses(m, text_examples))}

    cfg = IterativeConfig(rounds=2, per_round=40, hard_share=0.5, merge="linear", merge_weight=0.25,
                          kd=KDConfig(steps=4, batch_size=4, seq_len=64, lr=2e-3, alpha=0.5))
    history = iterative_distill(student, teacher, text_examples, cfg, pad_id=0, evaluate=evaluate, show_progress=False)
    assert [h["round"] for h in history] == [1, 2] and "merged" not in history[0] and "merged" in history[1]
    trained1, trained2, merged2 = seen
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged2[key], 0.75 * trained1[key] + 0.25 * trained2[key], atol=1e-6)
    assert torch.equal(student.state_dict()[key], merged2[key])
    assert history[1]["merged"]["loss"] < before
    # the round's picks lean to the hardest examples: their mean loss is above the pool's
    assert history[0]["chosen_mean_loss"] > before / len(text_examples)


def test_iterative_config_refuses_ties():
    with pytest.raises(ConfigError, match="TIES needs a common base"):
        IterativeConfig(merge="ties")
