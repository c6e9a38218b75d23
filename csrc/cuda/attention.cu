// Causal attention over a paged KV cache (reference.attention), flash-decoding: token i of
// sequence s = token_seq[i] sees keys j <= token_pos[i], key j at k_pages[page_table[s, j / P]]
// [h, j % P] (v alike). Layout: q [N, H, D] at (sq_n, sq_h, 1); pages [pages, H, P, D] contiguous
// (key rows D apart); out [N, H, D] contiguous; an fp32 workspace for split partials.
// Parallelisation: one block per (query row i * H + h, chunk of keys), the split planned from N * H
// and max_keys only; in a block, groups of lanes (the 16-byte vectors, or scalars, of a key row,
// rounded up to a power of two, at most a warp) fold every ngroups-th key into an online softmax
// (m, l, fp32 sum of p * v), merged through shared memory; a split row's chunks leave
// (m, l, acc) in the workspace for a combine kernel, which rounds once to T. attention_int8: the
// same kernel over an int8 cache (a Cache policy: codes [pages, H, P, D] and fp32 scales
// [pages, H, P, G]), key element d read as code * scale[d / (D / G)]: 16 codes per 16-byte load
// (a group of D / 16 lanes a key row), the vector's scale applied to its partial q . k and folded
// into p for the values. Constraints: 1 <= D <= 256 (int8: D / G a multiple of 16), P >= 1,
// max_keys < 2^31; the metadata are read unchecked (a row's keys clamped to max_keys); no
// allocation, no sync.
#include <climits>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {
// Named, since the SIMT module compiles every .cu file into one translation unit.
namespace attention_impl {

constexpr int kThreads = 128;           // per block, both kernels
constexpr int kMaxHeadDim = 256;
constexpr int kLaneElems = 8;           // elements of a key row per lane: D <= 256 = 32 lanes x 8
                                        // (one 16-byte vector of int8 codes: 16)
constexpr int kUnroll = 4;              // keys per group in flight at once
constexpr int64_t kTargetBlocks = 1024; // split the keys until about this many blocks run
constexpr int64_t kMinChunk = 64;       // keys per split block, at least (and chunks a multiple)
constexpr int kMaxSplits = 1024;        // chunks per row: plan() gives at most kTargetBlocks
constexpr int kVecBytes = 16;

// How the keys of a row are split: `splits` chunks of `chunk` keys (max_keys in one chunk: no
// split). A function of the shapes only (rows = N * H and max_keys), so that the workspace can be
// sized before the launch; a row's own length then decides how many of the chunks it uses. Each
// split block reads chunk keys and writes D + 2 floats, so the workspace traffic is 1/chunk of
// the cache reads. Chunks are multiples of 64 keys: whole pages for P = 16, 32 or 64 (any other P
// works the same, a page lookup per key).
struct Plan {
  int64_t chunk;
  int64_t splits;
};

Plan plan(int64_t rows, int64_t max_keys) {
  if (rows >= kTargetBlocks || max_keys <= kMinChunk) return {max_keys, 1};
  const int64_t want = (kTargetBlocks + rows - 1) / rows;  // splits per row
  const int64_t per = (max_keys + want - 1) / want;
  const int64_t chunk = (per + kMinChunk - 1) / kMinChunk * kMinChunk;
  const int64_t splits = (max_keys + chunk - 1) / chunk;
  return splits > 1 ? Plan{chunk, splits} : Plan{max_keys, 1};
}

// Query row `row` (= i * H + h): its token i, head h, sequence and number of keys.
struct Row {
  int64_t i, h, seq, n_keys;
};

__device__ __forceinline__ Row row_of(int64_t row, int64_t H, int64_t max_keys,
                                      const int32_t* token_seq, const int32_t* token_pos) {
  Row r;
  r.i = row / H;
  r.h = row - r.i * H;
  r.seq = __ldg(token_seq + r.i);
  const int64_t n = int64_t{__ldg(token_pos + r.i)} + 1;
  // Clamped: a position past the plan would otherwise write past the workspace.
  r.n_keys = n < max_keys ? n : max_keys;
  return r;
}

// Slot of key j of row r's sequence, head r.h, in a page pool: its row in [pages, H, P, ...]
// (elements at slot * D, scales at slot * G). 32-bit division: the launcher keeps max_keys and P
// below 2^31 (a 64-bit one costs several times more per key).
__device__ __forceinline__ int64_t key_slot(const Row& r, int64_t j, const int32_t* pt, int64_t H,
                                            int64_t P) {
  const uint32_t jj = static_cast<uint32_t>(j), pp = static_cast<uint32_t>(P);
  const uint32_t n = jj / pp;
  const int64_t page = __ldg(pt + n);
  return (page * H + r.h) * P + (jj - n * pp);
}

// The caches the kernel reads, as a policy: element type, and the scale of an element group.
// A 16/32-bit cache of T: elements read as they are (its scales are the constant 1).
template <typename T>
struct PlainCache {
  using Elem = T;
  static constexpr bool kScaled = false;
  const T* k;  // [pages, H, P, D]
  const T* v;
  __device__ __forceinline__ int group_of(int) const { return 0; }
  __device__ __forceinline__ float k_scale(int64_t, int) const { return 1.0f; }
  __device__ __forceinline__ float v_scale(int64_t, int) const { return 1.0f; }
};

// An int8 cache: element d of a slot is code * scale[slot, d / group_elems] (reference
// dequantize_kv), group_elems = D / G a multiple of 16, so a 16-code vector has one scale.
struct Int8Cache {
  using Elem = int8_t;
  static constexpr bool kScaled = true;
  const int8_t* k;  // [pages, H, P, D]
  const int8_t* v;
  const float* ks;  // [pages, H, P, G]
  const float* vs;
  int G, group_elems;
  __device__ __forceinline__ int group_of(int d) const { return d / group_elems; }
  __device__ __forceinline__ float k_scale(int64_t slot, int g) const {
    return __ldg(ks + slot * G + g);
  }
  __device__ __forceinline__ float v_scale(int64_t slot, int g) const {
    return __ldg(vs + slot * G + g);
  }
};

// VEC elements of a key or value row in registers (one aligned load), read as fp32.
template <typename E, int VEC, bool kWords = std::is_same<E, int8_t>::value && VEC % 4 == 0>
struct Chunk {
  Vec<E, VEC> x;
  __device__ __forceinline__ void load(const E* p) { x = load_vec<E, VEC>(p); }
  __device__ __forceinline__ float operator[](int e) const { return to_f32(x.v[e]); }
};
// int8 codes as 32-bit words: s8_to_f32's byte permute, not an I2F a code.
template <typename E, int VEC>
struct Chunk<E, VEC, true> {
  Vec<uint32_t, VEC / 4> w;
  __device__ __forceinline__ void load(const E* p) {
    w = load_vec<uint32_t, VEC / 4>(reinterpret_cast<const uint32_t*>(p));
  }
  __device__ __forceinline__ float operator[](int e) const { return s8_to_f32(w.v[e / 4], e % 4); }
};

// dst = q's VEC elements at p in fp32: one vector load when they fit 16 bytes (then aligned), else
// element by element (the int8 cache's 16-element vectors; q is read once per block).
template <typename T, int VEC>
__device__ __forceinline__ void load_q(float (&dst)[VEC], const T* p) {
  if constexpr (VEC * sizeof(T) <= kVecBytes) {
    const Vec<T, VEC> x = load_vec<T, VEC>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = to_f32(x.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = to_f32(p[e]);
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v = fmaxf(v, shfl_xor(v, mask));
  return v;
}

// max(a, b), NaN if either is (fmaxf drops a NaN): a NaN score (a NaN in q or in a key) then
// makes the row NaN, as in the reference, instead of leaving that key out unseen.
__device__ __forceinline__ float max_keep_nan(float a, float b) {
  return (a != a || b != b) ? a + b : fmaxf(a, b);
}

// Sum over the aligned group of `group` lanes (a power of two <= 32); every lane of the warp
// takes part, every lane gets its group's total.
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int mask = group / 2; mask > 0; mask /= 2) v += shfl_xor(v, mask);
  return v;
}

// Max over the block (kThreads threads); `scratch` is __shared__ float[kThreads / 32]; every
// thread calls it and gets the max. Ends with a barrier.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  constexpr int kWarps = kThreads / kWarpSize;
  v = warp_max(v);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  v = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = fmaxf(v, scratch[w]);
  __syncthreads();
  return v;
}

