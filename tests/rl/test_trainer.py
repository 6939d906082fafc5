import json
import shutil

import pytest
import torch

import pocketlm
from pocketlm.errors import ConfigError, DataError, UnsupportedModelError
from pocketlm.io import ASSETS
from pocketlm.rl.config import RLConfig
from pocketlm.rl.trainer import METRICS, train_rl

from test_cli import assert_bad_input, run

TASKS = ASSETS / "data" / "arith_test.jsonl"
SMALL = dict(steps=2, prompts_per_step=2, group_size=4, max_tokens=16, warmup_items=4, warmup_epochs=1,
             warmup_correct_only=False, micro_batch=4, checkpoint_every=1)  # tiny answers no sum right


def _items(n=8):
    return [json.loads(line) for line in TASKS.read_text().splitlines()[:n]]


def test_train_writes_an_rl_artifact(tmp_path):
    seen = []
    result = train_rl("tiny", _items(), RLConfig(**SMALL), tmp_path / "out", show_progress=False,
                      on_step=seen.append)
    assert result["steps"] == 2 and [m["step"] for m in seen] == [0, 1]
    m = seen[-1]
    assert set(m["sources"]) == {"correctness", "format", "cost", "repetition"}
    assert 0 <= m["think_rate"] <= 1 and m["tokens"] > 0 and m["mean_age"] == 0
    model, tok = pocketlm.load(tmp_path / "out")
    assert model.pocketlm_record["rl"]["mode_choice"] is True
    assert model.pocketlm_record["rl"]["switch"] == "/auto_think"
    assert model.pocketlm_record["recipe"][-1]["kind"] == "rl"
    lines = (tmp_path / "out" / METRICS).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]
    base, _ = pocketlm.load("tiny")
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed  # warm-up and RL trained the weights


def test_resume_continues_from_the_checkpoint(tmp_path):
    work = tmp_path / "work"
    train_rl("tiny", _items(), RLConfig(**SMALL), tmp_path / "a", workdir=work, show_progress=False)
    result = train_rl("tiny", _items(), RLConfig(**{**SMALL, "steps": 3}), tmp_path / "b", workdir=work,
                      resume=True, show_progress=False)
    assert [m["step"] for m in result["metrics"]] == [0, 1, 2]
    assert len((tmp_path / "b" / METRICS).read_text().splitlines()) == 3


def test_stale_run_trains_with_lagging_samples(tmp_path):
    result = train_rl("tiny", _items(), RLConfig(**{**SMALL, "steps": 3, "staleness": 1, "warmup_items": 0}),
                      tmp_path / "out", show_progress=False)
    ages = [m["mean_age"] for m in result["metrics"]]
    assert ages[0] == 0 and max(ages) == 1


def test_bad_inputs_write_nothing(tmp_path, tiny):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="task kind 'poem' has no answer checker"):
        train_rl("tiny", [{"question": "q", "answer": "a", "kind": "poem"}], RLConfig(**SMALL), out,
                 show_progress=False)
    with pytest.raises(ConfigError, match="resume"):
        train_rl("tiny", _items(), RLConfig(**SMALL), out, resume=True, show_progress=False)
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(group_size=1)
    with pytest.raises(ConfigError, match="explore"):
        RLConfig(explore=0.0)  # the default accuracy target needs forced-thinking samples
    assert not out.exists()
    model, tok = tiny
    plain = tmp_path / "plain"
    shutil.copytree(ASSETS / "models" / "tiny", plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UnsupportedModelError, match="enable_thinking"):
        train_rl(str(plain), _items(), RLConfig(**SMALL), out, show_progress=False)
    assert not out.exists()


def test_cli_rl(tmp_path, capsys):
    out = tmp_path / "out"
    code, text, _ = run(["rl", "tiny", "--tasks", str(TASKS), "-o", str(out), "--steps", "1", "--prompts-per-step",
                         "2", "--group-size", "2", "--max-tokens", "8", "--warmup-items", "0", "--limit", "4"], capsys)
    assert code == 0 and "wrote" in text and (out / METRICS).is_file()
    work = tmp_path / "bad"
    work.mkdir()
    bad = work / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a", "kind": "poem"}\n')
    for args, problem in [(["--tasks", str(bad)], "no answer checker"),
                          (["--tasks", str(TASKS), "--group-size", "1"], "group_size"),
                          (["--tasks", str(TASKS), "--checker", "poem"], "KIND=numeric"),
                          (["--tasks", str(work / "none.jsonl")], "does not exist"),
                          (["--tasks", str(TASKS), "-o", str(out)], "exists")]:
        argv = ["rl", "tiny", "-o", str(work / "x"), *args] if "-o" not in args else ["rl", "tiny", *args]
        assert_bad_input(argv, capsys, work, problem)



def test_warmup_keeps_only_answers_the_checker_accepts(reasoner):
    from pocketlm.rl.rewards import Completion, correctness
    from pocketlm.rl.warmup import warmup_targets
    model, tok = reasoner
    items = _items(48)
    kw = dict(warmup_items=48, max_tokens=96, replay=False, switch="/any_think")

    def right(prompts, comps):  # each target judged against the item whose question its prompt holds
        out = []
        for p, c in zip(prompts, comps):
            item = next(it for it in items if it["question"] in tok.decode(p))
            out.append(correctness("", Completion(tok.decode(c), c, True, 96), item) == 1.0)
        return out

    every = right(*warmup_targets(model, tok, items, RLConfig(**kw, warmup_correct_only=False),
                                  show_progress=False)[:2])
    kept = right(*warmup_targets(model, tok, items, RLConfig(**kw), show_progress=False)[:2])
    assert not all(every)  # the model gets some of these wrong (fast mode) ...
    assert all(kept) and len(kept) == sum(every)  # ... and only those are dropped
