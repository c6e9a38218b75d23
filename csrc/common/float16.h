// 16-bit float storage types shared by the CPU and CUDA launchers, and their host-side
// conversions to and from fp32. Torch-free and CUDA-free.
//
// qf::bf16 / qf::fp16 are plain 2-byte bit containers with the layout of torch's BFloat16 /
// Half (and CUDA's __nv_bfloat16 / __half), so a tensor's data pointer can be cast to them.
// Conversions round to nearest, ties to even, exactly like torch's own casts, and are
// written as branch-light integer code so that loops over them auto-vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace qf {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && sizeof(fp16) == 2, "16-bit storage types must be 2 bytes");

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) { return float_from_bits(uint32_t{x.bits} << 16); }

inline float to_float(fp16 x) {
  const uint32_t sign = uint32_t{x.bits & 0x8000u} << 16;
  const uint32_t mag = x.bits & 0x7fffu;  // exponent and mantissa
  // All three cases are computed and one is selected, so that loops over this vectorise.
  // inf / nan: all-ones exponent, mantissa kept; a NaN comes out quiet, as from the hardware.
  const uint32_t inf_nan = (mag << 13) | 0x7f800000u | (mag > 0x7c00u ? 0x00400000u : 0u);
  const uint32_t normal = (mag << 13) + (uint32_t{127 - 15} << 23);  // rebias the exponent
  const uint32_t subnormal =  // or zero: mag * 2^-24, exact
      bits_from_float(static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-24f);
  const uint32_t u = mag >= 0x7c00u ? inf_nan : mag >= 0x0400u ? normal : subnormal;
  return float_from_bits(u | sign);
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline bf16 from_float<bf16>(float f) {
  const uint32_t u = bits_from_float(f);
  // Adding 0x7fff plus the lowest kept bit rounds the dropped 16 bits to nearest, ties to even.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded)};  // torch's canonical NaN
}

template <>
inline fp16 from_float<fp16>(float f) {
  const uint32_t u = bits_from_float(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7fffffffu;
  // As in to_float(fp16): every case is computed, one is selected.
  // |f| >= 2^16 overflows to inf (values in [65520, 2^16) reach inf through rounding below).
  const uint32_t inf_nan = mag > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: fp16 subnormal. In [0.5, 1) fp32's ulp is 2^-24, the fp16 subnormal step, so
  // the fp32 adder's own round-to-nearest-even leaves the rounded mantissa in the low bits.
  const uint32_t subnormal = bits_from_float(float_from_bits(mag) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent (127 -> 15) and round 23 -> 10 mantissa bits to nearest even;
  // a carry out of the mantissa correctly bumps the exponent (up to inf).
  const uint32_t normal = (mag - (uint32_t{127 - 15} << 23) + 0xfffu + ((mag >> 13) & 1u)) >> 13;
  const uint32_t h = mag >= 0x47800000u ? inf_nan : mag < 0x38800000u ? subnormal : normal;
  return fp16{static_cast<uint16_t>(h | sign)};
}

}  // namespace qf
