// Every CUDA launcher on one screen. Torch-free host declarations (also included by ops.cpp,
// compiled by the host compiler): raw device pointers, sizes, row strides in elements, and the
// stream to launch on. Launchers return a qf::Status (a CUDA error comes back as
// cuda_error_status(err)), never throw, never allocate, never synchronise.
// T is the storage type: float, qf::bf16 or qf::fp16 (explicitly instantiated for those).
#pragma once

#ifdef QF_SIMT
#include "../simt/simt.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

#include "../common/float16.h"
#include "../common/status.h"

namespace qf::cuda {

// out = (x * rsqrt(mean(x^2) + eps)) rounded to T, times weight, rounded to T (reference.rms_norm).
template <typename T>
Status rms_norm(T* out,           // [rows, ld_out], the first `hidden` columns are written
                const T* x,       // [rows, ld_x]
                const T* weight,  // [hidden]
                int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_x, float eps,
                cudaStream_t stream);

// residual_out = residual + x rounded to T; out = rms_norm(residual_out)
// (reference.fused_add_rms_norm).
template <typename T>
Status fused_add_rms_norm(T* out,             // [rows, ld_out]
                          T* residual_out,    // [rows, ld_residual_out]; may alias residual
                          const T* x,         // [rows, ld_x]
                          const T* residual,  // [rows, ld_residual]
                          const T* weight,    // [hidden]
                          int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_residual_out,
                          int64_t ld_x, int64_t ld_residual, float eps, cudaStream_t stream);

// ---- rotary_embedding, rotary_kv_cache (rotary_embedding.cu) ----------------------------------

// ---- swiglu (swiglu.cu) -----------------------------------------------------------------------

// ---- linear (linear.cu) -----------------------------------------------------------------------

// y = x . w^T + bias: fp32 products and sums, the bias added in fp32, rounded once to T
// (reference.linear). Streams w once per 16 rows of x: built for decode (M <= 16), correct for any M.
template <typename T>
Status linear(T* y,           // [M, ld_y], the first N columns are written
              const T* x,     // [M, ld_x], the first K columns are read
              const T* w,     // [N, K] contiguous
              const T* bias,  // [N], or nullptr for none
              int64_t M, int64_t N, int64_t K, int64_t ld_y, int64_t ld_x, cudaStream_t stream);

// ---- quant_linear: int4_gemm / int8_gemm (quant_linear.cu) -----------------------------------

// y = x . W^T + bias for int4 / int8 weights in the CPU kernel's layout (qwen_fast/qweight.py),
// W[n, k] = s * q - s * z dequantized exactly in fp32 in registers, fp32 products and sums with
// x[m, perm[k]] (perm: the act-order permutation, or nullptr for none), the bias added in fp32,
// rounded once to T. Streams the weights once per 16 rows of x (decode); correct for any M.
// perm values outside [0, K) read x as 0 (ops.cpp checks them on the CPU only: no sync here).
template <typename T>
Status quant_linear(T* y,                 // [M, ld_y], the first N columns are written
                    const T* x,           // [M, ld_x], the first K columns are read
                    const uint8_t* w,     // [ceil(N / 16), C * record] (C = ceil(K / 128)), 16-byte aligned
                    const T* bias,        // [N] or nullptr
                    const int64_t* perm,  // [K] or nullptr
                    int64_t M, int64_t N, int64_t K, int bits, int64_t ld_y, int64_t ld_x,
                    cudaStream_t stream);

// The dense weight of the same layout in the original input order: out[n, perm[k]] (out[n, k]
// without perm) = s * q - s * z rounded to T, as QuantWeight.dequantize(T); for prefill, where
// a dense GEMM (at::linear) on it runs instead of the GEMV.
template <typename T>
Status quant_linear_dequantize(T* out,               // [N, ld_out], the first K columns are written
                               const uint8_t* w,     // as quant_linear's
                               const int64_t* perm,  // [K] or nullptr
                               int64_t N, int64_t K, int bits, int64_t ld_out,
                               cudaStream_t stream);

// ---- attention (attention.cu) -----------------------------------------------------------------

}  // namespace qf::cuda
