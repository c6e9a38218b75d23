// RoPE (GPT-NeoX "rotate half") on the GPU, bit-exact with reference.rotary_embedding: with
// h = R/2, out[i] = x[i]*cos[i] - x[i+h]*sin[i], out[i+h] = x[i+h]*cos[i+h] + x[i]*sin[i+h], each
// product an __fmul_rn and the sum an __fadd_rn (no FMA: torch rounds the products), rounded once
// to T; dims R..D-1 copied. rotary_kv_cache: q into q_out, k rotated and v copied into a paged KV
// cache [pages, H, P, D] (token i at page page_table[token_seq[i], token_pos[i] / P], offset
// token_pos[i] % P), in one pass. Layout: x [B, T, H, D] at any B, T, H strides, q, k, v [N, H, D]
// at any N, H strides, head dim contiguous; cos/sin contiguous [B, T, R] / [N, R] fp32.
// Parallelisation: one thread per 16-byte chunk of a head row (one element where D, R/2, a stride
// or a pointer do not allow vectors), consecutive threads on consecutive chunks, grid-stride over
// all rows. rotary_kv_cache_int8: the same q, and the rotated key (rounded to T) and the value
// quantized into an int8 cache per group of D / G elements (reference.quantize_kv, bit-exact): a
// warp per (token, head) row, lanes on consecutive chunks, the group max through shared memory.
// Constraints: R even, 0 <= R <= D < 2^31, P >= 1 (int8: D <= 2^16, 1 <= G <= 16, D / G a
// multiple of 16); outputs overlap no input; the page metadata are read unchecked; no
// allocation, no sync.
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

// The two halves of a rotation: x*cos + rotate_half(x)*sin with rotate_half(x) = [-x[h:], x[:h]],
// each product rounded (torch rounds them: no FMA), p + (-q) exactly p - q.
__device__ __forceinline__ float rope_lo(float xl, float xh, float c, float s) {
  return __fadd_rn(__fmul_rn(xl, c), -__fmul_rn(xh, s));
}
__device__ __forceinline__ float rope_hi(float xh, float xl, float c, float s) {
  return __fadd_rn(__fmul_rn(xh, c), __fmul_rn(xl, s));
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
      o_lo.v[k] = from_f32<T>(rope_lo(xl, xh, c_lo[k], s_lo[k]));
      o_hi.v[k] = from_f32<T>(rope_hi(xh, xl, c_hi[k], s_hi[k]));
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

// A step's inputs to rotary_kv_cache (either cache type): row `row` = n * heads + h is token n's
// head h.
template <typename T>
struct KvStep {
  const T* q;                 // [N, H, D] each, at (x_stride_n, x_stride_h, 1)
  const T* k;
  const T* v;
  const float* cos;           // [N, rot_dim]
  const float* sin;           // [N, rot_dim]
  const int32_t* page_table;  // [num_seqs, ld_pt]
  const int32_t* token_seq;   // [N]
  const int32_t* token_pos;   // [N]
  int64_t N, heads, head_dim, rot_dim, P, ld_pt, x_stride_n, x_stride_h;

  __host__ __device__ __forceinline__ int64_t rows() const { return N * heads; }

  __device__ __forceinline__ int64_t in(int64_t n, int64_t h) const {  // of q, k, v
    return n * x_stride_n + h * x_stride_h;
  }
  // Token n's slot for head h: its row in the pools [num_pages, H, P, ...].
  __device__ __forceinline__ int64_t slot(int64_t n, int64_t h) const {
    const int64_t pos = __ldg(token_pos + n);
    const int64_t page = __ldg(page_table + __ldg(token_seq + n) * ld_pt + pos / P);
    return (page * heads + h) * P + pos % P;
  }
};

// A row (i, h) has three runs of items: q's rotation into q_out, k's rotation into its page
// slot and v's copy (D / VEC chunks) beside it.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rotary_kv_cache_kernel(T* q_out,      // [N, H, D], contiguous
                           T* k_pages,    // [num_pages, H, P, D], contiguous
                           T* v_pages,    // [num_pages, H, P, D], contiguous
                           KvStep<T> st) {
  const int64_t D = st.head_dim;
  const int64_t rot_items = rope_items<VEC>(D, st.rot_dim);
  const int64_t items = 2 * rot_items + D / VEC;
  const int64_t total = st.rows() * items;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t row = i / items, j = i - row * items;
    const int64_t n = row / st.heads, h = row - n * st.heads;
    const int64_t in = st.in(n, h);
    const float* c = st.cos + n * st.rot_dim;
    const float* s = st.sin + n * st.rot_dim;
    if (j < rot_items) {
      rope_item<T, VEC>(q_out + row * D, st.q + in, c, s, j, st.rot_dim / 2);
      continue;
    }
    const int64_t at = st.slot(n, h) * D;
    if (j < 2 * rot_items) {
      rope_item<T, VEC>(k_pages + at, st.k + in, c, s, j - rot_items, st.rot_dim / 2);
    } else {
      const int64_t o = (j - 2 * rot_items) * VEC;
      store_vec<T, VEC>(v_pages + at + o, load_vec<T, VEC>(st.v + in + o));
    }
  }
}

