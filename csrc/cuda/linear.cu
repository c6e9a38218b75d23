// y = x . w^T + bias on the GPU for few rows of x (decode): fp32 products and sums, the bias
// added in fp32, rounded once to T (reference.linear). Layout: w [N, K] row-major, x and y rows
// ld_x / ld_y elements apart. Parallelisation: a block streams 2 rows of w once, its threads
// striding over K in 16-byte vectors (coalesced; scalars when K, ld_x or an address forbid them),
// each keeping fp32 sums for up to 16 rows of x (read through L1); a warp reduce-scatter and a
// shared-memory sum over the block's warps end it. Constraints: 1 <= K, N < 2^31; rows of x
// beyond 16 run as further panels (grid y), each reading w again.
#include <algorithm>
#include <climits>

#include "common.cuh"
#include "gemv.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {
// Named as well: the SIMT emulator compiles every kernel source into one translation unit.
namespace linear_impl {

constexpr int kRowsPerBlock = 2;  // rows of w (outputs) a block streams together
constexpr int kMaxWarps = 4;
constexpr int kVecBytes = 16;

// acc[m * kRowsPerBlock + r] += x[m, i*VEC ..] . w_r[i*VEC ..] for the block's rows r of w, whose
// vector i is in wv; rows of x past `rows` repeat the last one (computed, never written).
template <typename T, int VEC, int MT>
__device__ __forceinline__ void accumulate(float (&acc)[MT * kRowsPerBlock],
                                           const Vec<T, VEC> (&wv)[kRowsPerBlock],
                                           const T* xb,  // [rows, ld_x]
                                           int64_t ld_x, int rows, int i) {
  float wf[kRowsPerBlock][VEC];
#pragma unroll
  for (int r = 0; r < kRowsPerBlock; ++r)
#pragma unroll
    for (int e = 0; e < VEC; ++e) wf[r][e] = to_f32(wv[r].v[e]);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int row = m < rows ? m : rows - 1;
    const Vec<T, VEC> xv = load_vec<T, VEC>(xb + row * ld_x + int64_t{i} * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xf = to_f32(xv.v[e]);
#pragma unroll
      for (int r = 0; r < kRowsPerBlock; ++r)
        acc[m * kRowsPerBlock + r] = fmaf(xf, wf[r][e], acc[m * kRowsPerBlock + r]);
    }
  }
}

// Block (blockIdx.x, blockIdx.y): outputs n0 = 2 * blockIdx.x and n0 + 1, rows of x
// m0 = MT * blockIdx.y .. m0 + MT - 1. VEC elements per access (K, ld_x and the pointers allow).
template <typename T, int VEC, int MT>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    linear_kernel(T* __restrict__ y,           // [M, ld_y]
                  const T* __restrict__ x,     // [M, ld_x]
                  const T* __restrict__ w,     // [N, K]
                  const T* __restrict__ bias,  // [N] or nullptr
                  int64_t M, int N, int K, int64_t ld_y, int64_t ld_x) {
  constexpr int kValues = MT * kRowsPerBlock;  // sums per thread: at most 32
  __shared__ float partial[kMaxWarps * kValues];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int n0 = blockIdx.x * kRowsPerBlock;
  const int64_t m0 = int64_t{blockIdx.y} * MT;
  const int rows = static_cast<int>(M - m0 < MT ? M - m0 : MT);
  const T* xb = x + m0 * ld_x;
  const T* wr[kRowsPerBlock];
#pragma unroll
  for (int r = 0; r < kRowsPerBlock; ++r)  // a missing last row repeats row N - 1, unwritten
    wr[r] = w + int64_t{n0 + r < N ? n0 + r : N - 1} * K;

  float acc[kValues] = {};
  const int vecs = K / VEC;
  const int stride = blockDim.x;
  int i = threadIdx.x;
  // Two vectors of each row in flight per thread before their multiply-adds.
  for (; i + stride < vecs; i += 2 * stride) {
    Vec<T, VEC> a[kRowsPerBlock], b[kRowsPerBlock];
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
      a[r] = load_vec<T, VEC>(wr[r] + int64_t{i} * VEC);
      b[r] = load_vec<T, VEC>(wr[r] + int64_t{i + stride} * VEC);
    }
    accumulate<T, VEC, MT>(acc, a, xb, ld_x, rows, i);
    accumulate<T, VEC, MT>(acc, b, xb, ld_x, rows, i + stride);
  }
  if (i < vecs) {
    Vec<T, VEC> a[kRowsPerBlock];
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) a[r] = load_vec<T, VEC>(wr[r] + int64_t{i} * VEC);
    accumulate<T, VEC, MT>(acc, a, xb, ld_x, rows, i);
  }

  // Each lane ends with one of the warp's kValues totals (several lanes with copies when fewer).
  int index = 0;
  bool rep = true;
  reduce_scatter<kValues, kWarpSize / 2, 1>(acc, lane, index, rep);
  if (rep) partial[warp * kValues + index] = acc[0];
  __syncthreads();
  for (int t = threadIdx.x; t < kValues; t += blockDim.x) {
    const int m = t / kRowsPerBlock;
    const int n = n0 + t % kRowsPerBlock;
    if (m >= rows || n >= N) continue;
    float sum = 0.0f;
    for (int k = 0; k < warps; ++k) sum += partial[k * kValues + t];
    if (bias != nullptr) sum += to_f32(bias[n]);
    y[(m0 + m) * ld_y + n] = from_f32<T>(sum);
  }
}

