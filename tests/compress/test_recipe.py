"""Recipes (YAML passes, built-ins, order rules, CLI) and KD recovery after pruning and quantization."""
import copy
import json

import pytest
import torch

import pocketlm
from pocketlm.cli import main
from pocketlm.compress import KDConfig, MlpPruneConfig, RTNConfig, compress_
from pocketlm.compress.distill.losses import kd_loss
from pocketlm.compress.quant.linear import QuantLinear
from pocketlm.compress.recipe import apply_recipe, builtin_recipes, load_recipe, parse_recipe
from pocketlm.errors import ConfigError
from pocketlm.eval.data import read_text

KD = dict(steps=40, batch_size=4, seq_len=64, lr=3e-3)


def kl(student, teacher, ids):
    with torch.no_grad():
        return kd_loss(student(ids).logits, teacher(ids).logits, 1.0).item()


@pytest.fixture(scope="module")
def held_out(tiny):
    _, tok = tiny
    _, text = read_text(None)  # the test split; KD trains on the calibration (train) slice
    return tok(text[:20_000], return_tensors="pt")["input_ids"][:, :512].view(4, 128)


def test_builtin_recipes_parse_and_say_what_they_do():
    assert {"edge-int8", "edge-int4", "minitron-50"} <= set(builtin_recipes())
    r = load_recipe("minitron-50")
    assert [p.kind for p in r.passes] == ["prune_width", "kd"] and r.passes[0].target_ratio == 0.5
    assert [p.kind for p in load_recipe("edge-int4").passes] == ["gptq", "kd"]


@pytest.mark.parametrize("text, problem", [
    ("passes:\n  - kind: prune_magic\n", "pass 1: unknown pass 'prune_magic'"),
    ("passes:\n  - kind: rtn\n    bitz: 4\n", "pass 1 (rtn): unknown rtn option(s): bitz"),
    ("passes:\n  - kind: rtn\n    bits: 5\n", "pass 1 (rtn)"),
    ("passes:\n  - kind: rtn\n  - kind: prune_mlp\n", "pass 2: prune_mlp after quantization"),
    ("passes:\n  - kind: rtn\n  - kind: gptq\n", "pass 2: a second quantization pass"),
    ("passes:\n  - kind: smoothquant\n  - kind: kd\n", "kd after smoothquant"),
    ("passes: []\n", "has no list of passes"),
    ("passes: [\n", "not valid YAML"),
])
def test_a_bad_recipe_is_refused_whole(text, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(text, "r")


def test_kd_recovery_after_pruning_moves_the_student_back(tiny, held_out):
    teacher, tok = tiny
    model = copy.deepcopy(teacher)
    compress_(model, MlpPruneConfig(ratio=0.5), tok=tok, calib_samples=8, calib_len=128, show_progress=False)
    before = kl(model, teacher, held_out)
    applied = compress_(model, KDConfig(**KD), tok=tok, show_progress=False, teacher=teacher)
    assert kl(model, teacher, held_out) < 0.9 * before
    assert applied[0]["stats"]["quantized_layers_trained"] == 0
    assert applied[0]["stats"]["loss_last"] < applied[0]["stats"]["loss_first"]


def test_kd_recovery_after_quantization_trains_scales_not_codes(tiny, held_out, tmp_path):
    teacher, tok = tiny
    model = copy.deepcopy(teacher)
    # The teacher of a recipe's kd pass is the model as it entered compress_ (a copy made before pass 1).
    recipe = parse_recipe("passes:\n  - kind: rtn\n    bits: 4\n    group_size: 32\n    head: true\n"
                          "  - kind: kd\n" + "".join(f"    {k}: {v}\n" for k, v in KD.items()), "int4-kd")
    q = copy.deepcopy(model)
    compress_(q, RTNConfig(bits=4, group_size=32, head=True), show_progress=False)  # the int8 head: no kernel grad
    codes = {n: m.codes().clone() for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    scales = {n: m.scales.clone() for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    applied = apply_recipe(model, recipe, tok=tok, show_progress=False)
    assert applied[1]["stats"]["quantized_layers_trained"] == len(codes) - 1 > 0  # all but the frozen head
    assert kl(model, teacher, held_out) < 0.9 * kl(q, teacher, held_out)
    mods = dict(model.named_modules())
    assert all(torch.equal(mods[n].codes(), c) for n, c in codes.items())
    assert any(not torch.equal(mods[n].scales, s) for n, s in scales.items())
    pocketlm.save(model, tok, tmp_path / "a")  # the trained scales are what is saved and reloaded
    again, _ = pocketlm.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(held_out).logits, model(held_out).logits)
    record = json.loads((tmp_path / "a" / "pocketlm.json").read_text())
    assert [p["kind"] for p in record["recipe"]] == ["rtn", "kd"]
    assert record["recipes"][0]["name"] == "int4-kd"


def test_compress_recipe_cli_writes_the_artifact_with_its_recipe(tmp_path, capsys):
    out = tmp_path / "int8"
    with pytest.raises(SystemExit) as e:
        main(["compress", "tiny", "--recipe", "edge-int8", "-o", str(out)])
    assert e.value.code == 0
    record = json.loads((out / "pocketlm.json").read_text())
    assert record["recipes"][0]["name"] == "edge-int8" and record["recipe"][0]["bits"] == 8


def test_compress_recipe_cli_refuses_an_unknown_pass_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - kind: rtn\n  - kind: prune_everything\n")
    with pytest.raises(SystemExit) as e:
        main(["compress", "tiny", "--recipe", str(bad), "-o", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pass 2: unknown pass 'prune_everything'" in err and "prune_width" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        main(["compress", "tiny", "--recipe", "no-such-recipe", "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and "minitron-50" in capsys.readouterr().err