// ---- the int8 cache: codes and a scale per group of D / G elements ----------------------------

constexpr int kMaxGroups = 16;  // scale groups a row (G): D / G >= 16 and D <= 256 in practice
constexpr int64_t kMaxInt8HeadDim = 1 << 16;  // chunk indices in 32 bits (fast division)
constexpr int kWarps = kThreads / kWarpSize;

// Chunk ch (VEC elements) of a row's key and value, as the 16-bit cache would hold them, in fp32:
// ch < nch is the key's chunk ch rotated and rounded to T, a later one the value's chunk ch - nch.
// VEC divides rot_dim / 2, so a chunk lies on one side of the rotation.
template <typename T, int VEC>
__device__ __forceinline__ void kv_chunk(float (&x)[VEC], const T* k, const T* v,
                                         const float* cos, const float* sin, int ch, int nch,
                                         int64_t half) {
  const int64_t d0 = int64_t{ch < nch ? ch : ch - nch} * VEC;
  const T* src = ch < nch ? k : v;
  const Vec<T, VEC> a = load_vec<T, VEC>(src + d0);
  if (ch >= nch || d0 >= 2 * half) {  // the value, or the key's unrotated tail
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = to_f32(a.v[e]);
    return;
  }
  const bool lo = d0 < half;
  const Vec<T, VEC> b = load_vec<T, VEC>(k + (lo ? d0 + half : d0 - half));  // the partner
  float c[VEC], s[VEC];
  load_f32<VEC>(c, cos + d0);
  load_f32<VEC>(s, sin + d0);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float xa = to_f32(a.v[e]), xb = to_f32(b.v[e]);
    x[e] = to_f32(from_f32<T>(lo ? rope_lo(xa, xb, c[e], s[e]) : rope_hi(xa, xb, c[e], s[e])));
  }
}

// The code of x under scale s (reference.quantize_kv): round half to even of the IEEE quotient,
// clamped to [-127, 127] (a NaN gives -127; the reference leaves it undefined).
__device__ __forceinline__ int kv_code(float x, float s) {
  const float r = rintf(__fdiv_rn(x, s));
  return static_cast<int>(fminf(fmaxf(r, -127.0f), 127.0f));
}

// The codes of x[0..VEC) under scale s stored at dst: packed into 32-bit words (one vector store)
// when VEC % 4 == 0 (dst then aligned to VEC bytes), else byte by byte.
template <int VEC>
__device__ __forceinline__ void store_codes(int8_t* dst, const float (&x)[VEC], float s) {
  if constexpr (VEC % 4 == 0) {
    Vec<uint32_t, VEC / 4> w;
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
      uint32_t word = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        word |= (static_cast<uint32_t>(kv_code(x[4 * i + b], s)) & 0xffu) << (8 * b);
      w.v[i] = word;
    }
    store_vec<uint32_t, VEC / 4>(reinterpret_cast<uint32_t*>(dst), w);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = static_cast<int8_t>(kv_code(x[e], s));
  }
}

