"""The Ray backend on a local Ray instance with 2 CPUs gives the in-process result for a fixed seed."""
import json

import pytest
import torch

from pocketlm.io import ASSETS
from pocketlm.rl.config import RLConfig
from pocketlm.rl.trainer import train_rl

ray = pytest.importorskip("ray")
TASKS = ASSETS / "data" / "arith_test.jsonl"


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_backend_matches_in_process(tmp_path, local_ray):
    items = [json.loads(line) for line in TASKS.read_text().splitlines()[:8]]
    cfg = dict(steps=2, prompts_per_step=2, group_size=4, max_tokens=16, warmup_items=0, micro_batch=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actor runs on one thread: the same arithmetic, the same samples
    try:
        local = train_rl("tiny", items, RLConfig(**cfg), tmp_path / "local", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = train_rl("tiny", items, RLConfig(**cfg, backend="ray"), tmp_path / "ray", show_progress=False)
    for a, b in zip(local["metrics"], remote["metrics"]):
        assert a["tokens"] == b["tokens"] and a["think_rate"] == b["think_rate"]
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
