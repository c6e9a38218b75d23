// Device helpers shared by the GEMV kernels (linear.cu, quant_linear.cu): the warp
// reduce-scatter that sums many per-lane partial results with few shuffles, and the exact
// conversion of a small unsigned integer to fp32 without the slow conversion unit.
#pragma once

#include "common.cuh"

namespace qf::cuda {

// Sums `v` (C values per lane) over the lanes that differ in the lane-index bits kOffset,
// kOffset / 2, ..., kLowest (powers of two), halving the values a lane keeps at each bit while
// it has more than one: a lane gives away half of them and adds the partner's copy of the half
// it keeps, so that C values cost C - 1 shuffles instead of C * log2(lanes). On return the lane
// holds in v[i] the total of the value first numbered base + i (for i < max(1, C >> bits));
// lanes that differ only in the bits summed after a single value was left hold copies, and
// `rep` is cleared on all but the one whose such bits are zero. Every lane of the warp must
// call it (full-warp shuffles).
template <int C, int kOffset, int kLowest, int V>
__device__ __forceinline__ void reduce_scatter(float (&v)[V], int lane, int& base, bool& rep) {
  if constexpr (kOffset >= kLowest) {
    if constexpr (C > 1) {
      constexpr int kHalf = C / 2;
      const bool upper = (lane & kOffset) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float give = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + shfl_xor(give, kOffset);
      }
      if (upper) base += kHalf;
      reduce_scatter<kHalf, kOffset / 2, kLowest>(v, lane, base, rep);
    } else {
      v[0] += shfl_xor(v[0], kOffset);
      if (lane & kOffset) rep = false;
      reduce_scatter<1, kOffset / 2, kLowest>(v, lane, base, rep);
    }
  }
}

// v (< 2^23) as fp32, exactly: the bits of 2^23 + v minus 2^23 (a logic op and an add, where a
// conversion instruction runs at a quarter of the FMA rate).
__device__ __forceinline__ float small_uint_to_f32(unsigned v) {
  return __uint_as_float(0x4B000000u | v) - 8388608.0f;
}

}  // namespace qf::cuda
