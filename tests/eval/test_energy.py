import pytest

from pocketlm.eval.energy import CpuTimeEstimate, RaplMeter, measure, pick_meter


def fake_rapl(root, packages):
    for i, (energy, max_range) in enumerate(packages):
        zone = root / f"intel-rapl:{i}"
        zone.mkdir(parents=True)
        (zone / "energy_uj").write_text(str(energy))
        (zone / "max_energy_range_uj").write_text(str(max_range))
        sub = root / f"intel-rapl:{i}:0"  # a sub-domain (core) must not be counted twice
        sub.mkdir()
        (sub / "energy_uj").write_text("999999")
        (sub / "max_energy_range_uj").write_text("1000000")


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    fake_rapl(tmp_path, [(1_000_000, 10_000_000), (9_500_000, 10_000_000)])
    meter = RaplMeter(tmp_path)
    assert meter.kind == "measured"
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000000")  # +2 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500000")   # wrapped: +1 J
    assert meter.read() == pytest.approx(3.0)


def test_pick_meter_prefers_rapl_then_estimate(tmp_path):
    fake_rapl(tmp_path / "with", [(0, 10)])
    assert isinstance(pick_meter("cpu", powercap=tmp_path / "with"), RaplMeter)
    meter = pick_meter("cpu", watts_per_core=7.0, powercap=tmp_path / "empty")
    assert isinstance(meter, CpuTimeEstimate) and meter.kind == "estimated" and meter.watts_per_core == 7.0


def test_unreadable_rapl_falls_back_to_estimate(tmp_path):
    fake_rapl(tmp_path, [(0, 10)])
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    assert isinstance(pick_meter("cpu", powercap=tmp_path), CpuTimeEstimate)


def test_estimate_is_cpu_seconds_times_watts():
    meter = CpuTimeEstimate(watts_per_core=20.0)
    with measure(meter) as reading:
        x = 0
        for i in range(3_000_000):
            x += i
        reading.tokens = 10
    out = reading.to_dict()
    assert out["kind"] == "estimated" and out["source"] == "cpu_time x watts_per_core"
    assert out["joules"] > 0 and out["joules_per_token"] == pytest.approx(out["joules"] / 10)
    # Busy on one core: the estimate is about seconds x 20 W, never more than the cores allow.
    assert out["joules"] <= 20.0 * out["seconds"] * 2 + 0.2


@pytest.mark.gpu
def test_nvml_meter_measures_on_gpu():
    import torch
    from pocketlm.eval.energy import NvmlMeter
    meter = NvmlMeter(0)
    with measure(meter) as reading:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            a = a @ a / 64
        torch.cuda.synchronize()
    assert reading.kind == "measured" and reading.joules > 0
