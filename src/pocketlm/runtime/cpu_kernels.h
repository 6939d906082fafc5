// Decode-size matrix products with fp32 activations: weight-only int8/int4 (the qlinear ops,
// cpu_qlinear.cpp, which describes the layouts) and fp32 (pocketlm_cpu::linear, cpu_linear.cpp),
// shared with the native decode step (cpu_step.cpp).
#pragma once
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace pocketlm {
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
inline vf load8(const uint8_t* p) {
#ifdef __AVX512F__
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}

// V bytes → the V low-nibble codes (even inputs) and the V high-nibble codes (odd inputs), as fp32
inline void load4(const uint8_t* p, vf& lo, vf& hi) {
#ifdef __AVX512F__
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#else
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
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

struct Mat {  // one quantized weight and its input
  const float* X;     // (M, K); int4: each run of 2V inputs reordered evens first, then odds
  const uint8_t* Q;   // codes, row stride `stride` bytes
  const uint16_t* S;  // (N, G) bf16 scales
  const uint16_t* Z;  // int4: (N, G) bf16 zeros
  int64_t K, G, N, stride;
};

// Y[m, n] for weight rows n in [n0, n1), R rows at a time. Codes are dequantized in registers (one
// multiply, or FMA with the zero, per code vector, shared by the M input rows), so the accumulators
// are M x R vectors only: AVX2 has 16 registers.
// ROW_SCALE (int8 with one scale per row): codes are summed as they are and the row's sum scaled once,
// one multiply per code vector fewer (~20% of the instructions at batch 1).
template <int BITS, int M, int R, bool ROW_SCALE = false>
void rows(const Mat& A, float* Y, int64_t n0, int64_t n1) {
  constexpr int STEP = BITS == 8 ? V : 2 * V;  // inputs per iteration
  const int64_t g = A.K / A.G;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    vf acc[M][R] = {};
    float tail[M][R] = {};  // int8: inputs past the last full vector (int4 groups are whole vectors)
    for (int64_t gi = 0; gi < A.G; ++gi) {
      vf s[R], off[R];
      for (int r = 0; r < R; ++r) {
        const float sc = bf16(A.S + (n + r) * A.G + gi);
        s[r] = vf{} + sc;
        off[r] = vf{} + (BITS == 8 ? 0.f : bf16(A.Z + (n + r) * A.G + gi) - 8 * sc);
      }
      const int64_t k0 = gi * g, k1 = k0 + g;
      int64_t k = k0;
      for (; k + STEP <= k1; k += STEP) {
        vf lo[R], hi[R];
        for (int r = 0; r < R; ++r) {
          const uint8_t* q = A.Q + (n + r) * A.stride + k * BITS / 8;
          __builtin_prefetch(q + 1024);
          if constexpr (ROW_SCALE) {
            lo[r] = load8(q);
          } else if constexpr (BITS == 8) {
            lo[r] = load8(q) * s[r];
          } else {
            load4(q, lo[r], hi[r]);
            lo[r] = lo[r] * s[r] + off[r];
            hi[r] = hi[r] * s[r] + off[r];
          }
        }
        for (int m = 0; m < M; ++m) {
          const vf x = loadf(A.X + m * A.K + k);
          if constexpr (BITS == 8) {
            for (int r = 0; r < R; ++r) acc[m][r] += lo[r] * x;
          } else {
            const vf x2 = loadf(A.X + m * A.K + k + V);
            for (int r = 0; r < R; ++r) acc[m][r] += lo[r] * x + hi[r] * x2;
          }
        }
      }
      if constexpr (BITS == 8)
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < M; ++m)
            for (int64_t j = k; j < k1; ++j)
              tail[m][r] += A.X[m * A.K + j] * float(int8_t(A.Q[(n + r) * A.stride + j])) * (ROW_SCALE ? 1.f : s[r][0]);
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        const float y = hsum(acc[m][r]) + tail[m][r];
        Y[m * A.N + n + r] = ROW_SCALE ? y * bf16(A.S + (n + r)) : y;
      }
  }
  if (n < n1) rows<BITS, M, 1, ROW_SCALE>(A, Y, n, n1);
}