// One block: keys [split * chunk, min((split + 1) * chunk, n_keys)) of one query row. Lane
// `lane` of group `gi` holds vectors lane, lane + group, ... of the head dim (kPer of them at
// most). The cache (PlainCache or Int8Cache) is read in VEC-element vectors.
template <typename T, typename Cache, int VEC>
__global__ void __launch_bounds__(kThreads)
    attention_split_kernel(T* out,                     // [rows, D], rows = N * H
                           float* ws_acc,              // [rows, splits, D]; when splits > 1
                           float2* ws_ml,              // [rows, splits] (m, l); when splits > 1
                           const T* q,                 // [N, H, D] at (sq_n, sq_h, 1)
                           Cache kv,                   // pages [pages, H, P, D] contiguous
                           const int32_t* page_table,  // [num_seqs, ld_pt]
                           const int32_t* token_seq,   // [N]
                           const int32_t* token_pos,   // [N]
                           int64_t H, int D, int64_t P, int64_t ld_pt, int64_t max_keys,
                           int64_t chunk, int splits, int group, int64_t sq_n, int64_t sq_h,
                           float scale) {
  using E = typename Cache::Elem;
  constexpr int kPer = (kLaneElems + VEC - 1) / VEC;  // vectors per lane
  // [ngroups, D]: ngroups * D <= kThreads * max(kLaneElems, VEC), as group >= min(D / VEC, 32)
  __shared__ float sm_acc[kThreads * (VEC > kLaneElems ? VEC : kLaneElems)];
  __shared__ float sm_l[kThreads];                 // [ngroups]
  __shared__ float sm_m[kThreads];                 // [ngroups]
  __shared__ float scratch[kThreads / kWarpSize];

  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const Row r = row_of(row, H, max_keys, token_seq, token_pos);
  const int64_t j0 = split * chunk;
  if (r.n_keys < 1) {  // token_pos < 0: no key to attend to; NaN as an empty softmax
    if (split == 0)
      for (int d = threadIdx.x; d < D; d += kThreads) out[row * D + d] = from_f32<T>(NAN);
    return;
  }
  if (j0 >= r.n_keys) return;  // the whole block: this row is shorter than the grid's rows
  const int64_t j1 = j0 + chunk < r.n_keys ? j0 + chunk : r.n_keys;
  const int row_splits = static_cast<int>((r.n_keys + chunk - 1) / chunk);

  const int nvec = D / VEC;
  const int lane = threadIdx.x % group;
  const int gi = threadIdx.x / group;
  const int ngroups = kThreads / group;

  float qr[kPer][VEC];
  float acc[kPer][VEC];
  int sg[kPer];  // the scale group of each of the lane's vectors
  const T* qp = q + r.i * sq_n + r.h * sq_h;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int vi = lane + i * group;
    if (vi < nvec) load_q<T, VEC>(qr[i], qp + vi * VEC);
    sg[i] = kv.group_of(vi * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (vi >= nvec) qr[i][e] = 0.0f;
      acc[i][e] = 0.0f;
    }
  }
  const int32_t* pt = page_table + r.seq * ld_pt;
  float m = -INFINITY, l = 0.0f;

  // Block-uniform trip count (the group sums shuffle across the whole warp); group gi takes
  // keys base + u * ngroups + gi, so neighbouring groups read neighbouring key rows.
  for (int64_t base = j0; base < j1; base += kUnroll * ngroups) {
    Chunk<E, VEC> kr[kUnroll][kPer], vr[kUnroll][kPer];
    float ksc[kUnroll][kPer], vsc[kUnroll][kPer];  // the vectors' scales (1: a plain cache)
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * ngroups + gi;
      valid[u] = j < j1;
      if (!valid[u]) continue;
      const int64_t slot = key_slot(r, j, pt, H, P);  // the group's lanes read one entry
      const int64_t at = slot * D;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int vi = lane + i * group;
        if (vi < nvec) {
          kr[u][i].load(kv.k + at + vi * VEC);
          vr[u][i].load(kv.v + at + vi * VEC);
          ksc[u][i] = kv.k_scale(slot, sg[i]);
          vsc[u][i] = kv.v_scale(slot, sg[i]);
        }
      }
    }
    float s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if (valid[u] && lane + i * group < nvec) {
          if constexpr (Cache::kScaled) {  // a vector has one scale: applied to its partial dot
            float part = 0.0f;
#pragma unroll
            for (int e = 0; e < VEC; ++e) part += qr[i][e] * kr[u][i][e];
            dot += part * ksc[u][i];
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot += qr[i][e] * kr[u][i][e];
          }
        }
      }
      s[u] = group_sum(dot, group) * scale;  // q . k in fp32, then scaled, as the reference
    }
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (valid[u]) m_new = max_keep_nan(m_new, s[u]);
    if (m_new == -INFINITY) continue;  // no key for this group yet (the group's lanes agree)
    const float c = expf(m - m_new);   // 0 while m = -inf
    float p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) p[u] = valid[u] ? expf(s[u] - m_new) : 0.0f;
    l = l * c + ((p[0] + p[1]) + (p[2] + p[3]));
    m = m_new;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (lane + i * group >= nvec) continue;
      float pv[kUnroll];  // the weights times the vectors' value scales (p: a plain cache)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        pv[u] = !Cache::kScaled ? p[u] : valid[u] ? p[u] * vsc[u][i] : 0.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float a = acc[i][e] * c;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (valid[u]) a += pv[u] * vr[u][i][e];
        acc[i][e] = a;
      }
    }
  }

  // Merge the groups: rescale each to the block's max M, sum through shared memory.
  if (lane == 0) sm_m[gi] = m;
  __syncthreads();
  const float M = block_max(static_cast<int>(threadIdx.x) < ngroups ? sm_m[threadIdx.x] : -INFINITY, scratch);
  const float f = m == -INFINITY ? 0.0f : expf(m - M);  // a group that saw no key adds nothing
  if (lane == 0) sm_l[gi] = l * f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int vi = lane + i * group;
    if (vi >= nvec) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e) sm_acc[gi * D + vi * VEC + e] = acc[i][e] * f;
  }
  __syncthreads();
  float L = 0.0f;
  for (int g = 0; g < ngroups; ++g) L += sm_l[g];
  if (row_splits == 1) {
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float a = 0.0f;
      for (int g = 0; g < ngroups; ++g) a += sm_acc[g * D + d];
      out[row * D + d] = from_f32<T>(a / L);
    }
  } else {
    const int64_t slot = row * splits + split;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float a = 0.0f;
      for (int g = 0; g < ngroups; ++g) a += sm_acc[g * D + d];
      ws_acc[slot * D + d] = a;
    }
    if (threadIdx.x == 0) ws_ml[slot] = float2{M, L};
  }
}

