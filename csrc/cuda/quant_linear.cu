// int4 / int8 GEMV on the GPU (int4_gemm / int8_gemm): y = x[:, perm] . W^T + bias for few rows
// of x, W[n, k] = s * q - s * z (exact in fp32) formed in registers, fp32 products and sums, the
// bias added in fp32, rounded once to T. Layout (the CPU kernel's, qwen_fast/qweight.py): tiles of
// 16 outputs, per 128-input chunk the q as 64-byte vectors j (lane r = 4 inputs of output r),
// then 16 fp16 s and 16 zeros (uint8 / uint16; s * z formed in fp32, exact). Parallelisation: a block per tile (and 16 rows of x), its warps
// striding over the chunks; lane L reads the 16-byte pieces L, L + 32, ... of a chunk's q (a warp
// reads 512 contiguous bytes at a time): piece 4j + g holds outputs 4g..4g+3 of vector j, so lane
// L owns outputs 4(L % 4)..+3 and vectors j = L / 4 + 8i; the 8 lanes of one g, then the block's
// warps, are summed at the end. Prefill: quant_linear_dequantize writes the dense W instead.
#include <algorithm>
#include <climits>

#include "common.cuh"
#include "gemv.cuh"
#include "kernels.cuh"

namespace qf::cuda {
namespace {
// Named as well: the SIMT emulator compiles every kernel source into one translation unit.
namespace quant_linear_impl {

constexpr int kTile = 16;    // outputs per tile
constexpr int kChunk = 128;  // inputs per chunk (one scale and offset per output)
constexpr int kPieceBytes = 16;

template <int BITS>
struct Layout {
  static constexpr int kQBytes = kTile * kChunk * BITS / 8;      // q of one chunk of a tile
  static constexpr int kZeroBytes = BITS == 4 ? 1 : 2;           // uint8 / uint16 zeros
  static constexpr int kRecord = kQBytes + 2 * kTile + kZeroBytes * kTile;  // + 16 fp16 s, 16 z
  static constexpr int kPieces = kQBytes / kPieceBytes;          // 16-byte pieces of q
  static constexpr int kLanePieces = kPieces / kWarpSize;        // per lane: 2 (int4), 4 (int8)
};

// More rows of x need more registers for their sums: fewer threads per block.
template <int MT>
constexpr int max_warps() {
  return MT <= 4 ? 16 : 8;
}

// Outputs 4g .. 4g + 3 of a chunk record: their scales (fp16, widened exactly) and s * z, exact in
// fp32 (an fp16 scale times an integer below 2^16), as the CPU kernel and QuantWeight.dequantize.
template <int BITS>
__device__ __forceinline__ void scales_of(float4& s4, float4& sz4, const uint8_t* rec, int g) {
  using L = Layout<BITS>;
  const __half* sh = reinterpret_cast<const __half*>(rec + L::kQBytes) + 4 * g;
  float s[4], z[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    s[e] = to_f32(__ldg(sh + e));
    if constexpr (BITS == 4)
      z[e] = static_cast<float>(__ldg(rec + L::kQBytes + 2 * kTile + 4 * g + e));
    else
      z[e] = static_cast<float>(
          __ldg(reinterpret_cast<const unsigned short*>(rec + L::kQBytes + 2 * kTile) + 4 * g + e));
  }
  s4.x = s[0], s4.y = s[1], s4.z = s[2], s4.w = s[3];
  sz4.x = __fmul_rn(s[0], z[0]), sz4.y = __fmul_rn(s[1], z[1]);
  sz4.z = __fmul_rn(s[2], z[2]), sz4.w = __fmul_rn(s[3], z[3]);
}

// What one lane reads of a chunk: its pieces of q and the s, s*z of its four outputs.
template <int BITS>
struct LaneChunk {
  uint4 q[Layout<BITS>::kLanePieces];
  float4 s, sz;
};

template <int BITS>
__device__ __forceinline__ void load_chunk(LaneChunk<BITS>& d,
                                           const uint8_t* rec,  // [record] of one chunk
                                           int lane) {
  using L = Layout<BITS>;
#pragma unroll
  for (int p = 0; p < L::kLanePieces; ++p)
    d.q[p] = __ldg(reinterpret_cast<const uint4*>(rec + (p * kWarpSize + lane) * kPieceBytes));
  scales_of<BITS>(d.s, d.sz, rec, lane % 4);
}

// Adds the products of four consecutive inputs k0..k0+3 (bits kShift.. of each byte of the four
// words, word e for output 4g + e) to acc[m * 4 + e]. x is read at perm[k] (or k) as fp32; inputs
// past K (the last chunk's padding) are skipped. kVecX: no perm, K and ld_x multiples of 4 and
// x aligned, so the four are one aligned vector.
template <typename T, int MT, bool kVecX, unsigned kMask, int kShift>
__device__ __forceinline__ void add_group(float (&acc)[MT * 4], const unsigned (&words)[4],
                                          const float (&s)[4], const float (&sz)[4], int k0,
                                          const T* xb,          // [rows, ld_x]
                                          const int64_t* perm,  // [K] or nullptr
                                          int64_t ld_x, int rows, int K) {
  if (k0 >= K) return;
  float wv[4][4];
#pragma unroll
  for (int e = 0; e < 4; ++e)
#pragma unroll
    for (int b = 0; b < 4; ++b)
      wv[e][b] = fmaf(small_uint_to_f32((words[e] >> (8 * b + kShift)) & kMask), s[e], -sz[e]);
  int col[4];
  if constexpr (!kVecX) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int k = k0 + b;
      const int64_t c = k >= K ? -1 : perm != nullptr ? perm[k] : k;
      // a bad perm value reads 0 rather than out of bounds
      col[b] = c >= 0 && c < K ? static_cast<int>(c) : -1;
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const T* xr = xb + (m < rows ? m : rows - 1) * ld_x;
    float xf[4];
    if constexpr (kVecX) {
      const Vec<T, 4> v = load_vec<T, 4>(xr + k0);
#pragma unroll
      for (int b = 0; b < 4; ++b) xf[b] = to_f32(v.v[b]);
    } else {
#pragma unroll
      for (int b = 0; b < 4; ++b) xf[b] = col[b] >= 0 ? to_f32(xr[col[b]]) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[m * 4 + e] = fmaf(xf[b], wv[e][b], acc[m * 4 + e]);
  }
}

// Block (blockIdx.x, blockIdx.y): tile blockIdx.x (outputs 16 * blockIdx.x ..), rows of x
// m0 = MT * blockIdx.y .. m0 + MT - 1 (past M: the last row again, computed and not written).
template <typename T, int BITS, int MT, bool kVecX>
__global__ void __launch_bounds__(max_warps<MT>() * kWarpSize)
    quant_linear_kernel(T* __restrict__ y,                // [M, ld_y]
                        const T* __restrict__ x,          // [M, ld_x]
                        const uint8_t* __restrict__ w,    // [tiles, C * record]
                        const T* __restrict__ bias,       // [N] or nullptr
                        const int64_t* __restrict__ perm, // [K] or nullptr
                        int64_t M, int N, int K, int64_t ld_y, int64_t ld_x) {
  using L = Layout<BITS>;
  constexpr int kValues = MT * 4;                         // sums per lane: [m][output 4g + e]
  constexpr int kKept = kValues >= 8 ? kValues / 8 : 1;  // per lane after the 8-lane reduction
  __shared__ float partial[max_warps<MT>() * MT * kTile];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int g = lane % 4;
  const int C = (K + kChunk - 1) / kChunk;
  const int64_t tile = blockIdx.x;
  const int64_t m0 = int64_t{blockIdx.y} * MT;
  const int rows = static_cast<int>(M - m0 < MT ? M - m0 : MT);
  const uint8_t* wt = w + tile * C * L::kRecord;
  const T* xb = x + m0 * ld_x;

  float acc[kValues] = {};
  // The next chunk's loads are issued before the current chunk's multiply-adds.
  LaneChunk<BITS> next;
  if (warp < C) load_chunk<BITS>(next, wt + int64_t{warp} * L::kRecord, lane);
  for (int c = warp; c < C; c += warps) {
    const LaneChunk<BITS> cur = next;
    if (c + warps < C) load_chunk<BITS>(next, wt + int64_t{c + warps} * L::kRecord, lane);
    const float s[4] = {cur.s.x, cur.s.y, cur.s.z, cur.s.w};
    const float sz[4] = {cur.sz.x, cur.sz.y, cur.sz.z, cur.sz.w};
#pragma unroll
    for (int p = 0; p < L::kLanePieces; ++p) {
      const int j = lane / 4 + 8 * p;  // the 64-byte vector this piece belongs to
      const unsigned words[4] = {cur.q[p].x, cur.q[p].y, cur.q[p].z, cur.q[p].w};
      const int k0 = c * kChunk + 4 * j;
      if constexpr (BITS == 8) {
        add_group<T, MT, kVecX, 0xffu, 0>(acc, words, s, sz, k0, xb, perm, ld_x, rows, K);
      } else {  // low nibbles: inputs 4j..4j+3; high nibbles: 64 + 4j..
        add_group<T, MT, kVecX, 0xfu, 0>(acc, words, s, sz, k0, xb, perm, ld_x, rows, K);
        add_group<T, MT, kVecX, 0xfu, 4>(acc, words, s, sz, k0 + kChunk / 2, xb, perm, ld_x,
                                          rows, K);
      }
    }
  }

  // Sum over the 8 lanes of each g (lane bits 4, 8, 16), then over the warps in shared memory.
  int index = 0;
  bool rep = true;
  reduce_scatter<kValues, 16, 4>(acc, lane, index, rep);
  if (rep) {
#pragma unroll
    for (int i = 0; i < kKept; ++i) {
      const int m = (index + i) / 4, e = (index + i) % 4;
      partial[(warp * MT + m) * kTile + 4 * g + e] = acc[i];
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < MT * kTile; t += blockDim.x) {
    const int m = t / kTile;
    const int64_t n = tile * kTile + t % kTile;
    if (m >= rows || n >= N) continue;
    float sum = 0.0f;
    for (int k = 0; k < warps; ++k) sum += partial[k * MT * kTile + t];
    if (bias != nullptr) sum += to_f32(bias[n]);
    y[(m0 + m) * ld_y + n] = from_f32<T>(sum);
  }
}

template <typename T, int BITS, int MT, bool kVecX>
Status launch(T* y, const T* x, const uint8_t* w, const T* bias, const int64_t* perm, int64_t M,
              int64_t N, int64_t K, int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  // As many warps as the chunks allow (up to max_warps), each with an equal share of them.
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  const int64_t per_warp = (chunks + max_warps<MT>() - 1) / max_warps<MT>();
  const int64_t warps = (chunks + per_warp - 1) / per_warp;
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile),
                  static_cast<unsigned>((M + MT - 1) / MT));
  QF_LAUNCH(grid, static_cast<unsigned>(warps * kWarpSize), 0, stream,
            quant_linear_kernel<T, BITS, MT, kVecX>)(y, x, w, bias, perm, M, static_cast<int>(N),
                                                     static_cast<int>(K), ld_y, ld_x);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

// Rows of x per panel: the smallest of 1, 2, 4, 8, 16 that holds M (16 beyond).
template <typename T, int BITS, bool kVecX>
Status launch_rows(T* y, const T* x, const uint8_t* w, const T* bias, const int64_t* perm,
                   int64_t M, int64_t N, int64_t K, int64_t ld_y, int64_t ld_x,
                   cudaStream_t stream) {
  if (M <= 1) return launch<T, BITS, 1, kVecX>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
  if (M <= 2) return launch<T, BITS, 2, kVecX>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
  if (M <= 4) return launch<T, BITS, 4, kVecX>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
  if (M <= 8) return launch<T, BITS, 8, kVecX>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
  return launch<T, BITS, 16, kVecX>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
}

template <typename T, int BITS>
Status launch_x(T* y, const T* x, const uint8_t* w, const T* bias, const int64_t* perm, int64_t M,
                int64_t N, int64_t K, int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  const bool vec_x = perm == nullptr && K % 4 == 0 && ld_x % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(x) % (4 * sizeof(T)) == 0;
  return vec_x ? launch_rows<T, BITS, true>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream)
               : launch_rows<T, BITS, false>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
}

// Thread per 16-byte piece of q: its 4 outputs x 4 (int8) or 8 (int4) inputs, written at
// out[n, perm[k]] (a scatter; the prefill GEMM that follows costs far more).
template <typename T, int BITS>
__global__ void quant_linear_dequantize_kernel(T* __restrict__ out,               // [N, ld_out]
                                               const uint8_t* __restrict__ w,     // [tiles, C * record]
                                               const int64_t* __restrict__ perm,  // [K] or nullptr
                                               int N, int K, int64_t ld_out, int64_t pieces) {
  using L = Layout<BITS>;
  const int C = (K + kChunk - 1) / kChunk;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t p = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; p < pieces; p += step) {
    const int64_t chunk = p / L::kPieces;  // tile * C + c: records are laid out in this order
    const int piece = static_cast<int>(p % L::kPieces);
    const int64_t tile = chunk / C;
    const int c = static_cast<int>(chunk % C);
    const int j = piece / 4, g = piece % 4;
    const uint8_t* rec = w + chunk * L::kRecord;
    const uint4 q = *reinterpret_cast<const uint4*>(rec + piece * kPieceBytes);
    float4 s4, sz4;
    scales_of<BITS>(s4, sz4, rec, g);
    const unsigned words[4] = {q.x, q.y, q.z, q.w};
    const float s[4] = {s4.x, s4.y, s4.z, s4.w};
    const float sz[4] = {sz4.x, sz4.y, sz4.z, sz4.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t n = tile * kTile + 4 * g + e;
      if (n >= N) continue;
#pragma unroll
      for (int half = 0; half < (BITS == 4 ? 2 : 1); ++half) {
        const int k0 = c * kChunk + half * (kChunk / 2) + 4 * j;
        const int shift = 4 * half;
        const unsigned mask = BITS == 4 ? 0xfu : 0xffu;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int k = k0 + b;
          if (k >= K) continue;
          const int64_t col = perm != nullptr ? perm[k] : k;
          if (col < 0 || col >= K) continue;
          const unsigned qv = (words[e] >> (8 * b + shift)) & mask;
          out[n * ld_out + col] = from_f32<T>(fmaf(small_uint_to_f32(qv), s[e], -sz[e]));
        }
      }
    }
  }
}

