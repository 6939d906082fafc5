// pocketlm_cpu::qlinear8(x, q, s): x (.., K) fp32 times int8 weight codes q (N, K) with bf16 scales
// s (N, G), one per group of K/G inputs (G = 1: per output channel): y = x · (q · s)ᵀ in fp32.
// Up to 16 rows (decode batches, 8 per pass): codes streamed once and widened to fp32 in registers, each code
// row shared by every input row; the activations stay fp32 (torch's int8 kernel rounds them to
// bf16, which alone cost SmolLM2-135M +0.18% perplexity). More rows (prefill): codes dequantized
// a block of weight rows at a time, then sgemm. See cpu_linear.py for the build and measurements.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {
#ifdef __AVX512F__
constexpr int V = 16;  // lanes: one vector register
#else
constexpr int V = 8;   // AVX2
#endif
typedef float vf __attribute__((vector_size(V * sizeof(float))));

inline vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

// V int8 codes widened to fp32 (vpmovsxbd + vcvtdq2ps; the generic vector conversion goes scalar)
inline vf loadq(const int8_t* p) {
#ifdef __AVX512F__
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}

inline float bf16(const uint16_t* s) {
  uint32_t bits = uint32_t(*s) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

// Y[m, n] for weight rows n in [n0, n1), R rows at a time; per group the integer-weighted sums are
// scaled once (one FMA per lane), so a row needs one horizontal sum however many groups it has.
template <int M, int R>
void rows(const float* X, const int8_t* Q, const uint16_t* S, float* Y, int64_t K, int64_t G, int64_t N,
          int64_t n0, int64_t n1) {
  const int64_t g = K / G;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    vf total[M][R] = {};
    float tail[M][R] = {};
    for (int64_t gi = 0; gi < G; ++gi) {
      vf acc[M][R] = {};
      const int64_t k0 = gi * g, k1 = k0 + g;
      int64_t k = k0;
      for (; k + V <= k1; k += V) {
        vf w[R];
        for (int r = 0; r < R; ++r) {
          __builtin_prefetch(Q + (n + r) * K + k + 1024);
          w[r] = loadq(Q + (n + r) * K + k);
        }
        for (int m = 0; m < M; ++m) {
          vf x = loadf(X + m * K + k);
          for (int r = 0; r < R; ++r) acc[m][r] += w[r] * x;
        }
      }
      for (int r = 0; r < R; ++r) {
        const float s = bf16(S + (n + r) * G + gi);
        for (int m = 0; m < M; ++m) {
          total[m][r] += acc[m][r] * s;
          float t = 0;
          for (int64_t j = k; j < k1; ++j) t += X[m * K + j] * float(Q[(n + r) * K + j]);
          tail[m][r] += t * s;
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) Y[m * N + n + r] = hsum(total[m][r]) + tail[m][r];
  }
  if (n < n1) rows<M, 1>(X, Q, S, Y, K, G, N, n, n1);
}

template <int M>
void gemv(const float* X, const int8_t* Q, const uint16_t* S, float* Y, int64_t K, int64_t G, int64_t N) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);  // accumulators that stay in registers
  constexpr int64_t block = 16;                     // weight rows per work item
  at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    rows<M, R>(X, Q, S, Y, K, G, N, b0 * block, std::min(N, b1 * block));
  });
}

// Many rows: dequantize `block` weight rows to fp32, multiply, next block (bounded scratch memory).
at::Tensor prefill(const at::Tensor& x2, const at::Tensor& q, const at::Tensor& s) {
  const int64_t M = x2.size(0), K = q.size(1), N = q.size(0), G = s.size(1), g = K / G;
  const int64_t block = std::max<int64_t>(64, (1 << 20) / std::max<int64_t>(K, 1));
  at::Tensor y = at::empty({M, N}, x2.options());
  at::Tensor w = at::empty({std::min(block, N), K}, x2.options());
  const int8_t* Q = q.const_data_ptr<int8_t>();
  const uint16_t* S = reinterpret_cast<const uint16_t*>(s.const_data_ptr<at::BFloat16>());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    float* W = w.mutable_data_ptr<float>();
    at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n)
        for (int64_t k = 0; k < K; ++k) W[(n - n0) * K + k] = float(Q[n * K + k]) * bf16(S + n * G + k / g);
    });
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x2, w.narrow(0, 0, n1 - n0).t()));
  }
  return y;
}

at::Tensor qlinear8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "pocketlm_cpu::qlinear8 takes fp32 activations");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "qlinear8: codes are (N, K) int8");
  TORCH_CHECK(s.scalar_type() == at::kBFloat16 && s.dim() == 2 && s.size(0) == q.size(0) && s.is_contiguous(),
              "qlinear8: scales are (N, G) bf16");
  const int64_t K = q.size(1), N = q.size(0), G = s.size(1);
  TORCH_CHECK(x.size(-1) == K && G > 0 && K % G == 0, "qlinear8: input width or group count does not fit the codes");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  if (M > 16) return prefill(x2, q, s).view(shape);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* X = x2.const_data_ptr<float>();
  const int8_t* Q = q.const_data_ptr<int8_t>();
  const uint16_t* S = reinterpret_cast<const uint16_t*>(s.const_data_ptr<at::BFloat16>());
  float* Y = y.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; m += 8) {  // 9..16 rows: two passes of up to 8
    const float* Xm = X + m * K;
    float* Ym = Y + m * N;
    switch (std::min<int64_t>(8, M - m)) {
      case 1: gemv<1>(Xm, Q, S, Ym, K, G, N); break;
      case 2: gemv<2>(Xm, Q, S, Ym, K, G, N); break;
      case 3: gemv<3>(Xm, Q, S, Ym, K, G, N); break;
      case 4: gemv<4>(Xm, Q, S, Ym, K, G, N); break;
      case 5: gemv<5>(Xm, Q, S, Ym, K, G, N); break;
      case 6: gemv<6>(Xm, Q, S, Ym, K, G, N); break;
      case 7: gemv<7>(Xm, Q, S, Ym, K, G, N); break;
      default: gemv<8>(Xm, Q, S, Ym, K, G, N); break;
    }
  }
  return y.view(shape);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm_cpu, m) { m.def("qlinear8(Tensor x, Tensor q, Tensor s) -> Tensor"); }
TORCH_LIBRARY_IMPL(pocketlm_cpu, CPU, m) { m.impl("qlinear8", qlinear8); }
