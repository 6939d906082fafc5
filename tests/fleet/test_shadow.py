"""Shadow → gate → promote on a device install, from the command line."""
import json
import shutil

import pytest

import pocketlm
from pocketlm.compress import RTNConfig, compress_
from pocketlm.errors import DataError
from pocketlm.fleet import install as inst
from pocketlm.fleet import keys, package
from pocketlm.fleet.shadow import read_requests, run_shadow
from pocketlm.io import ASSETS
from test_cli import run

REQUESTS = [{"prompt": "In the beginning"}, {"prompt": "The function returns"},
            {"messages": [{"role": "user", "content": "What is 2+3?"}], "answer": "5"}, {"prompt": "A list of"}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A device running tiny (v1) with an int4 candidate (v2) installed beside it, not active."""
    d = tmp_path_factory.mktemp("fleet")
    priv, pub = keys.generate(d / "rel")
    model, tok = pocketlm.load("tiny")
    compress_(model, RTNConfig(bits=4, group_size=32), tok=tok, show_progress=False)
    pocketlm.save(model, tok, d / "int4")
    package.pack(ASSETS / "models" / "tiny", d / "v1.pkg", priv, version="1")
    package.pack(d / "int4", d / "v2.pkg", priv, version="2")
    root = d / "device"
    inst.install(d / "v1.pkg", root, pub)
    inst.install(d / "v2.pkg", root, pub, activate=False)
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return {"dir": d, "root": root, "requests": d / "requests.jsonl"}


def test_shadow_report_compares_the_pair(fleet):
    r = run_shadow(str(fleet["root"]), str(fleet["root"] / "versions" / "2"), REQUESTS, max_tokens=8,
                   ppl_tokens=1024, show_progress=False)
    inc, cand = r["incumbent"], r["candidate"]
    assert inc["requests"] == cand["requests"] == 4 and len(r["rows"]) == 4
    assert 0 <= cand["agreement"] <= 1 and cand["kl_mean"] > 0  # int4 moves the distribution
    assert cand["ppl_ratio"] == pytest.approx(cand["ppl"] / inc["ppl"]) and cand["ppl_ratio"] > 1
    assert "task_accuracy" in cand and "task_accuracy" in inc and cand["disk_mb"] > 0
    same = run_shadow(str(fleet["root"]), str(fleet["root"]), REQUESTS[:2], max_tokens=8, ppl_tokens=0,
                      show_progress=False)
    assert same["candidate"]["agreement"] == 1.0 and same["candidate"]["kl_mean"] == pytest.approx(0, abs=1e-6)


def test_shadow_gate_promote_and_rollback_from_the_cli(fleet, capsys, tmp_path):
    report = tmp_path / "shadow.json"
    code, out, err = run(["shadow", "--incumbent", str(fleet["root"]), "--candidate",
                          str(fleet["root"] / "versions" / "2"), "--requests", str(fleet["requests"]),
                          "-o", str(report), "--max-tokens", "8", "--ppl-tokens", "1024"], capsys)
    assert code == 0, err
    strict, loose = tmp_path / "strict.yaml", tmp_path / "loose.yaml"
    strict.write_text("- ppl_ratio <= 1.0001\n- agreement >= 1.0\n")
    loose.write_text("gates:\n  - ppl_ratio <= 2 * incumbent\n  - p95_latency_ms <= 10 * incumbent\n")
    code, out, err = run(["gate", str(report), "--gates", str(strict)], capsys)
    assert code == 1 and "FAIL" in out
    code, out, err = run(["promote", "--into", str(fleet["root"]), "--version", "2", "--report", str(report),
                          "--gates", str(strict)], capsys)
    assert code == 1 and inst.verify_install(fleet["root"])["version"] == "1"  # nothing changed
    code, out, err = run(["gate", str(report), "--gates", str(loose)], capsys)
    assert code == 0 and "all gates pass" in out
    code, out, err = run(["promote", "--into", str(fleet["root"]), "--version", "2", "--report", str(report),
                          "--gates", str(loose)], capsys)
    assert code == 0 and inst.verify_install(fleet["root"])["version"] == "2"
    code, out, err = run(["rollback", "--into", str(fleet["root"])], capsys)
    assert code == 0 and inst.verify_install(fleet["root"])["version"] == "1"


def test_bad_requests_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_requests(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(DataError, match="neither a 'prompt'"):
        read_requests(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="cannot be read"):
        read_requests(tmp_path / "missing.jsonl")


def test_eval_and_search_take_the_same_gates(tmp_path, capsys):
    from pocketlm.compress.search import SearchBudget
    from pocketlm.errors import ConfigError
    report = tmp_path / "tiny.json"
    code, out, err = run(["eval", "tiny", "--tokens", "1024", "--no-speed", "--json", str(report)], capsys)
    assert code == 0, err
    ok, bad = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok.write_text("- quality.ppl <= 1.0 * incumbent\n- quality.ppl > 1\n")
    bad.write_text("- quality.ppl < 0.9 * incumbent\n")
    base = ["eval", "tiny", "--tokens", "1024", "--no-speed", "--incumbent", str(report), "--gates"]
    code, out, err = run([*base, str(ok)], capsys)
    assert code == 0 and "FAIL" not in out, err
    code, out, err = run([*base, str(bad)], capsys)
    assert code == 1 and "gates FAILED" in out
    assert SearchBudget(max_size_mb=8, gates=("quality.kl <= 0.05",)).parsed_gates()[0].metric == "quality.kl"
    with pytest.raises(ConfigError, match="not allowed"):
        SearchBudget(max_size_mb=8, gates=("quality.ppl <= incumbent ** 2",))
