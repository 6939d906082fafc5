"""The comparison report: files, plots, escaping, atomic refusal and input errors."""
import json

import pytest
from rich.console import Console

from pocketlm.errors import DataError, OutputExistsError
from pocketlm.eval.report import load_reports, render_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(label, ppl, weights_mb, tok_s=250.0, jpt=0.05, kind="measured", protocol=None):
    """A synthetic EvalReport dict shaped like `pocketlm eval --json` output."""
    speed = tok_s is not None
    return {
        "pocketlm_version": "0.1.0", "label": label,
        "model": {"name": "tiny", "path": "/m", "model_type": "llama", "params": 1787008,
                  "dtype": "bfloat16", "device": "cpu"},
        "baseline": {"name": "tiny", "path": "/m"},
        "protocol": protocol or {"ctx": 512, "n_tokens": 65536, "seed": 0},
        "quality": {"ppl": ppl, "nll": 3.17, "tokens_scored": 65408, "windows": 128, "kl": 0.0012,
                    "top1": 0.993, "cloze": 0.31, "cloze_words": 9000, "task_accuracy": None,
                    "task_items": None, "task_mean_tokens": None},
        "efficiency": {"weights_mb": weights_mb, "weights_bytes": int(weights_mb * 2**20), "disk_mb": None,
                       "peak_rss_mb": 410.0 if speed else None, "rss_method": "psutil",
                       "cuda_max_allocated_mb": None, "prefill_ms": 12.3 if speed else None,
                       "prefill_tokens": 512, "decode_tok_s": tok_s,
                       "decode_tok_s_batch": {"1": tok_s, "8": tok_s * 5} if speed else {},
                       "threads": 2, "engine": "transformers.generate"},
        "energy": None if jpt is None else {
            "joules_per_token": jpt, "kind": kind,
            "source": "nvml" if kind == "measured" else "cpu_time x watts_per_core",
            "joules": 3.2, "tokens": 645, "watts_per_core": None if kind == "measured" else 10.0},
        "machine": {"cpu": "test cpu", "cores": 2, "torch": "2.13.0", "gpu": None},
        "wall_s": 12.0,
    }


@pytest.fixture
def reports():
    return [make_report("tiny-fp32", 23.5, 7.1, tok_s=200.0, jpt=0.08),
            make_report("tiny-int8", 23.9, 3.6, tok_s=260.0, jpt=0.051, kind="estimated"),
            make_report("<b>tiny-int4</b>", 30.0, 2.0, tok_s=150.0, jpt=0.04)]


def test_write_report_files_and_plots(tmp_path, reports):
    out = write_report(reports, tmp_path / "rep")
    assert out == tmp_path / "rep"
    for name in ("report.md", "report.html", "report.json", "quality_vs_size.png", "quality_vs_speed.png"):
        assert (out / name).is_file(), name
    for png in ("quality_vs_size.png", "quality_vs_speed.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    html = (out / "report.html").read_text()
    assert '<img src="quality_vs_size.png"' in html and '<img src="quality_vs_speed.png"' in html
    assert "tiny-fp32" in html and "tiny-int8" in html
    assert "&lt;b&gt;tiny-int4&lt;/b&gt;" in html and "<b>tiny-int4</b>" not in html
    md = (out / "report.md").read_text()
    assert "0.051 (est.)" in md
    assert "| tiny-fp32 |" in md and "score = quality − 0.2·t_norm − 0.2·e_norm" in md
    assert "measured and estimated" in md  # mixed energy kinds are warned about
    data = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in data["score"]["rows"]] == ["tiny-fp32", "tiny-int8", "<b>tiny-int4</b>"]
    assert len(data["reports"]) == 3 and data["score"]["quality_metric"] == "ppl_ratio"
    # int4 is smallest, fp32 has the best ppl, int8 sits between: all on the size front.
    assert data["score"]["fronts"]["quality_vs_size"] == ["tiny-fp32", "tiny-int8", "<b>tiny-int4</b>"]
    # int4 is slower and worse than int8: off the speed front.
    assert data["score"]["fronts"]["quality_vs_speed"] == ["tiny-fp32", "tiny-int8"]


def test_missing_speed_skips_speed_plot_and_prints_dash(tmp_path):
    reps = [make_report("a", 20.0, 7.0, tok_s=None, jpt=None), make_report("b", 22.0, 3.0, tok_s=None, jpt=None)]
    out = write_report(reps, tmp_path / "rep")
    assert (out / "quality_vs_size.png").is_file()
    assert not (out / "quality_vs_speed.png").exists()
    md = (out / "report.md").read_text()
    assert "quality_vs_speed.png not drawn" in md
    assert '<img src="quality_vs_speed.png"' not in (out / "report.html").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert "–" in row
    data = json.loads((out / "report.json").read_text())
    assert data["score"]["dropped_terms"] == ["time", "energy"]


def test_protocol_difference_is_warned(tmp_path):
    reps = [make_report("a", 20.0, 7.0), make_report("b", 22.0, 3.0, protocol={"ctx": 256, "n_tokens": 65536, "seed": 0})]
    md = (write_report(reps, tmp_path / "rep") / "report.md").read_text()
    assert "protocols differ between reports in: ctx" in md


def test_existing_out_dir_is_refused_and_untouched(tmp_path, reports):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        write_report(reports, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temp dir left behind
    write_report(reports, out, overwrite=True)
    assert (out / "report.md").is_file() and not (out / "keep.txt").exists()


def test_load_reports_roundtrip_and_duplicate_labels(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(make_report("same", 20.0 + i, 5.0)))
        paths.append(p)
    assert [r["label"] for r in load_reports(paths)] == ["same", "same#2", "same#3"]


def test_load_reports_errors(tmp_path):
    with pytest.raises(DataError, match="no evaluation reports"):
        load_reports([])
    with pytest.raises(DataError, match="missing.json.*does not exist") as e:
        load_reports([tmp_path / "missing.json"])
    assert "pocketlm eval --json" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        load_reports([bad])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"quality": {"ppl": 3.0}}))
    with pytest.raises(DataError, match="other.json.*not an evaluation report"):
        load_reports([other])


def test_render_table_has_md_columns(reports):
    console = Console(record=True, width=250)
    console.print(render_table(reports))
    text = console.export_text()
    for needle in ("tiny-int8", "J/token", "tok/s b8", "0.051 (est.)", "score"):
        assert needle in text


def test_cost_table_prices_each_report(tmp_path, reports):
    from pocketlm.fleet.cost import CostInputs
    reps = reports + [make_report("no-speed", 25.0, 3.0, tok_s=None, jpt=None)]
    out = write_report(reps, tmp_path / "rep", cost=CostInputs(kwh_price=0.3, cloud_price_per_1m_tokens=0.5))
    md = (out / "report.md").read_text()
    assert "## Cost (on-prem)" in md and "cloud 0.5 per 1M tokens" in md
    # tiny-int8: 0.051 J/token at 260 tok/s → energy 0.051 / 3.6e6 × 0.3 × 1e6 = 0.00425 per 1M tokens, estimated
    row = next(line for line in md.splitlines() if line.startswith("| tiny-int8 |") and "estimated" in line)
    assert "0.00425" in row
    from pocketlm.eval.report import MISSING
    cost_rows = md[md.index("## Cost"):].splitlines()
    assert next(line for line in cost_rows if line.startswith("| no-speed |")).count(MISSING) == 6  # nothing to price
    assert "Cost (on-prem)" in (out / "report.html").read_text()
    assert "## Cost" not in (write_report(reports, tmp_path / "plain") / "report.md").read_text()
