"""`pocketlm moe bench` and `pocketlm moefy` from the command line."""
import json

import pocketlm
from pocketlm.moe.moefy import MoEfiedFFN
from test_cli import assert_bad_input, run


def test_moe_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run(["moe", "bench", "moe", "--resident", "12", "--new-tokens", "8", "--rounds", "1",
                             "--ppl-tokens", "1024", "--top-p", "0.9", "--json", str(out)], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["expert_budget_mb"] == 9.0  # 12 of 48 experts of 0.75 MB
    assert r["cache"]["requests"] > 0 and 1 < r["routing"]["mean_active_experts"] < 2
    assert "ppl_change" in r and "hit rate" in stdout


def test_moe_bench_bad_input(tmp_path, capsys):
    assert_bad_input(["moe", "bench", "tiny"], capsys, tmp_path, "no sparse mixture-of-experts")
    assert_bad_input(["moe", "bench", "moe", "--resident", "abc"], capsys, tmp_path, "--resident-experts")
    assert_bad_input(["moe", "bench", "moe", "--resident", "0.5", "--expert-memory-mb", "4"], capsys, tmp_path,
                     "both")
    assert_bad_input(["moe", "bench", "moe", "--bits-budget-mb", "0.5"], capsys, tmp_path, "below the experts")
    assert_bad_input(["moe", "bench", "moe", "--group-size", "48"], capsys, tmp_path, "group size")


def test_moefy_writes_a_loadable_model(tmp_path, capsys):
    code, stdout, err = run(["moefy", "tiny", "-o", str(tmp_path / "m"), "--experts", "4", "--top-k", "1",
                             "--calib-samples", "2"], capsys)
    assert code == 0, err
    assert "skipped" in stdout
    model, _ = pocketlm.load(tmp_path / "m")
    assert isinstance(model.model.layers[0].mlp, MoEfiedFFN) and model.model.layers[0].mlp.top_k == 1
    assert model.pocketlm_record["recipe"][-1]["kind"] == "moefy"
    assert_bad_input(["compress", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--method", "rtn", "--bits", "8"],
                     capsys, tmp_path, "moefied")


def test_moefy_bad_input(tmp_path, capsys):
    assert_bad_input(["moefy", "tiny", "-o", str(tmp_path / "m"), "--experts", "5"], capsys, tmp_path, "equal parts")
    assert_bad_input(["moefy", "moe", "-o", str(tmp_path / "m")], capsys, tmp_path, "dense gated FFN")
