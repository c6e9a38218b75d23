// Every CPU launcher on one screen. Torch-free: raw pointers, sizes and row strides (in
// elements). Launchers return a qf::Status, never throw and never allocate.
// T is the storage type: float, qf::bf16 or qf::fp16 (explicitly instantiated for those).
#pragma once

#include <cstdint>

#include "../common/float16.h"
#include "../common/simd.h"
#include "../common/status.h"

namespace qf::cpu {

// out = (x * rsqrt(mean(x^2) + eps)) rounded to T, times weight, rounded to T (reference.rms_norm).
template <typename T>
Status rms_norm(T* out,           // [rows, ld_out], the first `hidden` columns are written
                const T* x,       // [rows, ld_x]
                const T* weight,  // [hidden]
                int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_x, float eps);

// residual_out = residual + x rounded to T; out = rms_norm(residual_out)
// (reference.fused_add_rms_norm).
template <typename T>
Status fused_add_rms_norm(T* out,             // [rows, ld_out]
                          T* residual_out,    // [rows, ld_residual_out]; may alias residual
                          const T* x,         // [rows, ld_x]
                          const T* residual,  // [rows, ld_residual]
                          const T* weight,    // [hidden]
                          int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_residual_out,
                          int64_t ld_x, int64_t ld_residual, float eps);

// y = x . w^T + bias: fp32 products and sums, the bias added in fp32, rounded once to T
// (reference.linear). Streams w once, each of num_threads OpenMP threads owning a block of
// output columns; built for small M (decode), correct for any M. isa: kAuto = the best this CPU
// has; a lower level forces that kernel (kUnsupported if the CPU lacks it).
template <typename T>
Status linear(T* y,           // [M, ld_y], the first N columns are written
              const T* x,     // [M, ld_x], the first K columns are read
              const T* w,     // [N, K] contiguous
              const T* bias,  // [N], or nullptr for none
              int64_t M, int64_t N, int64_t K, int64_t ld_y, int64_t ld_x, int num_threads,
              CpuIsa isa);

}  // namespace qf::cpu
