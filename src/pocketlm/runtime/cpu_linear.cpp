// pocketlm_cpu::linear(x, w, b): F.linear for fp32 on CPU, for the engine's compiled decode steps.
// Up to 8 rows (decode batches): a weight-streaming GEMV/GEMM-by-rows, each weight row read once
// and shared by every input row; more rows (prefill): oneDNN's linear on the same plain weights.
// See cpu_linear.py for why this exists and what it measured.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {
constexpr int V = 16;  // floats per vector: one AVX-512 register; the compiler splits it where narrower
typedef float vf __attribute__((vector_size(V * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));  // unaligned load
  return v;
}

inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

// Y[m, n] = X[m, :] . W[n, :] (+ B[n]) for weight rows n in [n0, n1); R rows at a time share each x load.
template <int M, int R>
void rows(const float* X, const float* W, const float* B, float* Y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    vf acc[M][R] = {};
    int64_t k = 0;
    for (; k + V <= K; k += V) {
      vf w[R];
      for (int r = 0; r < R; ++r) {
        // 4 KB ahead of each stream (past a short row: into the next rows): ~1.5x at 8 rows on small
        __builtin_prefetch(W + (n + r) * K + k + 1024);
        w[r] = load(W + (n + r) * K + k);
      }
      for (int m = 0; m < M; ++m) {
        vf x = load(X + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] += w[r] * x;
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[m][r]);
        for (int64_t t = k; t < K; ++t) s += X[m * K + t] * W[(n + r) * K + t];
        Y[m * N + n + r] = s + (B ? B[n + r] : 0.f);
      }
  }
  if (n < n1) rows<M, 1>(X, W, B, Y, K, N, n, n1);
}

template <int M>
void gemm_rows(const float* X, const float* W, const float* B, float* Y, int64_t K, int64_t N) {
  // Independent accumulators: enough to hide FMA latency, few enough to stay in registers.
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  constexpr int64_t block = 16;  // weight rows per work item
  at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    rows<M, R>(X, W, B, Y, K, N, b0 * block, std::min(N, b1 * block));
  });
}

at::Tensor onednn(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                        c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "pocketlm_cpu::linear takes fp32");
  const int64_t K = x.size(-1), N = w.size(0), M = K ? x.numel() / K : 0;
  TORCH_CHECK(w.dim() == 2 && w.size(1) == K, "pocketlm_cpu::linear: weight is not (out, in)");
  if (M == 0 || M > 8 || !x.is_contiguous() || !w.is_contiguous() || (b.has_value() && !b->is_contiguous()))
    return onednn(x, w, b);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const float* X = x.const_data_ptr<float>();
  const float* W = w.const_data_ptr<float>();
  const float* B = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  float* Y = y.mutable_data_ptr<float>();
  switch (M) {
    case 1: gemm_rows<1>(X, W, B, Y, K, N); break;
    case 2: gemm_rows<2>(X, W, B, Y, K, N); break;
    case 3: gemm_rows<3>(X, W, B, Y, K, N); break;
    case 4: gemm_rows<4>(X, W, B, Y, K, N); break;
    case 5: gemm_rows<5>(X, W, B, Y, K, N); break;
    case 6: gemm_rows<6>(X, W, B, Y, K, N); break;
    case 7: gemm_rows<7>(X, W, B, Y, K, N); break;
    default: gemm_rows<8>(X, W, B, Y, K, N); break;
  }
  return y;
}
}  // namespace

TORCH_LIBRARY(pocketlm_cpu, m) { m.def("linear(Tensor x, Tensor w, Tensor? b) -> Tensor"); }
TORCH_LIBRARY_IMPL(pocketlm_cpu, CPU, m) { m.impl("linear", linear); }
