// Kernels that test the SIMT emulator itself (tests/test_simt.py): barriers, shuffles, shared
// memory, and kernels with deliberate faults (a missing barrier, divergent barriers) that the
// emulator must catch. Written in CUDA like csrc/cuda/*.cu; compiled only into qwen_fast._simt.
#include "../cuda/common.cuh"

namespace qf::simt_selftest {

using qf::cuda::block_sum;
using qf::cuda::warp_sum;

// out[b * n + t] = what thread n - 1 - t of block b wrote (n = blockDim.x <= 1024); with
// kBarrier false the barrier between the write and the read is missing.
template <bool kBarrier>
__global__ void reverse_kernel(int* out) {
  __shared__ int buf[1024];
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = blockIdx.x * 10000 + t;
  if (kBarrier) __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

// out[b * n + t] = the sum over block b of x (block_sum of common.cuh: shared scratch + shuffles).
__global__ void block_sum_kernel(float* out, const float* x) {
  __shared__ float scratch[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = block_sum(x[i], scratch);
}

// Per thread: [0] warp_sum (xor butterfly), [1] a broadcast of lane 3's value, [2] the value of
// lane + 1 (shfl_down, the last lane keeps its own), [3] the xor-1 partner within width 8.
__global__ void shuffle_kernel(float* out, const float* x) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[i];
  out[4 * i + 0] = warp_sum(v);
  out[4 * i + 1] = __shfl_sync(qf::cuda::kFullWarpMask, v, 3);
  out[4 * i + 2] = __shfl_down_sync(qf::cuda::kFullWarpMask, v, 1);
  out[4 * i + 3] = __shfl_xor_sync(qf::cuda::kFullWarpMask, v, 1, 8);
}

// Faults: 0 a barrier inside a branch half the block takes; 1 an early return before a barrier;
// 2 a shuffle whose mask leaves out the calling lane.
__global__ void fault_kernel(int* out, int which) {
  const int t = threadIdx.x;
  if (which == 0) {
    if (t < 16) __syncthreads();
  } else if (which == 1) {
    if (t == 5) return;
    __syncthreads();
  } else {
    out[t] = __shfl_sync(0x1u, t, 0);
  }
  out[t] = t;
}

// Dynamic shared memory as a kernel finds it before writing: its first `n` bytes, per block.
__global__ void dynamic_smem_kernel(unsigned char* out, int n) {
  QF_DYNAMIC_SMEM(unsigned char, smem);
  if (threadIdx.x == 0)
    for (int i = 0; i < n; ++i) out[blockIdx.x * n + i] = smem[i];
  __syncthreads();
  smem[threadIdx.x % n] = 0;  // the next block must not see this
}

}  // namespace qf::simt_selftest
