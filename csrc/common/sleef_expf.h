// exp(x) in fp32 as SLEEF's expf_u10 computes it (1 ulp), inline and branch-free so that a loop
// over it vectorises under QF_CPU_CLONES. swiglu.cpp needs it bit for bit (torch's vectorised
// exp) and so includes fp_contract_off.h before this header; attention.cpp only needs an
// accurate, vectorisable exp.
#pragma once

#include <cmath>
#include <cstdint>

#include "float16.h"
#include "simd.h"

namespace qf::cpu {

// 2^q for -126 <= q <= 127, from its exponent bits (SLEEF's vpow2i).
QF_INLINE float pow2i(int32_t q) { return float_from_bits(static_cast<uint32_t>(q + 0x7f) << 23); }

// exp(d) as SLEEF's xexpf (expf_u10, src/libm/sleefsimdsp.c) built with FMA: q = rint(d/ln2),
// s = d - q*ln2 in two FMA steps, a degree-6 polynomial, then a scale by 2^q in two halves.
QF_INLINE float sleef_expf(float d) {
  const float qf = std::nearbyint(d * 1.442695040888963407359924681001892137426645954152985934f);
  // |d| <= 104 is all that matters (see the end); this keeps the int conversion defined
  // for any d, NaN included (whose s below is NaN whatever q is).
  const int32_t q = qf > -1000.0f && qf < 1000.0f ? static_cast<int32_t>(qf) : 0;
  const float qq = static_cast<float>(q);
  float s = std::fma(qq, -0.693145751953125f, d);
  s = std::fma(qq, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = std::fma(u, s, 0.00139304355252534151077271f);
  u = std::fma(u, s, 0.00833336077630519866943359f);
  u = std::fma(u, s, 0.0416664853692054748535156f);
  u = std::fma(u, s, 0.166666671633720397949219f);
  u = std::fma(u, s, 0.5f);
  u = 1.0f + std::fma(s * s, u, s);
  const int32_t q_half = q >> 1;
  u = (u * pow2i(q_half)) * pow2i(q - q_half);
  u = d < -104.0f ? 0.0f : u;
  return 100.0f < d ? INFINITY : u;
}

}  // namespace qf::cpu
