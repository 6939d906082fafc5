// Weight-only quantized linears for CPU with fp32 activations: y = x · Wᵀ, W dequantized in registers.
//   pocketlm_cpu::qlinear8(x, q, s):    q (N, K) int8 codes, s (N, G) bf16 scales: w = q · s
//   pocketlm_cpu::qlinear4(x, q, s, z): q (N, K/2) uint8, two codes per byte (low nibble first), s and
//                                       z (N, G) bf16: w = (q − 8) · s + z (primitives.py's layout)
// G groups of K/G inputs per row (G = 1: per output channel). Up to 16 rows (decode batches, 8 per
// pass): codes streamed once and widened to fp32 in registers, each code row shared by every input
// row. torch's int8/int4 kernels round the activations to bf16, which alone cost SmolLM2-135M
// +0.18% perplexity at int8. More rows (prefill): a block of weight rows dequantized, then sgemm.
// See cpu_linear.py for the build and measurements.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {
using namespace pocketlm;

// Weight row n as fp32, V codes at a time (groups are whole vectors: g is a multiple of 2V for int4,
// of 32 or the whole row for int8); int4 even inputs are the low nibbles.
template <int BITS>
void dequantize_row(const Mat& A, int64_t n, int64_t g, float* out) {
  const uint8_t* q = A.Q + n * A.stride;
  int64_t k = 0;
  for (int64_t gi = 0; gi < A.G; ++gi) {
    const float s = bf16(A.S + n * A.G + gi);
    const int64_t end = (gi + 1) * g;
    if constexpr (BITS == 8) {
      for (; k + V <= end; k += V) {
        const vf w = load8(q + k) * s;
        std::memcpy(out + k, &w, sizeof w);
      }
      for (; k < end; ++k) out[k] = float(int8_t(q[k])) * s;
    } else {
      const vf off = vf{} + (bf16(A.Z + n * A.G + gi) - 8 * s);
      for (; k < end; k += 2 * V) {
        vf lo, hi;
        load4(q + k / 2, lo, hi);
        lo = lo * s + off, hi = hi * s + off;
        for (int j = 0; j < V; ++j) out[k + 2 * j] = lo[j], out[k + 2 * j + 1] = hi[j];
      }
    }
  }
}

// Many rows: dequantize `block` weight rows to fp32, multiply, next block (bounded scratch memory;
// a matrix of one block is multiplied straight into the result).
template <int BITS>
at::Tensor prefill(const at::Tensor& x2, const Mat& A) {
  const int64_t M = x2.size(0), K = A.K, N = A.N, g = A.K / A.G;
  const int64_t block = std::min(N, std::max<int64_t>(64, (1 << 20) / std::max<int64_t>(K, 1)));
  at::Tensor w = at::empty({block, K}, x2.options());
  float* W = w.mutable_data_ptr<float>();
  at::Tensor y = block < N ? at::empty({M, N}, x2.options()) : at::Tensor();
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) dequantize_row<BITS>(A, n, g, W + (n - n0) * K);
    });
    if (block == N) return at::mm(x2, w.t());
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x2, w.narrow(0, 0, n1 - n0).t()));
  }
  return y;
}

void check_params(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pocketlm_cpu::qlinear takes fp32 activations");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous(), "qlinear: codes are a contiguous (N, bytes per row) matrix");
  TORCH_CHECK(s.scalar_type() == at::kBFloat16 && s.dim() == 2 && s.size(0) == q.size(0) && s.is_contiguous(),
              "qlinear: scales are (N, G) bf16");
  TORCH_CHECK(x.size(-1) == K && s.size(1) > 0 && K % s.size(1) == 0,
              "qlinear: input width or group count does not fit the codes");
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

at::Tensor qlinear8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "qlinear8: codes are int8");
  const int64_t K = q.size(1), N = q.size(0);
  check_params(x, q, s, K);
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  Mat A{x2.const_data_ptr<float>(), reinterpret_cast<const uint8_t*>(q.const_data_ptr<int8_t>()),
        bf16_ptr(s), nullptr, K, s.size(1), N, K};
  if (M > 16) return prefill<8>(x2, A).view(out_shape(x, N));
  at::Tensor y = at::empty({M, N}, x.options());
  qgemv(8, A, M, y.mutable_data_ptr<float>());
  return y.view(out_shape(x, N));
}

at::Tensor qlinear4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "qlinear4: codes are uint8, two per byte");
  const int64_t K = q.size(1) * 2, N = q.size(0), G = s.size(1);
  check_params(x, q, s, K);
  TORCH_CHECK(z.sizes() == s.sizes() && z.scalar_type() == at::kBFloat16 && z.is_contiguous(),
              "qlinear4: zeros are (N, G) bf16 like the scales");
  TORCH_CHECK((K / G) % (2 * V) == 0, "qlinear4: the group size must be a multiple of ", 2 * V);
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  Mat A{x2.const_data_ptr<float>(), q.const_data_ptr<uint8_t>(), bf16_ptr(s), bf16_ptr(z), K, G, N, K / 2};
  if (M > 16) return prefill<4>(x2, A).view(out_shape(x, N));
  at::Tensor xp = at::empty_like(x2), y = at::empty({M, N}, x.options());
  qlinear_rows(4, x2.const_data_ptr<float>(), M, A, y.mutable_data_ptr<float>(), xp.mutable_data_ptr<float>());
  return y.view(out_shape(x, N));
}
// The same product with 8-bit activations (quantize_act8), for tests and measurements; z empty for int8.
at::Tensor qlinear_a8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(kAct8, "qlinear_a8 needs AVX2");
  const int64_t bits = q.scalar_type() == at::kChar ? 8 : 4;
  const int64_t K = bits == 8 ? q.size(1) : q.size(1) * 2, N = q.size(0), G = s.size(1);
  check_params(x, q, s, K);
  TORCH_CHECK(K % 32 == 0 && (K / G) % 32 == 0, "qlinear_a8: groups of whole 32-input blocks");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, K / 32}, x.options()), sum = at::empty({M, G}, x.options());
#ifdef __AVX2__
  Mat A{nullptr, static_cast<const uint8_t*>(q.const_data_ptr()), bf16_ptr(s), bf16_ptr(z), K, G, N,
        bits == 8 ? K : K / 2};
  at::Tensor y = at::empty({M, N}, x.options());
  float* Y = y.mutable_data_ptr<float>();
  qlinear_rows_a8(int(bits), x2.const_data_ptr<float>(), M, &A, &Y, 1, xq.mutable_data_ptr<int8_t>(),
                  d.mutable_data_ptr<float>(), sum.mutable_data_ptr<float>());
  return y.view(out_shape(x, N));
#else
  return at::Tensor();
#endif
}

// Which integer dot products 8-bit activations run on in this build: 2 AVX-512 VNNI, 1 AVX2, 0 none.
int64_t act8_kernel() {
#if defined(POCKETLM_VNNI)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm_cpu, m) {
  m.def("act8_kernel() -> int", act8_kernel);
  m.def("qlinear8(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("qlinear4(Tensor x, Tensor q, Tensor s, Tensor z) -> Tensor");
  m.def("qlinear_a8(Tensor x, Tensor q, Tensor s, Tensor z) -> Tensor");
}
TORCH_LIBRARY_IMPL(pocketlm_cpu, CPU, m) {
  m.impl("qlinear8", qlinear8);
  m.impl("qlinear4", qlinear4);
  m.impl("qlinear_a8", qlinear_a8);
}
