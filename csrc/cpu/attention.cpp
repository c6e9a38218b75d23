// Causal multi-head attention over a KV cache on the CPU (reference.attention):
//   out[b,t,h] = sum_j softmax_j(scale * q[b,t,h] . k[b,j,h]) v[b,j,h],  j < min(start[b]+t+1, S)
// (bottom-right aligned: query t of sequence b sits at position start[b] + t, so one query per
// sequence is a decode step over its own cached length, and T > 1 is a (chunked) prefill).
// Maths in fp32: dot products (four keys a pass), an online softmax over blocks of kKeyBlock keys
// (running max and sum, the accumulator rescaled when the max grows; the block's exps
// vectorised, SLEEF's expf_u10), one rounding of the output to T.
// Layout: q [B, T, H, D], k and v [B, S, H, D], each with its own b/t/h strides in elements and a
// contiguous head dim (views of the KV cache and of the fused qkv projection work as they are);
// out [B, T, H, D] contiguous. Parallelisation: OpenMP over (b, h, t) rows, t innermost so that
// a thread's consecutive rows reuse the same head's keys from its cache; a dynamic schedule for
// prefill, since causal rows grow longer with t, a static one for decode.
// Constraints: 1 <= D <= kMaxHeadDim; start[b] >= 0.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common/simd.h"
#include "../common/sleef_expf.h"
#include "../common/x86_reduce.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kKeyBlock = 128;   // scores held at once per row (on the stack)

// s[i] = q . k_i * scale for 4 keys at once: one pass over d with four sums, so that the
// vectorised loop's horizontal reductions are shared by four keys, not paid per key.
template <typename T>
QF_INLINE void dot4(float* s, const float* q, const T* k0, const T* k1, const T* k2, const T* k3,
                    int64_t n, float scale) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < n; ++d) {
    a0 += q[d] * to_float(k0[d]);
    a1 += q[d] * to_float(k1[d]);
    a2 += q[d] * to_float(k2[d]);
    a3 += q[d] * to_float(k3[d]);
  }
  s[0] = a0 * scale, s[1] = a1 * scale, s[2] = a2 * scale, s[3] = a3 * scale;
}

template <typename T>
QF_INLINE float dot(const float* q, const T* k, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += q[d] * to_float(k[d]);
  return sum;
}

// Online-softmax state of one run of keys: running max m of the scores, sum l of exp(score - m),
// and acc = sum of exp(score - m) * v.
struct Partial {
  float m, l;
  float acc[kMaxHeadDim];
};

// Folds keys j0 .. j0 + n - 1 (n <= kKeyBlock) into p. kD: the head dim at compile time (the
// accumulator then lives in registers across the block), or 0 for D at run time.
template <typename T, int kD>
QF_INLINE void attend_block(Partial& p, const float* qf, const T* k, const T* v, int64_t j0,
                            int64_t n, int64_t D_, int64_t ld_k, int64_t ld_v, float scale) {
  const int64_t D = kD > 0 ? kD : D_;
  float s[kKeyBlock];
  const T* kb = k + j0 * ld_k;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    dot4(s + j, qf, kb + j * ld_k, kb + (j + 1) * ld_k, kb + (j + 2) * ld_k, kb + (j + 3) * ld_k,
         D, scale);
  for (; j < n; ++j) s[j] = dot(qf, kb + j * ld_k, D) * scale;
  float block_max = -INFINITY;
  for (j = 0; j < n; ++j) block_max = std::max(block_max, s[j]);
  const float m_new = std::max(p.m, block_max);
  const float correction = std::exp(p.m - m_new);  // 0 for the first block (m = -inf)
  // The block's probabilities (unnormalised), a vectorised exp; their sum in any fp32 order.
  float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
  for (j = 0; j < n; ++j) {
    s[j] = sleef_expf(s[j] - m_new);
    block_sum += s[j];
  }
  p.l = p.l * correction + block_sum;
  p.m = m_new;
  float acc[kD > 0 ? kD : kMaxHeadDim];
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] = p.acc[d] * correction;
  const T* vb = v + j0 * ld_v;
  for (j = 0; j < n; ++j) {
    const float w = s[j];
    const T* vr = vb + j * ld_v;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += w * to_float(vr[d]);
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) p.acc[d] = acc[d];
}

template <typename T, int kD>
QF_CPU_CLONES void attend_row(T* out,        // [D]
                              const T* q,    // [D]
                              const T* k,    // [n_keys, ld_k]: key j at k + j * ld_k
                              const T* v,    // [n_keys, ld_v]
                              int64_t n_keys, int64_t D, int64_t ld_k, int64_t ld_v,
                              float scale) {
  float qf[kMaxHeadDim];
  for (int64_t d = 0; d < D; ++d) qf[d] = to_float(q[d]);
  Partial p;
  p.m = -INFINITY, p.l = 0.0f;
  for (int64_t d = 0; d < D; ++d) p.acc[d] = 0.0f;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock)
    attend_block<T, kD>(p, qf, k, v, j0, std::min(kKeyBlock, n_keys - j0), D, ld_k, ld_v, scale);
  const float inv = 1.0f / p.l;
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(p.acc[d] * inv);
}