template <int BITS, int M>
void gemv(const Mat& A, float* Y) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);  // accumulators that stay in registers
  constexpr int64_t block = 16;                     // weight rows per work item
  const bool row_scale = BITS == 8 && A.G == 1;
  at::parallel_for(0, (A.N + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    if (row_scale) rows<BITS, M, R, true>(A, Y, b0 * block, std::min(A.N, b1 * block));
    else rows<BITS, M, R>(A, Y, b0 * block, std::min(A.N, b1 * block));
  });
}

template <int BITS>
void gemv_rows(Mat A, int64_t M, float* Y) {
  const float* X = A.X;
  for (int64_t m = 0; m < M; m += 8) {  // 9..16 rows: two passes of up to 8
    A.X = X + m * A.K;
    float* Ym = Y + m * A.N;
    switch (std::min<int64_t>(8, M - m)) {
      case 1: gemv<BITS, 1>(A, Ym); break;
      case 2: gemv<BITS, 2>(A, Ym); break;
      case 3: gemv<BITS, 3>(A, Ym); break;
      case 4: gemv<BITS, 4>(A, Ym); break;
      case 5: gemv<BITS, 5>(A, Ym); break;
      case 6: gemv<BITS, 6>(A, Ym); break;
      case 7: gemv<BITS, 7>(A, Ym); break;
      default: gemv<BITS, 8>(A, Ym); break;
    }
  }
}

// y = x · Wᵀ for up to 16 rows of fp32 x (M, K), int4 x reordered as `reorder4` does.
inline void qgemv(int bits, Mat A, int64_t M, float* Y) {
  if (bits == 8) gemv_rows<8>(A, M, Y);
  else gemv_rows<4>(A, M, Y);
}

// int4 kernels read each run of 2V inputs as its V evens, then its V odds (a byte run's nibbles).
inline void reorder4(const float* X, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 2 * V)
      for (int j = 0; j < V; ++j) {
        out[m * K + c + j] = X[m * K + c + 2 * j];
        out[m * K + c + V + j] = X[m * K + c + 2 * j + 1];
      }
}

// y (M, N) = x (M, K) · Wᵀ for any M on the decode kernels (16 rows per pass); A's X is ignored.
// int4 reorders its inputs into `scratch` (M·K floats), unless `prepared` says it holds them already.
inline void qlinear_rows(int bits, const float* X, int64_t M, Mat A, float* Y, float* scratch, bool prepared = false) {
  if (bits == 4) {
    if (!prepared) reorder4(X, M, A.K, scratch);
    X = scratch;
  }
  for (int64_t m = 0; m < M; m += 16) {
    A.X = X + m * A.K;
    qgemv(bits, A, std::min<int64_t>(16, M - m), Y + m * A.N);
  }
}

inline const uint16_t* bf16_ptr(const at::Tensor& t) {  // null for an undefined or empty tensor
  return t.defined() && t.numel() ? reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()) : nullptr;
}

// ---- 8-bit activations: integer dot products (llama.cpp's approach) -------------------------------
// Each block of 32 inputs of each row is quantized to int8 with its own scale (max |x| / 127). A
// block's dot product with 32 codes is an integer sum, scaled once by the block's and the weight
// group's scales; the int4 zero term uses the exact fp32 input sums of each group.
// - AVX-512 VNNI (vpdpbusd: 64 u8 × s8 products summed in fours into 16 int32 lanes, one
//   instruction): one 64-byte code load covers 2 blocks of int8 codes or 4 blocks of int4 codes.
//   int8 codes are signed: x + 128 is the unsigned operand, and each lane starts from −128 · Σw
//   (computed once per code load, shared by the input rows; no repacked copy of the weights). int4
//   codes are unsigned already. 3–5 instructions per 64 weights and input row where AVX2 takes ~16.
// - AVX2 (maddubs: u8 × s8 → s16 pairs, madd → 8 s32 sums) per block of 32.
// int4 inputs are stored in their codes' nibble order: within each run of kNibbleRun inputs (the
// codes of one load), all evens, then all odds. Elsewhere (no AVX2) `kAct8` is false.
#ifdef __AVX2__
constexpr bool kAct8 = true;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define POCKETLM_VNNI 1
constexpr int kNibbleRun = 128;  // the inputs of 64 bytes of int4 codes
#else
constexpr int kNibbleRun = 32;
#endif

