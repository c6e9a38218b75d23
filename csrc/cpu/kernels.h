// Every CPU launcher on one screen. Torch-free: raw pointers, sizes and row strides (in
// elements). Launchers return a qf::Status, never throw and never allocate.
// T is the storage type: float, qf::bf16 or qf::fp16 (explicitly instantiated for those).
#pragma once

#include <cstdint>

#include "../common/float16.h"
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

// Causal attention over a KV cache (reference.attention): query t of sequence b sits at position
// start[b] + t and sees keys 0 .. min(start[b] + t, S - 1); fp32 scores, online softmax and
// accumulation, the output rounded once to T. Strides are in elements; the head dim is contiguous.
template <typename T>
Status attention(T* out,                // [B, T, H, D] contiguous
                 const T* q,            // [B, T, H, D] at strides (sq_b, sq_t, sq_h, 1)
                 const T* k,            // [B, S, H, D] at strides (sk_b, sk_s, sk_h, 1)
                 const T* v,            // [B, S, H, D] at strides (sv_b, sv_s, sv_h, 1)
                 const int64_t* start,  // [B] cached positions before this call's queries
                 int64_t B, int64_t T_, int64_t H, int64_t D, int64_t S, int64_t sq_b,
                 int64_t sq_t, int64_t sq_h, int64_t sk_b, int64_t sk_s, int64_t sk_h,
                 int64_t sv_b, int64_t sv_s, int64_t sv_h, float scale);

}  // namespace qf::cpu
