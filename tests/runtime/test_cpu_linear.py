import pytest
import torch
import torch.nn.functional as F

from pocketlm.runtime import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(torch.zeros(1)), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 40])  # 9 and 40 rows: the oneDNN branch
@pytest.mark.parametrize("k, n", [(64, 48), (100, 37), (8, 5)])  # tails in K (not x16) and in N (not xR)
def test_kernel_equals_f_linear(rows, k, n):
    cpu_linear.build_kernel()
    torch.manual_seed(rows * k + n)
    x, w, b = torch.randn(rows, 1, k), torch.randn(n, k), torch.randn(n)
    for bias in (None, b):
        want = F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()
        got = torch.ops.pocketlm_cpu.linear(x, w, bias)
        assert got.shape == (rows, 1, n)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cpu_linear.linear(x, w, bias), want, atol=1e-4, rtol=1e-4)  # eager


@pytest.mark.parametrize("n, op", [(cpu_linear.ONEDNN_MIN_WEIGHTS // 64, "mkldnn::_linear_pointwise"), (16, "aten::addmm")])
def test_eager_picks_onednn_for_large_weights_only(n, op):
    """Eager steps send large weights to oneDNN and small ones to F.linear, where oneDNN's call costs more."""
    x, w, b = torch.randn(2, 64), torch.randn(n, 64), torch.randn(n)
    with torch.profiler.profile() as prof:
        got = cpu_linear.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    names = {e.key for e in prof.key_averages()}
    assert op in names and ("mkldnn::_linear_pointwise" in names) == (op.startswith("mkldnn"))


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 11, 16, 17, 40])  # 17 and 40 rows: the dequantize-then-sgemm branch
@pytest.mark.parametrize("k, n, groups", [(64, 48, 1), (100, 37, 1), (96, 21, 3), (8, 5, 1)])  # tails in K and N
def test_int8_kernel_equals_dequantized_weights_in_fp32(rows, k, n, groups):
    cpu_linear.build_kernel()
    torch.manual_seed(rows * k + n)
    x = torch.randn(rows, 1, k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = (torch.rand(n, groups) / 50).to(torch.bfloat16)
    w = (q.double().reshape(n, groups, -1) * s.double()[..., None]).reshape(n, k)
    got = cpu_linear.qlinear8(x, q, s)
    assert got.shape == (rows, 1, n)
    # fp32 activations: within fp32 rounding of the exact product (bf16 activations miss by ~1e-2)
    torch.testing.assert_close(got.double(), x.double() @ w.t(), atol=1e-4, rtol=1e-4)


def test_int8_layers_keep_fp32_activations():
    """A QuantLinear int8 layer computes with its dequantized weight and the fp32 input, not a bf16 copy."""
    from pocketlm.compress.quant.linear import QuantLinear
    from pocketlm.compress.quant.primitives import Scheme
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    q = QuantLinear.from_linear(lin, Scheme(8))
    x = torch.randn(3, 256)
    want = F.linear(x.double(), q.dequantize().double(), lin.bias.double()).float()
    torch.testing.assert_close(q(x), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(q(x.repeat(10, 1)), want.repeat(10, 1), atol=2e-5, rtol=2e-5)  # prefill rows


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17])
@pytest.mark.parametrize("k, n, groups", [(64, 48, 2), (96, 37, 1), (256, 21, 4)])  # N tails; one group per row
def test_int4_kernel_equals_dequantized_weights_in_fp32(rows, k, n, groups):
    from pocketlm.compress.quant import primitives as P
    cpu_linear.build_kernel()
    torch.manual_seed(rows * k + n)
    x = torch.randn(rows, k)
    codes = torch.randint(0, 16, (n, k))
    s = (torch.rand(n, groups) / 50).to(torch.bfloat16)
    z = (torch.randn(n, groups) / 50).to(torch.bfloat16)
    w = P.dequantize_matrix(codes, s.float(), z.float(), 4).double()
    got = torch.ops.pocketlm_cpu.qlinear4(x, P.pack(codes, 4), s, z)
    torch.testing.assert_close(got.double(), x.double() @ w.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (3, 32)])
def test_int4_layers_keep_fp32_activations_int3_keeps_torchs_kernel(bits, group):
    from pocketlm.compress.quant.linear import QuantLinear
    from pocketlm.compress.quant.primitives import Scheme
    torch.manual_seed(bits)
    lin = torch.nn.Linear(256, 64)
    q = QuantLinear.from_linear(lin, Scheme(bits, group))
    assert q.tiled == (bits == 3)
    x = torch.randn(3, 256)
    want = F.linear(x.double(), q.dequantize().double(), lin.bias.double()).float()
    tol = 2e-2 if bits == 3 else 2e-5  # torch's kernel: bf16 activations
    torch.testing.assert_close(q(x), want, atol=tol, rtol=tol)
    sd = q.state_dict()  # saved codes are the portable layout either way
    assert sd["qweight"].shape == (64, 256 * bits // 8)


def _a8_reference(x, q, s, z, bits):
    """What the 8-bit-activation kernels compute, in float64: x quantized per block of 32 (round half to
    even, scale max|x|/127), times the dequantized codes; int4's zero term on the exact fp32 x."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)  # codes rounded from fp32 products, as the kernel does
    codes8 = torch.where(amax > 0, torch.round(blocks * (127 / amax)), 0)
    xq = (codes8.double() * (amax / 127).double()).view(M, K)
    scale = s.double().repeat_interleave(K // s.shape[1], 1)
    if bits == 8:
        return xq @ (q.double() * scale).t()
    codes = torch.stack([q & 15, q >> 4], -1).view(q.shape[0], K).double()
    zero = z.double().repeat_interleave(K // s.shape[1], 1)
    return xq @ (codes * scale).t() + x.double() @ (zero - 8 * scale).t()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize("bits, k, group", [(8, 576, None), (8, 96, 32), (8, 608, 32), (8, 1536, 64), (8, 256, 128),
                                            (4, 576, 64), (4, 96, 32), (4, 384, 96), (4, 608, 32), (4, 256, 128),
                                            (4, 256, None)])
def test_8_bit_activation_kernel_equals_its_arithmetic_in_float64(rows, bits, k, group):
    """Every load shape of the integer kernels: K tails past the last full code load (576, 608, 96), one
    to four weight groups per load, groups across loads (96), one scale per row, N tails (37 rows)."""
    if not cpu_linear.kernels_built() or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("8-bit activations need an AVX2 build")
    torch.manual_seed(rows * k + bits)
    n, groups = 37, k // (group or k)
    x = torch.randn(rows, k)
    x[0, 5] = 30.0  # an outlier coarsens one block only
    if bits == 8:
        q, z = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.empty(0)
    else:
        q, z = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.randn(n, groups).bfloat16()
    s = (torch.rand(n, groups) + 0.1).bfloat16()
    want = _a8_reference(x, q, s, z, bits)
    got = torch.ops.pocketlm_cpu.qlinear_a8(x, q, s, z).double()
    assert float((got - want).abs().max() / want.abs().max()) < 2e-5