struct Act8 {      // M rows of quantized inputs
  const int8_t* q; // (M, K)
  const float* d;  // (M, K/32) block scales
  const float* sum;// int4: (M, G) fp32 input sums per group
};

// X (M, K) → q, d (and per-group sums when `groups` > 0); `nibble_order` for int4 codes.
inline void quantize_act8(const float* X, int64_t M, int64_t K, bool nibble_order, int64_t groups, int8_t* q, float* d,
                          float* sum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * K;
    for (int64_t c = 0; c < K; c += 32) {
#ifdef __AVX512F__
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + c)), _mm512_abs_ps(_mm512_loadu_ps(x + c + 16))));
#else
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[c + j]));
#endif
      const float scale = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
      d[m * (K / 32) + c / 32] = scale;
      // int4: block c's 16 evens and 16 odds go to their places in its run (evens first, then odds)
      const int64_t run0 = c - c % kNibbleRun, half = std::min<int64_t>(kNibbleRun, K - run0) / 2;
      int8_t* even = q + m * K + run0 + (c - run0) / 2;
#ifdef __AVX512F__  // the same roundings (x · inv, then to nearest even) 32 at a time
      const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(x + c), _mm512_set1_ps(inv));
      const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(x + c + 16), _mm512_set1_ps(inv));
      __m512i qa = _mm512_cvtps_epi32(a), qb = _mm512_cvtps_epi32(b);
      int8_t* lo = q + m * K + c;
      int8_t* hi = lo + 16;
      if (nibble_order) {
        const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i ev = _mm512_permutex2var_epi32(qa, evens, qb);
        qb = _mm512_permutex2var_epi32(qa, _mm512_add_epi32(evens, _mm512_set1_epi32(1)), qb);
        qa = ev, lo = even, hi = even + half;
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtsepi32_epi8(qb));
#else
      for (int j = 0; j < 32; ++j) {
        const int8_t v = int8_t(std::nearbyint(x[c + j] * inv));
        if (!nibble_order) q[m * K + c + j] = v;
        else (j % 2 ? even + half : even)[j / 2] = v;
      }
#endif
    }
    if (groups > 0) {
      const int64_t g = K / groups;
      for (int64_t gi = 0; gi < groups; ++gi) {
        float t = 0;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) t += x[k];
        sum[m * groups + gi] = t;
      }
    }
  }
}

// Weight rows per parallel work item, and the work items of `count` matrices that read one input
// (q, k, v; gate, up): one parallel region over all their rows instead of one per matrix.
constexpr int64_t kRowBlock = 16;
constexpr int kMaxMats = 3;

template <class Rows>
void over_rows(const Mat* A, int count, Rows rows) {
  int64_t start[kMaxMats + 1] = {0};
  for (int i = 0; i < count; ++i) start[i + 1] = start[i] + (A[i].N + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, start[count], 1, [&](int64_t b0, int64_t b1) {
    for (int i = 0; i < count; ++i) {
      const int64_t lo = std::max(b0, start[i]) - start[i], hi = std::min(b1, start[i + 1]) - start[i];
      if (lo < hi) rows(i, lo * kRowBlock, std::min(A[i].N, hi * kRowBlock));
    }
  });
}

