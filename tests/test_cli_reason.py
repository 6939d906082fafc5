"""The dual-system commands: chat, reason, router fit; generate --repair."""
import io
import json

import pytest

from pocketlm.io import ASSETS

from test_cli import assert_bad_input, run

TASKS = ASSETS / "data" / "arith_test.jsonl"
REASONER = ASSETS / "models" / "reasoner"


def test_reason_writes_accuracy_tokens_and_rows(tmp_path, capsys):
    out_json = tmp_path / "fast.json"
    code, out, _ = run(["reason", "reasoner", "--tasks", str(TASKS), "--mode", "fast", "--limit", "5",
                        "--json", str(out_json)], capsys)
    assert code == 0 and "accuracy" in out
    result = json.loads(out_json.read_text())
    assert result["items"] == 5 and len(result["rows"]) == 5 and result["wall_s"] > 0
    assert {"question", "mode", "answer", "correct", "tokens"} <= set(result["rows"][0])
    assert all(r["mode"] == "fast" for r in result["rows"])


def test_router_fit_then_auto(tmp_path, capsys):
    router = tmp_path / "router"
    code, out, _ = run(["router", "fit", "reasoner", "--tasks", str(TASKS), "--limit", "20", "-o", str(router)],
                       capsys)
    assert code == 0 and "both" in out and (router / "router.json").is_file()
    code, out, _ = run(["reason", "reasoner", "--tasks", str(TASKS), "--limit", "4", "--mode", "auto",
                        "--router", str(router), "--json", str(tmp_path / "auto.json")], capsys)
    assert code == 0
    assert {r["mode"] for r in json.loads((tmp_path / "auto.json").read_text())["rows"]} <= {"fast", "slow"}


def test_chat_streams_and_names_the_mode(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 12+30? /think\nWhat is 2+2? /no_think\n"))
    code, out, err = run(["chat", "reasoner", "--mode", "fast"], capsys)
    assert code == 0 and "42" in out and "4" in out
    assert "mode slow (soft switch)" in err and "mode fast (soft switch)" in err and "thinking skipped" in err


def test_chat_reports_a_bad_turn_and_goes_on(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2? /auto_think\nWhat is 3+3?\n"))
    code, out, err = run(["chat", "reasoner", "--mode", "fast"], capsys)
    assert code == 0 and "needs a router" in err and "6" in out and "mode fast (default)" in err


def test_generate_with_repair_reports_repairs(capsys):
    code, out, err = run(["generate", "tiny", "And the LORD said unto Moses,", "--max-tokens", "60", "--repair"],
                         capsys)
    assert code == 0 and out.strip() and "loops repaired" in err


@pytest.mark.parametrize("argv, needle", [
    (["reason", "reasoner", "--tasks", str(TASKS), "--mode", "auto"], "needs a router"),
    (["reason", "reasoner", "--tasks", str(TASKS), "--mode", "medium"], "unknown mode"),
    (["reason", "reasoner", "--tasks", "missing.jsonl", "--mode", "fast"], "does not exist"),
    (["reason", "reasoner", "--tasks", str(TASKS), "--mode", "auto", "--router", "nowhere"], "not a router"),
    (["reason", "tiny", "--tasks", str(TASKS), "--mode", "slow", "--think-budget", "-1"], "negative"),
    (["reason", "tiny", "--tasks", str(TASKS), "--mode", "slow", "--budget-fallback", "guess"], "budget fallback"),
    (["router", "fit", "reasoner", "--tasks", str(TASKS), "-o", str(REASONER / "router")], "input model"),
    (["router", "fit", "reasoner", "--tasks", str(TASKS), "-o", "r", "--max-drop", "-1"], "negative"),
])
def test_bad_input(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_bad_input(argv, capsys, tmp_path, needle)
