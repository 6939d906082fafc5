"""Routing diagnostics: counted the same for transformers' blocks and pocketlm's, and in eval reports."""
import copy

import torch

import pocketlm
from pocketlm.eval.protocol import EvalProtocol, evaluate
from pocketlm.eval.report import write_report
from pocketlm.moe.routing import count_routing, routing_report
from pocketlm.moe.runtime import offload_experts


def test_report_arithmetic():
    r = routing_report([(torch.tensor([2, 2, 2, 2]), 4), (torch.tensor([8, 0, 0, 0]), 4)])
    assert r["layers"][0]["cv"] == 0 and r["layers"][0]["share"] == [0.5] * 4
    assert abs(r["layers"][1]["cv"] - 3 ** 0.5) < 1e-9  # one expert takes everything: sqrt(E - 1)
    assert r["mean_active_experts"] == 2 and r["layers"][1]["active"] == 2


def test_counts_match_between_hf_blocks_and_offloaded(tiny):
    model, tok = pocketlm.load("moe")
    ids = tok("And God said, Let there be light: and there was light.", return_tensors="pt").input_ids
    with torch.no_grad(), count_routing(model) as hf:
        model(ids)
    m = copy.deepcopy(model)
    rt = offload_experts(m, resident=0.5)
    with torch.no_grad(), count_routing(m) as ours:
        m(ids)
    assert hf[0]["layers"] == ours[0]["layers"] and hf[0]["mean_active_experts"] == 2
    assert sum(hf[0]["layers"][0]["share"]) == 2
    with count_routing(tiny[0]) as dense:
        pass
    assert dense == []
    rt.close()


def test_eval_report_shows_routing(tmp_path, tiny):
    model, tok = pocketlm.load("moe")
    protocol = EvalProtocol(tokens=1024, ctx=256, speed=False)
    moe_report = evaluate(model, tok, protocol, show_progress=False).to_dict()
    dense_report = evaluate(*tiny, protocol, show_progress=False).to_dict()
    assert dense_report["quality"]["routing"] is None
    layers = moe_report["quality"]["routing"]["layers"]
    assert len(layers) == 6 and all(x["tokens"] == 4 * 256 for x in layers)
    write_report([moe_report, dense_report], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Expert routing" in md and "moe-float32" in md.split("## Expert routing")[1]
    assert "Expert routing" in (tmp_path / "rep" / "report.html").read_text()