#ifdef POCKETLM_VNNI
// Software prefetch distance in bytes of a row's codes. The R rows of an iteration are adjacent, so
// this reaches ~1–7 row groups ahead; 4 KB decoded SmolLM2 ~15% faster than 1 KB (8–16 KB: no better).
constexpr int kPrefetch = 4096;

// One 64-byte load of codes: IN inputs, BL int32 lanes per 32-input block, and per lane which block
// and which weight group (relative to the load's first) its sum belongs to.
template <int BITS>
struct Load64 {
  static constexpr int IN = BITS == 8 ? 64 : 128, BL = 16 / (IN / 32);
  __m512i group_of_lane;  // scale index of each lane, relative to g0
  int64_t g0;             // the first input's weight group
  __mmask8 groups;        // the scales this load reads (masked past the row's last)
};

template <int BITS>
std::vector<Load64<BITS>> plan_loads(const Mat& A) {
  using L = Load64<BITS>;
  const int64_t g = A.K / A.G;
  std::vector<L> out;
  for (int64_t c0 = 0; c0 < A.K; c0 += L::IN) {
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = int32_t((c0 + 32 * (l / L::BL)) / g - c0 / g);
    const int64_t last = (std::min<int64_t>(c0 + L::IN, A.K) - 1) / g - c0 / g;
    out.push_back({_mm512_load_si512(lanes), c0 / g, __mmask8((1u << (last + 1)) - 1)});
  }
  return out;
}

// up to 16 bf16 values as fp32 (zero where not `live`)
inline __m512 bf16x16(__mmask16 live, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}

// the bf16 scales of one load (at most 4 groups), per lane
inline __m512 lane_scales(const uint16_t* s, const __m512i& group_of_lane, __mmask8 groups) {
  const __m128i h = _mm_maskz_loadu_epi16(groups, s);
  const __m128 f = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  return _mm512_permutexvar_ps(group_of_lane, _mm512_castps128_ps512(f));
}

// ROW_SCALE: int8 with one scale per row, applied once to the row's sum.
template <int BITS, int M, int R, bool ROW_SCALE>
void rows_vnni(const Mat& A, const Act8& X, float* Y, int64_t n0, int64_t n1, const std::vector<Load64<BITS>>& plan) {
  using L = Load64<BITS>;
  const int64_t K = A.K, blocks = K / 32;
  const __m512i block_of_lane = BITS == 8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                          : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i low4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (size_t li = 0; li < plan.size(); ++li) {
      const int64_t c0 = int64_t(li) * L::IN, len = std::min<int64_t>(L::IN, K - c0);
      const __mmask64 bytes = len * BITS / 8 == 64 ? ~__mmask64(0) : (__mmask64(1) << (len * BITS / 8)) - 1;
      __m512i w[R], w_hi[R];  // int8: the codes; int4: the low and the high nibbles
      __m512i base[R];        // int8: −128 · (the sums of 4 codes), what x + 128 adds to each lane
      __m512 sv[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = A.Q + (n + r) * A.stride + c0 * BITS / 8;
        __builtin_prefetch(q + kPrefetch);
        const __m512i v = _mm512_maskz_loadu_epi8(bytes, q);
        if constexpr (BITS == 8) {
          w[r] = v;
          base[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(char(0x80)), v));
        } else {
          w[r] = _mm512_and_si512(v, low4);
          w_hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        if constexpr (!ROW_SCALE) sv[r] = lane_scales(A.S + (n + r) * A.G + plan[li].g0, plan[li].group_of_lane,
                                                      plan[li].groups);
      }
      const __mmask16 dmask = __mmask16((1u << (len / 32)) - 1);
      for (int m = 0; m < M; ++m) {
        const int8_t* xq = X.q + m * K + c0;
        const __m512 dv = _mm512_permutexvar_ps(block_of_lane, _mm512_maskz_loadu_ps(dmask, X.d + m * blocks + c0 / 32));
        if constexpr (BITS == 8) {
          // x + 128 (unsigned) · w (signed), from a base of −128 · Σw: Σ x·w
          const __m512i xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, xq), _mm512_set1_epi8(char(0x80)));
          for (int r = 0; r < R; ++r) {
            const __m512i p = _mm512_dpbusd_epi32(base[r], xu, w[r]);
            acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), ROW_SCALE ? dv : _mm512_mul_ps(dv, sv[r]), acc[m][r]);
          }
        } else {
          const __m512i lo = _mm512_maskz_loadu_epi8(bytes, xq), hi = _mm512_maskz_loadu_epi8(bytes, xq + len / 2);
          for (int r = 0; r < R; ++r) {
            const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w[r], lo), w_hi[r], hi);
            acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dv, sv[r]), acc[m][r]);
          }
        }
      }
    }
    if constexpr (BITS == 4)  // + Σ_g (z − 8s) · Σx, 16 groups at a time, in lanes the sum below adds up
      for (int64_t g0 = 0; g0 < A.G; g0 += 16) {
        const __mmask16 live = A.G - g0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (A.G - g0)) - 1);
        for (int r = 0; r < R; ++r) {
          const int64_t at = (n + r) * A.G + g0;
          const __m512 s = bf16x16(live, A.S + at), z = bf16x16(live, A.Z + at);
          const __m512 off = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);
          for (int m = 0; m < M; ++m)
            acc[m][r] = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(live, X.sum + m * A.G + g0), acc[m][r]);
        }
      }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        const float y = _mm512_reduce_add_ps(acc[m][r]);
        Y[m * A.N + n + r] = ROW_SCALE ? y * bf16(A.S + n + r) : y;
      }
  }
  if (n < n1) rows_vnni<BITS, M, 1, ROW_SCALE>(A, X, Y, n, n1, plan);
}

