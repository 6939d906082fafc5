import copy

import pytest
import torch

import pocketlm
from pocketlm.compress import RTNConfig, compress_
from pocketlm.errors import ConfigError, UnsupportedModelError
from pocketlm.runtime import Generator, cpu_linear

from pocketlm.eval.data import DEFAULT_TEXT

TEXT = DEFAULT_TEXT.read_text()


def prompts(tok, n, chars=90):
    step = len(TEXT) // n
    return [tok(TEXT[i * step: i * step + chars + 7 * (i % 5)])["input_ids"] for i in range(n)]


def engine_greedy(gen, ids, n):
    return [int(t[0]) for t, _ in gen.generate_step([ids], n, stop_tokens=set())]


def quantized(tiny, bits, group=32):
    model = copy.deepcopy(tiny[0])
    if bits:
        compress_(model, RTNConfig(bits=bits, group_size=group, head=True), tok=tiny[1], show_progress=False)
    return model


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_native_logits_equal_the_eager_step(tiny, bits):
    """A padded batch, a row that forgets tokens (masked slots): every step's logits match eager's."""
    model, tok = quantized(tiny, bits), tiny[1]
    eager, native = Generator(model, tok), Generator(model, tok, native=True)
    assert native.path == "native" and eager.path == "eager"
    batch = prompts(tok, 3)
    runs = [g.start(batch, 24) for g in (eager, native)]
    for step in range(20):
        tokens, _ = runs[0].choose()
        for run in runs:
            if step == 8:
                run.forget(1, 3)
            run.advance(tokens)
        torch.testing.assert_close(runs[1].logits(), runs[0].logits(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_native_with_8_bit_activations_stays_close_to_the_eager_step(tiny, bits):
    """Integer dot products on 8-bit activations: not logits-equal, but within a few percent of them."""
    if not cpu_linear.kernels_built() or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("8-bit activations need an AVX2 build")
    model, tok = quantized(tiny, bits), tiny[1]
    eager = Generator(model, tok)
    fast = Generator(model, tok, native=True, native_activations="int8")
    assert fast.path in ("native, int8 activations (AVX-512 VNNI)", "native, int8 activations (AVX2)")
    runs = [g.start(prompts(tok, 2), 12) for g in (eager, fast)]
    for _ in range(8):
        tokens, _ = runs[0].choose()
        for run in runs:
            run.advance(tokens)
        want, got = runs[0].logits(), runs[1].logits()
        assert 0 < float((got - want).norm() / want.norm()) < 0.05
    with pytest.raises(ConfigError, match="unknown native activations"):
        Generator(model, tok, native=True, native_activations="int4")


def test_native_greedy_tokens_equal_eager_on_the_reasoner(reasoner):
    model, tok = reasoner
    eager, native = Generator(model, tok), Generator(model, tok, native=True)
    for ids in prompts(tok, 16):
        assert engine_greedy(native, ids, 12) == engine_greedy(eager, ids, 12)


def test_native_refuses_what_it_cannot_run(tiny):
    tok = tiny[1]
    with pytest.raises(UnsupportedModelError, match="int3 layer in torch's tiled layout"):
        Generator(quantized(tiny, 3), tok, native=True)
    moe, moe_tok = pocketlm.load("moe")
    with pytest.raises(UnsupportedModelError, match="no plain gated MLP"):
        Generator(moe, moe_tok, native=True)
    with pytest.raises(UnsupportedModelError, match="fp32 models on CPU"):
        Generator(copy.deepcopy(tiny[0]).to(torch.bfloat16), tok, native=True)
    with pytest.raises(ConfigError, match="two different paths"):
        Generator(tiny[0], tok, native=True, compile=True)


@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_native_layers_of_mixed_widths_prepare_each_input_for_its_own_kernel(tiny, activations):
    """q int4, k int8, v fp32 (and gate int8 beside up int4) read the same input: each kernel gets it
    in its own form, not the copy prepared for the previous width. o and down: int8 per group of 32."""
    from pocketlm.compress.quant.linear import QuantLinear
    from pocketlm.compress.quant.primitives import Scheme
    model, tok = quantized(tiny, 4), tiny[1]
    floats = tiny[0].model.layers[0]
    layer = model.model.layers[0]
    layer.self_attn.k_proj = QuantLinear.from_linear(floats.self_attn.k_proj, Scheme(8))
    layer.self_attn.v_proj = copy.deepcopy(floats.self_attn.v_proj)
    layer.mlp.gate_proj = QuantLinear.from_linear(floats.mlp.gate_proj, Scheme(8))
    layer.self_attn.o_proj = QuantLinear.from_linear(floats.self_attn.o_proj, Scheme(8, 32))
    layer.mlp.down_proj = QuantLinear.from_linear(floats.mlp.down_proj, Scheme(8, 32))
    eager = Generator(model, tok)
    native = Generator(model, tok, native=True, native_activations=activations)
    runs = [g.start(prompts(tok, 2), 6) for g in (eager, native)]
    tol = 2e-4 if activations == "fp32" else None
    for _ in range(4):
        tokens, _ = runs[0].choose()
        for run in runs:
            run.advance(tokens)
        want, got = runs[0].logits(), runs[1].logits()
        if tol:
            torch.testing.assert_close(got, want, atol=tol, rtol=1e-4)
        else:
            assert float((got - want).norm() / want.norm()) < 0.05
