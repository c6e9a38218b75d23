// Rotary embedding (GPT-NeoX "rotate half") on the CPU, bit-exact with reference.rotary_embedding:
// with h = R/2, out[i] = x[i]*cos[i] - x[i+h]*sin[i] and out[i+h] = x[i+h]*cos[i+h] + x[i]*sin[i+h]
// for i < h, each product rounded to fp32 before the add (FMA contraction is off in this file,
// see fp_contract_off.h), then rounded once to T; dims R..D-1 pass through unchanged.
// Layout: x is [B, T, H, D] with any strides on B, T, H (the q/k views of the fused qkv output) and
// a contiguous last dim; cos/sin are contiguous [B, T, R] fp32; out is contiguous [B, T, H, D].
// rotary_kv_cache does the same for q [N, H, D] (the packed tokens of a step) into a contiguous
// output and for k into a paged KV cache [pages, H, P, D] at each token's page and offset, copying
// v beside it (the model's step: one pass over the qkv output instead of two rotations and two
// copies); rotary_kv_cache_int8 writes int8 codes and fp32 scales of them instead
// (reference.quantize_kv, bit for bit).
// Parallelisation: OpenMP over the B*T*H rows (serial when small); the row worker is built for
// AVX-512, AVX2 and baseline x86 (QF_CPU_CLONES). Constraints: R even, 0 <= R <= D.
#include "../common/fp_contract_off.h"

#include <algorithm>
#include <cmath>

#include "../common/simd.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

// Below this many elements the OpenMP fork/join costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;
// The largest head dim rotary_kv_cache_int8 takes (its rotated key is held on the stack).
constexpr int64_t kMaxQuantHeadDim = 1024;

template <typename T>
QF_CPU_CLONES void rotary_row(T* __restrict out,          // [head_dim]
                              const T* __restrict x,      // [head_dim]
                              const float* __restrict cos,  // [rot_dim]
                              const float* __restrict sin,  // [rot_dim]
                              int64_t head_dim, int64_t rot_dim) {
  const int64_t half = rot_dim / 2;
  // x*cos + rotate_half(x)*sin with rotate_half(x) = [-x[h:], x[:h]]; p + (-q) == p - q exactly.
  for (int64_t i = 0; i < half; ++i) {
    const float lo = to_float(x[i]);
    const float hi = to_float(x[i + half]);
    out[i] = from_float<T>(lo * cos[i] - hi * sin[i]);
    out[i + half] = from_float<T>(hi * cos[i + half] + lo * sin[i + half]);
  }
  // The reference converts these to fp32 and back: the same as a copy, NaN payloads aside.
  for (int64_t i = rot_dim; i < head_dim; ++i) out[i] = from_float<T>(to_float(x[i]));
}

}  // namespace

template <typename T>
Status rotary_embedding(T* out, const T* x, const float* cos, const float* sin, int64_t batch,
                        int64_t seq, int64_t heads, int64_t head_dim, int64_t rot_dim,
                        int64_t x_stride_b, int64_t x_stride_t, int64_t x_stride_h) {
  if (batch < 0 || seq < 0 || heads < 0 || head_dim < 1 || rot_dim < 0 || rot_dim % 2 != 0 ||
      rot_dim > head_dim || x_stride_b < 0 || x_stride_t < 0 || x_stride_h < 0)
    return Status::kInvalidArgument;
  const int64_t rows = batch * seq * heads;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || x == nullptr || (rot_dim > 0 && (cos == nullptr || sin == nullptr)))
    return Status::kInvalidArgument;
#pragma omp parallel for collapse(3) schedule(static) \
    if (rows > 1 && rows * head_dim >= kParallelMinElements)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t bt = b * seq + t;  // row of the cos/sin tables
        rotary_row(out + (bt * heads + h) * head_dim,
                   x + b * x_stride_b + t * x_stride_t + h * x_stride_h, cos + bt * rot_dim,
                   sin + bt * rot_dim, head_dim, rot_dim);
      }
  return Status::kOk;
}

// The rows of rotary_kv_cache: (b, t, h) for the queries, then the keys and values of the
// positions each sequence really appends; the same row worker as rotary_embedding.
template <typename T>
QF_CPU_CLONES void copy_row(T* __restrict out, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i];
}

// The pass both caches share: the checks of the step's metadata, then rows r < N * H the queries
// (i, h), rotated into q_out, and rows N * H .. 2 * N * H the keys and values, each handed to
// write(slot, k row, v row, cos, sin) with slot = (page * H + h) * P + p % P, the cache's own
// format's writer. The caller has checked its pages and the sizes.
template <typename T, typename Write>
Status rotary_kv_pass(T* q_out, const T* q, const T* k, const T* v, const float* cos,
                      const float* sin, const int32_t* page_table, const int32_t* token_seq,
                      const int32_t* token_pos, int64_t N, int64_t H, int64_t D, int64_t rot_dim,
                      int64_t P, int64_t ld_pt, int64_t x_stride_n, int64_t x_stride_h,
                      Write write) {
  if (N < 0 || H < 0 || D < 1 || rot_dim < 0 || rot_dim % 2 != 0 || rot_dim > D || P < 1 ||
      ld_pt < 0 || x_stride_n < 0 || x_stride_h < 0)
    return Status::kInvalidArgument;
  const int64_t rows = N * H;
  if (rows == 0) return Status::kOk;
  if (q_out == nullptr || q == nullptr || k == nullptr || v == nullptr ||
      page_table == nullptr || token_seq == nullptr || token_pos == nullptr ||
      (rot_dim > 0 && (cos == nullptr || sin == nullptr)))
    return Status::kInvalidArgument;
  for (int64_t i = 0; i < N; ++i)
    if (token_seq[i] < 0 || token_pos[i] < 0 || token_pos[i] / P >= ld_pt)
      return Status::kInvalidArgument;
#pragma omp parallel for schedule(static) if (rows > 1 && 2 * rows * D >= kParallelMinElements)
  for (int64_t r = 0; r < 2 * rows; ++r) {
    const int64_t row = r % rows;
    const int64_t h = row % H, i = row / H;
    const int64_t in = i * x_stride_n + h * x_stride_h;
    const float* c = cos + i * rot_dim;
    const float* s = sin + i * rot_dim;
    if (r < rows) {
      rotary_row(q_out + row * D, q + in, c, s, D, rot_dim);
    } else {
      const int64_t p = token_pos[i];
      const int64_t page = page_table[token_seq[i] * ld_pt + p / P];
      write((page * H + h) * P + p % P, k + in, v + in, c, s);
    }
  }
  return Status::kOk;
}

