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

// Causal attention over a paged KV cache (reference.attention): token i belongs to sequence
// s = token_seq[i], sits at position p = token_pos[i] and sees that sequence's keys 0 .. p, key j
// at k_pages[page_table[s, j / P], h, j % P]. fp32 scores, online softmax and accumulation, the
// output rounded once to T. The caller guarantees the pages of every position read are valid.
template <typename T>
Status attention(T* out,                      // [N, H, D] contiguous
                 const T* q,                  // [N, H, D] at strides (sq_n, sq_h, 1)
                 const T* k_pages,            // [num_pages, H, P, D] contiguous
                 const T* v_pages,            // [num_pages, H, P, D] contiguous
                 const int32_t* page_table,   // [num_seqs, ld_pt]
                 const int32_t* token_seq,    // [N]
                 const int32_t* token_pos,    // [N]
                 int64_t N, int64_t H, int64_t D, int64_t P, int64_t ld_pt, int64_t sq_n,
                 int64_t sq_h, float scale);

// attention over an int8 KV cache (reference.attention with k_scales / v_scales): the pages hold
// int8 codes and the scales [num_pages, H, P, G] fp32, G per position and head, each for D / G
// consecutive elements; key j of a row reads as code * scale in fp32. fp32 maths as attention
// (the scale applied once per group and key, not per element: within fp32 rounding of the
// reference), the output rounded once to T. A token's output has the same bits however the
// step's tokens are chunked or packed (every (token, head) row is computed alone).
template <typename T>
Status attention_int8(T* out,                      // [N, H, D] contiguous
                      const T* q,                  // [N, H, D] at strides (sq_n, sq_h, 1)
                      const int8_t* k_pages,       // [num_pages, H, P, D] contiguous
                      const int8_t* v_pages,       // [num_pages, H, P, D] contiguous
                      const float* k_scales,       // [num_pages, H, P, G] contiguous
                      const float* v_scales,       // [num_pages, H, P, G] contiguous
                      const int32_t* page_table,   // [num_seqs, ld_pt]
                      const int32_t* token_seq,    // [N]
                      const int32_t* token_pos,    // [N]
                      int64_t N, int64_t H, int64_t D, int64_t P, int64_t ld_pt, int64_t sq_n,
                      int64_t sq_h, float scale, int64_t G);

// GPT-NeoX ("rotate half") RoPE over the first rot_dim dims of each head; dims past rot_dim are
// copied (reference.rotary_embedding). fp32 maths, x*cos and rotate_half(x)*sin each rounded
// before the add, one rounding to T.
template <typename T>
Status rotary_embedding(T* out,            // [batch, seq, heads, head_dim], contiguous
                        const T* x,        // [batch, seq, heads, head_dim], strides
                                           // (x_stride_b, x_stride_t, x_stride_h, 1)
                        const float* cos,  // [batch, seq, rot_dim], contiguous
                        const float* sin,  // [batch, seq, rot_dim], contiguous
                        int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                        int64_t rot_dim, int64_t x_stride_b, int64_t x_stride_t,
                        int64_t x_stride_h);

// rotary_embedding of q into q_out, and of k into a paged KV cache with v beside it: token i
// (sequence s = token_seq[i], position p = token_pos[i]) writes, for every head h,
// k_pages[page_table[s, p / P], h, p % P] = rope(k[i, h]) and v_pages[...] = v[i, h] (copied);
// q_out[i, h] = rope(q[i, h]). The roundings of rotary_embedding. q, k, v share their strides
// (views of one qkv buffer). The caller guarantees that every page written is valid.
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
                       int64_t ld_pt, int64_t x_stride_n, int64_t x_stride_h);

// rotary_kv_cache into an int8 KV cache (reference.rotary_kv_cache with k_scales / v_scales):
// q_out as rotary_kv_cache; the rotated key (rounded to T) and the value are quantized per group
// of D / G elements: s = max|x| / 127 (fp32; 1 for an all-zero group), code = x / s rounded half
// to even, clamped to [-127, 127]; codes and scales bit-identical to reference.quantize_kv.
template <typename T>
Status rotary_kv_cache_int8(T* q_out,                    // [N, H, D] contiguous
                            int8_t* k_pages,             // [num_pages, H, P, D] contiguous
                            int8_t* v_pages,             // [num_pages, H, P, D] contiguous
                            float* k_scales,             // [num_pages, H, P, G] contiguous
                            float* v_scales,             // [num_pages, H, P, G] contiguous
                            const T* q, const T* k, const T* v,  // [N, H, D] at (x_stride_n, x_stride_h, 1)
                            const float* cos,            // [N, rot_dim], contiguous
                            const float* sin,            // [N, rot_dim], contiguous
                            const int32_t* page_table,   // [num_seqs, ld_pt]
                            const int32_t* token_seq,    // [N]
                            const int32_t* token_pos,    // [N]
                            int64_t N, int64_t H, int64_t D, int64_t rot_dim, int64_t P,
                            int64_t ld_pt, int64_t x_stride_n, int64_t x_stride_h, int64_t G);

// out = up * silu(gate), silu(g) = g / (1 + exp(-g)) rounded to T, the product rounded to T
// (reference.swiglu).
template <typename T>
Status swiglu(T* out,         // [rows, ld_out], the first `cols` columns are written
              const T* up,    // [rows, ld_up]
              const T* gate,  // [rows, ld_gate]
              int64_t rows, int64_t cols, int64_t ld_out, int64_t ld_up, int64_t ld_gate);

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

// y = x . W^T + bias for int4 / int8 weights in our kernel layout (quant_linear.cpp; documented
// in qwen_fast/qweight.py): x quantized to int8 per row and 128-chunk (through perm, the act-order
// permutation of K, when given), integer chunk dots, fp32 scaling, rounded once to T. isa: kAuto
// (the best this CPU has), kAvx512Vnni, kAvx2 or kScalar (the portable loop).
int64_t quant_tile_bytes(int bits, int64_t K);                   // bytes of one tile of 16 outputs
int64_t quant_workspace_bytes(int64_t M, int64_t N, int64_t K);  // what `workspace` must hold
template <typename T>
Status quant_linear(T* y,               // [M, ld_y], the first N columns are written
                    const T* x,         // [M, ld_x], the first K columns are read
                    const uint8_t* w,   // [ceil(N / 16), quant_tile_bytes(bits, K)]
                    const T* bias,      // [N] or nullptr
                    const int64_t* perm,  // [K] or nullptr: the kernel reads x[m, perm[k]]
                    int64_t M, int64_t N, int64_t K, int bits, int64_t ld_y, int64_t ld_x,
                    void* workspace,    // quant_workspace_bytes(M, N, K), 64-byte aligned
                    int num_threads, CpuIsa isa);
// Two weights against the same x (the MLP's w1 and w2), no bias, no perm: x quantized once and
// one parallel region for both, whose threads take blocks of either (a decode step pays one
// fork/join and one ramp of the memory streams fewer). workspace: quant_workspace_bytes(M,
// 16 * (ceil(N1 / 16) + ceil(N2 / 16)), K). The outputs are quant_linear's, bit for bit.
template <typename T>
Status quant_linear_pair(T* y1, T* y2, const T* x, const uint8_t* w1, const uint8_t* w2,
                         int64_t M, int64_t N1, int64_t N2, int64_t K, int bits, int64_t ld_y1,
                         int64_t ld_y2, int64_t ld_x, void* workspace, int num_threads,
                         CpuIsa isa);

}  // namespace qf::cpu