// One block per row that was split: out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - M).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_combine_kernel(T* out,                // [rows, D]
                             const float* ws_acc,   // [rows, splits, D]
                             const float2* ws_ml,   // [rows, splits]
                             const int32_t* token_seq,  // [N]
                             const int32_t* token_pos,  // [N]
                             int64_t H, int D, int64_t max_keys, int64_t chunk, int splits) {
  __shared__ float w[kMaxSplits];
  __shared__ float scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const Row r = row_of(row, H, max_keys, token_seq, token_pos);
  const int n = static_cast<int>((r.n_keys + chunk - 1) / chunk);
  if (n <= 1) return;  // written by its split block (or, with no keys, NaN there)
  const float2* ml = ws_ml + row * splits;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < n; s += kThreads) mx = fmaxf(mx, ml[s].x);
  const float M = block_max(mx, scratch);
  float L = 0.0f;
  for (int s = threadIdx.x; s < n; s += kThreads) {
    const float2 p = ml[s];
    w[s] = expf(p.x - M);
    L += w[s] * p.y;
  }
  L = block_sum(L, scratch);  // its barriers also publish w[]
  const float* acc = ws_acc + row * splits * D;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float a = 0.0f;
    for (int s = 0; s < n; ++s) a += w[s] * acc[s * D + d];
    out[row * D + d] = from_f32<T>(a / L);
  }
}

