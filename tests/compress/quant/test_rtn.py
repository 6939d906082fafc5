import copy

import pytest
import torch
from torch import nn

import pocketlm
from pocketlm.compress.quant import primitives as P
from pocketlm.compress.quant.linear import QuantLinear
from pocketlm.compress.quant.rtn import RTNConfig
from pocketlm.errors import ConfigError, UnsupportedModelError
from pocketlm.runtime import Generator


@pytest.fixture(scope="module")
def lin():
    torch.manual_seed(0)
    return nn.Linear(256, 96, bias=True)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 128)])
def test_kernel_equals_dequantized_matmul(lin, bits, group):
    q = QuantLinear.from_linear(lin, bits, group)
    x = torch.randn(5, 256)
    ref = x @ q.dequantize().t() + lin.bias
    assert torch.allclose(q(x), ref, atol=2e-2, rtol=1e-2)
    # and the dequantized weight is the RTN grid of the original
    w = lin.weight.detach()
    if bits == 8:
        expect = P.dequant_int8(*P.int8_per_channel(w))
    else:
        expect = P.dequant_int4(*P.int4_groupwise(w, group), group)
    assert torch.allclose(q.dequantize(), expect, atol=1e-2 * w.abs().max().item())


def test_int4_error_grows_with_group_size_and_int8_is_near_exact(lin):
    w = lin.weight.detach()
    errs = {g: (QuantLinear.from_linear(lin, 4, g).dequantize() - w).pow(2).mean() for g in (32, 128)}
    e8 = (QuantLinear.from_linear(lin, 8).dequantize() - w).pow(2).mean()
    assert e8 < errs[32] < errs[128]


def test_rtn_pass_quantizes_decoder_and_engine_matches_transformers(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    size = pocketlm.eval.efficiency.weight_bytes(model)
    stats = pocketlm.compress_(model, RTNConfig(bits=8), tok=tok)[0]["stats"]
    assert stats["layers"] == 7 * model.config.num_hidden_layers
    assert stats["linear_bytes_after"] < 0.3 * stats["linear_bytes_before"]
    assert pocketlm.eval.efficiency.weight_bytes(model) < size
    assert type(model.lm_head) is nn.Linear  # head and embeddings stay float
    x = torch.randint(0, 8192, (1, 24))
    ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                         min_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, 24:].tolist()
    ours = [int(t[0]) for t, _ in Generator(model, tok).generate_step([x[0].tolist()], 12, stop_tokens=set())]
    assert ours == ref
    compiled = Generator(model, tok, compile=True)  # the packed kernels also run inside the compiled step
    assert [int(t[0]) for t, _ in compiled.generate_step([x[0].tolist()], 12, stop_tokens=set())] == ref


def test_bad_settings_and_saving_is_refused(tmp_path, tiny):
    with pytest.raises(ConfigError, match="8 or 4 bits"):
        RTNConfig(bits=3)
    with pytest.raises(ConfigError, match="group size 48"):
        RTNConfig(bits=4, group_size=48)
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    with pytest.raises(ConfigError, match=r"does not divide input width\(s\) \[352\]"):
        pocketlm.compress_(model, RTNConfig(bits=4, group_size=128), tok=tok)  # tiny's MLP is 352 wide
    assert all(type(m) is not QuantLinear for m in model.modules())  # nothing changed
    pocketlm.compress_(model, RTNConfig(bits=4, group_size=32), tok=tok)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        pocketlm.save(model, tok, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_head_quantization_unties_and_keeps_the_embedding(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    emb = model.model.embed_tokens.weight.detach().clone()
    pocketlm.compress_(model, RTNConfig(bits=8, head=True), tok=tok)
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, emb)
    x = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        logits = model(x).logits
        ref = tiny[0](x).logits
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9  # int8 stays close
