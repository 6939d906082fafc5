import json

import pytest

from pocketlm.errors import ConfigError, DataError
from pocketlm.fleet.cost import CostInputs, cost_from_eval_report, cost_report

# 0.5 J/token, 50 tok/s, defaults (0.30/kWh, 1000 over 3 years at 50% utilization, 256 tokens/request):
# energy   = 0.5 / 3.6e6 * 0.30 per token                  = 0.0416667 per 1M
# hardware = 1000 / (3 * 31_557_600 s * 0.5 * 50 tok/s)     = 0.4225078 per 1M
ENERGY_1M = 0.5 / 3.6e6 * 0.30 * 1e6
HARDWARE_1M = 1000 / 2_366_820_000 * 1e6


def test_hand_computed_numbers():
    c = cost_report(0.5, 50.0, "measured")
    assert c["energy_per_1m_tokens"] == pytest.approx(0.0416667, rel=1e-5) == pytest.approx(ENERGY_1M)
    assert c["hardware_per_1m_tokens"] == pytest.approx(0.4225078, rel=1e-6) == pytest.approx(HARDWARE_1M)
    assert c["total_per_1m_tokens"] == pytest.approx(0.4641745, rel=1e-6)
    assert c["per_1000_requests"] == pytest.approx(0.4641745e-6 * 256 * 1000, rel=1e-6)
    assert c["cloud_per_1m_tokens"] is None and c["ratio_to_cloud"] is None
    assert c["energy_kind"] == "measured" and c["estimated"] is False
    assert c["inputs"]["kwh_price"] == 0.30 and c["inputs"]["tokens_per_request"] == 256.0


def test_ratio_to_cloud():
    c = cost_report(0.5, 50.0, "measured", CostInputs(cloud_price_per_1m_tokens=0.5))
    assert c["cloud_per_1m_tokens"] == 0.5
    assert c["ratio_to_cloud"] == pytest.approx(0.4641745 / 0.5, rel=1e-6)


def test_estimated_flag():
    assert cost_report(0.5, 50.0, "estimated")["estimated"] is True
    assert cost_report(0.5, 50.0, "something-else")["estimated"] is True


def test_inputs_scale():
    c = cost_report(0.5, 50.0, "measured", CostInputs(utilization=1.0, kwh_price=0.60))
    assert c["hardware_per_1m_tokens"] == pytest.approx(HARDWARE_1M / 2)
    assert c["energy_per_1m_tokens"] == pytest.approx(ENERGY_1M * 2)


@pytest.mark.parametrize("kwargs", [
    {"kwh_price": 0}, {"hardware_price": -1}, {"lifetime_years": 0}, {"utilization": 0},
    {"utilization": 1.5}, {"tokens_per_request": 0}, {"cloud_price_per_1m_tokens": 0},
    {"kwh_price": float("nan")},
])
def test_bad_inputs_raise(kwargs):
    with pytest.raises(ConfigError):
        CostInputs(**kwargs)


@pytest.mark.parametrize("jpt, tps", [(0, 50), (-1, 50), (0.5, 0), (0.5, -3), (None, 50)])
def test_bad_measurements_raise(jpt, tps):
    with pytest.raises(DataError):
        cost_report(jpt, tps, "measured")


def test_from_eval_report():
    report = {"efficiency": {"decode_tok_s": 50.0, "prefill_ms": 3.0},
              "energy": {"joules_per_token": 0.5, "kind": "estimated", "source": "cpu-time"}}
    c = cost_from_eval_report(report, CostInputs())
    assert c["total_per_1m_tokens"] == pytest.approx(0.4641745, rel=1e-6)
    assert c["estimated"] is True and c["energy_kind"] == "estimated"


def test_from_eval_report_without_energy():
    with pytest.raises(DataError, match="no energy measurement"):
        cost_from_eval_report({"efficiency": {"decode_tok_s": 50.0}, "energy": None}, CostInputs())
    with pytest.raises(DataError):
        cost_from_eval_report({"efficiency": {}, "energy": {"joules_per_token": 0.5, "kind": "measured"}},
                              CostInputs())


def test_cost_command_prints_the_table_and_refuses_a_report_without_energy(tmp_path, capsys):
    from test_cli import run
    report = {"efficiency": {"decode_tok_s": 50.0}, "energy": {"joules_per_token": 0.5, "kind": "estimated"}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    code, out, err = run(["cost", str(tmp_path / "r.json"), "--cloud-price", "0.5"], capsys)
    assert code == 0 and "energy estimated" in out and "0.4642" in out, err  # total per 1M tokens, as above
    (tmp_path / "n.json").write_text(json.dumps({**report, "energy": None}))
    code, out, err = run(["cost", str(tmp_path / "n.json")], capsys)
    assert code == 2 and "no energy measurement" in err and err.count("\n") == 1
