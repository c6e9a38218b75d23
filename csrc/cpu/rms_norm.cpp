// RMSNorm on the CPU: out = round(round(x * rsqrt(mean(x^2) + eps)) * weight), maths in fp32,
// rounding to the storage type T exactly where reference.rms_norm rounds; the fused variant
// first forms h = round(residual + x), stores it, and normalises h.
// Layout: rows of `hidden` contiguous elements, row strides ld_* (in elements) may exceed hidden.
// Parallelisation: OpenMP over rows (serial when the input is small); each row runs in a worker
// built for AVX-512, AVX2 and baseline x86 (QF_CPU_CLONES, picked at load time), and `omp simd`
// lets the sum of squares vectorise (lane-wise partial sums) without -ffast-math.
// Constraints: hidden >= 1; residual_out may alias residual (each element is read before written).
#include <cmath>
#include <type_traits>

#include "../common/simd.h"
#include "convert.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

// Below this many elements the OpenMP fork/join costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

// v rounded to T's precision (v itself for float).
template <typename T>
QF_INLINE float rounded(float v) {
  return to_float(from_float<T>(v));
}

template <typename T>
QF_INLINE float sum_squares(const T* x,  // [n]
                            int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    sum += v * v;
  }
  return sum;
}

// h = round(residual + x), written out; returns the sum of squares of the rounded h.
template <typename T>
QF_INLINE float add_store_sum_squares(T* h,               // [n]; may alias residual
                                      const T* x,         // [n]
                                      const T* residual,  // [n]
                                      int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = rounded<T>(to_float(residual[i]) + to_float(x[i]));
    h[i] = from_float<T>(v);
    sum += v * v;
  }
  return sum;
}

// 1 / sqrt(mean + eps) with an exact division, as torch's CPU rsqrt computes it.
QF_INLINE float inv_rms(float sum_sq, int64_t n, float eps) {
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
}

template <typename T>
QF_INLINE void scale_row(T* out,           // [n]
                         const T* x,       // [n]
                         const T* weight,  // [n]
                         int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) {
    const float normed = rounded<T>(to_float(x[i]) * inv);
    out[i] = from_float<T>(normed * to_float(weight[i]));
  }
}

// fp16 rows up to this long take the fp16 path below (on the stack).
constexpr int64_t kFp16RowMax = 8192;

// The fp16 path: the same maths in the same order on the row widened to fp32 first, every
// conversion a run through convert.h (the hardware's where it has one), so the same bits as the
// element-wise loops above at a fraction of their cost. v: the row (h or x) in fp32; writes out.
QF_INLINE void scale_row_fp16(fp16* out, const float* v, const fp16* weight, int64_t n,
                              float inv) {
  float t[kFp16RowMax], w[kFp16RowMax];
  for (int64_t i = 0; i < n; ++i) t[i] = v[i] * inv;
  round_fp16_n(t, n);
  to_float_n(w, weight, n);
  for (int64_t i = 0; i < n; ++i) t[i] = t[i] * w[i];
  from_float_n(out, t, n);
}

template <typename T>
QF_CPU_CLONES void rms_norm_row(T* out,           // [hidden]
                                const T* x,       // [hidden]
                                const T* weight,  // [hidden]
                                int64_t hidden, float eps) {
  if constexpr (std::is_same_v<T, fp16>) {
    if (hidden <= kFp16RowMax) {
      float v[kFp16RowMax];
      to_float_n(v, x, hidden);
      scale_row_fp16(out, v, weight, hidden, inv_rms(sum_squares(v, hidden), hidden, eps));
      return;
    }
  }
  scale_row(out, x, weight, hidden, inv_rms(sum_squares(x, hidden), hidden, eps));
}

template <typename T>
QF_CPU_CLONES void fused_add_rms_norm_row(T* out,             // [hidden]
                                          T* residual_out,    // [hidden]; may alias residual
                                          const T* x,         // [hidden]
                                          const T* residual,  // [hidden]
                                          const T* weight,    // [hidden]
                                          int64_t hidden, float eps) {
  if constexpr (std::is_same_v<T, fp16>) {
    if (hidden <= kFp16RowMax) {
      float v[kFp16RowMax], b[kFp16RowMax];
      to_float_n(v, residual, hidden);   // all of residual read before residual_out is written
      to_float_n(b, x, hidden);
      for (int64_t i = 0; i < hidden; ++i) v[i] = v[i] + b[i];
      round_fp16_n(v, hidden);
      from_float_n(residual_out, v, hidden);
      scale_row_fp16(out, v, weight, hidden, inv_rms(sum_squares(v, hidden), hidden, eps));
      return;
    }
  }
  const float sum_sq = add_store_sum_squares(residual_out, x, residual, hidden);
  scale_row(out, residual_out, weight, hidden, inv_rms(sum_sq, hidden, eps));
}

bool parallel_worthwhile(int64_t rows, int64_t hidden) {
  return rows > 1 && rows * hidden >= kParallelMinElements;
}

}  // namespace

template <typename T>
Status rms_norm(T* out, const T* x, const T* weight, int64_t rows, int64_t hidden, int64_t ld_out,
                int64_t ld_x, float eps) {
  if (rows < 0 || hidden < 1 || ld_x < 0 || (rows > 1 && ld_out < hidden))
    return Status::kInvalidArgument;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || x == nullptr || weight == nullptr) return Status::kInvalidArgument;
#pragma omp parallel for schedule(static) if (parallel_worthwhile(rows, hidden))
  for (int64_t r = 0; r < rows; ++r)
    rms_norm_row(out + r * ld_out, x + r * ld_x, weight, hidden, eps);
  return Status::kOk;
}

template <typename T>
Status fused_add_rms_norm(T* out, T* residual_out, const T* x, const T* residual, const T* weight,
                          int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_residual_out,
                          int64_t ld_x, int64_t ld_residual, float eps) {
  if (rows < 0 || hidden < 1 || ld_x < 0 || ld_residual < 0 ||
      (rows > 1 && (ld_out < hidden || ld_residual_out < hidden)))
    return Status::kInvalidArgument;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || residual_out == nullptr || x == nullptr || residual == nullptr ||
      weight == nullptr)
    return Status::kInvalidArgument;
#pragma omp parallel for schedule(static) if (parallel_worthwhile(rows, hidden))
  for (int64_t r = 0; r < rows; ++r)
    fused_add_rms_norm_row(out + r * ld_out, residual_out + r * ld_residual_out, x + r * ld_x,
                           residual + r * ld_residual, weight, hidden, eps);
  return Status::kOk;
}

#define QF_INSTANTIATE(T)                                                                      \
  template Status rms_norm<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, float); \
  template Status fused_add_rms_norm<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t,   \
                                        int64_t, int64_t, int64_t, int64_t, float);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
