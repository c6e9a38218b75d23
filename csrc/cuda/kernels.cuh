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

// ---- quant_linear: int4_gemm / int8_gemm (quant_linear.cu) -----------------------------------

// ---- attention (attention.cu) -----------------------------------------------------------------

}  // namespace qf::cuda
