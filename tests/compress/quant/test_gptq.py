import copy

import pytest
import torch

import pocketlm
from pocketlm.compress import GPTQConfig
from pocketlm.compress.quant import primitives as P
from pocketlm.compress.quant.gptq import gptq_quantize_weight, proxy_error
from pocketlm.compress.quant.linear import QuantLinear
from pocketlm.compress.quant.primitives import Scheme
from pocketlm.compress.quant.rtn import RTNConfig
from pocketlm.errors import ConfigError
from pocketlm.io import ASSETS


def _problem(N=64, K=256, dead=()):
    """A random weight and the Hessian of correlated inputs with a few loud channels."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g)
    mix = torch.randn(K, K, generator=g) * torch.logspace(0, -2, K)[None, :]  # decaying spectrum
    X = torch.randn(2048, K, generator=g) @ mix.T
    X[:, ::29] *= 6  # outlier channels, so the column order matters
    X[:, list(dead)] = 0
    return W, 2 * X.T @ X / len(X)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_output_error_is_below_rtn(bits, act_order):
    W, H = _problem()
    scheme = Scheme(bits, 32)
    rtn = proxy_error(W, P.dequantize_matrix(*P.quantize_matrix(W, scheme), bits), H)
    q, s, z = gptq_quantize_weight(W, H, scheme, act_order=act_order)
    gptq = proxy_error(W, P.dequantize_matrix(q, s, z, bits), H)
    assert gptq < 0.5 * rtn


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 32), Scheme(3, 64, sym=True)])
def test_codes_in_range_and_from_codes_reproduces_the_weights(scheme):
    W, H = _problem(dead=(3, 100))
    q, s, z = gptq_quantize_weight(W, H, scheme, act_order=True)
    lo, hi = P.CODES[scheme.bits]
    assert q.dtype == torch.int32 and q.min() >= lo and q.max() <= hi
    assert s.shape == (64, 256 // scheme.group(256)) and torch.equal(s, s.bfloat16().float())
    w_hat = P.dequantize_matrix(q, s, z, scheme.bits)
    assert torch.equal(QuantLinear.from_codes(q, s, z, scheme).dequantize(), w_hat)
    step = s.repeat_interleave(scheme.group(256), dim=1)
    assert (w_hat[:, [3, 100]].abs() <= 0.51 * step[:, [3, 100]] + 1e-6).all()  # dead inputs: weights → 0


def test_act_order_uses_static_contiguous_groups():
    W, H = _problem()
    scheme = Scheme(4, 32)
    _, s, z = gptq_quantize_weight(W, H, scheme, act_order=True)
    s0, z0 = P.params(W.reshape(64, 8, 32), scheme)  # each contiguous group of the original W
    assert torch.equal(s, s0) and torch.equal(z, z0)
    _, s_dyn, _ = gptq_quantize_weight(W, H, scheme, act_order=False)
    assert torch.equal(s_dyn[:, 0], s0[:, 0]) and not torch.equal(s_dyn, s0)  # later groups see the updates


def test_non_positive_definite_hessian_raises_with_a_fix():
    K = 64
    v = torch.ones(K) / K ** 0.5
    H = torch.eye(K) - 2 * torch.outer(v, v)  # positive diagonal, one eigenvalue −1
    with pytest.raises(ValueError, match=r"not positive definite.*raise damp"):
        gptq_quantize_weight(torch.randn(8, K), H, Scheme(4, 32))


def test_gptq_int3_is_closer_to_the_float_model_than_rtn(tiny):
    tok = tiny[1]
    x = torch.tensor([tok((ASSETS / "data" / "test.txt").read_text()[:2000])["input_ids"][:128]])
    with torch.no_grad():
        ref = tiny[0](x).logits.log_softmax(-1)
    kl, stats = {}, {}
    for cfg in (RTNConfig(bits=3, group_size=32), GPTQConfig(bits=3, group_size=32)):
        model = copy.deepcopy(tiny[0])
        stats[cfg.kind] = pocketlm.compress_(model, cfg, tok=tok, calib_samples=8, calib_len=64,
                                             show_progress=False)[0]["stats"]
        with torch.no_grad():
            logp = model(x).logits.log_softmax(-1)
        kl[cfg.kind] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
    assert kl["gptq"] < 0.95 * kl["rtn"]
    s = stats["gptq"]
    assert s["layers"] == 28 and s["linear_bytes_after"] == stats["rtn"]["linear_bytes_after"]
    assert 0 < s["mean_relative_output_error"] < 0.05


def test_bad_settings_and_missing_calibration_change_nothing(tiny):
    with pytest.raises(ConfigError, match="damp 0"):
        GPTQConfig(damp=0)
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    with pytest.raises(ConfigError, match="needs calibration data"):
        pocketlm.compress_(model, GPTQConfig(bits=4, group_size=32))
    assert all(type(m) is not QuantLinear for m in model.modules())


def test_saved_gptq_artifact_reloads_bit_exactly(tmp_path, tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    pocketlm.compress_(model, GPTQConfig(bits=4, group_size=32, head=True), tok=tok, calib_samples=8, calib_len=64,
                       show_progress=False)
    again, _ = pocketlm.load(pocketlm.save(model, tok, tmp_path / "q"))
    assert again.pocketlm_record["recipe"][0]["kind"] == "gptq"
    x = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
