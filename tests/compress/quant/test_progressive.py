import copy

import pytest
import torch

import pocketlm
from pocketlm.compress import GPTQConfig, ProgressiveConfig
from pocketlm.errors import ConfigError
from pocketlm.io import ASSETS

# 32 × 64 calibration tokens: with fewer (8 × 64) the re-fit overfits them and the KL on other text rises
CALIB = dict(calib_samples=32, calib_len=64, show_progress=False)


@pytest.fixture(scope="module")
def compressed(tiny):
    """Plain GPTQ and progressive GPTQ of tiny at 3 bits, group 32, and the progressive stats."""
    gptq, prog = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[0])
    pocketlm.compress_(gptq, GPTQConfig(bits=3, group_size=32), tok=tiny[1], **CALIB)
    stats = pocketlm.compress_(prog, ProgressiveConfig(bits=3, group_size=32), tok=tiny[1], **CALIB)[0]["stats"]
    return gptq, prog, stats


def test_refit_lowers_every_block_error_and_the_model_kl(tiny, compressed):
    gptq, prog, stats = compressed
    before, after = stats["block_mse_before"], stats["block_mse_after"]
    assert len(before) == len(after) == tiny[0].config.num_hidden_layers
    assert all(a <= b for a, b in zip(after, before))
    assert sum(a < 0.95 * b for a, b in zip(after, before)) >= 3
    # block 0 sees the same inputs in both runs: same codes, re-fitted scales
    q_g, q_p = gptq.model.layers[0].mlp.down_proj, prog.model.layers[0].mlp.down_proj
    assert torch.equal(q_g.codes(), q_p.codes()) and not torch.equal(q_g.scales, q_p.scales)
    tok = tiny[1]
    x = torch.tensor([tok((ASSETS / "data" / "test.txt").read_text()[:2000])["input_ids"][:128]])
    with torch.no_grad():
        ref = tiny[0](x).logits.log_softmax(-1)
        kl = {name: (ref.exp() * (ref - m(x).logits.log_softmax(-1))).sum(-1).mean().item()
              for name, m in (("gptq", gptq), ("prog", prog))}
    assert kl["prog"] <= kl["gptq"]


def test_progressive_artifact_reloads_bit_exactly(tmp_path, tiny, compressed):
    with pytest.raises(ConfigError, match="steps -1"):
        ProgressiveConfig(steps=-1)
    prog = compressed[1]
    again, _ = pocketlm.load(pocketlm.save(prog, tiny[1], tmp_path / "p"))
    x = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(x).logits, prog(x).logits)


def test_a_fit_that_does_not_help_is_undone(tiny):
    from pocketlm.compress.calibration import calibration_tokens, first_layer_inputs, run_layer
    from pocketlm.compress.quant.gptq import quantize_layer_
    from pocketlm.compress.quant.primitives import Scheme
    from pocketlm.compress.quant.progressive import refit_block_
    model = copy.deepcopy(tiny[0])
    x, kwargs = first_layer_inputs(model, calibration_tokens(tiny[1], samples=8, seq_len=32)[0])
    layer = model.model.layers[0]
    targets = run_layer(layer, x, kwargs)
    quantize_layer_(layer, x, kwargs, Scheme(3, 32))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    before, after = refit_block_(layer, x, targets, kwargs, steps=3, lr=1.0)  # a step far too large
    assert after == before
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