// Lanes per key row: the vectors of a row, rounded up to a power of two, at most a warp.
int group_size(int64_t nvec) {
  int g = 1;
  while (g < nvec && g < kWarpSize) g *= 2;
  return g;
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// The launchers' argument checks (both cache types): kOk when the launch may go ahead (or there is
// nothing to do: rows == 0).
Status check_args(const void* out, const void* q, const void* k_pages, const void* v_pages,
                  const int32_t* page_table, const int32_t* token_seq, const int32_t* token_pos,
                  int64_t N, int64_t H, int64_t D, int64_t P, int64_t ld_pt, int64_t max_keys,
                  int64_t sq_n, int64_t sq_h, const void* workspace, int64_t workspace_bytes) {
  if (N < 0 || H < 0 || D < 1 || D > kMaxHeadDim || P < 1 || P > INT_MAX || ld_pt < 0 ||
      max_keys < 1 || max_keys > INT_MAX || sq_n < 0 || sq_h < 0)
    return Status::kInvalidArgument;
  const int64_t rows = N * H;
  if (rows == 0) return Status::kOk;
  if (rows > INT_MAX) return Status::kInvalidArgument;  // one block row per query row
  const int64_t need = attention_workspace_bytes(N, H, D, max_keys);
  if (out == nullptr || q == nullptr || k_pages == nullptr || v_pages == nullptr ||
      page_table == nullptr || token_seq == nullptr || token_pos == nullptr ||
      workspace_bytes < need || (need > 0 && workspace == nullptr))
    return Status::kInvalidArgument;
  return Status::kOk;
}

// The launchers' common body: the argument checks, the split kernel reading the cache in
// VEC-element vectors (vec) or element by element, then the combine where rows split.
template <typename T, int VEC, typename Cache>
Status launch(bool vec, T* out, const T* q, Cache kv, const int32_t* page_table,
              const int32_t* token_seq, const int32_t* token_pos, int64_t N, int64_t H, int64_t D,
              int64_t P, int64_t ld_pt, int64_t max_keys, int64_t sq_n, int64_t sq_h,
              float scale, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  const Status bad = check_args(out, q, kv.k, kv.v, page_table, token_seq, token_pos, N, H, D, P,
                                ld_pt, max_keys, sq_n, sq_h, workspace, workspace_bytes);
  if (bad != Status::kOk || N * H == 0) return bad;
  const int64_t rows = N * H;
  const Plan p = plan(rows, max_keys);
  const int splits = static_cast<int>(p.splits);
  auto* ws_ml = static_cast<float2*>(workspace);
  auto* ws_acc = p.splits > 1 ? reinterpret_cast<float*>(ws_ml + rows * p.splits) : nullptr;
  const int d = static_cast<int>(D);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(splits));
  auto* split_kernel =
      vec ? attention_split_kernel<T, Cache, VEC> : attention_split_kernel<T, Cache, 1>;
  QF_LAUNCH(grid, kThreads, 0, stream, split_kernel)(
      out, ws_acc, ws_ml, q, kv, page_table, token_seq, token_pos, H, d, P, ld_pt, max_keys,
      p.chunk, splits, group_size(D / (vec ? VEC : 1)), sq_n, sq_h, scale);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && splits > 1) {
    QF_LAUNCH(static_cast<unsigned>(rows), kThreads, 0, stream, attention_combine_kernel<T>)(
        out, ws_acc, ws_ml, token_seq, token_pos, H, d, max_keys, p.chunk, splits);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

}  // namespace attention_impl
}  // namespace

