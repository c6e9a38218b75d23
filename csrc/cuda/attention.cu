// Causal attention over a KV cache on the GPU (reference.attention), flash-decoding:
//   out[b,t,h] = sum_j softmax_j(scale * q[b,t,h] . k[b,j,h]) v[b,j,h],  j < min(start[b]+t+1, S).
// Layout: q [B, T, H, D], k and v [B, S, H, D] with their own b/t/h (b/s/h) strides in elements
// and a contiguous head dim; out [B, T, H, D] contiguous; an fp32 workspace for split partials.
// Parallelisation: one block per (query row, chunk of `chunk` keys); in a block, groups of G
// lanes (G * 16-byte vectors, or scalars, span one key row) each fold every ngroups-th key into
// an online softmax (max m, sum l, fp32 sum of p * v), merged through shared memory. A row
// whose keys fit one chunk is written out at once; otherwise each chunk leaves (m, l, acc) in the
// workspace and a combine kernel rescales and sums them, rounding once to T.
// Constraints: 1 <= D <= 256, S >= 1, start[b] >= 0; no allocation, no sync.
#include <climits>
#include <cmath>

#include "common.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {
// Named, since the SIMT module compiles every .cu file into one translation unit.
namespace attention_impl {

constexpr int kThreads = 128;           // per block, both kernels
constexpr int kMaxHeadDim = 256;
constexpr int kLaneElems = 8;           // elements of a key row per lane: D <= 256 = 32 lanes x 8
constexpr int kUnroll = 4;              // keys per group in flight at once
constexpr int64_t kTargetBlocks = 1024; // split the keys until about this many blocks run
constexpr int64_t kMinChunk = 64;       // keys per split block, at least (and chunks a multiple)
constexpr int kMaxSplits = 1024;        // chunks per row: plan() gives at most kTargetBlocks
constexpr int kVecBytes = 16;

// How the keys of a row are split: `splits` chunks of `chunk` keys (S in one chunk: no split).
// A function of the shapes only, so that the workspace can be sized before the launch; a row's
// own length then decides how many of the chunks it uses. Each split block reads chunk keys and
// writes D + 2 floats, so the workspace traffic is 1/chunk of the cache reads.
struct Plan {
  int64_t chunk;
  int64_t splits;
};

Plan plan(int64_t rows, int64_t S) {
  if (rows >= kTargetBlocks || S <= kMinChunk) return {S, 1};
  const int64_t want = (kTargetBlocks + rows - 1) / rows;                // splits per row
  const int64_t per = (S + want - 1) / want;
  const int64_t chunk = (per + kMinChunk - 1) / kMinChunk * kMinChunk;
  const int64_t splits = (S + chunk - 1) / chunk;
  return splits > 1 ? Plan{chunk, splits} : Plan{S, 1};
}

// Keys row `row` (= (b * T + t) * H + h) attends to, and the row's b, t, h.
struct Row {
  int64_t b, t, h, n_keys;
};

__device__ __forceinline__ Row row_of(int64_t row, int64_t T_, int64_t H, int64_t S,
                                      const int64_t* start) {
  Row r;
  r.h = row % H;
  r.t = (row / H) % T_;
  r.b = row / (H * T_);
  const int64_t n = start[r.b] + r.t + 1;
  r.n_keys = n < S ? n : S;
  return r;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v = fmaxf(v, shfl_xor(v, mask));
  return v;
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
// `lane` of group `gi` holds vectors lane, lane + G, ... of the head dim (kPer of them at most).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    attention_split_kernel(T* out,               // [rows, D], rows = B * T * H
                           float* ws_acc,        // [rows, splits, D]; when splits > 1
                           float2* ws_ml,        // [rows, splits] (m, l); when splits > 1
                           const T* q,           // [B, T, H, D] at (sq_b, sq_t, sq_h, 1)
                           const T* k,           // [B, S, H, D] at (sk_b, sk_s, sk_h, 1)
                           const T* v,           // [B, S, H, D] at (sv_b, sv_s, sv_h, 1)
                           const int64_t* start, // [B]
                           int64_t T_, int64_t H, int D, int64_t S, int64_t chunk, int splits,
                           int group, int64_t sq_b, int64_t sq_t, int64_t sq_h, int64_t sk_b,
                           int64_t sk_s, int64_t sk_h, int64_t sv_b, int64_t sv_s, int64_t sv_h,
                           float scale) {
  constexpr int kPer = kLaneElems / VEC;  // vectors per lane
  __shared__ float sm_acc[kThreads * kLaneElems];  // [ngroups, D]: ngroups * D <= this
  __shared__ float sm_l[kThreads];                 // [ngroups]
  __shared__ float sm_m[kThreads];                 // [ngroups]
  __shared__ float scratch[kThreads / kWarpSize];

  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const Row r = row_of(row, T_, H, S, start);
  const int64_t j0 = split * chunk;
  if (r.n_keys < 1) {  // start[b] < 0: no key to attend to; NaN as the reference's empty softmax
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
  const T* qp = q + r.b * sq_b + r.t * sq_t + r.h * sq_h;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int vi = lane + i * group;
    Vec<T, VEC> x;
    if (vi < nvec) x = load_vec<T, VEC>(qp + vi * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      qr[i][e] = vi < nvec ? to_f32(x.v[e]) : 0.0f;
      acc[i][e] = 0.0f;
    }
  }
  const T* kp = k + r.b * sk_b + r.h * sk_h;
  const T* vp = v + r.b * sv_b + r.h * sv_h;
  float m = -INFINITY, l = 0.0f;

  // Block-uniform trip count (the group sums shuffle across the whole warp); group gi takes
  // keys base + u * ngroups + gi, so neighbouring groups read neighbouring key rows.
  for (int64_t base = j0; base < j1; base += kUnroll * ngroups) {
    Vec<T, VEC> kr[kUnroll][kPer], vr[kUnroll][kPer];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * ngroups + gi;
      valid[u] = j < j1;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int vi = lane + i * group;
        if (valid[u] && vi < nvec) {
          kr[u][i] = load_vec<T, VEC>(kp + j * sk_s + vi * VEC);
          vr[u][i] = load_vec<T, VEC>(vp + j * sv_s + vi * VEC);
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
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot += qr[i][e] * to_f32(kr[u][i].v[e]);
        }
      }
      s[u] = group_sum(dot, group) * scale;  // q . k in fp32, then scaled, as the reference
    }
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (valid[u]) m_new = fmaxf(m_new, s[u]);
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
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float a = acc[i][e] * c;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (valid[u]) a += p[u] * to_f32(vr[u][i].v[e]);
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
                             const int64_t* start,  // [B]
                             int64_t T_, int64_t H, int D, int64_t S, int64_t chunk,
                             int splits) {
  __shared__ float w[kMaxSplits];
  __shared__ float scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const Row r = row_of(row, T_, H, S, start);
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

template <typename T, int VEC>
Status launch(T* out, const T* q, const T* k, const T* v, const int64_t* start, int64_t B,
              int64_t T_, int64_t H, int64_t D, int64_t S, int64_t sq_b, int64_t sq_t,
              int64_t sq_h, int64_t sk_b, int64_t sk_s, int64_t sk_h, int64_t sv_b, int64_t sv_s,
              int64_t sv_h, float scale, void* workspace, cudaStream_t stream) {
  const int64_t rows = B * T_ * H;
  const Plan p = plan(rows, S);
  const int splits = static_cast<int>(p.splits);
  auto* ws_ml = static_cast<float2*>(workspace);
  auto* ws_acc = p.splits > 1 ? reinterpret_cast<float*>(ws_ml + rows * p.splits) : nullptr;
  const int d = static_cast<int>(D);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(splits));
  QF_LAUNCH(grid, kThreads, 0, stream, attention_split_kernel<T, VEC>)(
      out, ws_acc, ws_ml, q, k, v, start, T_, H, d, S, p.chunk, splits, group_size(D / VEC),
      sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, scale);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && splits > 1) {
    QF_LAUNCH(static_cast<unsigned>(rows), kThreads, 0, stream, attention_combine_kernel<T>)(
        out, ws_acc, ws_ml, start, T_, H, d, S, p.chunk, splits);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

}  // namespace attention_impl
}  // namespace

