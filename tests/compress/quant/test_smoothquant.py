import copy
import json

import pytest
import torch

import pocketlm
from pocketlm.compress.calibration import calibration_tokens
from pocketlm.compress.quant.linear import QuantEmbedding, W8A8Linear
from pocketlm.compress.quant.smoothquant import SmoothQuantConfig, smooth_
from pocketlm.compress.quant.swap import decoder_linears, set_module
from pocketlm.errors import ConfigError
from pocketlm.io import ASSETS

OUTLIER = 7  # the channel given an outlier


def _with_outliers(model, factor=30.0):
    """Channel OUTLIER of every norm ×factor, the columns reading it ÷factor: same float function,
    one activation outlier channel per smoothed input."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.self_attn.v_proj)),
                               (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[OUTLIER] *= factor
                for lin in lins:
                    lin.weight[:, OUTLIER] /= factor
    return model


def _kl(ref, model, x):
    with torch.no_grad():
        logp = model(x).logits.log_softmax(-1)
    return (ref.exp() * (ref - logp)).sum(-1).mean().item()


def _outlier_ratio(model, x):
    """max over channels / median over channels of max |x_j|, at every q_proj and gate_proj input."""
    seen = {}
    hooks = [lin.register_forward_pre_hook(lambda _m, a, n=name: seen.__setitem__(
                 n, a[0].abs().reshape(-1, a[0].shape[-1]).amax(0)))
             for name, lin in decoder_linears(model).items() if name.endswith(("q_proj", "gate_proj"))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return torch.stack([(m.max() / m.median()) for m in seen.values()])


def test_smoothing_keeps_the_float_function_and_migrates_outliers(tiny):
    model, tok = _with_outliers(copy.deepcopy(tiny[0])), tiny[1]
    calib, _ = calibration_tokens(tok, samples=8, seq_len=64)
    x = torch.randint(0, 8192, (2, 32))
    with torch.no_grad():
        ref = model(x).logits
    before = _outlier_ratio(model, calib)
    assert smooth_(model, calib) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=1e-4, rtol=1e-4)
    after = _outlier_ratio(model, calib)
    assert (before > 10).all() and (after < before / 3).all()


def test_smoothing_beats_plain_w8a8_on_outliers(tiny):
    tok = tiny[1]
    base = _with_outliers(copy.deepcopy(tiny[0]))
    x = torch.tensor(tok((ASSETS / "data" / "test.txt").read_text()[:8000])["input_ids"][:256]).view(2, -1)
    with torch.no_grad():
        ref = base(x).logits.log_softmax(-1)
    plain = copy.deepcopy(base)
    for name, lin in decoder_linears(plain).items():
        set_module(plain, name, W8A8Linear.from_linear(lin))
    smooth = copy.deepcopy(base)
    stats = pocketlm.compress_(smooth, SmoothQuantConfig(), tok=tok, calib_samples=8, calib_len=64,
                               show_progress=False)[0]["stats"]
    assert stats["layers"] == 7 * base.config.num_hidden_layers
    assert sum(isinstance(m, W8A8Linear) for m in smooth.modules()) == stats["layers"]
    assert _kl(ref, smooth, x) < 0.2 * _kl(ref, plain, x)


def test_bad_settings(tiny):
    with pytest.raises(ConfigError, match="alpha must be in"):
        SmoothQuantConfig(alpha=1.5)
    model = copy.deepcopy(tiny[0])
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        pocketlm.compress_(model, SmoothQuantConfig())


@pytest.mark.parametrize("cfg", [SmoothQuantConfig(), SmoothQuantConfig(alpha=0.8, head=True)])
def test_smoothquant_artifact_reloads_bit_exactly(tmp_path, tiny, cfg):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    pocketlm.compress_(model, cfg, tok=tok, calib_samples=8, calib_len=64, show_progress=False)
    out = pocketlm.save(model, tok, tmp_path / "sq")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["modules"]["model.layers.0.self_attn.q_proj"] == {"type": "w8a8"}
    again, _ = pocketlm.load(out)
    x = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    assert isinstance(again.model.embed_tokens, QuantEmbedding) == cfg.head
