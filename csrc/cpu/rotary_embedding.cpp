// Rotary embedding (GPT-NeoX "rotate half") on the CPU, bit-exact with reference.rotary_embedding:
// with h = R/2, out[i] = x[i]*cos[i] - x[i+h]*sin[i] and out[i+h] = x[i+h]*cos[i+h] + x[i]*sin[i+h]
// for i < h, each product rounded to fp32 before the add (FMA contraction is off in this file,
// see fp_contract_off.h), then rounded once to T; dims R..D-1 pass through unchanged.
// Layout: x is [B, T, H, D] with any strides on B, T, H (the q/k views of the fused qkv output) and
// a contiguous last dim; cos/sin are contiguous [B, T, R] fp32; out is contiguous [B, T, H, D].
// rotary_kv_cache does the same for q into a contiguous output and for k into a KV cache
// [slots, H, S, D] at per-sequence slots and positions, copying v beside it (the model's step:
// one pass over the qkv output instead of two rotations and two copies).
// Parallelisation: OpenMP over the B*T*H rows (serial when small); the row worker is built for
// AVX-512, AVX2 and baseline x86 (QF_CPU_CLONES). Constraints: R even, 0 <= R <= D.
#include "../common/fp_contract_off.h"

#include "../common/simd.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

// Below this many elements the OpenMP fork/join costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

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

template <typename T>
Status rotary_kv_cache(T* q_out, T* k_cache, T* v_cache, const T* q, const T* k, const T* v,
                       const float* cos, const float* sin, const int64_t* slots,
                       const int64_t* start, const int64_t* n_new, int64_t batch, int64_t seq,
                       int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t x_stride_b,
                       int64_t x_stride_t, int64_t x_stride_h, int64_t c_stride_slot,
                       int64_t c_stride_h, int64_t c_stride_s) {
  if (batch < 0 || seq < 0 || heads < 0 || head_dim < 1 || rot_dim < 0 || rot_dim % 2 != 0 ||
      rot_dim > head_dim || x_stride_b < 0 || x_stride_t < 0 || x_stride_h < 0 ||
      c_stride_slot < 0 || c_stride_h < 0 || c_stride_s < 0)
    return Status::kInvalidArgument;
  const int64_t rows = batch * seq * heads;
  if (rows == 0) return Status::kOk;
  if (q_out == nullptr || k_cache == nullptr || v_cache == nullptr || q == nullptr ||
      k == nullptr || v == nullptr || slots == nullptr || start == nullptr || n_new == nullptr ||
      (rot_dim > 0 && (cos == nullptr || sin == nullptr)))
    return Status::kInvalidArgument;
  for (int64_t b = 0; b < batch; ++b)
    if (slots[b] < 0 || start[b] < 0 || n_new[b] < 0 || n_new[b] > seq)
      return Status::kInvalidArgument;
  // Row r < rows is a query; rows .. 2 * rows a key and its value (skipped past n_new[b]).
#pragma omp parallel for schedule(static) if (rows > 1 && 2 * rows * head_dim >= kParallelMinElements)
  for (int64_t r = 0; r < 2 * rows; ++r) {
    const int64_t i = r % rows;
    const int64_t h = i % heads, bt = i / heads, t = bt % seq, b = bt / seq;
    const int64_t in = b * x_stride_b + t * x_stride_t + h * x_stride_h;
    const float* c = cos + bt * rot_dim;
    const float* s = sin + bt * rot_dim;
    if (r < rows) {
      rotary_row(q_out + i * head_dim, q + in, c, s, head_dim, rot_dim);
    } else if (t < n_new[b]) {
      const int64_t at = slots[b] * c_stride_slot + h * c_stride_h + (start[b] + t) * c_stride_s;
      rotary_row(k_cache + at, k + in, c, s, head_dim, rot_dim);
      copy_row(v_cache + at, v + in, head_dim);
    }
  }
  return Status::kOk;
}

#define QF_INSTANTIATE(T)                                                                   \
  template Status rotary_kv_cache<T>(T*, T*, T*, const T*, const T*, const T*, const float*, \
                                     const float*, const int64_t*, const int64_t*,            \
                                     const int64_t*, int64_t, int64_t, int64_t, int64_t,      \
                                     int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                     int64_t);                                                \
  template Status rotary_embedding<T>(T*, const T*, const float*, const float*, int64_t,    \
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                      int64_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