int64_t attention_workspace_bytes(int64_t B, int64_t T_, int64_t H, int64_t D, int64_t S) {
  if (B < 1 || T_ < 1 || H < 1 || D < 1 || S < 1) return 0;
  const int64_t rows = B * T_ * H;
  const attention_impl::Plan p = attention_impl::plan(rows, S);
  if (p.splits <= 1) return 0;
  return rows * p.splits * static_cast<int64_t>(sizeof(float2) + sizeof(float) * D);
}

template <typename S_>
Status attention(S_* out, const S_* q, const S_* k, const S_* v, const int64_t* start, int64_t B,
                 int64_t T_, int64_t H, int64_t D, int64_t S, int64_t sq_b, int64_t sq_t,
                 int64_t sq_h, int64_t sk_b, int64_t sk_s, int64_t sk_h, int64_t sv_b,
                 int64_t sv_s, int64_t sv_h, float scale, void* workspace,
                 int64_t workspace_bytes, cudaStream_t stream) {
  namespace impl = attention_impl;
  if (B < 0 || T_ < 0 || H < 0 || D < 1 || D > impl::kMaxHeadDim || S < 1)
    return Status::kInvalidArgument;
  const int64_t rows = B * T_ * H;
  if (rows == 0) return Status::kOk;
  if (rows > INT_MAX) return Status::kInvalidArgument;  // one block row per query row
  const int64_t need = attention_workspace_bytes(B, T_, H, D, S);
  if (out == nullptr || q == nullptr || k == nullptr || v == nullptr || start == nullptr ||
      workspace_bytes < need || (need > 0 && workspace == nullptr))
    return Status::kInvalidArgument;

  using T = device_t<S_>;
  constexpr int kVec = impl::kVecBytes / sizeof(T);
  const bool vec = D % kVec == 0 && sq_b % kVec == 0 && sq_t % kVec == 0 && sq_h % kVec == 0 &&
                   sk_b % kVec == 0 && sk_s % kVec == 0 && sk_h % kVec == 0 &&
                   sv_b % kVec == 0 && sv_s % kVec == 0 && sv_h % kVec == 0 &&
                   impl::aligned(q) && impl::aligned(k) && impl::aligned(v);
  auto* o = reinterpret_cast<T*>(out);
  const auto* qi = reinterpret_cast<const T*>(q);
  const auto* ki = reinterpret_cast<const T*>(k);
  const auto* vi = reinterpret_cast<const T*>(v);
  return vec ? impl::launch<T, kVec>(o, qi, ki, vi, start, B, T_, H, D, S, sq_b, sq_t, sq_h,
                                     sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, scale, workspace, stream)
             : impl::launch<T, 1>(o, qi, ki, vi, start, B, T_, H, D, S, sq_b, sq_t, sq_h, sk_b,
                                  sk_s, sk_h, sv_b, sv_s, sv_h, scale, workspace, stream);
}

#define QF_INSTANTIATE(T)                                                                     \
  template Status attention<T>(T*, const T*, const T*, const T*, const int64_t*, int64_t,     \
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,  \
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,    \
                               void*, int64_t, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
