"""Checkpoint merging: the arithmetic of linear, SLERP and TIES, and the `pocketlm merge` command."""
import pytest
import torch

import pocketlm
from pocketlm.compress.distill.merge import merge_states
from pocketlm.errors import ConfigError
from test_cli import assert_bad_input, run


def states(*values):
    return [{"w": torch.tensor(v, dtype=torch.float32), "ids": torch.tensor([1, 2])} for v in values]


def test_linear_weights_and_integer_tensors():
    a, b = states([1.0, 2.0], [3.0, 6.0])
    out = merge_states([a, b], "linear")
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and torch.equal(out["ids"], a["ids"])
    assert torch.allclose(merge_states([a, b], "linear", weights=[3, 1])["w"], torch.tensor([1.5, 3.0]))
    b["ids"] = torch.tensor([1, 3])
    with pytest.raises(ConfigError, match="integer values"):
        merge_states([a, b], "linear")


def test_slerp_ends_and_keeps_the_norm_on_the_arc():
    a, b = states([1.0, 0.0], [0.0, 1.0])
    assert torch.allclose(merge_states([a, b], "slerp", t=0.0)["w"], a["w"])
    assert torch.allclose(merge_states([a, b], "slerp", t=1.0)["w"], b["w"])
    mid = merge_states([a, b], "slerp", t=0.5)["w"]
    assert torch.allclose(mid, torch.tensor([0.5 ** 0.5] * 2))  # on the unit circle; linear would give 0.5
    c, d = states([1.0, 2.0], [2.0, 4.0])  # parallel: falls back to the straight line
    assert torch.allclose(merge_states([c, d], "slerp", t=0.5)["w"], torch.tensor([1.5, 3.0]))


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    base = states([0.0, 0.0, 0.0, 0.0])[0]
    m1, m2, m3 = states([1.0, 0.1, -2.0, 0.0], [3.0, -0.1, 1.0, 0.0], [0.0, 0.0, -2.0, 4.0])
    out = merge_states([m1, m2, m3], "ties", base=base, density=0.5)["w"]
    # kept per model (top 2 by |tau|): m1 {1, -2}, m2 {3, 1}, m3 {-2, 4}; signs: +, +(trimmed 0), -, +
    assert torch.allclose(out, torch.tensor([2.0, 0.0, -2.0, 4.0]))


def test_bad_settings():
    a, b = states([1.0], [2.0])
    for kwargs, needle in [(dict(method="mean"), "unknown"), (dict(method="ties"), "base"),
                           (dict(method="slerp", t=2.0), "outside"), (dict(method="linear", weights=[1.0]), "weights")]:
        with pytest.raises(ConfigError, match=needle):
            merge_states([a, b], **kwargs)
    with pytest.raises(ConfigError, match="exactly two"):
        merge_states(states([1.0], [2.0], [3.0]), "slerp")
    with pytest.raises(ConfigError, match="incompatible merge shapes"):
        merge_states([a, states([1.0, 2.0])[0]], "linear")
    with pytest.raises(ConfigError, match="different tensors"):
        merge_states([a, {"v": torch.zeros(1), "ids": a["ids"]}], "linear")


def test_merge_command(tmp_path, capsys, tiny):
    # a second checkpoint of tiny: every float weight scaled, so the linear midpoint is known
    other = tmp_path / "other"
    model, tok = pocketlm.load("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    pocketlm.save(model, tok, other)
    code, _, err = run(["merge", "tiny", str(other), "-o", str(tmp_path / "m"), "--method", "linear"], capsys)
    assert code == 0, err
    merged, _ = pocketlm.load(tmp_path / "m")
    ref = dict(tiny[0].named_parameters())
    for name, p in merged.named_parameters():
        assert torch.allclose(p, 2.0 * ref[name], rtol=1e-6, atol=1e-6), name
    assert merged.pocketlm_record["recipe"][-1]["kind"] == "merge"
    assert_bad_input(["merge", "tiny", "reasoner", "-o", str(tmp_path / "x")], capsys, tmp_path, "different tensors")
    assert_bad_input(["merge", "tiny", str(other), "-o", str(tmp_path / "x"), "--method", "ties"], capsys, tmp_path,
                     "--base")
    assert_bad_input(["merge", "tiny", str(other), "-o", str(other)], capsys, tmp_path, "")
