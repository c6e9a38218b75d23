// SwiGLU on the GPU: out = round(up * round(silu(gate))), silu(g) = g / (1 + expf(-g)) in fp32 (a
// division, as torch's CPU silu computes it), rounded to T where reference.swiglu rounds (not for
// fp32). CUDA's expf is within 2 fp32 ulp of exp where torch's CPU exp is within 1, so an fp32
// silu may differ from the reference's by a few ulp and a 16-bit one by one ulp, rarely.
// Layout: [rows, cols] with row strides ld_*, contiguous rows. Parallelisation: one thread per
// chunk of a row, consecutive threads on consecutive chunks, grid-stride over all rows; chunks
// are 16-byte vectors when cols, the strides and the pointers allow, else single elements.
// Constraints: cols >= 1; out overlaps neither input; no allocation, no sync.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {
// Named, because the emulator's module compiles every .cu file in one translation unit.
namespace swiglu_detail {

constexpr int kVecBytes = 16;
constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_kernel(T* out,         // [rows, ld_out]
                  const T* up,    // [rows, ld_up]
                  const T* gate,  // [rows, ld_gate]
                  int64_t rows, int64_t cols, int64_t ld_out, int64_t ld_up, int64_t ld_gate) {
  const int64_t vecs = cols / VEC;
  const int64_t total = rows * vecs;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t r = i / vecs, c = (i - r * vecs) * VEC;
    const Vec<T, VEC> u = load_vec<T, VEC>(up + r * ld_up + c);
    const Vec<T, VEC> g = load_vec<T, VEC>(gate + r * ld_gate + c);
    Vec<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gf = to_f32(g.v[k]);
      // torch rounds silu to the tensor dtype, then multiplies in fp32 and rounds again.
      // __fadd_rn: exp rounded before the add, as in torch (nvcc would otherwise fuse expf's
      // last multiply with the add into an FMA).
      const float silu = to_f32(from_f32<T>(gf / __fadd_rn(1.0f, expf(-gf))));
      o.v[k] = from_f32<T>(to_f32(u.v[k]) * silu);
    }
    store_vec<T, VEC>(out + r * ld_out + c, o);
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

template <typename T, int VEC>
Status launch(T* out, const T* up, const T* gate, int64_t rows, int64_t cols, int64_t ld_out,
              int64_t ld_up, int64_t ld_gate, cudaStream_t stream) {
  const int64_t blocks = (rows * (cols / VEC) + kThreads - 1) / kThreads;
  QF_LAUNCH(static_cast<unsigned>(std::min<int64_t>(blocks, INT_MAX)), kThreads, 0, stream,
            swiglu_kernel<T, VEC>)(out, up, gate, rows, cols, ld_out, ld_up, ld_gate);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

// Argument checks, then 16-byte vectors when cols, every stride and every pointer allow them.
template <typename S>
Status dispatch(S* out, const S* up, const S* gate, int64_t rows, int64_t cols, int64_t ld_out,
                int64_t ld_up, int64_t ld_gate, cudaStream_t stream) {
  if (rows < 0 || cols < 1 || ld_up < 0 || ld_gate < 0 || (rows > 1 && ld_out < cols))
    return Status::kInvalidArgument;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || up == nullptr || gate == nullptr) return Status::kInvalidArgument;
  using T = device_t<S>;
  constexpr int kVec = kVecBytes / sizeof(T);
  auto* o = reinterpret_cast<T*>(out);
  const auto* u = reinterpret_cast<const T*>(up);
  const auto* g = reinterpret_cast<const T*>(gate);
  const bool vec = cols % kVec == 0 && ld_out % kVec == 0 && ld_up % kVec == 0 &&
                   ld_gate % kVec == 0 && aligned(out) && aligned(up) && aligned(gate);
  return vec ? launch<T, kVec>(o, u, g, rows, cols, ld_out, ld_up, ld_gate, stream)
             : launch<T, 1>(o, u, g, rows, cols, ld_out, ld_up, ld_gate, stream);
}

}  // namespace swiglu_detail
}  // namespace

template <typename T>
Status swiglu(T* out, const T* up, const T* gate, int64_t rows, int64_t cols, int64_t ld_out,
              int64_t ld_up, int64_t ld_gate, cudaStream_t stream) {
  return swiglu_detail::dispatch(out, up, gate, rows, cols, ld_out, ld_up, ld_gate, stream);
}

#define QF_INSTANTIATE(T)                                                                  \
  template Status swiglu<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                            cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