template <typename T, int VEC, int MT>
Status launch(T* y, const T* x, const T* w, const T* bias, int64_t M, int64_t N, int64_t K,
              int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  const int64_t vecs = K / VEC;
  // Enough threads that each has at least two vectors of each row, up to kMaxWarps warps.
  const int64_t warps = std::clamp<int64_t>((vecs + 2 * kWarpSize - 1) / (2 * kWarpSize), 1,
                                            kMaxWarps);
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>((M + MT - 1) / MT));
  QF_LAUNCH(grid, static_cast<unsigned>(warps * kWarpSize), 0, stream, linear_kernel<T, VEC, MT>)(
      y, x, w, bias, M, static_cast<int>(N), static_cast<int>(K), ld_y, ld_x);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

// Rows of x per panel: the smallest of 1, 2, 4, 8, 16 that holds M (16 beyond).
template <typename T, int VEC>
Status launch_rows(T* y, const T* x, const T* w, const T* bias, int64_t M, int64_t N, int64_t K,
                   int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  if (M <= 1) return launch<T, VEC, 1>(y, x, w, bias, M, N, K, ld_y, ld_x, stream);
  if (M <= 2) return launch<T, VEC, 2>(y, x, w, bias, M, N, K, ld_y, ld_x, stream);
  if (M <= 4) return launch<T, VEC, 4>(y, x, w, bias, M, N, K, ld_y, ld_x, stream);
  if (M <= 8) return launch<T, VEC, 8>(y, x, w, bias, M, N, K, ld_y, ld_x, stream);
  return launch<T, VEC, 16>(y, x, w, bias, M, N, K, ld_y, ld_x, stream);
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Picks 16-byte vectors when K, ld_x and the pointers allow them, else scalars.
template <typename T>
Status dispatch(T* y, const T* x, const T* w, const T* bias, int64_t M, int64_t N, int64_t K,
                int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  if (M < 0 || N < 0 || N > INT_MAX || K < 1 || K > INT_MAX || (M > 1 && (ld_x < K || ld_y < N)) ||
      (M + 15) / 16 > 65535)
    return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (y == nullptr || x == nullptr || w == nullptr) return Status::kInvalidArgument;
  constexpr int kVec = kVecBytes / sizeof(T);
  const bool vec = K % kVec == 0 && ld_x % kVec == 0 && aligned(x) && aligned(w);
  return vec ? launch_rows<T, kVec>(y, x, w, bias, M, N, K, ld_y, ld_x, stream)
             : launch_rows<T, 1>(y, x, w, bias, M, N, K, ld_y, ld_x, stream);
}

}  // namespace linear_impl
}  // namespace

template <typename S>
Status linear(S* y, const S* x, const S* w, const S* bias, int64_t M, int64_t N, int64_t K,
              int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  using T = device_t<S>;
  return linear_impl::dispatch<T>(reinterpret_cast<T*>(y), reinterpret_cast<const T*>(x),
                                  reinterpret_cast<const T*>(w), reinterpret_cast<const T*>(bias),
                                  M, N, K, ld_y, ld_x, stream);
}

#define QF_INSTANTIATE(T)                                                                      \
  template Status linear<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                            int64_t, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
