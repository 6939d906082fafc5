import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network

import pytest
import torch

import pocketlm

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny Llama in fp32 and its tokenizer (shared: tests must not change its values; the
    runtime may repack its weights in place, which keeps them)."""
    return pocketlm.load("tiny")


@pytest.fixture(scope="session")
def reasoner():
    """The embedded reasoner (Qwen3-style chat template with a thinking switch) in fp32, shared."""
    return pocketlm.load("reasoner")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
