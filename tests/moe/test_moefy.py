"""MoEfication of a dense model: same function with every expert, fewer FFN FLOPs with top-k, reloadable."""
import copy

import pytest
import torch

import pocketlm
from pocketlm.compress import RTNConfig, compress_
from pocketlm.errors import ConfigError, UnsupportedModelError
from pocketlm.moe.moefy import MoEfiedFFN, balanced_clusters, ffn_flops_saved, moefy, set_top_k


@pytest.fixture(scope="module")
def moefied(tiny):
    model = copy.deepcopy(tiny[0])
    tokens = torch.randint(0, 8192, (4, 64), generator=torch.Generator().manual_seed(0))
    moefy(model, tokens, experts=4, top_k=2, router_steps=50, show_progress=False)
    return model


def test_balanced_clusters_are_equal_and_group_alike_rows():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    rows = torch.cat([c + 0.1 * torch.randn(8, 16, generator=g) for c in centres])  # 4 groups of 8
    assign = balanced_clusters(rows, 4)
    assert torch.bincount(assign, minlength=4).tolist() == [8, 8, 8, 8]
    for k in range(4):  # each true group lands in one cluster
        assert len(set(assign[k * 8:(k + 1) * 8].tolist())) == 1
    with pytest.raises(ConfigError, match="equal experts"):
        balanced_clusters(rows, 5)


def test_all_experts_is_the_dense_model_and_top_k_is_not(tiny, moefied):
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = tiny[0](ids).logits
        set_top_k(moefied, 4)
        torch.testing.assert_close(moefied(ids).logits, dense, rtol=1e-4, atol=1e-4)
        set_top_k(moefied, 1)
        assert not torch.allclose(moefied(ids).logits, dense, atol=1e-2)
    set_top_k(moefied, 2)
    assert all(isinstance(layer.mlp, MoEfiedFFN) for layer in moefied.model.layers)
    assert moefied.pocketlm_record["moefy"] == {"experts": 4, "top_k": 2}
    assert ffn_flops_saved(128, 352, 4, 2) == pytest.approx(1 - 0.5 - 4 / (3 * 352))
    with pytest.raises(ConfigError):
        set_top_k(moefied, 5)


def test_saved_moefied_model_reloads_identically(tiny, moefied, tmp_path):
    pocketlm.save(moefied, tiny[1], tmp_path / "m")
    again, _ = pocketlm.load(tmp_path / "m")
    assert isinstance(again.model.layers[0].mlp, MoEfiedFFN) and again.model.layers[0].mlp.top_k == 2
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, moefied(ids).logits)


def test_bad_input(tiny):
    tokens = torch.randint(0, 8192, (1, 16))
    with pytest.raises(ConfigError, match="equal parts"):
        moefy(copy.deepcopy(tiny[0]), tokens, experts=5)
    with pytest.raises(ConfigError, match="top-k"):
        moefy(copy.deepcopy(tiny[0]), tokens, experts=4, top_k=5)
    with pytest.raises(UnsupportedModelError, match="already"):
        moefy(pocketlm.load("moe")[0], tokens)
    quantized = copy.deepcopy(tiny[0])
    compress_(quantized, RTNConfig(bits=8), tok=tiny[1], show_progress=False)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        moefy(quantized, tokens)
