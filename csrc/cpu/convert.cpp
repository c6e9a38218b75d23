// See convert.h.
#include "convert.h"

#include "../common/simd.h"
#include "../common/x86_reduce.h"

namespace qf::cpu {
namespace {

#if QF_X86_INTRINSICS
constexpr __mmask16 first_n(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

QF_TARGET_AVX512 void to_float_avx512(float* dst, const fp16* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = first_n(n - i);
    _mm512_mask_storeu_ps(dst + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + i)));
  }
}

QF_TARGET_AVX512 __m256i to_half(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

QF_TARGET_AVX512 void from_float_avx512(fp16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = first_n(n - i);
    _mm256_mask_storeu_epi16(dst + i, k, to_half(_mm512_maskz_loadu_ps(k, src + i)));
  }
}

QF_TARGET_AVX512 void round_avx512(float* v, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = first_n(n - i);
    _mm512_mask_storeu_ps(v + i, k, _mm512_cvtph_ps(to_half(_mm512_maskz_loadu_ps(k, v + i))));
  }
}
#endif

QF_CPU_CLONES void to_float_loop(float* dst, const fp16* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
QF_CPU_CLONES void from_float_loop(fp16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<fp16>(src[i]);
}
QF_CPU_CLONES void round_loop(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = to_float(from_float<fp16>(v[i]));
}

bool have_avx512() {
  static const bool yes = cpu_isa_supported(CpuIsa::kAvx512);
  return yes;
}

}  // namespace

void to_float_n(float* dst, const fp16* src, int64_t n) {
#if QF_X86_INTRINSICS
  if (have_avx512()) return to_float_avx512(dst, src, n);
#endif
  to_float_loop(dst, src, n);
}

void from_float_n(fp16* dst, const float* src, int64_t n) {
#if QF_X86_INTRINSICS
  if (have_avx512()) return from_float_avx512(dst, src, n);
#endif
  from_float_loop(dst, src, n);
}

void round_fp16_n(float* v, int64_t n) {
#if QF_X86_INTRINSICS
  if (have_avx512()) return round_avx512(v, n);
#endif
  round_loop(v, n);
}

}  // namespace qf::cpu