template <typename T>
Status rotary_kv_cache(T* q_out, T* k_pages, T* v_pages, const T* q, const T* k, const T* v,
                       const float* cos, const float* sin, const int32_t* page_table,
                       const int32_t* token_seq, const int32_t* token_pos, int64_t N, int64_t H,
                       int64_t D, int64_t rot_dim, int64_t P, int64_t ld_pt, int64_t x_stride_n,
                       int64_t x_stride_h) {
  if (N * H > 0 && (k_pages == nullptr || v_pages == nullptr)) return Status::kInvalidArgument;
  return rotary_kv_pass(q_out, q, k, v, cos, sin, page_table, token_seq, token_pos, N, H, D,
                        rot_dim, P, ld_pt, x_stride_n, x_stride_h,
                        [&](int64_t slot, const T* kx, const T* vx, const float* c,
                            const float* s) {
                          rotary_row(k_pages + slot * D, kx, c, s, D, rot_dim);
                          copy_row(v_pages + slot * D, vx, D);
                        });
}

// x [D] (already in T: the rotated key as the 16-bit cache would hold it, or the value) into
// int8 codes and G scales, as reference.quantize_kv with fp32 scales: per group of gs = D / G
// elements s = max|x| / 127 (an fp32 division; 1 when it is 0 or NaN, as torch.where(s > 0, s,
// 1)), code = x / s (an fp32 division, not a product with 1 / s) rounded half to even and
// clamped to [-127, 127]. Contraction is off in this file; the division is exact IEEE.
template <typename T>
QF_CPU_CLONES void quantize_row(int8_t* __restrict codes,   // [D]
                                float* __restrict scales,   // [G]
                                const T* __restrict x,      // [D]
                                int64_t D, int64_t G) {
  const int64_t gs = D / G;
  for (int64_t g = 0; g < G; ++g) {
    const T* xg = x + g * gs;
    float m = 0.0f;
    for (int64_t d = 0; d < gs; ++d) m = std::max(m, std::fabs(to_float(xg[d])));
    float s = m / 127.0f;
    s = s > 0.0f ? s : 1.0f;
    scales[g] = s;
    for (int64_t d = 0; d < gs; ++d) {
      const float r = __builtin_roundevenf(to_float(xg[d]) / s);
      codes[g * gs + d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
    }
  }
}

template <typename T>
Status rotary_kv_cache_int8(T* q_out, int8_t* k_pages, int8_t* v_pages, float* k_scales,
                            float* v_scales, const T* q, const T* k, const T* v, const float* cos,
                            const float* sin, const int32_t* page_table, const int32_t* token_seq,
                            const int32_t* token_pos, int64_t N, int64_t H, int64_t D,
                            int64_t rot_dim, int64_t P, int64_t ld_pt, int64_t x_stride_n,
                            int64_t x_stride_h, int64_t G) {
  if (D > kMaxQuantHeadDim || G < 1 || (D > 0 && D % G) ||
      (N * H > 0 && (k_pages == nullptr || v_pages == nullptr || k_scales == nullptr ||
                     v_scales == nullptr)))
    return Status::kInvalidArgument;
  return rotary_kv_pass(q_out, q, k, v, cos, sin, page_table, token_seq, token_pos, N, H, D,
                        rot_dim, P, ld_pt, x_stride_n, x_stride_h,
                        [&](int64_t slot, const T* kx, const T* vx, const float* c,
                            const float* s) {
                          T kr[kMaxQuantHeadDim];  // the rotated key in T, as the 16-bit cache holds it
                          rotary_row(kr, kx, c, s, D, rot_dim);
                          quantize_row(k_pages + slot * D, k_scales + slot * G, kr, D, G);
                          quantize_row(v_pages + slot * D, v_scales + slot * G, vx, D, G);
                        });
}

#define QF_INSTANTIATE(T)                                                                   \
  template Status rotary_kv_cache_int8<T>(T*, int8_t*, int8_t*, float*, float*, const T*,   \
                                          const T*, const T*, const float*, const float*,   \
                                          const int32_t*, const int32_t*, const int32_t*,   \
                                          int64_t, int64_t, int64_t, int64_t, int64_t,      \
                                          int64_t, int64_t, int64_t, int64_t);              \
  template Status rotary_kv_cache<T>(T*, T*, T*, const T*, const T*, const T*, const float*, \
                                     const float*, const int32_t*, const int32_t*,            \
                                     const int32_t*, int64_t, int64_t, int64_t, int64_t,      \
                                     int64_t, int64_t, int64_t, int64_t);                     \
  template Status rotary_embedding<T>(T*, const T*, const float*, const float*, int64_t,    \
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                      int64_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
