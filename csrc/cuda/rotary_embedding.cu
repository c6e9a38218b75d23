// RoPE (GPT-NeoX "rotate half") on the GPU, bit-exact with reference.rotary_embedding: with
// h = R/2, out[i] = x[i]*cos[i] - x[i+h]*sin[i], out[i+h] = x[i+h]*cos[i+h] + x[i]*sin[i+h], each
// product an __fmul_rn and the sum an __fadd_rn (no FMA: torch rounds the products), rounded once
// to T; dims R..D-1 copied. rotary_kv_cache: q into q_out, k rotated and v copied into a paged KV
// cache [pages, H, P, D] (token i at page page_table[token_seq[i], token_pos[i] / P], offset
// token_pos[i] % P), in one pass. Layout: x [B, T, H, D] at any B, T, H strides, q, k, v [N, H, D]
// at any N, H strides, head dim contiguous; cos/sin contiguous [B, T, R] / [N, R] fp32.
// Parallelisation: one thread per 16-byte chunk of a head row (one element where D, R/2, a stride
// or a pointer do not allow vectors), consecutive threads on consecutive chunks, grid-stride over
// all rows. Constraints: R even, 0 <= R <= D < 2^31, P >= 1; outputs overlap no input; the page
// metadata are read unchecked; no allocation, no sync.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {
// Named, because the emulator's module compiles every .cu file in one translation unit.
namespace rotary_detail {

constexpr int kVecBytes = 16;
constexpr int kThreads = 256;

// dst[0..N) = p[0..N) (fp32), as 16-byte loads when N >= 4 (p then 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_f32(float (&dst)[N], const float* p) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const Vec<float, 4> v = load_vec<float, 4>(p + i);
#pragma unroll
      for (int k = 0; k < 4; ++k) dst[i + k] = v.v[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = p[k];
  }
}

// Items of a head row: half / VEC rotations, then (head_dim - rot_dim) / VEC copies.
template <int VEC>
__host__ __device__ __forceinline__ int64_t rope_items(int64_t head_dim, int64_t rot_dim) {
  return rot_dim / 2 / VEC + (head_dim - rot_dim) / VEC;
}

// Item j of one head row: j < half / VEC rotates the VEC elements at j * VEC with those at
// half + j * VEC; a later j copies the VEC elements at rot_dim + (j - half / VEC) * VEC.
template <typename T, int VEC>
__device__ __forceinline__ void rope_item(T* out,            // [head_dim]
                                          const T* x,        // [head_dim]
                                          const float* cos,  // [rot_dim]
                                          const float* sin,  // [rot_dim]
                                          int64_t j, int64_t half) {
  const int64_t half_vecs = half / VEC;
  if (j < half_vecs) {
    const int64_t lo = j * VEC, hi = half + j * VEC;
    const Vec<T, VEC> a = load_vec<T, VEC>(x + lo);
    const Vec<T, VEC> b = load_vec<T, VEC>(x + hi);
    float c_lo[VEC], s_lo[VEC], c_hi[VEC], s_hi[VEC];
    load_f32<VEC>(c_lo, cos + lo);
    load_f32<VEC>(s_lo, sin + lo);
    load_f32<VEC>(c_hi, cos + hi);
    load_f32<VEC>(s_hi, sin + hi);
    Vec<T, VEC> o_lo, o_hi;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xl = to_f32(a.v[k]), xh = to_f32(b.v[k]);
      // x*cos + rotate_half(x)*sin with rotate_half(x) = [-x[h:], x[:h]]: p + (-q), exactly p - q.
      o_lo.v[k] = from_f32<T>(__fadd_rn(__fmul_rn(xl, c_lo[k]), -__fmul_rn(xh, s_lo[k])));
      o_hi.v[k] = from_f32<T>(__fadd_rn(__fmul_rn(xh, c_hi[k]), __fmul_rn(xl, s_hi[k])));
    }
    store_vec<T, VEC>(out + lo, o_lo);
    store_vec<T, VEC>(out + hi, o_hi);
  } else {
    // The reference converts these to fp32 and back: the same as a copy, NaN payloads aside.
    const int64_t at = 2 * half + (j - half_vecs) * VEC;
    store_vec<T, VEC>(out + at, load_vec<T, VEC>(x + at));
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rotary_embedding_kernel(T* out,            // [batch, seq, heads, head_dim], contiguous
                            const T* x,        // [batch, seq, heads, head_dim] at x_stride_*
                            const float* cos,  // [batch, seq, rot_dim]
                            const float* sin,  // [batch, seq, rot_dim]
                            int64_t rows, int64_t seq, int64_t heads, int64_t head_dim,
                            int64_t rot_dim, int64_t x_stride_b, int64_t x_stride_t,
                            int64_t x_stride_h) {
  const int64_t items = rope_items<VEC>(head_dim, rot_dim);
  const int64_t total = rows * items;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t row = i / items, j = i - row * items;
    const int64_t bt = row / heads, h = row - bt * heads;  // bt: the row of the cos/sin tables
    const int64_t b = bt / seq, t = bt - b * seq;
    rope_item<T, VEC>(out + row * head_dim, x + b * x_stride_b + t * x_stride_t + h * x_stride_h,
                      cos + bt * rot_dim, sin + bt * rot_dim, j, rot_dim / 2);
  }
}