template <int BITS, int M>
void gemv_a8(const Mat* A, float* const* Y, int count, const Act8& X) {
  constexpr int R = M <= 2 ? 4 : 2;  // M x R accumulators and R rows of codes in 32 registers
  std::vector<Load64<BITS>> plan[kMaxMats];
  for (int i = 0; i < count; ++i) plan[i] = plan_loads<BITS>(A[i]);
  over_rows(A, count, [&](int i, int64_t n0, int64_t n1) {
    if (BITS == 8 && A[i].G == 1) rows_vnni<BITS, M, R, true>(A[i], X, Y[i], n0, n1, plan[i]);
    else rows_vnni<BITS, M, R, false>(A[i], X, Y[i], n0, n1, plan[i]);
  });
}
#else
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 codes of weight row `q` (block c) as the u8 × s8 pair maddubs takes, against the block's inputs x
template <int BITS>
inline __m256i block_dot(const uint8_t* q, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  __m256i p;
  if constexpr (BITS == 8) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
    p = _mm256_maddubs_epi16(w, xv);
  }
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

template <int BITS, int M, int R>
void rows_a8(const Mat& A, const Act8& X, float* Y, int64_t n0, int64_t n1) {
  const int64_t blocks = A.K / 32, per_group = (A.K / A.G) / 32;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < blocks; ++c) {
      const int64_t gi = c / per_group;
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = A.Q + (n + r) * A.stride + c * 32 * BITS / 8;
        __builtin_prefetch(q + 512);
        const float s = bf16(A.S + (n + r) * A.G + gi);
        for (int m = 0; m < M; ++m) {
          const __m256 dot = _mm256_cvtepi32_ps(block_dot<BITS>(q, X.q + m * A.K + c * 32));
          acc[m][r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(s * X.d[m * blocks + c]), acc[m][r]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float y = hsum8(acc[m][r]);
        if constexpr (BITS == 4)
          for (int64_t gi = 0; gi < A.G; ++gi) {
            const float s = bf16(A.S + (n + r) * A.G + gi), z = bf16(A.Z + (n + r) * A.G + gi);
            y += (z - 8 * s) * X.sum[m * A.G + gi];
          }
        Y[m * A.N + n + r] = y;
      }
  }
  if (n < n1) rows_a8<BITS, M, 1>(A, X, Y, n, n1);
}