int64_t attention_workspace_bytes(int64_t N, int64_t H, int64_t D, int64_t max_keys) {
  if (N < 1 || H < 1 || D < 1 || max_keys < 1) return 0;
  const int64_t rows = N * H;
  const attention_impl::Plan p = attention_impl::plan(rows, max_keys);
  if (p.splits <= 1) return 0;
  return rows * p.splits * static_cast<int64_t>(sizeof(float2) + sizeof(float) * D);
}


template <typename S_>
Status attention(S_* out, const S_* q, const S_* k_pages, const S_* v_pages,
                 const int32_t* page_table, const int32_t* token_seq, const int32_t* token_pos,
                 int64_t N, int64_t H, int64_t D, int64_t P, int64_t ld_pt, int64_t max_keys,
                 int64_t sq_n, int64_t sq_h, float scale, void* workspace,
                 int64_t workspace_bytes, cudaStream_t stream) {
  namespace impl = attention_impl;
  using T = device_t<S_>;
  constexpr int kVec = impl::kVecBytes / sizeof(T);
  // Key rows sit D elements apart in the pools: D % kVec and aligned pools align every row.
  const bool vec = D % kVec == 0 && sq_n % kVec == 0 && sq_h % kVec == 0 && impl::aligned(q) &&
                   impl::aligned(k_pages) && impl::aligned(v_pages);
  auto* o = reinterpret_cast<T*>(out);
  const auto* qi = reinterpret_cast<const T*>(q);
  const impl::PlainCache<T> kv{reinterpret_cast<const T*>(k_pages),
                               reinterpret_cast<const T*>(v_pages)};
  return impl::launch<T, kVec>(vec, o, qi, kv, page_table, token_seq, token_pos, N, H, D, P,
                               ld_pt, max_keys, sq_n, sq_h, scale, workspace, workspace_bytes,
                               stream);
}

