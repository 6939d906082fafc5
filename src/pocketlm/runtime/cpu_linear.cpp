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

#include "cpu_kernels.h"

namespace {
using namespace pocketlm;

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
  linear_f32(X, M, W, B, Y, K, N);
  return y;
}
}  // namespace

TORCH_LIBRARY(pocketlm_cpu, m) { m.def("linear(Tensor x, Tensor w, Tensor? b) -> Tensor"); }
TORCH_LIBRARY_IMPL(pocketlm_cpu, CPU, m) { m.impl("linear", linear); }