#if QF_X86_INTRINSICS
// bf16 with a head dim of 128 (Qwen's) on AVX-512 BF16, the decode hot path: q . k by vdpbf16ps
// on the bf16 values as they are (each product exact in fp32, sums in fp32), four keys' sums
// reduced together; p * v in fp32 FMAs on v widened from bf16, the 128 accumulators in eight
// registers. The widening splits each 32 values into even and odd elements, so acc holds them in
// that order (even 0..15, odd 0..15 for each 32) until the output is written.
constexpr int kBf16Dim = 128;
constexpr int64_t kPrefetchKeys = 16;

QF_TARGET_AVX512_BF16 inline __m512 dot_bf16_d128(const __m512bh (&q)[4], const bf16* k) {
  __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(_mm512_loadu_si512(k)), q[0]);
  a = _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + 32)), q[1]);
  a = _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + 64)), q[2]);
  return _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + 96)), q[3]);
}

// Scores (unscaled) of keys j .. j + 3 of k into s[j ..].
QF_TARGET_AVX512_BF16 inline void scores_bf16_d128(float* s, const __m512bh (&qv)[4],
                                                  const bf16* k, int64_t j, int64_t ld_k) {
  hsum4(dot_bf16_d128(qv, k + j * ld_k), dot_bf16_d128(qv, k + (j + 1) * ld_k),
        dot_bf16_d128(qv, k + (j + 2) * ld_k), dot_bf16_d128(qv, k + (j + 3) * ld_k), s + j);
}

// acc += s[j] * v[j] for one key (acc in the even/odd order of the widening).
QF_TARGET_AVX512_BF16 inline void accumulate_bf16_d128(__m512 (&acc)[8], float p_j, const bf16* vr) {
  const __m512 p = _mm512_set1_ps(p_j);
  const __m512i high = _mm512_set1_epi32(-65536);
  for (int i = 0; i < 4; ++i) {
    const __m512i w = _mm512_loadu_si512(vr + 32 * i);
    acc[2 * i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), p, acc[2 * i]);
    acc[2 * i + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, high)), p, acc[2 * i + 1]);
  }
}

// Software-pipelined over blocks: the values of block b are accumulated in the same loop that
// computes the scores of block b + 1, so that the key and the value streams are read at once
// (at decode the cache is cold: the weights in between evict every layer's keys and values),
// and both are prefetched kPrefetchKeys keys ahead (4 KiB: 5-15% faster in the runs below at
// 8, 16 or 32 alike; the hardware prefetcher alone runs too short a way ahead).
// Measured against linear reading the same bytes in the same run (24 layers at 2048 cached
// tokens, 2 threads): 27.8 GB/s against 34.3 (one block after the other: 25.9; splitting the
// keys into 2 or 4 runs in lockstep, for more streams, 24.6: the register spills cost more).
QF_TARGET_AVX512_BF16 __attribute__((flatten)) void attend_row_bf16_d128(
    bf16* out, const bf16* q, const bf16* k, const bf16* v, int64_t n_keys, int64_t ld_k,
    int64_t ld_v, float scale) {
  __m512bh qv[4];
  for (int i = 0; i < 4; ++i) qv[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + 32 * i));
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  float m = -INFINITY, l = 0.0f;
  alignas(64) float buf[2][kKeyBlock];
  // Scores of keys [j0, j0 + n) into s (unscaled).
  auto score_block = [&](float* s, int64_t j0, int64_t n) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) scores_bf16_d128(s, qv, k + j0 * ld_k, j, ld_k);
    for (; j < n; ++j) s[j] = hsum(dot_bf16_d128(qv, k + (j0 + j) * ld_k));
  };
  score_block(buf[0], 0, std::min(kKeyBlock, n_keys));
  for (int64_t j0 = 0, b = 0; j0 < n_keys; j0 += kKeyBlock, b ^= 1) {
    float* s = buf[b];
    float* s_next = buf[b ^ 1];
    const int64_t n = std::min(kKeyBlock, n_keys - j0);
    const int64_t j1 = j0 + kKeyBlock;
    const int64_t n_next = j1 < n_keys ? std::min(kKeyBlock, n_keys - j1) : 0;
    float block_max = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      s[j] *= scale;
      block_max = std::max(block_max, s[j]);
    }
    const float m_new = std::max(m, block_max);
    const float correction = std::exp(m - m_new);  // 0 for the first block (m = -inf)
    float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = sleef_expf(s[j] - m_new);
      block_sum += s[j];
    }
    l = l * correction + block_sum;
    m = m_new;
    const __m512 c = _mm512_set1_ps(correction);
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_mul_ps(acc[i], c);
    const bf16* vb = v + j0 * ld_v;
    int64_t j = 0;
    for (; j + 4 <= n && j + 4 <= n_next; j += 4) {  // both streams
      if (j1 + j + kPrefetchKeys + 4 <= n_keys) {  // the 4 keys and values kPrefetchKeys on
        const char* kp = reinterpret_cast<const char*>(k + (j1 + j + kPrefetchKeys) * ld_k);
        const char* vp = reinterpret_cast<const char*>(vb + (j + kPrefetchKeys) * ld_v);
        for (int r = 0; r < 4; ++r)
          for (int o = 0; o < kBf16Dim * 2; o += 64) {
            __builtin_prefetch(kp + r * ld_k * 2 + o, 0, 2);  // into L2
            __builtin_prefetch(vp + r * ld_v * 2 + o, 0, 2);
          }
      }
      scores_bf16_d128(s_next, qv, k + j1 * ld_k, j, ld_k);
      for (int r = 0; r < 4; ++r) accumulate_bf16_d128(acc, s[j + r], vb + (j + r) * ld_v);
    }
    for (int64_t i = j; i < n; ++i) accumulate_bf16_d128(acc, s[i], vb + i * ld_v);
    if (n_next > j) score_block(s_next + j, j1 + j, n_next - j);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / l);
  alignas(64) float even[16], odd[16];
  for (int i = 0; i < 4; ++i) {
    _mm512_store_ps(even, _mm512_mul_ps(acc[2 * i], inv));
    _mm512_store_ps(odd, _mm512_mul_ps(acc[2 * i + 1], inv));
    for (int e = 0; e < 16; ++e) {
      out[32 * i + 2 * e] = from_float<bf16>(even[e]);
      out[32 * i + 2 * e + 1] = from_float<bf16>(odd[e]);
    }
  }
}
#endif  // QF_X86_INTRINSICS

