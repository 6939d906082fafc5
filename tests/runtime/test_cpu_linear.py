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