// A warp per row (token n, head h): q's rotation into q_out (rope_item over the lanes), then the
// 2 * nch chunks of the row's key and value over the lanes, twice: first each chunk's largest
// |x| goes into its scale group's slot (a shared atomicMax on the bits, which order as the
// magnitudes do; a NaN is the largest, and gives the scale 1 as in the reference), then each
// chunk is quantized with its group's scale s = max / 127 (1 when 0), recomputed from the same
// inputs rather than held. Coalesced: neighbouring lanes read and write neighbouring chunks.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rotary_kv_cache_int8_kernel(T* q_out,          // [N, H, D], contiguous
                                int8_t* k_pages,   // [num_pages, H, P, D], contiguous
                                int8_t* v_pages,   // [num_pages, H, P, D], contiguous
                                float* k_scales,   // [num_pages, H, P, G], contiguous
                                float* v_scales,   // [num_pages, H, P, G], contiguous
                                KvStep<T> st, int G) {
  __shared__ unsigned amax_bits[kWarps][2 * kMaxGroups];  // a warp's slots: k groups, v groups
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  unsigned* slot = amax_bits[warp];
  const int64_t D = st.head_dim;
  const int64_t rot_items = rope_items<VEC>(D, st.rot_dim);
  const int nch = static_cast<int>(D / VEC);  // chunks of a key (or value) row
  const int per_group = nch / G;              // chunks a scale
  const int64_t half = st.rot_dim / 2;
  const int64_t step = int64_t{gridDim.x} * kWarps;
  // Warp-uniform trip count: every lane reaches the __syncwarp()s.
  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < st.rows(); row += step) {
    const int64_t n = row / st.heads, h = row - n * st.heads;
    const T* k = st.k + st.in(n, h);
    const T* v = st.v + st.in(n, h);
    const float* c = st.cos + n * st.rot_dim;
    const float* s = st.sin + n * st.rot_dim;
    for (int64_t j = lane; j < rot_items; j += kWarpSize)
      rope_item<T, VEC>(q_out + row * D, st.q + st.in(n, h), c, s, j, half);
    const int64_t key = st.slot(n, h);  // the row of pages and scales written
    if (lane < 2 * G) slot[lane] = 0u;
    __syncwarp();
    for (int ch = lane; ch < 2 * nch; ch += kWarpSize) {
      float x[VEC];
      kv_chunk<T, VEC>(x, k, v, c, s, ch, nch, half);
      unsigned m = 0u;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const unsigned a = __float_as_uint(x[e]) & 0x7fffffffu;  // |x|
        m = a > m ? a : m;
      }
      atomicMax(slot + ch / per_group, m);
    }
    __syncwarp();
    for (int ch = lane; ch < 2 * nch; ch += kWarpSize) {
      float x[VEC];
      kv_chunk<T, VEC>(x, k, v, c, s, ch, nch, half);
      float sc = __fdiv_rn(__uint_as_float(slot[ch / per_group]), 127.0f);
      if (!(sc > 0.0f)) sc = 1.0f;  // all zeros (or a NaN): the reference's torch.where
      const bool is_k = ch < nch;
      const int c0 = is_k ? ch : ch - nch;
      store_codes<VEC>((is_k ? k_pages : v_pages) + key * D + int64_t{c0} * VEC, x, sc);
      if (c0 % per_group == 0) (is_k ? k_scales : v_scales)[key * G + c0 / per_group] = sc;
    }
    __syncwarp();  // the slots are read before the next row clears them
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

// The step of rotary_kv_cache's arguments, as the kernels' element type.
template <typename S>
KvStep<device_t<S>> kv_step(const S* q, const S* k, const S* v, const float* cos,
                            const float* sin, const int32_t* page_table, const int32_t* token_seq,
                            const int32_t* token_pos, int64_t N, int64_t H, int64_t D,
                            int64_t rot_dim, int64_t P, int64_t ld_pt, int64_t x_stride_n,
                            int64_t x_stride_h) {
  using T = device_t<S>;
  return {reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k),
          reinterpret_cast<const T*>(v), cos, sin, page_table, token_seq, token_pos, N, H, D,
          rot_dim, P, ld_pt, x_stride_n, x_stride_h};
}

// rotary_kv_cache's argument checks (both cache types): kOk when the launch may go ahead (or
// there is nothing to do: no rows).
template <typename T>
Status check_kv(const void* q_out, const void* k_pages, const void* v_pages, const KvStep<T>& st) {
  if (bad_sizes(st.N, 1, st.heads, st.head_dim, st.rot_dim) || st.P < 1 || st.ld_pt < 0 ||
      st.x_stride_n < 0 || st.x_stride_h < 0)
    return Status::kInvalidArgument;
  if (st.rows() == 0) return Status::kOk;
  if (q_out == nullptr || k_pages == nullptr || v_pages == nullptr || st.q == nullptr ||
      st.k == nullptr || st.v == nullptr || st.page_table == nullptr || st.token_seq == nullptr ||
      st.token_pos == nullptr || (st.rot_dim > 0 && (st.cos == nullptr || st.sin == nullptr)))
    return Status::kInvalidArgument;
  return Status::kOk;
}

// Whether a step's rows can move as VEC-element vectors (q_out and the pools aligned too).
template <int VEC, typename T>
bool vector_step(const KvStep<T>& st, const void* q_out, const void* k_pages,
                 const void* v_pages) {
  return vector_rows<VEC>(st.head_dim, st.rot_dim, {st.x_stride_n, st.x_stride_h},
                          {q_out, k_pages, v_pages, st.q, st.k, st.v, st.cos, st.sin});
}