// A row (i, h) has three runs of items: q's rotation into q_out, k's rotation into its page
// slot and v's copy (D / VEC chunks) beside it.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rotary_kv_cache_kernel(T* q_out,                   // [N, H, D], contiguous
                           T* k_pages,                 // [num_pages, H, P, D], contiguous
                           T* v_pages,                 // [num_pages, H, P, D], contiguous
                           const T* q, const T* k,
                           const T* v,                 // [N, H, D] each, at (x_stride_n, x_stride_h, 1)
                           const float* cos,           // [N, rot_dim]
                           const float* sin,           // [N, rot_dim]
                           const int32_t* page_table,  // [num_seqs, ld_pt]
                           const int32_t* token_seq,   // [N]
                           const int32_t* token_pos,   // [N]
                           int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                           int64_t P, int64_t ld_pt, int64_t x_stride_n, int64_t x_stride_h) {
  const int64_t rot_items = rope_items<VEC>(head_dim, rot_dim);
  const int64_t items = 2 * rot_items + head_dim / VEC;
  const int64_t total = rows * items;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t row = i / items, j = i - row * items;
    const int64_t n = row / heads, h = row - n * heads;
    const int64_t in = n * x_stride_n + h * x_stride_h;
    const float* c = cos + n * rot_dim;
    const float* s = sin + n * rot_dim;
    if (j < rot_items) {
      rope_item<T, VEC>(q_out + row * head_dim, q + in, c, s, j, rot_dim / 2);
      continue;
    }
    const int64_t pos = __ldg(token_pos + n);
    const int64_t page = __ldg(page_table + __ldg(token_seq + n) * ld_pt + pos / P);
    const int64_t at = ((page * heads + h) * P + pos % P) * head_dim;
    if (j < 2 * rot_items) {
      rope_item<T, VEC>(k_pages + at, k + in, c, s, j - rot_items, rot_dim / 2);
    } else {
      const int64_t o = (j - 2 * rot_items) * VEC;
      store_vec<T, VEC>(v_pages + at + o, load_vec<T, VEC>(v + in + o));
    }
  }
}

// One thread per item; a grid past INT_MAX blocks strides over the rest.
unsigned grid_size(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, INT_MAX));
}

Status launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Whether head rows of these sizes and strides, at these pointers, can move as VEC-element
// vectors: every chunk of a row (rotated halves, copied tail, tables) starts on 16 bytes.
template <int VEC>
bool vector_rows(int64_t head_dim, int64_t rot_dim, std::initializer_list<int64_t> strides,
                 std::initializer_list<const void*> ptrs) {
  if (head_dim % VEC != 0 || (rot_dim / 2) % VEC != 0) return false;
  for (const int64_t s : strides)
    if (s % VEC != 0) return false;
  for (const void* p : ptrs)
    if (!aligned(p)) return false;
  return true;
}

bool bad_sizes(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t rot_dim) {
  return batch < 0 || seq < 0 || heads < 0 || head_dim < 1 || head_dim > INT_MAX ||
         rot_dim < 0 || rot_dim % 2 != 0 || rot_dim > head_dim;
}

// The launchers' bodies: argument checks, then the vector kernel where sizes, strides and
// pointers allow it, else the scalar one.
template <typename S>
Status launch_rope(S* out, const S* x, const float* cos, const float* sin, int64_t batch,
                   int64_t seq, int64_t heads, int64_t head_dim, int64_t rot_dim,
                   int64_t x_stride_b, int64_t x_stride_t, int64_t x_stride_h,
                   cudaStream_t stream) {
  if (bad_sizes(batch, seq, heads, head_dim, rot_dim) || x_stride_b < 0 || x_stride_t < 0 ||
      x_stride_h < 0)
    return Status::kInvalidArgument;
  const int64_t rows = batch * seq * heads;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || x == nullptr || (rot_dim > 0 && (cos == nullptr || sin == nullptr)))
    return Status::kInvalidArgument;
  using T = device_t<S>;
  constexpr int kVec = kVecBytes / sizeof(T);
  auto* o = reinterpret_cast<T*>(out);
  const auto* xi = reinterpret_cast<const T*>(x);
  if (vector_rows<kVec>(head_dim, rot_dim, {x_stride_b, x_stride_t, x_stride_h},
                        {out, x, cos, sin})) {
    QF_LAUNCH(grid_size(rows * rope_items<kVec>(head_dim, rot_dim)), kThreads, 0, stream,
              rotary_embedding_kernel<T, kVec>)(o, xi, cos, sin, rows, seq, heads, head_dim,
                                                rot_dim, x_stride_b, x_stride_t, x_stride_h);
  } else {
    QF_LAUNCH(grid_size(rows * rope_items<1>(head_dim, rot_dim)), kThreads, 0, stream,
              rotary_embedding_kernel<T, 1>)(o, xi, cos, sin, rows, seq, heads, head_dim, rot_dim,
                                             x_stride_b, x_stride_t, x_stride_h);
  }
  return launch_status();
}

