// Helpers shared by the CPU kernels written with intrinsics (linear, attention): the target
// attributes of each x86 ISA level, and horizontal sums of fp32 vectors (and of plain floats). They carry their target
// attribute and are only ever inlined into an entry point built for that ISA (or a wider one).
#pragma once

#include "simd.h"

namespace qf::cpu {

// ---- horizontal sums of fp32 accumulators: hsum (one), hsum4 (four, shuffles shared) -----------
// The scalar overloads let code written over an accumulator type also take plain floats.
inline float hsum(float v) { return v; }
inline void hsum4(float a, float b, float c, float d, float* out) {
  out[0] = a, out[1] = b, out[2] = c, out[3] = d;
}

}  // namespace qf::cpu

#if QF_X86_INTRINSICS
#include <immintrin.h>
// Vector arguments of the inline helpers below: they are only inlined, never called across an
// ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's own AVX-512 headers trip it (_mm512_undefined_*: GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace qf::cpu {

#define QF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QF_TARGET_AVX512 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define QF_TARGET_AVX512_BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

QF_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The lane sums of a, b, c, d with shared shuffles (about a third of four hsum's work): within
// each 128-bit block, interleave and add pairs of vectors until one vector holds a partial sum
// of a, b, c and d per block, then add the blocks.
QF_TARGET_AVX2 inline __m256 interleave_add4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  return _mm256_add_ps(
      _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
      _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
}

// out[i] = the sum over v's two 128-bit blocks of lane i.
QF_TARGET_AVX2 inline void hsum4_blocks(__m256 v, float* out) {
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

QF_TARGET_AVX2 inline void hsum4(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  hsum4_blocks(interleave_add4(a, b, c, d), out);
}

QF_TARGET_AVX512 inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

QF_TARGET_AVX512 inline __m512 interleave_add4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  return _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
}

QF_TARGET_AVX512 inline void hsum4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 v = interleave_add4(a, b, c, d);
  hsum4_blocks(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)), out);
}

}  // namespace qf::cpu

#endif  // QF_X86_INTRINSICS
