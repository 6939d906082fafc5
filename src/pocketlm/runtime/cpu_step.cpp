// pocketlm_cpu.DecodeStep: one decode step of a Llama-family decoder as one native call: every
// layer's RMSNorms, q/k/v, rope, the KV-cache write, grouped attention over the static cache, o,
// the gated SiLU MLP, then the final norm and the LM head, with no Python or dispatcher between
// them. Linears run on cpu_kernels.h (fp32, int8, int4, fp32 activations: the same kernels as the
// eager path's). Built with the other CPU kernels; see native.py for what it takes and why.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace {
using namespace pocketlm;

struct Lin {  // one linear layer as the kernels take it
  int64_t bits = 32, N = 0, K = 0, G = 1;
  const float* W = nullptr;    // fp32 (N, K)
  const uint8_t* Q = nullptr;  // int8 (N, K) / int4 (N, K/2) codes
  const uint16_t* S = nullptr; // bf16 (N, G) scales
  const uint16_t* Z = nullptr; // int4: bf16 (N, G) zeros
  const float* bias = nullptr;
};

struct Scratch {  // per-call buffers of the linears' inputs
  float* f;        // M·K floats: int4 inputs reordered
  int8_t* q;       // M·K int8: 8-bit activations
  float* d;        // M·K/32 block scales
  float* sum;      // M·G group sums
  int64_t bits;    // the width the buffers were last prepared for (0: none)
};

Mat mat(const Lin& L) { return Mat{nullptr, L.Q, L.S, L.Z, L.K, L.G, L.N, L.bits == 8 ? L.K : L.K / 2}; }

void add_bias(const Lin& L, int64_t M, float* Y) {
  if (L.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < L.N; ++n) Y[m * L.N + n] += L.bias[n];
}

// Y (M, N) = X (M, K) · Wᵀ (+ bias); act8: int8/int4 weights take 8-bit activations (cpu_kernels.h).
// same_input: X is the previous call's input (k, v after q; up after gate), so its reordered or
// quantized copy is reused when that call's width was the same.
void run(const Lin& L, const float* X, int64_t M, float* Y, Scratch& sc, bool act8, bool same_input = false) {
  if (L.bits == 32) {
    for (int64_t m = 0; m < M; m += 8) linear_f32(X + m * L.K, std::min<int64_t>(8, M - m), L.W, L.bias, Y + m * L.N, L.K, L.N);
    sc.bits = 0;  // nothing prepared
    return;
  }
  const Mat A = mat(L);
  const bool prepared = same_input && sc.bits == L.bits;
  sc.bits = L.bits;
#ifdef __AVX2__
  if (act8) qlinear_rows_a8(int(L.bits), X, M, &A, &Y, 1, sc.q, sc.d, sc.sum, prepared);
  else
#endif
    qlinear_rows(int(L.bits), X, M, A, Y, sc.f, prepared);
  add_bias(L, M, Y);
}

// The linears of one input (q, k, v; gate, up): with 8-bit activations and one kernel for all of
// them, one quantization of X and one parallel region over all their rows; else one run each.
void run_all(const Lin* L, int count, const float* X, int64_t M, float* const* Y, Scratch& sc, bool act8) {
#ifdef __AVX2__
  bool fused = act8 && count <= kMaxMats;
  for (int i = 0; i < count; ++i) fused = fused && L[i].bits != 32 && L[i].bits == L[0].bits && L[i].G == L[0].G;
  if (fused) {
    Mat A[kMaxMats];
    for (int i = 0; i < count; ++i) A[i] = mat(L[i]);
    qlinear_rows_a8(int(L[0].bits), X, M, A, Y, count, sc.q, sc.d, sc.sum);
    sc.bits = L[0].bits;
    for (int i = 0; i < count; ++i) add_bias(L[i], M, Y[i]);
    return;
  }
#endif
  for (int i = 0; i < count; ++i) run(L[i], X, M, Y[i], sc, act8, i > 0);
}