template <typename S>
Status launch_rope_kv(S* q_out, S* k_pages, S* v_pages, const S* q, const S* k, const S* v,
                      const float* cos, const float* sin, const int32_t* page_table,
                      const int32_t* token_seq, const int32_t* token_pos, int64_t N, int64_t H,
                      int64_t D, int64_t rot_dim, int64_t P, int64_t ld_pt, int64_t x_stride_n,
                      int64_t x_stride_h, cudaStream_t stream) {
  if (bad_sizes(N, 1, H, D, rot_dim) || P < 1 || ld_pt < 0 || x_stride_n < 0 || x_stride_h < 0)
    return Status::kInvalidArgument;
  const int64_t rows = N * H;
  if (rows == 0) return Status::kOk;
  if (q_out == nullptr || k_pages == nullptr || v_pages == nullptr || q == nullptr ||
      k == nullptr || v == nullptr || page_table == nullptr || token_seq == nullptr ||
      token_pos == nullptr || (rot_dim > 0 && (cos == nullptr || sin == nullptr)))
    return Status::kInvalidArgument;
  using T = device_t<S>;
  constexpr int kVec = kVecBytes / sizeof(T);
  auto* qo = reinterpret_cast<T*>(q_out);
  auto* kp = reinterpret_cast<T*>(k_pages);
  auto* vp = reinterpret_cast<T*>(v_pages);
  const auto* qi = reinterpret_cast<const T*>(q);
  const auto* ki = reinterpret_cast<const T*>(k);
  const auto* vi = reinterpret_cast<const T*>(v);
  // Page slots lie D elements apart, so D % VEC and aligned pools keep every slot aligned.
  if (vector_rows<kVec>(D, rot_dim, {x_stride_n, x_stride_h},
                        {q_out, k_pages, v_pages, q, k, v, cos, sin})) {
    const int64_t items = 2 * rope_items<kVec>(D, rot_dim) + D / kVec;
    QF_LAUNCH(grid_size(rows * items), kThreads, 0, stream, rotary_kv_cache_kernel<T, kVec>)(
        qo, kp, vp, qi, ki, vi, cos, sin, page_table, token_seq, token_pos, rows, H, D, rot_dim,
        P, ld_pt, x_stride_n, x_stride_h);
  } else {
    const int64_t items = 2 * rope_items<1>(D, rot_dim) + D;
    QF_LAUNCH(grid_size(rows * items), kThreads, 0, stream, rotary_kv_cache_kernel<T, 1>)(
        qo, kp, vp, qi, ki, vi, cos, sin, page_table, token_seq, token_pos, rows, H, D, rot_dim,
        P, ld_pt, x_stride_n, x_stride_h);
  }
  return launch_status();
}

}  // namespace rotary_detail
}  // namespace

template <typename T>
Status rotary_embedding(T* out, const T* x, const float* cos, const float* sin, int64_t batch,
                        int64_t seq, int64_t heads, int64_t head_dim, int64_t rot_dim,
                        int64_t x_stride_b, int64_t x_stride_t, int64_t x_stride_h,
                        cudaStream_t stream) {
  return rotary_detail::launch_rope(out, x, cos, sin, batch, seq, heads, head_dim, rot_dim,
                                    x_stride_b, x_stride_t, x_stride_h, stream);
}

template <typename T>
Status rotary_kv_cache(T* q_out, T* k_pages, T* v_pages, const T* q, const T* k, const T* v,
                       const float* cos, const float* sin, const int32_t* page_table,
                       const int32_t* token_seq, const int32_t* token_pos, int64_t N, int64_t H,
                       int64_t D, int64_t rot_dim, int64_t P, int64_t ld_pt, int64_t x_stride_n,
                       int64_t x_stride_h, cudaStream_t stream) {
  return rotary_detail::launch_rope_kv(q_out, k_pages, v_pages, q, k, v, cos, sin, page_table,
                                       token_seq, token_pos, N, H, D, rot_dim, P, ld_pt,
                                       x_stride_n, x_stride_h, stream);
}

#define QF_INSTANTIATE(T)                                                                       \
  template Status rotary_embedding<T>(T*, const T*, const float*, const float*, int64_t,        \
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,     \
                                      int64_t, cudaStream_t);                                   \
  template Status rotary_kv_cache<T>(T*, T*, T*, const T*, const T*, const T*, const float*,     \
                                     const float*, const int32_t*, const int32_t*,                \
                                     const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                     int64_t, int64_t, int64_t, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
