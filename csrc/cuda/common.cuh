// Device-side helpers shared by the CUDA kernels: storage-type mapping, fp32 conversions,
// vector loads, and the warp / block reductions. Every warp-level intrinsic sits in a small
// named function here, so that the SIMT emulator can supply a host twin for each.
#pragma once

#ifdef QF_SIMT
#include "../simt/simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "../common/float16.h"

// Kernel launch, written so that the SIMT emulator can run it too:
//   QF_LAUNCH(grid, block, dynamic_smem_bytes, stream, kernel<T, ...>)(args...);
#ifdef QF_SIMT
#define QF_LAUNCH(grid, block, smem, stream, ...) \
  ::qf::simt::make_launcher(__VA_ARGS__, dim3(grid), dim3(block), (smem))
#else
#define QF_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

// The block's dynamic shared memory (the launch's smem bytes) as `type name[]`.
#ifdef QF_SIMT
#define QF_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::qf::simt::dynamic_smem())
#else
#define QF_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace qf::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Launcher storage type (qf::bf16, qf::fp16, float) -> CUDA's arithmetic type of the same layout.
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<qf::bf16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceType<qf::fp16> {
  using type = __half;
};
template <typename T>
using device_t = typename DeviceType<T>::type;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(int8_t v) { return static_cast<float>(v); }  // a KV code

// Byte k (0..3) of w, a two's complement int8, as an exact fp32: the byte biased by 128 becomes the
// low mantissa bits of 2^23 (one byte permute), then 2^23 + 128 is subtracted (exact). Two
// full-rate instructions instead of an I2F, which runs at a quarter of the fp32 rate: the int8 KV
// cache converts one value per byte read.
__device__ __forceinline__ float s8_to_f32(uint32_t w, int k) {
  const uint32_t sel = 0x7540u | static_cast<uint32_t>(k);  // bytes: w's k-th, 0, 0, 0x4B
  return __uint_as_float(__byte_perm(w ^ 0x80808080u, 0x4B000000u, sel)) - 8388736.0f;
}

// Round an fp32 value to the storage type, to nearest even (as torch's casts do).
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// N consecutive elements moved as one aligned memory access (16-byte vectors in the kernels).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {  // p: [N], aligned to sizeof(Vec)
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {  // p: [N], aligned
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// `v` of the lane whose index is this lane's XOR `lane_mask` (all 32 lanes must take part).
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(kFullWarpMask, v, lane_mask);
}

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += shfl_xor(v, mask);
  return v;
}

// Sum over the whole block; every thread gets the total. blockDim.x must be a multiple of 32
// (at most 1024); `scratch` is __shared__ float[32]. Every thread of the block must call it.
// Ends with a barrier, so the caller may call it again (e.g. for the next row) at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  // Each warp reduces the per-warp partials itself: no second barrier for a broadcast.
  v = warp_sum(lane < num_warps ? scratch[lane] : 0.0f);
  __syncthreads();
  return v;
}

}  // namespace qf::cuda
