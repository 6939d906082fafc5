"""Shared by the benchmark scripts: machine description and JSON results under benchmarks/results/."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "git": _git_rev(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2) + "\n")
    return path


def params(model) -> int:
    """Parameter count of a model."""
    return sum(p.numel() for p in model.parameters())


def recovery_kd(steps: int):
    """The KD recovery every benchmark uses (logit KL at T 2 + LM loss, alpha 0.9, lr 1e-3) for `steps`
    steps of 8 × 256 tokens of the reference train split."""
    from pocketlm.compress import KDConfig
    return KDConfig(steps=steps, batch_size=8, seq_len=256, lr=1e-3, alpha=0.9, text=str(SHARED / "corpus" / "train.txt"))


def reference_args(ap: argparse.ArgumentParser, tokens: int = 65536, model: str = "small") -> argparse.ArgumentParser:
    """The options every benchmark on the reference model shares: model, text, tokens, threads."""
    ap.add_argument("--model", default=str(SHARED / "models" / model))
    ap.add_argument("--text", default=str(SHARED / "corpus" / "test.txt"))
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def parse_reference_args(ap: argparse.ArgumentParser, tokens: int = 65536, model: str = "small") -> argparse.Namespace:
    """Parse the shared and the script's own options and apply --threads."""
    args = reference_args(ap, tokens, model).parse_args()
    torch.set_num_threads(args.threads)
    return args
