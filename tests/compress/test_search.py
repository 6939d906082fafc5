"""Budgeted recipe search on the tiny model: every candidate measured, Pareto set, best within budget."""
import json

import pytest

import pocketlm
from pocketlm.cli import main
from pocketlm.compress.distill.trainer import KDConfig
from pocketlm.compress.search import SearchBudget, SearchSpace, run_search
from pocketlm.errors import ConfigError
from pocketlm.eval.protocol import EvalProtocol

PROTOCOL = EvalProtocol(tokens=1024, ctx=256, decode_batch_sizes=(1,), decode_new_tokens=8, warmup=0, repeats=1)
SPACE = SearchSpace(prune_ratios=(0.5,), quant=("none", "int8"), kd=KDConfig(steps=2, batch_size=2, seq_len=64))


@pytest.fixture(scope="module")
def searched(tiny, tmp_path_factory):
    model, tok = tiny
    out = tmp_path_factory.mktemp("search") / "s"
    # the dense fp32 tiny model is ~7 MB of weights, int8 about a quarter: a 4 MB budget leaves the compressed ones
    result = run_search(model, tok, out, SearchBudget(max_size_mb=4.0), SPACE, protocol=PROTOCOL, show_progress=False)
    return result, out


def test_every_candidate_is_measured_and_the_best_fits(searched):
    result, out = searched
    names = [c["name"] for c in result["candidates"]]
    assert names == ["dense", "dense int8", "width-50%+kd", "width-50%+kd int8"]
    assert all(c["ppl"] > 1 and c["weights_mb"] > 0 and c["decode_tok_s"] > 0 for c in result["candidates"])
    fits = [c for c in result["candidates"] if c["weights_mb"] <= 4.0]
    assert [c["within_budget"] for c in result["candidates"]] == [c in fits for c in result["candidates"]]
    best = next(c for c in result["candidates"] if c["name"] == result["best"])
    assert best["within_budget"] and best["score"] == max(c["score"] for c in fits)
    assert [p["kind"] for p in best["recipe"]][-1] in ("rtn", "kd")
    sharpest = min(result["candidates"], key=lambda c: c["ppl"])["name"]
    assert sharpest in result["pareto"]["quality_vs_size"]  # the best perplexity is never dominated
    saved = json.loads((out / "search.json").read_text())
    assert saved["best"] == result["best"] and (out / "report.html").is_file() and (out / "quality_vs_size.png").is_file()
    assert not (out / "candidates").exists()  # the other saved candidates are gone
    again, _ = pocketlm.load(out / "best")  # the chosen candidate, not another one
    assert [p["kind"] for p in again.pocketlm_record["recipe"]] == [p["kind"] for p in best["recipe"]]


def test_a_budget_nothing_fits_is_reported_not_guessed(tiny, tmp_path):
    model, tok = tiny
    space = SearchSpace(prune_ratios=(), quant=("none", "int8"), kd=None)
    result = run_search(model, tok, tmp_path / "s", SearchBudget(max_size_mb=0.01), space, protocol=PROTOCOL,
                        show_progress=False)
    assert result["best"] is None and not (tmp_path / "s" / "best").exists()


def test_impossible_search_settings_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not positive"):
        SearchBudget(max_size_mb=0)
    with pytest.raises(ConfigError, match="quantization choices"):
        SearchSpace(quant=("int2",))
    with pytest.raises(SystemExit) as e:
        main(["search", "tiny", "--max-size-mb", "-1", "-o", str(tmp_path / "s")])
    assert e.value.code == 2 and "size budget" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
