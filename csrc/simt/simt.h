// The SIMT emulator: runs our CUDA kernels' own .cu source on the CPU, compiled by the host
// compiler, so that their indexing, reductions and barriers are tested without a GPU (docs:
// csrc/simt/README.md). Included instead of the CUDA headers when QF_SIMT is defined.
//
// Every CUDA thread is a fiber (its own stack, switched cooperatively on one OS thread); the
// blocks of a launch run one after another, in a random order. A fiber runs until it reaches a
// synchronisation point: __syncthreads (every thread of the block must arrive), a warp
// shuffle or __syncwarp (the warp's lanes must arrive), or its end. Between synchronisation
// points the scheduler picks the next fiber to run at random (seeded), so a kernel that reads
// what another thread wrote without a barrier between sees, on most seeds, the value from
// before the write. A barrier that some threads of the block never reach (divergence, or an
// early return) is reported as an error, as are warp operations on absent lanes.
// __shared__ variables are function statics (one copy, which every block reuses: a block's
// shared memory starts with the previous block's contents, not zeros); dynamic shared memory
// (QF_DYNAMIC_SMEM) starts filled with 0xff bytes (NaN as floats).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../common/float16.h"

// ---- the CUDA language surface ---------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };

// The runtime API the launchers use.
using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
namespace qf::simt {
cudaError_t take_error();  // the last launch's error, cleared (as cudaGetLastError)
const char* error_message();
}  // namespace qf::simt
inline cudaError_t cudaGetLastError() { return ::qf::simt::take_error(); }
inline const char* cudaGetErrorString(cudaError_t) { return ::qf::simt::error_message(); }

// The 16-bit float types of cuda_fp16.h / cuda_bf16.h: ours (the same bits and rounding).
using __nv_bfloat16 = qf::bf16;
using __half = qf::fp16;
inline float __bfloat162float(qf::bf16 v) { return qf::to_float(v); }
inline float __half2float(qf::fp16 v) { return qf::to_float(v); }
inline qf::bf16 __float2bfloat16_rn(float v) { return qf::from_float<qf::bf16>(v); }
inline qf::fp16 __float2half_rn(float v) { return qf::from_float<qf::fp16>(v); }

// Device maths, as the host library computes it (the emulator checks logic, not ulps).
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __fdividef(float a, float b) { return a / b; }
// Correctly rounded fp32 product and sum that are never fused into an FMA, as nvcc treats these
// intrinsics (bit-exact kernels use them). Kept out of line so that the host compiler cannot
// contract the caller's __fadd_rn(__fmul_rn(a, b), c) into an FMA either: GCC does so at -O2,
// across statements, wherever the target has FMA, and the emulator's module sets no
// -ffp-contract=off (fp_contract_off.h would switch it off for every kernel included after).
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division, as on the GPU
// __byte_perm: byte i of the result is byte s_i of the 8 bytes {y, x} (x bytes 0-3, y bytes
// 4-7), s_i = bits [4i, 4i+3) of s (CUDA's math API). Selectors with bit 4i+3 set are not
// modelled (CUDA documents them as unused, PTX prmt's default mode replicates a sign bit): callers
// must not use them.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (uint64_t{y} << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 7u;
    out |= (static_cast<unsigned>(bytes >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return out;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
// Fibers switch only at synchronisation points, so a read-modify-write is already atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old > v ? old : v;
  return old;
}

namespace qf::simt {

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;        // threadIdx in the block, x fastest
  int state = 0;         // kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone
  unsigned warp_mask = 0;  // the lanes this fiber's warp operation waits for
  uint64_t slot = 0;     // the value this lane gives to a shuffle
};

// One launch in progress on this OS thread.
struct Launch {
  dim3 grid, block, block_idx;
  std::vector<Fiber>* fibers = nullptr;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  unsigned char* dynamic_smem = nullptr;
  ucontext_t scheduler;
  std::string error;  // set by a fiber; the launch stops
};

Launch& launch_state();  // this OS thread's launch (throws if none is running)
void sync_block();       // __syncthreads
void sync_warp(unsigned mask);
// Every lane in `mask` gives `value` and receives the one of lane `src_lane(lane)`.
uint64_t exchange(unsigned mask, uint64_t value, int src_lane);
void fail(const std::string& message);  // ends the launch with an error naming this thread
void run(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);
void set_seed(uint64_t seed);

inline unsigned char* dynamic_smem() { return launch_state().dynamic_smem; }
inline int lane_id() { return launch_state().current->linear % 32; }

// The value of lane `src` (within the same warp) as type T.
template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// CUDA-syntax launch: QF_LAUNCH(grid, block, smem, stream, kernel)(args...).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    auto k = kernel;
    const std::function<void()> body = [&, k] { k(static_cast<P>(args)...); };
    run(grid, block, smem, body);
  }
};
template <typename... P>
Launcher<P...> make_launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace qf::simt

// Built-in variables of the running fiber.
#define threadIdx (::qf::simt::launch_state().current->tid)
#define blockIdx (::qf::simt::launch_state().block_idx)
#define blockDim (::qf::simt::launch_state().block)
#define gridDim (::qf::simt::launch_state().grid)
#define warpSize 32

inline void __syncthreads() { ::qf::simt::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::qf::simt::sync_warp(mask); }

// width (a power of two <= 32) splits the warp into segments, as on the GPU.
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::qf::simt::lane_id();
  return ::qf::simt::shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::qf::simt::lane_id();
  const int src = lane ^ lane_mask;
  return ::qf::simt::shuffle(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::qf::simt::lane_id();
  const int src = lane + static_cast<int>(delta);
  return ::qf::simt::shuffle(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