bool valid_sizes(int64_t N, int64_t K, int bits) {
  return N >= 1 && N <= INT_MAX - kTile && K >= 1 && K <= INT_MAX - kChunk &&
         (bits == 4 || bits == 8);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kPieceBytes == 0; }

template <typename T>
Status gemv(T* y, const T* x, const uint8_t* w, const T* bias, const int64_t* perm, int64_t M,
            int64_t N, int64_t K, int bits, int64_t ld_y, int64_t ld_x, cudaStream_t stream) {
  if (M < 0 || !valid_sizes(N, K, bits) || (M > 1 && (ld_x < K || ld_y < N)) ||
      (M + 15) / 16 > 65535)
    return Status::kInvalidArgument;
  if (M == 0) return Status::kOk;
  if (y == nullptr || x == nullptr || w == nullptr || !aligned16(w))
    return Status::kInvalidArgument;
  return bits == 4 ? launch_x<T, 4>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream)
                   : launch_x<T, 8>(y, x, w, bias, perm, M, N, K, ld_y, ld_x, stream);
}

template <typename T>
Status dequantize(T* out, const uint8_t* w, const int64_t* perm, int64_t N, int64_t K, int bits,
                  int64_t ld_out, cudaStream_t stream) {
  if (!valid_sizes(N, K, bits) || (N > 1 && ld_out < K)) return Status::kInvalidArgument;
  if (out == nullptr || w == nullptr || !aligned16(w)) return Status::kInvalidArgument;
  const int64_t pieces = (N + kTile - 1) / kTile * ((K + kChunk - 1) / kChunk) *
                         (bits == 4 ? Layout<4>::kPieces : Layout<8>::kPieces);
  constexpr int kThreads = 256;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((pieces + kThreads - 1) / kThreads, 1 << 16));
  if (bits == 4)
    QF_LAUNCH(blocks, kThreads, 0, stream, quant_linear_dequantize_kernel<T, 4>)(
        out, w, perm, static_cast<int>(N), static_cast<int>(K), ld_out, pieces);
  else
    QF_LAUNCH(blocks, kThreads, 0, stream, quant_linear_dequantize_kernel<T, 8>)(
        out, w, perm, static_cast<int>(N), static_cast<int>(K), ld_out, pieces);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::kOk : cuda_error_status(err);
}

}  // namespace quant_linear_impl
}  // namespace

