import json

from pocketlm.demo import DTYPES, PRUNED, run_demo
from pocketlm.eval.protocol import EvalProtocol

QUICK = EvalProtocol(tokens=1024, prefill_tokens=64, decode_new_tokens=8, decode_batch_sizes=(1, 2), repeats=1)


def test_demo_writes_results_and_report_with_plots(tmp_path):
    out = run_demo(tmp_path / "demo", protocol=QUICK)
    results = sorted((out / "results").glob("*.json"))
    assert [p.stem for p in results] == sorted([*(f"tiny-{d}" for d in DTYPES), PRUNED])
    fp32 = json.loads((out / "results" / "tiny-float32.json").read_text())
    bf16 = json.loads((out / "results" / "tiny-bfloat16.json").read_text())
    assert fp32["quality"]["kl"] < 1e-6 < bf16["quality"]["kl"]
    assert bf16["efficiency"]["weights_mb"] < 0.51 * fp32["efficiency"]["weights_mb"]
    pruned = json.loads((out / "results" / f"{PRUNED}.json").read_text())
    assert pruned["efficiency"]["weights_mb"] < fp32["efficiency"]["weights_mb"]
    assert pruned["model"]["recipe"][0]["kind"] == "prune_mlp" and pruned["quality"]["kl"] > 0
    html = (out / "report.html").read_text()
    for png in ("quality_vs_size.png", "quality_vs_speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}"' in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