// The row worker for T and D: the AVX-512 BF16 path where it applies, else the generic one.
template <typename T>
using RowFn = void (*)(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, float);

template <typename T>
RowFn<T> row_fn(int64_t D) {
#if QF_X86_INTRINSICS
  if constexpr (std::is_same_v<T, bf16>) {
    static const bool bf16_isa = cpu_isa_supported(CpuIsa::kAvx512Bf16);
    if (D == kBf16Dim && bf16_isa)
      return [](bf16* out, const bf16* q, const bf16* k, const bf16* v, int64_t n_keys, int64_t,
                int64_t ld_k, int64_t ld_v, float scale) {
        attend_row_bf16_d128(out, q, k, v, n_keys, ld_k, ld_v, scale);
      };
  }
#endif
  if (D == 128) return attend_row<T, 128>;  // Qwen's head dim: the accumulator unrolled
  return attend_row<T, 0>;
}

}  // namespace

template <typename T>
Status attention(T* out, const T* q, const T* k, const T* v, const int64_t* start, int64_t B,
                 int64_t T_, int64_t H, int64_t D, int64_t S, int64_t sq_b, int64_t sq_t,
                 int64_t sq_h, int64_t sk_b, int64_t sk_s, int64_t sk_h, int64_t sv_b,
                 int64_t sv_s, int64_t sv_h, float scale) {
  if (B < 0 || T_ < 0 || H < 0 || D < 1 || D > kMaxHeadDim || S < 1) return Status::kInvalidArgument;
  const int64_t rows = B * H * T_;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || q == nullptr || k == nullptr || v == nullptr || start == nullptr)
    return Status::kInvalidArgument;
  for (int64_t b = 0; b < B; ++b)
    if (start[b] < 0) return Status::kInvalidArgument;
  const RowFn<T> row = row_fn<T>(D);
  auto attend = [&](int64_t r) {
    const int64_t t = r % T_, h = (r / T_) % H, b = r / (T_ * H);
    const int64_t n_keys = std::min(start[b] + t + 1, S);
    row(out + ((b * T_ + t) * H + h) * D, q + b * sq_b + t * sq_t + h * sq_h,
        k + b * sk_b + h * sk_h, v + b * sv_b + h * sv_h, n_keys, D, sk_s, sv_s, scale);
  };
  if (T_ == 1) {
    // Decode: rows of equal work per sequence, split in contiguous runs. (dynamic, 4 here took
    // 64 against 33-40 us a layer at 150 cached tokens, 24 layers' caches, 2 threads.)
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) attend(r);
  } else {
#pragma omp parallel for schedule(dynamic, 4) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) attend(r);
  }
  return Status::kOk;
}

#define QF_INSTANTIATE(T)                                                                    \
  template Status attention<T>(T*, const T*, const T*, const T*, const int64_t*, int64_t,    \
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
