// SwiGLU on the CPU: out = round(up * round(silu(gate))), silu(g) = g / (1 + exp(-g)) in fp32, as
// torch's CPU silu computes it (a division, not g * sigmoid(g)); the roundings to T are those of
// reference.swiglu (none for fp32). exp is SLEEF's expf_u10, operation for operation (explicit
// FMAs, no other contraction: fp_contract_off.h), because that is torch's vectorised exp on
// AVX2 / AVX-512; so the output equals torch's vector path bit for bit (torch's scalar tail uses
// libm expf, which can differ by an fp32 ulp). Layout: [rows, cols] with row strides ld_*,
// contiguous rows. Parallelisation: OpenMP over rows; the row worker is built for AVX-512, AVX2
// (both vectorise the exp) and baseline x86 (QF_CPU_CLONES). Constraints: cols >= 1.
#include "../common/fp_contract_off.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common/simd.h"
#include "../common/sleef_expf.h"
#include "convert.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

// Below this many elements the OpenMP fork/join costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

template <typename T>
QF_CPU_CLONES void swiglu_row(T* __restrict out,         // [cols]
                              const T* __restrict up,    // [cols]
                              const T* __restrict gate,  // [cols]
                              int64_t cols) {
  if constexpr (std::is_same_v<T, fp16>) {
    // The same maths on runs widened to fp32 (convert.h: the hardware's conversions).
    constexpr int64_t kRun = 512;
    for (int64_t i0 = 0; i0 < cols; i0 += kRun) {
      const int64_t n = std::min(kRun, cols - i0);
      float g[kRun], u[kRun];
      to_float_n(g, gate + i0, n);
      to_float_n(u, up + i0, n);
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + sleef_expf(-g[i]));
      round_fp16_n(g, n);
      for (int64_t i = 0; i < n; ++i) g[i] = u[i] * g[i];
      from_float_n(out + i0, g, n);
    }
    return;
  }
  for (int64_t i = 0; i < cols; ++i) {
    const float g = to_float(gate[i]);
    // torch rounds silu to the tensor dtype, then multiplies in fp32 and rounds again.
    const float silu = to_float(from_float<T>(g / (1.0f + sleef_expf(-g))));
    out[i] = from_float<T>(to_float(up[i]) * silu);
  }
}

}  // namespace

template <typename T>
Status swiglu(T* out, const T* up, const T* gate, int64_t rows, int64_t cols, int64_t ld_out,
              int64_t ld_up, int64_t ld_gate) {
  if (rows < 0 || cols < 1 || ld_up < 0 || ld_gate < 0 || (rows > 1 && ld_out < cols))
    return Status::kInvalidArgument;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || up == nullptr || gate == nullptr) return Status::kInvalidArgument;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * cols >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r)
    swiglu_row(out + r * ld_out, up + r * ld_up, gate + r * ld_gate, cols);
  return Status::kOk;
}

#define QF_INSTANTIATE(T) \
  template Status swiglu<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
