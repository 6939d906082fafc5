import copy

import pytest

import pocketlm
from pocketlm.compress.quant.rtn import RTNConfig


@pytest.fixture(params=[RTNConfig(bits=8, head=True), RTNConfig(bits=4, group_size=32),
                        RTNConfig(bits=3, group_size=32, sym=True)], ids=["int8+head", "int4", "int3-sym"])
def rtn_artifact(request, tmp_path, tiny):
    """(config, the quantized model in memory, its saved artifact directory) for each RTN width."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    pocketlm.compress_(model, request.param, tok=tok)
    return request.param, model, pocketlm.save(model, tok, tmp_path / "q")