template <typename T>
Status launch_rope_kv(T* q_out, T* k_pages, T* v_pages, const KvStep<T>& st,
                      cudaStream_t stream) {
  const Status bad = check_kv(q_out, k_pages, v_pages, st);
  if (bad != Status::kOk || st.rows() == 0) return bad;
  constexpr int kVec = kVecBytes / sizeof(T);
  // Page slots lie D elements apart, so D % VEC and aligned pools keep every slot aligned.
  const bool vec = vector_step<kVec>(st, q_out, k_pages, v_pages);
  const int64_t items = vec ? 2 * rope_items<kVec>(st.head_dim, st.rot_dim) + st.head_dim / kVec
                            : 2 * rope_items<1>(st.head_dim, st.rot_dim) + st.head_dim;
  auto* kernel = vec ? rotary_kv_cache_kernel<T, kVec> : rotary_kv_cache_kernel<T, 1>;
  QF_LAUNCH(grid_size(st.rows() * items), kThreads, 0, stream, kernel)(q_out, k_pages, v_pages,
                                                                        st);
  return launch_status();
}

template <typename T>
Status launch_rope_kv_int8(T* q_out, int8_t* k_pages, int8_t* v_pages, float* k_scales,
                           float* v_scales, const KvStep<T>& st, int64_t G, cudaStream_t stream) {
  const Status bad = check_kv(q_out, k_pages, v_pages, st);
  if (bad != Status::kOk) return bad;
  // G groups of D / G elements, a multiple of 16 (whole 16-byte vectors of codes for attention).
  const int64_t D = st.head_dim;
  if (G < 1 || G > kMaxGroups || D > kMaxInt8HeadDim || D % G != 0 || (D / G) % 16 != 0)
    return Status::kInvalidArgument;
  if (st.rows() == 0) return Status::kOk;
  if (k_scales == nullptr || v_scales == nullptr) return Status::kInvalidArgument;
  constexpr int kVec = kVecBytes / sizeof(T);
  // Codes go out as kVec-byte vectors: D % 16 == 0 and aligned pools keep them aligned.
  auto* kernel = vector_step<kVec>(st, q_out, k_pages, v_pages)
                     ? rotary_kv_cache_int8_kernel<T, kVec>
                     : rotary_kv_cache_int8_kernel<T, 1>;
  // A warp a row: grid_size counts threads.
  QF_LAUNCH(grid_size(st.rows() * kWarpSize), kThreads, 0, stream, kernel)(
      q_out, k_pages, v_pages, k_scales, v_scales, st, static_cast<int>(G));
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
  using D_ = device_t<T>;
  return rotary_detail::launch_rope_kv(
      reinterpret_cast<D_*>(q_out), reinterpret_cast<D_*>(k_pages), reinterpret_cast<D_*>(v_pages),
      rotary_detail::kv_step(q, k, v, cos, sin, page_table, token_seq, token_pos, N, H, D,
                             rot_dim, P, ld_pt, x_stride_n, x_stride_h),
      stream);
}

template <typename T>
Status rotary_kv_cache_int8(T* q_out, int8_t* k_pages, int8_t* v_pages, float* k_scales,
                            float* v_scales, const T* q, const T* k, const T* v,
                            const float* cos, const float* sin, const int32_t* page_table,
                            const int32_t* token_seq, const int32_t* token_pos, int64_t N,
                            int64_t H, int64_t D, int64_t rot_dim, int64_t P, int64_t ld_pt,
                            int64_t x_stride_n, int64_t x_stride_h, int64_t G,
                            cudaStream_t stream) {
  return rotary_detail::launch_rope_kv_int8(
      reinterpret_cast<device_t<T>*>(q_out), k_pages, v_pages, k_scales, v_scales,
      rotary_detail::kv_step(q, k, v, cos, sin, page_table, token_seq, token_pos, N, H, D,
                             rot_dim, P, ld_pt, x_stride_n, x_stride_h),
      G, stream);
}

#define QF_INSTANTIATE(T)                                                                       \
  template Status rotary_embedding<T>(T*, const T*, const float*, const float*, int64_t,        \
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,     \
                                      int64_t, cudaStream_t);                                   \
  template Status rotary_kv_cache<T>(T*, T*, T*, const T*, const T*, const T*, const float*,     \
                                     const float*, const int32_t*, const int32_t*,                \
                                     const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                     int64_t, int64_t, int64_t, cudaStream_t);                    \
  template Status rotary_kv_cache_int8<T>(T*, int8_t*, int8_t*, float*, float*, const T*,       \
                                          const T*, const T*, const float*, const float*,       \
                                          const int32_t*, const int32_t*, const int32_t*,       \
                                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                          int64_t, int64_t, int64_t, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
