import pytest
import torch
from torch import nn

from pocketlm.compress.quant.linear import QuantEmbedding, QuantLinear, W8A8Linear
from pocketlm.compress.quant.primitives import Scheme


@pytest.fixture(scope="module")
def lin():
    torch.manual_seed(0)
    return nn.Linear(256, 96, bias=True)


SCHEMES = [Scheme(8), Scheme(8, 32), Scheme(4, 32), Scheme(4, 128, sym=True), Scheme(3, 64)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kernel_equals_dequantized_matmul(lin, scheme):
    q = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(5, 256)
    ref = x @ q.dequantize().t() + lin.bias
    assert torch.allclose(q(x), ref, atol=2e-2, rtol=1e-2)
    assert (q.dequantize() - lin.weight).abs().max() < 0.6 * q.scales.float().max()


@pytest.mark.parametrize("in_features", [72, 100])
def test_int8_kernel_takes_widths_that_are_not_multiples_of_16(in_features):
    # pruned widths: torch's int8 kernel crashes the process on AVX-512 CPUs unless K is padded
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 40)
    q = QuantLinear.from_linear(lin, Scheme(8))
    x = torch.randn(64, in_features)
    assert torch.allclose(q(x), x @ q.dequantize().t() + lin.bias, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_is_the_portable_layout_and_reloads_bit_exactly(lin, scheme):
    q = QuantLinear.from_linear(lin, scheme)
    state = q.state_dict()
    assert set(state) == {"bias", "qweight", "scales"} | ({"zeros"} if scheme.bits != 8 else set())
    assert state["qweight"].shape == (96, {8: 256, 4: 128, 3: 96}[scheme.bits])
    shell = QuantLinear(256, 96, scheme, bias=True)
    shell.load_state_dict(state)
    x = torch.randn(3, 256)
    assert torch.equal(shell(x), q(x))
    assert torch.equal(shell.codes(), q.codes())


def test_grouped_int8_without_pocketlms_kernel_takes_the_dequantized_fallback(lin, monkeypatch):
    from pocketlm.runtime import cpu_linear
    q = QuantLinear.from_linear(lin, Scheme(8, 64))
    x = torch.randn(4, 256)
    fast = q(x)
    monkeypatch.setattr(cpu_linear, "qlinear8", lambda *a: None)  # a machine where it cannot be built
    assert torch.allclose(q(x), fast, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(8, 32)])
def test_embedding_rows_come_from_the_int8_table(lin, scheme):
    table = QuantLinear.from_linear(lin, scheme)
    emb = QuantEmbedding(table)
    ids = torch.tensor([[0, 5, 95]])
    assert torch.allclose(emb(ids)[0], table.dequantize()[ids[0]])
    assert list(emb.state_dict()) == []  # saved once, as the table's owner
    with pytest.raises(ValueError, match="int8"):
        QuantEmbedding(QuantLinear.from_linear(lin, Scheme(4, 32)))


def test_w8a8_matches_float_closely_and_quantizes_each_row_on_its_own(lin):
    m = W8A8Linear.from_linear(lin)
    x = torch.randn(4, 256)
    x[0] *= 100  # a row with outliers must not coarsen the other rows
    y, ref = m(x), lin(x)
    rel = ((y - ref).norm(dim=1) / ref.norm(dim=1))
    assert (rel < 0.02).all()
    assert torch.equal(m(x[1:]), y[1:])