template <int BITS, int M>
void gemv_a8(const Mat* A, float* const* Y, int count, const Act8& X) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  over_rows(A, count, [&](int i, int64_t n0, int64_t n1) { rows_a8<BITS, M, R>(A[i], X, Y[i], n0, n1); });
}
#endif

// y_i = x · W_iᵀ for `count` matrices of one input width, bit width and group count, up to 16 rows
// of inputs quantized by quantize_act8 (K a multiple of 32).
inline void qgemv_a8(int bits, const Mat* A, float* const* Y, int count, Act8 X, int64_t M) {
  const int64_t K = A[0].K, G = A[0].G;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const Act8 Xm{X.q + m0 * K, X.d + m0 * (K / 32), X.sum ? X.sum + m0 * G : nullptr};
    float* Ym[kMaxMats];
    for (int i = 0; i < count; ++i) Ym[i] = Y[i] + m0 * A[i].N;
#define POCKETLM_A8(MM) (bits == 8 ? gemv_a8<8, MM>(A, Ym, count, Xm) : gemv_a8<4, MM>(A, Ym, count, Xm))
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: POCKETLM_A8(1); break;
      case 2: POCKETLM_A8(2); break;
      case 3: POCKETLM_A8(3); break;
      case 4: POCKETLM_A8(4); break;
      case 5: POCKETLM_A8(5); break;
      case 6: POCKETLM_A8(6); break;
      case 7: POCKETLM_A8(7); break;
      default: POCKETLM_A8(8); break;
    }
#undef POCKETLM_A8
  }
}

// The same as qlinear_rows with 8-bit activations, for `count` matrices that read the same X (as
// qgemv_a8 takes them); q (M·K), d (M·K/32), sum (M·G) are scratch (`prepared`: they hold X
// quantized for these bits already).
inline void qlinear_rows_a8(int bits, const float* X, int64_t M, const Mat* A, float* const* Y, int count, int8_t* q,
                            float* d, float* sum, bool prepared = false) {
  const int64_t K = A[0].K, G = A[0].G;
  if (!prepared) quantize_act8(X, M, K, bits == 4, bits == 4 ? G : 0, q, d, sum);
  for (int64_t m = 0; m < M; m += 16) {
    float* Ym[kMaxMats];
    for (int i = 0; i < count; ++i) Ym[i] = Y[i] + m * A[i].N;
    qgemv_a8(bits, A, Ym, count, Act8{q + m * K, d + m * (K / 32), sum + m * G}, std::min<int64_t>(16, M - m));
  }
}
#else
constexpr bool kAct8 = false;
#endif

// fp32 weights (N, K), up to 8 rows: each weight row streamed once and shared by every input row.
namespace f32 {
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
}  // namespace f32

// Y (M, N) = X (M, K) · Wᵀ (+ B) for up to 8 rows of fp32 X.
inline void linear_f32(const float* X, int64_t M, const float* W, const float* B, float* Y, int64_t K, int64_t N) {
  switch (M) {
    case 1: f32::gemm_rows<1>(X, W, B, Y, K, N); break;
    case 2: f32::gemm_rows<2>(X, W, B, Y, K, N); break;
    case 3: f32::gemm_rows<3>(X, W, B, Y, K, N); break;
    case 4: f32::gemm_rows<4>(X, W, B, Y, K, N); break;
    case 5: f32::gemm_rows<5>(X, W, B, Y, K, N); break;
    case 6: f32::gemm_rows<6>(X, W, B, Y, K, N); break;
    case 7: f32::gemm_rows<7>(X, W, B, Y, K, N); break;
    default: f32::gemm_rows<8>(X, W, B, Y, K, N); break;
  }
}
}  // namespace pocketlm
