// RMSNorm on the GPU: out = round(round(x * rsqrt(mean(x^2) + eps)) * weight), maths in fp32,
// rounding to the storage type exactly where reference.rms_norm rounds; the fused variant first
// forms h = round(residual + x), stores it, and normalises h.
// Layout: rows of `hidden` contiguous elements, row strides ld_* in elements.
// Parallelisation: one block per row, or one warp per row when a row is at most 128 vectors;
// 16-byte vector accesses when pointers, strides and hidden allow; warp-shuffle + shared sums.
// Constraints: 1 <= hidden < 2^31; residual_out may alias residual; no allocation, no sync.
#include <algorithm>
#include <climits>

#include "common.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {

constexpr int kMaxBlockThreads = 1024;
constexpr int64_t kWarpPerRowMaxVecs = 128;  // rows up to this many vectors get one warp each
constexpr int kWarpPerRowRowsPerBlock = 8;
constexpr int kVecBytes = 16;

// One pass computes the row's sum of squares (forming and storing h first when fused); after
// the reduction a second pass re-reads the row (h: this thread's own writes) and scales it.
template <typename T, int VEC, bool kFused, bool kWarpPerRow>
__global__ void rms_norm_kernel(T* out,                // [rows, ld_out]
                                T* residual_out,       // [rows, ld_residual_out]; fused only
                                const T* x,            // [rows, ld_x]
                                const T* residual,     // [rows, ld_residual]; fused only
                                const T* weight,       // [hidden]
                                int64_t rows, int hidden, int64_t ld_out, int64_t ld_residual_out,
                                int64_t ld_x, int64_t ld_residual, float eps) {
  __shared__ float scratch[kWarpSize];
  const int num_vecs = hidden / VEC;
  int lane, lanes;
  int64_t row, row_step;
  if constexpr (kWarpPerRow) {
    const int rows_per_block = blockDim.x / kWarpSize;
    lane = threadIdx.x % kWarpSize;
    lanes = kWarpSize;
    row = int64_t{blockIdx.x} * rows_per_block + threadIdx.x / kWarpSize;
    row_step = int64_t{gridDim.x} * rows_per_block;
  } else {
    lane = threadIdx.x;
    lanes = blockDim.x;
    row = blockIdx.x;
    row_step = gridDim.x;
  }
  for (; row < rows; row += row_step) {
    const T* src = x + row * ld_x;
    float sum_sq = 0.0f;
    if constexpr (kFused) {
      const T* res = residual + row * ld_residual;
      T* h = residual_out + row * ld_residual_out;
      for (int i = lane; i < num_vecs; i += lanes) {
        const Vec<T, VEC> a = load_vec<T, VEC>(src + i * VEC);
        const Vec<T, VEC> b = load_vec<T, VEC>(res + i * VEC);
        Vec<T, VEC> s;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          s.v[k] = from_f32<T>(to_f32(b.v[k]) + to_f32(a.v[k]));
          const float f = to_f32(s.v[k]);
          sum_sq += f * f;
        }
        store_vec<T, VEC>(h + i * VEC, s);
      }
      src = h;
    } else {
      for (int i = lane; i < num_vecs; i += lanes) {
        const Vec<T, VEC> a = load_vec<T, VEC>(src + i * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float f = to_f32(a.v[k]);
          sum_sq += f * f;
        }
      }
    }
    if constexpr (kWarpPerRow) {
      sum_sq = warp_sum(sum_sq);
    } else {
      sum_sq = block_sum(sum_sq, scratch);
    }
    // An exact division and an IEEE sqrt, as torch's CPU rsqrt (the reference) computes it.
    const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(hidden) + eps);
    T* dst = out + row * ld_out;
    for (int i = lane; i < num_vecs; i += lanes) {
      const Vec<T, VEC> a = load_vec<T, VEC>(src + i * VEC);
      const Vec<T, VEC> w = load_vec<T, VEC>(weight + i * VEC);
      Vec<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float normed = to_f32(from_f32<T>(to_f32(a.v[k]) * inv_rms));
        o.v[k] = from_f32<T>(normed * to_f32(w.v[k]));
      }
      store_vec<T, VEC>(dst + i * VEC, o);
    }
  }
}

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>(blocks, INT_MAX));  // grid-stride beyond
}

