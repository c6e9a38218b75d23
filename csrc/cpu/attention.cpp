// Causal multi-head attention over a KV cache on the CPU (reference.attention):
//   out[b,t,h] = sum_j softmax_j(scale * q[b,t,h] . k[b,j,h]) v[b,j,h],  j < min(start[b]+t+1, S)
// (bottom-right aligned: query t of sequence b sits at position start[b] + t, so one query per
// sequence is a decode step over its own cached length, and T > 1 is a (chunked) prefill).
// Maths in fp32: dot products, an online softmax over blocks of kKeyBlock keys (running max and
// sum, the accumulator rescaled when the max grows), one rounding of the output to T.
// Layout: q [B, T, H, D], k and v [B, S, H, D], each with its own b/t/h strides in elements and a
// contiguous head dim (views of the KV cache and of the fused qkv projection work as they are);
// out [B, T, H, D] contiguous. Parallelisation: OpenMP over (b, h, t) rows, t innermost so that
// a thread's consecutive rows reuse the same head's keys from its cache; dynamic schedule, since
// causal rows grow longer with t. Constraints: 1 <= D <= kMaxHeadDim; start[b] >= 0.
#include <algorithm>
#include <cmath>

#include "../common/simd.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kKeyBlock = 128;   // scores held at once per row (on the stack)

template <typename T>
QF_INLINE float dot(const float* q, const T* k, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += q[d] * to_float(k[d]);
  return sum;
}

template <typename T>
QF_CPU_CLONES void attend_row(T* out,        // [D]
                              const T* q,    // [D]
                              const T* k,    // [n_keys, ld_k]: key j at k + j * ld_k
                              const T* v,    // [n_keys, ld_v]
                              int64_t n_keys, int64_t D, int64_t ld_k, int64_t ld_v,
                              float scale) {
  float qf[kMaxHeadDim], acc[kMaxHeadDim], s[kKeyBlock];
  for (int64_t d = 0; d < D; ++d) {
    qf[d] = to_float(q[d]);
    acc[d] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;  // running max of the scores and sum of exp(score - m)
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, n_keys - j0);
    float block_max = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = dot(qf, k + (j0 + j) * ld_k, D) * scale;
      block_max = std::max(block_max, s[j]);
    }
    const float m_new = std::max(m, block_max);
    const float correction = std::exp(m - m_new);  // 0 for the first block (m = -inf)
    l *= correction;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
    for (int64_t j = 0; j < n; ++j) {
      const float p = std::exp(s[j] - m_new);
      const T* vr = v + (j0 + j) * ld_v;
      l += p;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += p * to_float(vr[d]);
    }
    m = m_new;
  }
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(acc[d] * inv);
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
#pragma omp parallel for schedule(dynamic, 4) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r % T_, h = (r / T_) % H, b = r / (T_ * H);
    const int64_t n_keys = std::min(start[b] + t + 1, S);
    attend_row(out + ((b * T_ + t) * H + h) * D, q + b * sq_b + t * sq_t + h * sq_h,
               k + b * sk_b + h * sk_h, v + b * sv_b + h * sv_h, n_keys, D, sk_s, sv_s, scale);
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
