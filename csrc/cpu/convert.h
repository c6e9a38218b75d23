// Runs of 16-bit values to and from fp32 on the CPU, for the elementwise kernels' fp16 paths.
// fp16 has no cheap integer conversion (bf16's is a shift), and the compiler vectorises ours
// (common/float16.h) into a dozen integer instructions per vector; these use the hardware's
// (vcvtph2ps / vcvtps2ph, F16C in AVX-512) where the CPU has AVX-512, else those loops. Both
// give the same bits: exact widening, rounding to nearest even (NaN stays NaN).
#pragma once

#include <cstdint>

#include "../common/float16.h"

namespace qf::cpu {

void to_float_n(float* dst, const fp16* src, int64_t n);
void from_float_n(fp16* dst, const float* src, int64_t n);
// v[i] = to_float(from_float<fp16>(v[i])): rounded to fp16's precision, in place.
void round_fp16_n(float* v, int64_t n);

}  // namespace qf::cpu
