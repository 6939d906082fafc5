"""Energy meters: NVML's GPU energy counter, RAPL powercap files, or a labelled CPU-time estimate.

A meter reads a cumulative counter in joules; `measure` turns two readings into a result. Only the
first two are measurements: the estimate says `"kind": "estimated"` and is never shown as measured.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

POWERCAP = Path("/sys/class/powercap")


class NvmlMeter:
    """Total energy of one NVIDIA GPU board since driver load (nvmlDeviceGetTotalEnergyConsumption, mJ)."""

    kind, source = "measured", "nvml"

    def __init__(self, index: int = 0):
        import pynvml  # from nvidia-ml-py (extra `gpu`)
        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.read()  # raises NVMLError_NotSupported on GPUs older than Volta

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0


class RaplMeter:
    """Sum of the CPU package domains' RAPL counters (energy_uj), corrected for wrap-around."""

    kind, source = "measured", "rapl"

    def __init__(self, root: Path = POWERCAP):
        # Top-level package domains only (intel-rapl:0, not intel-rapl:0:0) so nothing is counted twice.
        self._zones = [z for z in sorted(Path(root).glob("intel-rapl:*")) if z.name.count(":") == 1]
        if not self._zones:
            raise OSError(f"no RAPL package domains under {root}")
        self._ranges = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last = self._raw()  # raises PermissionError where energy_uj is root-only
        self._total_uj = 0

    def _raw(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self._zones]

    def read(self) -> float:
        now = self._raw()
        for i, (a, b) in enumerate(zip(self._last, now)):
            self._total_uj += b - a if b >= a else b + self._ranges[i] - a
        self._last = now
        return self._total_uj / 1e6


class CpuTimeEstimate:
    """Joules ≈ this process's CPU seconds (user + system, all threads) × watts per busy core."""

    kind, source = "estimated", "cpu_time x watts_per_core"

    def __init__(self, watts_per_core: float = 10.0):
        self.watts_per_core = watts_per_core
        self._proc = psutil.Process()

    def read(self) -> float:
        t = self._proc.cpu_times()
        return (t.user + t.system) * self.watts_per_core


def pick_meter(device: str = "cpu", watts_per_core: float = 10.0, powercap: Path = POWERCAP):
    """NVML on a CUDA device, else RAPL where readable, else the CPU-time estimate."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        with contextlib.suppress(Exception):
            return NvmlMeter(index)
    else:
        with contextlib.suppress(OSError, ValueError):
            return RaplMeter(powercap)
    return CpuTimeEstimate(watts_per_core)


@dataclass
class EnergyReading:
    kind: str
    source: str
    joules: float = 0.0
    seconds: float = 0.0
    watts_per_core: float | None = None
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        per_token = self.joules / self.tokens if self.tokens else None
        return {"joules_per_token": per_token, "kind": self.kind, "source": self.source, "joules": self.joules,
                "tokens": self.tokens, "seconds": self.seconds, "watts_per_core": self.watts_per_core,
                "mean_watts": self.joules / self.seconds if self.seconds else None}


@contextlib.contextmanager
def measure(meter) -> Iterator[EnergyReading]:
    """Energy used inside the block; set `.tokens` on the reading to get joules per token."""
    reading = EnergyReading(meter.kind, meter.source, watts_per_core=getattr(meter, "watts_per_core", None))
    start_j, start_t = meter.read(), time.perf_counter()
    try:
        yield reading
    finally:
        reading.joules = meter.read() - start_j
        reading.seconds = time.perf_counter() - start_t