template <typename T, int VEC, bool kFused>
Status launch(T* out, T* residual_out, const T* x, const T* residual, const T* weight,
              int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_residual_out, int64_t ld_x,
              int64_t ld_residual, float eps, cudaStream_t stream) {
  const int64_t num_vecs = hidden / VEC;
  const int h = static_cast<int>(hidden);
  if (num_vecs <= kWarpPerRowMaxVecs) {
    const int64_t blocks = (rows + kWarpPerRowRowsPerBlock - 1) / kWarpPerRowRowsPerBlock;
    QF_LAUNCH(grid_size(blocks), kWarpPerRowRowsPerBlock * kWarpSize, 0, stream,
              rms_norm_kernel<T, VEC, kFused, true>)(
            out, residual_out, x, residual, weight, rows, h, ld_out, ld_residual_out, ld_x,
            ld_residual, eps);
  } else {
    const int64_t warps = (num_vecs + kWarpSize - 1) / kWarpSize;
    const int threads = static_cast<int>(std::min<int64_t>(warps * kWarpSize, kMaxBlockThreads));
    QF_LAUNCH(grid_size(rows), threads, 0, stream, rms_norm_kernel<T, VEC, kFused, false>)(
        out, residual_out, x, residual, weight, rows, h, ld_out, ld_residual_out, ld_x,
        ld_residual, eps);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Picks 16-byte vectors when hidden, every stride and every pointer allow them, else scalars.
template <typename S, bool kFused>
Status dispatch(S* out, S* residual_out, const S* x, const S* residual, const S* weight,
                int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_residual_out,
                int64_t ld_x, int64_t ld_residual, float eps, cudaStream_t stream) {
  if (rows < 0 || hidden < 1 || hidden > INT_MAX || ld_x < 0 ||
      (rows > 1 && ld_out < hidden) ||
      (kFused && (ld_residual < 0 || (rows > 1 && ld_residual_out < hidden))))
    return Status::kInvalidArgument;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || x == nullptr || weight == nullptr ||
      (kFused && (residual_out == nullptr || residual == nullptr)))
    return Status::kInvalidArgument;

  using T = device_t<S>;
  constexpr int kVec = kVecBytes / sizeof(T);
  bool vec = hidden % kVec == 0 && ld_out % kVec == 0 && ld_x % kVec == 0 && aligned(out) &&
             aligned(x) && aligned(weight);
  if (kFused)
    vec = vec && ld_residual_out % kVec == 0 && ld_residual % kVec == 0 &&
          aligned(residual_out) && aligned(residual);
  auto* o = reinterpret_cast<T*>(out);
  auto* ro = reinterpret_cast<T*>(residual_out);
  const auto* xi = reinterpret_cast<const T*>(x);
  const auto* ri = reinterpret_cast<const T*>(residual);
  const auto* w = reinterpret_cast<const T*>(weight);
  return vec ? launch<T, kVec, kFused>(o, ro, xi, ri, w, rows, hidden, ld_out, ld_residual_out,
                                       ld_x, ld_residual, eps, stream)
             : launch<T, 1, kFused>(o, ro, xi, ri, w, rows, hidden, ld_out, ld_residual_out, ld_x,
                                    ld_residual, eps, stream);
}

}  // namespace

template <typename T>
Status rms_norm(T* out, const T* x, const T* weight, int64_t rows, int64_t hidden, int64_t ld_out,
                int64_t ld_x, float eps, cudaStream_t stream) {
  return dispatch<T, false>(out, nullptr, x, nullptr, weight, rows, hidden, ld_out, 0, ld_x, 0,
                            eps, stream);
}

template <typename T>
Status fused_add_rms_norm(T* out, T* residual_out, const T* x, const T* residual, const T* weight,
                          int64_t rows, int64_t hidden, int64_t ld_out, int64_t ld_residual_out,
                          int64_t ld_x, int64_t ld_residual, float eps, cudaStream_t stream) {
  return dispatch<T, true>(out, residual_out, x, residual, weight, rows, hidden, ld_out,
                           ld_residual_out, ld_x, ld_residual, eps, stream);
}

#define QF_INSTANTIATE(T)                                                                     \
  template Status rms_norm<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, float, \
                              cudaStream_t);                                                  \
  template Status fused_add_rms_norm<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t,  \
                                        int64_t, int64_t, int64_t, int64_t, float, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