template <typename S>
Status quant_linear(S* y, const S* x, const uint8_t* w, const S* bias, const int64_t* perm,
                    int64_t M, int64_t N, int64_t K, int bits, int64_t ld_y, int64_t ld_x,
                    cudaStream_t stream) {
  using T = device_t<S>;
  return quant_linear_impl::gemv<T>(reinterpret_cast<T*>(y), reinterpret_cast<const T*>(x), w,
                                    reinterpret_cast<const T*>(bias), perm, M, N, K, bits, ld_y,
                                    ld_x, stream);
}

template <typename S>
Status quant_linear_dequantize(S* out, const uint8_t* w, const int64_t* perm, int64_t N, int64_t K,
                               int bits, int64_t ld_out, cudaStream_t stream) {
  using T = device_t<S>;
  return quant_linear_impl::dequantize<T>(reinterpret_cast<T*>(out), w, perm, N, K, bits, ld_out,
                                          stream);
}

#define QF_INSTANTIATE(T)                                                                       \
  template Status quant_linear<T>(T*, const T*, const uint8_t*, const T*, const int64_t*,       \
                                  int64_t, int64_t, int64_t, int, int64_t, int64_t, cudaStream_t); \
  template Status quant_linear_dequantize<T>(T*, const uint8_t*, const int64_t*, int64_t, int64_t, \
                                             int, int64_t, cudaStream_t);
QF_INSTANTIATE(float)
QF_INSTANTIATE(qf::bf16)
QF_INSTANTIATE(qf::fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cuda
