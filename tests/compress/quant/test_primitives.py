import pytest
import torch

from pocketlm.compress.quant import primitives as P
from pocketlm.compress.quant.primitives import Scheme


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_pack_unpack_round_trip(bits):
    lo, hi = P.CODES[bits]
    q = torch.randint(lo, hi + 1, (6, 64), dtype=torch.int32)
    packed = P.pack(q, bits)
    assert packed.shape == (6, P.packed_width(bits, 64))
    assert torch.equal(P.unpack(packed, bits, 64), q)


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 32), Scheme(4, 32, sym=True), Scheme(3, 64),
                                    Scheme(3, 64, sym=True)])
def test_rtn_error_is_within_half_a_step_and_codes_in_range(scheme):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    q, scale, zero = P.quantize_matrix(w, scheme)
    lo, hi = P.CODES[scheme.bits]
    assert q.min() >= lo and q.max() <= hi
    err = (P.dequantize_matrix(q, scale, zero, scheme.bits) - w).abs()
    step = scale.repeat_interleave(scheme.group(128), dim=1)
    assert (err <= 0.5 * step * 1.02 + 1e-6).all()  # bf16 parameters: a hair over half a step
    assert torch.equal(scale, scale.bfloat16().float()) and torch.equal(zero, zero.bfloat16().float())


def test_more_bits_and_smaller_groups_lower_the_error():
    torch.manual_seed(0)
    w = torch.randn(32, 256)

    def err(s):
        return (P.dequantize_matrix(*P.quantize_matrix(w, s), s.bits) - w).pow(2).mean()
    assert err(Scheme(8)) < err(Scheme(4, 32)) < err(Scheme(4, 128)) < err(Scheme(3, 128))
    assert err(Scheme(3, 32)) < err(Scheme(3, 128))


def test_int8_is_always_symmetric_per_channel_unless_grouped():
    s = Scheme(8, sym=False)
    assert s.sym and s.group_size is None and s.bits_per_weight(256) == 8 + 16 / 256
    g = Scheme(8, 32, sym=False)
    assert g.sym and g.group_size == 32 and g.bits_per_weight(256) == 8 + 16 / 32


def test_grouped_int8_keeps_a_q8_0_source_and_beats_per_channel_with_outliers():
    torch.manual_seed(0)
    # a Q8_0-like source: int8 codes times a bf16-exact scale per block of 32, blocks of very different size
    codes = torch.randint(-127, 128, (16, 128)).float()
    codes[:, ::32] = 127  # every block reaches the top code, as a Q8_0 block does
    scale = (torch.rand(16, 4) * 2 ** torch.randint(-8, 0, (16, 4)).float()).bfloat16().float()
    w = (codes.reshape(16, 4, 32) * scale[..., None]).reshape(16, 128)
    q, s, z = P.quantize_matrix(w, Scheme(8, 32))
    assert torch.equal(P.dequantize_matrix(q, s, z, 8), w)
    per_channel = P.dequantize_matrix(*P.quantize_matrix(w, Scheme(8)), 8)
    assert (per_channel - w).abs().max() > 0


@pytest.mark.parametrize("scheme", [Scheme(4, 32), Scheme(3, 32, sym=True)])
def test_range_search_never_rounds_worse_and_helps_heavy_tails(scheme):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 32))  # a few extreme weights per group

    def err(search):
        s, z = P.params(w, scheme, search)
        return (P.dequantize(P.quantize(w, s, z, scheme.bits), s, z, scheme.bits) - w).abs().pow(2.4).sum(-1)
    plain, searched = err(0), err(20)
    assert (searched <= plain + 1e-6).all()
    assert (searched < plain - 1e-6).float().mean() > 0.25  # many groups gain from a narrower range
