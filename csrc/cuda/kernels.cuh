// Every CUDA launcher on one screen. Torch-free host declarations (also included by ops/common.h,
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

// GPT-NeoX ("rotate half") RoPE over the first rot_dim dims of each head; dims past rot_dim are
// copied (reference.rotary_embedding). fp32 maths, x*cos and rotate_half(x)*sin each rounded
// before the add (no FMA), one rounding to T: bit-identical to the reference.
template <typename T>
Status rotary_embedding(T* out,            // [batch, seq, heads, head_dim], contiguous
                        const T* x,        // [batch, seq, heads, head_dim], strides
                                           // (x_stride_b, x_stride_t, x_stride_h, 1)
                        const float* cos,  // [batch, seq, rot_dim], contiguous
                        const float* sin,  // [batch, seq, rot_dim], contiguous
                        int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                        int64_t rot_dim, int64_t x_stride_b, int64_t x_stride_t,
                        int64_t x_stride_h, cudaStream_t stream);

// rotary_embedding of q into q_out, and of k into a paged KV cache with v beside it: token i
// (sequence s = token_seq[i], position p = token_pos[i]) writes, for every head h,
// k_pages[page_table[s, p / P], h, p % P] = rope(k[i, h]) and v_pages[...] = v[i, h] (copied);
// q_out[i, h] = rope(q[i, h]). The roundings of rotary_embedding. q, k, v share their strides
// (views of one qkv buffer). The metadata are device arrays read unchecked: the caller guarantees
// that every page written is valid.
template <typename T>
Status rotary_kv_cache(T* q_out,                    // [N, H, D] contiguous
                       T* k_pages,                  // [num_pages, H, P, D] contiguous
                       T* v_pages,                  // [num_pages, H, P, D] contiguous
                       const T* q, const T* k, const T* v,  // [N, H, D] at (x_stride_n, x_stride_h, 1)
                       const float* cos,            // [N, rot_dim], contiguous
                       const float* sin,            // [N, rot_dim], contiguous
                       const int32_t* page_table,   // [num_seqs, ld_pt]
                       const int32_t* token_seq,    // [N]
                       const int32_t* token_pos,    // [N]
                       int64_t N, int64_t H, int64_t D, int64_t rot_dim, int64_t P,
                       int64_t ld_pt, int64_t x_stride_n, int64_t x_stride_h,
                       cudaStream_t stream);

// rotary_kv_cache into an int8 cache (reference.rotary_kv_cache with k_scales / v_scales): the
// rotated key, rounded to T as the 16-bit cache would hold it, and the value are quantized per
// group of D / G consecutive elements: s = max|x| / 127.0f (IEEE division; 1 when the max is 0),
// code = round-half-even(x / s) (IEEE division) clamped to [-127, 127]; codes and scales are
// bit-identical to quantize_kv's (float32 scales). q_out as rotary_kv_cache. Requires
// 1 <= G <= 16, D <= 65536, D % G == 0, (D / G) % 16 == 0.
template <typename T>
Status rotary_kv_cache_int8(T* q_out,                         // [N, H, D] contiguous
                            int8_t* k_pages, int8_t* v_pages,  // [num_pages, H, P, D] contiguous
                            float* k_scales, float* v_scales,  // [num_pages, H, P, G] contiguous
                            // q .. x_stride_h: rotary_kv_cache's
                            const T* q, const T* k, const T* v, const float* cos,
                            const float* sin, const int32_t* page_table, const int32_t* token_seq,
                            const int32_t* token_pos, int64_t N, int64_t H, int64_t D,
                            int64_t rot_dim, int64_t P, int64_t ld_pt, int64_t x_stride_n,
                            int64_t x_stride_h, int64_t G, cudaStream_t stream);

// ---- swiglu (swiglu.cu) -----------------------------------------------------------------------

// out = up * silu(gate), silu(g) = g / (1 + expf(-g)) rounded to T, the product rounded to T
// (reference.swiglu; CUDA's expf may differ from torch's CPU exp in the last fp32 bit).
template <typename T>
Status swiglu(T* out,         // [rows, ld_out], the first `cols` columns are written
              const T* up,    // [rows, ld_up]
              const T* gate,  // [rows, ld_gate]
              int64_t rows, int64_t cols, int64_t ld_out, int64_t ld_up, int64_t ld_gate,
              cudaStream_t stream);

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
// perm values outside [0, K) read x as 0 (ops/linear.cpp checks them on the CPU only: no sync here).
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

// Bytes of device workspace attention needs for N query tokens of H heads reading at most
// max_keys keys each (0 when no row's keys are split); the caller allocates it.
int64_t attention_workspace_bytes(int64_t N, int64_t H, int64_t D, int64_t max_keys);

// Causal attention over a paged KV cache (reference.attention): token i (sequence token_seq[i],
// position token_pos[i] < max_keys) sees its sequence's keys 0 .. token_pos[i], key j at
// k_pages[page_table[s, j / P], h, j % P]; fp32 scores, softmax and weighted sum (flash-decoding:
// the keys split into chunks, partials combined), the output rounded once to T. The metadata are
// device arrays read unchecked. 1 <= D <= 256.
template <typename T>
Status attention(T* out,                      // [N, H, D] contiguous
                 const T* q,                  // [N, H, D] at strides (sq_n, sq_h, 1)
                 const T* k_pages,            // [num_pages, H, P, D] contiguous
                 const T* v_pages,            // [num_pages, H, P, D] contiguous
                 const int32_t* page_table,   // [num_seqs, ld_pt]
                 const int32_t* token_seq,    // [N]
                 const int32_t* token_pos,    // [N]
                 int64_t N, int64_t H, int64_t D, int64_t P, int64_t ld_pt, int64_t max_keys,
                 int64_t sq_n, int64_t sq_h, float scale,
                 void* workspace,             // [workspace_bytes] >= attention_workspace_bytes(...)
                 int64_t workspace_bytes, cudaStream_t stream);

// attention over an int8 cache (reference.attention with k_scales / v_scales): key and value
// element d of a slot read as code * scale[d / (D / G)] in fp32, otherwise as attention (same
// workspace size: attention_workspace_bytes). Pools and scales contiguous. Requires G >= 1,
// D % G == 0 and (D / G) % 16 == 0.
template <typename T>
Status attention_int8(T* out,                                       // [N, H, D] contiguous
                      const T* q,                                   // as attention's
                      const int8_t* k_pages, const int8_t* v_pages,  // [num_pages, H, P, D]
                      const float* k_scales, const float* v_scales,  // [num_pages, H, P, G]
                      // page_table .. scale: attention's
                      const int32_t* page_table, const int32_t* token_seq,
                      const int32_t* token_pos, int64_t N, int64_t H, int64_t D, int64_t P,
                      int64_t ld_pt, int64_t max_keys, int64_t sq_n, int64_t sq_h, float scale,
                      int64_t G,
                      void* workspace,  // [workspace_bytes] >= attention_workspace_bytes(...)
                      int64_t workspace_bytes, cudaStream_t stream);

}  // namespace qf::cuda