// HF's RMSNorm in fp32: w · (x / sqrt(mean(x²) + eps))
void rms_norm(const float* x, const float* w, float* out, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * H;
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(xm[i]) * xm[i];
    const float r = 1.0f / std::sqrt(float(ss / H) + eps);
    for (int64_t i = 0; i < H; ++i) out[m * H + i] = w[i] * (xm[i] * r);
  }
}

// HF's rotate-half rope on each head of x (heads, hd) with the position's cos/sin rows
void rope(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  vf acc = {};
  int64_t i = 0;
  for (; i + V <= n; i += V) acc += loadf(a + i) * loadf(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

class DecodeStep : public torch::CustomClassHolder {
 public:
  // tensors: per layer [in_norm, post_norm] + 7 linears × [weight-or-codes, scales, zeros, bias], then
  // final norm, the head's 4, cos, sin, then the embedding table: fp32 (vocab, hidden), or int8 codes
  // and their bf16 (vocab, G) scales. meta: n_layers, n_heads, n_kv, head_dim, hidden, then per
  // linear (7 per layer, then the head) bits, N, K, G.
  // act8: int8/int4 linears quantize their inputs to 8 bits per block of 32 (integer dot products).
  DecodeStep(std::vector<at::Tensor> tensors, std::vector<int64_t> meta, double eps, double scale, bool act8)
      : t_(std::move(tensors)), eps_(float(eps)), scale_(float(scale)), act8_(act8) {
    TORCH_CHECK(!act8 || kAct8, "8-bit activations need AVX2");
    L_ = meta[0], H_ = meta[1], KV_ = meta[2], hd_ = meta[3], hidden_ = meta[4];
    size_t ti = 0, mi = 5;
    auto lin = [&]() {
      Lin l;
      l.bits = meta[mi], l.N = meta[mi + 1], l.K = meta[mi + 2], l.G = meta[mi + 3];
      mi += 4;
      const at::Tensor &a = t_[ti], &s = t_[ti + 1], &z = t_[ti + 2], &b = t_[ti + 3];
      ti += 4;
      if (l.bits == 32) l.W = a.const_data_ptr<float>();
      else l.Q = static_cast<const uint8_t*>(a.const_data_ptr());
      l.S = bf16_ptr(s), l.Z = bf16_ptr(z);
      l.bias = b.defined() && b.numel() ? b.const_data_ptr<float>() : nullptr;
      return l;
    };
    for (int64_t i = 0; i < L_; ++i) {
      norms_.push_back(t_[ti].const_data_ptr<float>());
      norms_.push_back(t_[ti + 1].const_data_ptr<float>());
      ti += 2;
      for (int j = 0; j < 7; ++j) lins_.push_back(lin());
    }
    final_norm_ = t_[ti++].const_data_ptr<float>();
    widest_ = hidden_;
    for (const Lin& l : lins_) widest_ = std::max({widest_, l.N, l.K});
    head_ = lin();
    cos_ = t_[ti].const_data_ptr<float>(), sin_ = t_[ti + 1].const_data_ptr<float>();
    embed_ = t_[ti + 2], embed_scales_ = t_[ti + 3];
    TORCH_CHECK(embed_.dim() == 2 && embed_.size(1) == hidden_ && embed_.is_contiguous() &&
                    (embed_.scalar_type() == at::kFloat || (embed_.scalar_type() == at::kChar && embed_scales_.numel())),
                "DecodeStep: the embedding is an fp32 table or int8 codes with their scales");
  }

  // x (B, hidden): the embedding rows of `tokens` (int8: codes · their row's or group's scale)
  void embed(const int64_t* tokens, int64_t B, float* x) const {
    const int64_t V = embed_.size(0), D = hidden_;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t id = tokens[b];
      TORCH_CHECK(id >= 0 && id < V, "DecodeStep: token id ", id, " outside the vocabulary of ", V);
      if (embed_.scalar_type() == at::kFloat) {
        std::memcpy(x + b * D, embed_.const_data_ptr<float>() + id * D, D * sizeof(float));
        continue;
      }
      const int8_t* q = embed_.const_data_ptr<int8_t>() + id * D;
      const int64_t G = embed_scales_.size(1), g = D / G;
      const uint16_t* sc = bf16_ptr(embed_scales_) + id * G;
      for (int64_t k = 0; k < D; ++k) x[b * D + k] = float(q[k]) * bf16(sc + k / g);
    }
  }

  // tokens (B,) token ids; pos (B,) rope positions; row b's new key/value goes to cache
  // slot slots[b]. Row b attends to the slots t ≤ max(slots) where valid[b, t] is set, or, with an
  // empty `valid` (continuous batching: each row at its own length), to t ≤ slots[b].
  // Returns logits (B, vocab).
  at::Tensor step(at::Tensor tokens, at::Tensor pos, at::Tensor slots, std::vector<at::Tensor> keys,
                  std::vector<at::Tensor> values, at::Tensor valid) {
    TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.dim() == 1,
                "DecodeStep: tokens is (B,) int64");
    TORCH_CHECK(int64_t(keys.size()) == L_ && int64_t(values.size()) == L_, "DecodeStep: one cache per layer");
    const int64_t B = tokens.size(0), S = keys[0].size(2);
    TORCH_CHECK(pos.numel() == B && slots.numel() == B && pos.is_contiguous() && slots.is_contiguous(),
                "DecodeStep: one position and one slot per row");
    for (int64_t i = 0; i < L_; ++i)
      TORCH_CHECK(keys[i].is_contiguous() && values[i].is_contiguous() && keys[i].size(0) == B,
                  "DecodeStep: the caches are contiguous (B, kv heads, slots, head dim)");
    const int64_t* slot = slots.const_data_ptr<int64_t>();
    int64_t kv_len = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(slot[b] >= 0 && slot[b] < S, "DecodeStep: slot outside the cache");
      kv_len = std::max(kv_len, slot[b] + 1);
    }
    const bool* ok = valid.numel() ? valid.const_data_ptr<bool>() : nullptr;
    TORCH_CHECK(!ok || (valid.dim() == 2 && valid.size(0) == B && valid.size(1) == S && valid.is_contiguous()),
                "DecodeStep: valid is (B, slots)");
    const int64_t widest = widest_;
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor work = at::empty({6, B, widest}, f32);
    at::Tensor q8 = at::empty({B * widest + 64}, f32.dtype(at::kChar));
    at::Tensor d8 = at::empty({2, B * widest / 32 + 16}, f32);
    at::Tensor probs = at::empty({B * H_, kv_len}, f32);
    float* h = work[0].data_ptr<float>();
    float* q = work[1].data_ptr<float>();
    float* k = work[2].data_ptr<float>();
    float* v = work[3].data_ptr<float>();
    float* a = work[4].data_ptr<float>();
    Scratch scratch{work[5].data_ptr<float>(), q8.data_ptr<int8_t>(), d8[0].data_ptr<float>(),
                    d8[1].data_ptr<float>(), 0};
    at::Tensor out = at::empty({B, hidden_}, f32);
    float* X = out.data_ptr<float>();
    embed(tokens.const_data_ptr<int64_t>(), B, X);
    const int64_t* P = pos.const_data_ptr<int64_t>();
    const int64_t D = hidden_, qd = H_ * hd_, kd = KV_ * hd_;
    for (int64_t i = 0; i < L_; ++i) {
      const Lin* w = &lins_[7 * i];  // q, k, v, o, gate, up, down
      rms_norm(X, norms_[2 * i], h, B, D, eps_);
      float* qkv[3] = {q, k, v};
      run_all(w, 3, h, B, qkv, scratch, act8_);
      float* Kc = keys[i].data_ptr<float>();
      float* Vc = values[i].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        rope(q + b * qd, H_, hd_, cos_ + P[b] * hd_, sin_ + P[b] * hd_);
        rope(k + b * kd, KV_, hd_, cos_ + P[b] * hd_, sin_ + P[b] * hd_);
        for (int64_t kh = 0; kh < KV_; ++kh) {
          std::memcpy(Kc + ((b * KV_ + kh) * S + slot[b]) * hd_, k + b * kd + kh * hd_, hd_ * sizeof(float));
          std::memcpy(Vc + ((b * KV_ + kh) * S + slot[b]) * hd_, v + b * kd + kh * hd_, hd_ * sizeof(float));
        }
      }
      float* pr = probs.data_ptr<float>();
      at::parallel_for(0, B * KV_, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) attend(r, q, Kc, Vc, ok, slot, pr, a, S, kv_len);
      });
      run(w[3], a, B, h, scratch, act8_);
      for (int64_t j = 0; j < B * D; ++j) X[j] += h[j];
      rms_norm(X, norms_[2 * i + 1], h, B, D, eps_);
      const int64_t I = w[4].N;
      float* gate_up[2] = {q, k};
      run_all(w + 4, 2, h, B, gate_up, scratch, act8_);
      for (int64_t j = 0; j < B * I; ++j) a[j] = q[j] / (1.0f + std::exp(-q[j])) * k[j];
      run(w[6], a, B, h, scratch, act8_);
      for (int64_t j = 0; j < B * D; ++j) X[j] += h[j];
    }
    rms_norm(X, final_norm_, h, B, D, eps_);
    at::Tensor logits = at::empty({B, head_.N}, f32);
    run(head_, h, B, logits.data_ptr<float>(), scratch, act8_);
    return logits;
  }

 private:
  // the query heads of KV head r = b·KV + kh over its slots, together: each key and value row is read
  // once for all of them (grouped-query attention). Writes a[b, qh·hd : (qh+1)·hd] of those heads,
  // using p[(b·H + qh)·kv_len + t] for the weights.
  void attend(int64_t r, const float* q, const float* Kc, const float* Vc, const bool* ok, const int64_t* slot,
              float* p, float* a, int64_t S, int64_t kv_len) const {
    const int64_t b = r / KV_, kh = r % KV_, n = H_ / KV_, qh0 = kh * n;
    const float* Kb = Kc + (b * KV_ + kh) * S * hd_;
    const float* Vb = Vc + (b * KV_ + kh) * S * hd_;
    const float* qv = q + b * H_ * hd_ + qh0 * hd_;
    float* pb = p + (b * H_ + qh0) * kv_len;
    float* out = a + b * H_ * hd_ + qh0 * hd_;
    constexpr float inf = std::numeric_limits<float>::infinity();
    std::vector<float> best(n, -inf), total(n, 0.f);
    for (int64_t t = 0; t < kv_len; ++t) {
      const bool skip = ok ? !ok[b * S + t] : t > slot[b];
      for (int64_t j = 0; j < n; ++j) {
        float& s = pb[j * kv_len + t];
        s = skip ? -inf : dot(qv + j * hd_, Kb + t * hd_, hd_) * scale_;
        best[j] = std::max(best[j], s);
      }
    }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t t = 0; t < kv_len; ++t) {
        float& s = pb[j * kv_len + t];
        total[j] += (s = std::isinf(s) ? 0.f : std::exp(s - best[j]));
      }
    std::fill(out, out + n * hd_, 0.f);
    for (int64_t t = 0; t < kv_len; ++t)
      for (int64_t j = 0; j < n; ++j) {
        const float w = pb[j * kv_len + t];
        if (w == 0.f) continue;
        const float wn = w / total[j];
        for (int64_t d = 0; d < hd_; ++d) out[j * hd_ + d] += wn * Vb[t * hd_ + d];
      }
  }

  std::vector<at::Tensor> t_;  // keeps every weight alive
  at::Tensor embed_, embed_scales_;
  std::vector<const float*> norms_;
  std::vector<Lin> lins_;
  Lin head_;
  const float *final_norm_ = nullptr, *cos_ = nullptr, *sin_ = nullptr;
  int64_t L_ = 0, H_ = 0, KV_ = 0, hd_ = 0, hidden_ = 0, widest_ = 0;  // widest: of any linear's in/out
  float eps_, scale_;
  bool act8_;
};
}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm_cpu, m) {
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double, double, bool>())
      .def("step", &DecodeStep::step);
}
