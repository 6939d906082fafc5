import json

import pytest

from pocketlm.errors import ConfigError, DataError
from pocketlm.fleet.gates import Gate, check_gates, load_gates, parse_gate, read_report

EXAMPLES = [
    "task_accuracy >= incumbent - 0.01",
    "p95_latency_ms <= 1.1 * incumbent",
    "agreement >= 0.95",
    "ppl_ratio <= 1.02",
]

REPORT = {
    "candidate": {"task_accuracy": 0.795, "p95_latency_ms": 115.0, "agreement": 0.97, "ppl_ratio": 1.03},
    "incumbent": {"task_accuracy": 0.80, "p95_latency_ms": 100.0},
}


def test_parse_examples():
    gates = [parse_gate(t) for t in EXAMPLES]
    assert gates[0] == Gate("task_accuracy >= incumbent - 0.01", "task_accuracy", ">=", "incumbent - 0.01")
    assert [(g.metric, g.op) for g in gates] == [
        ("task_accuracy", ">="), ("p95_latency_ms", "<="), ("agreement", ">="), ("ppl_ratio", "<=")]
    assert gates[0].threshold(0.80) == pytest.approx(0.79)
    assert gates[1].threshold(100.0) == pytest.approx(110.0)
    assert gates[2].threshold(None) == pytest.approx(0.95)
    assert gates[3].threshold(None) == pytest.approx(1.02)


def test_results_some_pass_some_fail():
    ok, results = check_gates(REPORT, [parse_gate(t) for t in EXAMPLES])
    assert not ok
    assert [r.passed for r in results] == [True, False, True, False]
    assert results[0].threshold == pytest.approx(0.79) and results[0].value == 0.795
    assert results[1].threshold == pytest.approx(110.0) and results[1].value == 115.0
    assert results[3].threshold == pytest.approx(1.02)
    assert results[0].reason == "" and results[1].reason


def test_all_pass():
    report = {"candidate": dict(REPORT["candidate"], p95_latency_ms=109.0, ppl_ratio=1.0),
              "incumbent": REPORT["incumbent"]}
    ok, results = check_gates(report, [parse_gate(t) for t in EXAMPLES])
    assert ok and all(r.passed for r in results)


def test_operators_strict_and_equal():
    assert parse_gate("x > 1").check({"x": 1}).passed is False
    assert parse_gate("x < 1").check({"x": 1}).passed is False
    assert parse_gate("x == 1").check({"x": 1.0}).passed is True
    assert parse_gate("x >= -(2 + 1) / 3").threshold(None) == pytest.approx(-1.0)


def test_missing_metric_fails_with_reason():
    r = parse_gate("agreement >= 0.95").check({"candidate": {"ppl_ratio": 1.0}})
    assert not r.passed and r.value is None
    assert "agreement" in r.reason and "candidate" in r.reason


def test_incumbent_gate_without_incumbent_fails():
    gate = parse_gate("task_accuracy >= incumbent - 0.01")
    for report in ({"candidate": {"task_accuracy": 0.9}}, {"task_accuracy": 0.9},
                   {"candidate": {"task_accuracy": 0.9}, "incumbent": {"other": 1.0}}):
        r = gate.check(report)
        assert not r.passed and "incumbent" in r.reason
    with pytest.raises(ValueError):
        gate.threshold(None)


def test_flat_report_is_candidate():
    ok, _ = check_gates({"agreement": 0.99}, [parse_gate("agreement >= 0.95")])
    assert ok


def test_dotted_metric():
    gate = parse_gate("efficiency.decode_tok_s >= 0.9 * incumbent")
    report = {"candidate": {"efficiency": {"decode_tok_s": 95.0}},
              "incumbent": {"efficiency": {"decode_tok_s": 100.0}}}
    r = gate.check(report)
    assert r.passed and r.threshold == pytest.approx(90.0)
    assert not gate.check({"candidate": {"efficiency": {}}, "incumbent": report["incumbent"]}).passed


def test_non_numeric_value_fails():
    r = parse_gate("x >= 1").check({"x": "high"})
    assert not r.passed and "number" in r.reason


def test_empty_gate_list_is_not_a_pass():
    assert check_gates({"x": 1}, []) == (False, [])


@pytest.mark.parametrize("text", [
    "acc >= __import__('os')", "acc ~ 1", "acc >= incumbent ** 2", "acc >= other", "acc >= 'a'",
    "acc >= (1", "acc >=", ">= 1", "acc >= incumbent.real", "acc >= [1]", "acc >= 1 if 1 else 2", "acc >= True",
])
def test_bad_syntax_raises(text):
    with pytest.raises(ConfigError):
        parse_gate(text)


def test_bad_part_named():
    with pytest.raises(ConfigError, match="Pow"):
        parse_gate("acc >= incumbent ** 2")
    with pytest.raises(ConfigError, match="acc >= __import__"):
        parse_gate("acc >= __import__('os')")


def test_load_gates_list_and_mapping(tmp_path):
    p = tmp_path / "gates.yaml"
    p.write_text("".join(f"- {t}\n" for t in EXAMPLES))
    assert [g.text for g in load_gates(p)] == EXAMPLES
    q = tmp_path / "gates2.yaml"
    q.write_text("gates:\n" + "".join(f"  - {t}\n" for t in EXAMPLES))
    assert [g.metric for g in load_gates(q)] == ["task_accuracy", "p95_latency_ms", "agreement", "ppl_ratio"]


def test_load_gates_errors(tmp_path):
    with pytest.raises(DataError):
        load_gates(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(DataError):
        load_gates(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- acc ~ 1\n")
    with pytest.raises(ConfigError):
        load_gates(bad)


def test_read_report(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(REPORT))
    assert read_report(p) == REPORT
    with pytest.raises(DataError):
        read_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError):
        read_report(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError):
        read_report(tmp_path / "list.json")
