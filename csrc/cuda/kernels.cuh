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

// Bytes of device workspace attention needs for these sizes (0 when no row's keys are split);
// the caller allocates it (the launcher never does).
int64_t attention_workspace_bytes(int64_t B, int64_t T, int64_t H, int64_t D, int64_t S);

// Causal attention over a KV cache (reference.attention): query t of sequence b sits at position
// start[b] + t and sees keys 0 .. min(start[b] + t, S - 1); fp32 scores, softmax and weighted sum
// (flash-decoding: the keys split into chunks, partials combined), the output rounded once to T.
// Strides in elements; head dims contiguous; 1 <= D <= 256; start (device memory) >= 0.
template <typename T>
Status attention(T* out,                // [B, T, H, D] contiguous
                 const T* q,            // [B, T, H, D] at strides (sq_b, sq_t, sq_h, 1)
                 const T* k,            // [B, S, H, D] at strides (sk_b, sk_s, sk_h, 1)
                 const T* v,            // [B, S, H, D] at strides (sv_b, sv_s, sv_h, 1)
                 const int64_t* start,  // [B] on the device: cached positions before the queries
                 int64_t B, int64_t T_, int64_t H, int64_t D, int64_t S, int64_t sq_b,
                 int64_t sq_t, int64_t sq_h, int64_t sk_b, int64_t sk_s, int64_t sk_h,
                 int64_t sv_b, int64_t sv_s, int64_t sv_h, float scale,
                 void* workspace,       // [workspace_bytes], >= attention_workspace_bytes(...)
                 int64_t workspace_bytes, cudaStream_t stream);

}  // namespace qf::cuda