template <typename S_>
Status attention_int8(S_* out, const S_* q, const int8_t* k_pages, const int8_t* v_pages,
                      const float* k_scales, const float* v_scales, const int32_t* page_table,
                      const int32_t* token_seq, const int32_t* token_pos, int64_t N, int64_t H,
                      int64_t D, int64_t P, int64_t ld_pt, int64_t max_keys, int64_t sq_n,
                      int64_t sq_h, float scale, int64_t G, void* workspace,
                      int64_t workspace_bytes, cudaStream_t stream) {
  namespace impl = attention_impl;
  if (G < 1 || D % G != 0 || (D / G) % 16 != 0 ||
      (N > 0 && H > 0 && (k_scales == nullptr || v_scales == nullptr)))
    return Status::kInvalidArgument;

  using T = device_t<S_>;
  constexpr int kVec = impl::kVecBytes;  // 16 codes a vector; D % 16 == 0 keeps rows aligned
  auto* o = reinterpret_cast<T*>(out);
  const auto* qi = reinterpret_cast<const T*>(q);  // read element by element: any alignment
  const impl::Int8Cache kv{k_pages, v_pages, k_scales, v_scales, static_cast<int>(G),
                           static_cast<int>(D / G)};
  const bool vec = impl::aligned(k_pages) && impl::aligned(v_pages);
  return impl::launch<T, kVec>(vec, o, qi, kv, page_table, token_seq, token_pos, N, H, D, P,
                               ld_pt, max_keys, sq_n, sq_h, scale, workspace, workspace_bytes,
                               stream);
}

#define QF_INSTANTIATE(T)                                                                     \
  template Status attention<T>(T*, const T*, const T*, const T*, const int32_t*,              \
                               const int32_t*, const int32_t*, int64_t, int64_t, int64_t,      \
                               int64_t, int64_t, int64_t, int64_t, int64_t, float, void*,      \
                               int64_t, cudaStream_t);                                         \
  template Status attention_int8<T>(T*, const T*, const int8_t*, const int8_t*, const float*, \
                                    const float*, const int32_t*, const int32_t*,             \
                                    const int32_t*, int64_t, int64_t, int64_t, int64_t,       \
                                    int64_t, int64_t, int64_t, int64_t, float, int64_t,       \
                                    void*, int64_t, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
