// Linear layer with int4 / int8 weights on the CPU (int4_gemm and int8_gemm; qwen_fast/quant.py
// documents the layout): y[m, n] = sum_k x[m, k] * W[n, k] + bias[n], W[n, k] = s[n, c] * (q[n, k]
// - z[n, c]) for the 128-element chunk c = k / 128 of row n.
//
// Activations are quantized to int8 first, per row and chunk of 128 (as llama.cpp's Q8 blocks):
// sx = max|x| / 127, x8 = round(x / sx), so that the chunk's products are exact integer sums
// (vpdpbusd: unsigned q times signed x8, four products per 32-bit lane). Then, per output,
//   y = sum_c s[c] * sx[c] * (q_c . x8_c)  -  sum_c (s[c] * z[c]) * (sx[c] * sum(x8_c))  + bias,
// in fp32, rounded once to T. The error against fp32 maths on the dequantized weights is the
// activation rounding, |x - sx * x8| <= sx / 2 per element (tests/test_quant_linear.py bounds
// each output by it).
//
// Weight layout, one row of `row_bytes` per output n: the q bytes of the C = Kp / 128 chunks
// (int4: 64 bytes a chunk, byte i = q[128c + i] | q[128c + 64 + i] << 4; int8: 128 bytes, q as
// uint8), then C fp32 scales s, then C fp32 products s * z. Kp is K rounded up to a chunk (the
// padding has q = 0 and x8 = 0, so it adds nothing). One row is read front to back, so a row is
// one sequential stream, and decode takes four rows far apart at a time, as linear.cpp does.
// Parallelisation: OpenMP over blocks of output columns (the weights stream once for up to 16
// activation rows, in panels of rows beyond); activation quantization over rows.
// ISA: AVX-512 VNNI explicitly; elsewhere the portable loop, built for AVX2 and baseline x86
// (QF_CPU_CLONES, compiler-vectorised), picked at run time or forced by the caller.
#include <algorithm>
#include <cmath>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/simd.h"
#include "../common/x86_reduce.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

constexpr int64_t kChunk = 128;
constexpr int kRows = 4;              // weight rows (streams) per tile
constexpr int64_t kMinPanelRows = 16;  // activation rows that share one pass over the weights
constexpr int64_t kPanelBytes = 256 * 1024;
constexpr int64_t kParallelMinMacs = int64_t{1} << 16;

struct QArgs {
  const int8_t* x8;     // [M, Kp]
  const float* xs;      // [M, C] activation scales sx
  const float* xsum;    // [M, C] sx * sum(x8 of the chunk)
  const uint8_t* w;     // [N, row_bytes]
  int64_t M, N, C, row_bytes, q_bytes;  // q_bytes: bytes of q per row (C * 64 or C * 128)
};

// y[n] = partial[n] - sum_c sz[n, c] * xsum[c] + bias[n] for n in [n0, n1) of one activation
// row: the tiles accumulate the first sum; this adds the zero points' sum (vectorised over c).
template <typename T>
QF_CPU_CLONES void finish_row(T* y, const float* partial, const uint8_t* w, int64_t row_bytes,
                              int64_t q_bytes, const float* xsum, const T* bias, int64_t C,
                              int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* sz = reinterpret_cast<const float*>(w + n * row_bytes + q_bytes) + C;
    float t = 0.0f;
#pragma omp simd reduction(+ : t)
    for (int64_t c = 0; c < C; ++c) t += sz[c] * xsum[c];
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
    y[n] = from_float<T>(partial[n] - t + b);
  }
}

// ---- portable tile: one output at a time (the compiler vectorises the chunk's integer dot) ------
template <int BITS>
QF_CPU_CLONES void rows_portable(const QArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                 float* acc) {  // acc[(m - m0) * N + n]: the first sum
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * a.row_bytes;
    const float* s = reinterpret_cast<const float*>(wr + a.q_bytes);
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xr = a.x8 + m * a.C * kChunk;
      const float* sx = a.xs + m * a.C;
      float y = 0.0f;
      for (int64_t c = 0; c < a.C; ++c) {
        int32_t isum = 0;
        const int8_t* xc = xr + c * kChunk;
        if constexpr (BITS == 4) {
          const uint8_t* q = wr + c * 64;
          for (int i = 0; i < 64; ++i)
            isum += int32_t(q[i] & 15) * xc[i] + int32_t(q[i] >> 4) * xc[64 + i];
        } else {
          const uint8_t* q = wr + c * kChunk;
          for (int i = 0; i < kChunk; ++i) isum += int32_t(q[i]) * xc[i];
        }
        y += s[c] * sx[c] * static_cast<float>(isum);
      }
      acc[(m - m0) * a.N + n] = y;
    }
  }
}

#if QF_X86_INTRINSICS
#define QF_TARGET_AVX512_VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// Rows n0 + r * step (r < R) against activation rows m0 .. m0 + MB - 1: R x MB fp32 accumulators,
// per chunk two vpdpbusd per (r, m) (the low and the high 64 of the chunk), converted and scaled.
template <int BITS, int R, int MB>
QF_TARGET_AVX512_VNNI inline void tile_vnni(const QArgs& a, int64_t n0, int64_t step, int64_t m0,
                                            float* acc) {
  __m512 sum[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) sum[r][m] = _mm512_setzero_ps();
  const uint8_t* wr[R];
  const float* s[R];
  for (int r = 0; r < R; ++r) {
    wr[r] = a.w + (n0 + r * step) * a.row_bytes;
    s[r] = reinterpret_cast<const float*>(wr[r] + a.q_bytes);
  }
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int64_t c = 0; c < a.C; ++c) {
    __m512i xlo[MB], xhi[MB];
    float sx[MB];
    for (int m = 0; m < MB; ++m) {
      const int8_t* xc = a.x8 + ((m0 + m) * a.C + c) * kChunk;
      xlo[m] = _mm512_loadu_si512(xc);
      xhi[m] = _mm512_loadu_si512(xc + 64);
      sx[m] = a.xs[(m0 + m) * a.C + c];
    }
    for (int r = 0; r < R; ++r) {
      __m512i lo, hi;
      if constexpr (BITS == 4) {
        const __m512i v = _mm512_loadu_si512(wr[r] + c * 64);
        lo = _mm512_and_si512(v, low4);
        hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      } else {
        lo = _mm512_loadu_si512(wr[r] + c * kChunk);
        hi = _mm512_loadu_si512(wr[r] + c * kChunk + 64);
      }
      for (int m = 0; m < MB; ++m) {
        __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]);
        t = _mm512_dpbusd_epi32(t, hi, xhi[m]);
        sum[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(s[r][c] * sx[m]),
                                    sum[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[m * a.N + n0 + r * step] = hsum(sum[r][m]);
}

template <int BITS, int R>
QF_TARGET_AVX512_VNNI inline void all_rows_vnni(const QArgs& a, int64_t m0, int64_t m1, int64_t n0,
                                                int64_t step, float* acc) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) tile_vnni<BITS, R, 4>(a, n0, step, m, acc + (m - m0) * a.N);
  switch (m1 - m) {
    case 3: tile_vnni<BITS, R, 3>(a, n0, step, m, acc + (m - m0) * a.N); break;
    case 2: tile_vnni<BITS, R, 2>(a, n0, step, m, acc + (m - m0) * a.N); break;
    case 1: tile_vnni<BITS, R, 1>(a, n0, step, m, acc + (m - m0) * a.N); break;
    default: break;
  }
}

// Output columns [n0, n1) for activation rows [m0, m1): four sequential streams of weight rows
// (a quarter of the block each; see linear.cpp's columns()), the remainder one row at a time.
template <int BITS>
QF_TARGET_AVX512_VNNI __attribute__((flatten)) void rows_vnni(const QArgs& a, int64_t m0,
                                                              int64_t m1, int64_t n0, int64_t n1,
                                                              float* acc) {
  const int64_t per = (n1 - n0) / kRows;
  for (int64_t i = 0; i < per; ++i) all_rows_vnni<BITS, kRows>(a, m0, m1, n0 + i, per, acc);
  for (int64_t n = n0 + kRows * per; n < n1; ++n) all_rows_vnni<BITS, 1>(a, m0, m1, n, 1, acc);
}
#endif  // QF_X86_INTRINSICS

using RowsFn = void (*)(const QArgs&, int64_t, int64_t, int64_t, int64_t, float*);

RowsFn rows_fn(int bits, CpuIsa isa) {
#if QF_X86_INTRINSICS
  if (isa == CpuIsa::kAvx512Vnni) return bits == 4 ? rows_vnni<4> : rows_vnni<8>;
#endif
  (void)isa;
  return bits == 4 ? rows_portable<4> : rows_portable<8>;
}

// x8 / xs / xsum of one activation row: K values, gathered through perm when given.
template <typename T>
QF_CPU_CLONES void quantize_row(int8_t* x8, float* xs, float* xsum, const T* x, const int64_t* perm,
                                int64_t K, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const int64_t k0 = c * kChunk, n = std::min(kChunk, K - k0);
    float v[kChunk];
    for (int64_t i = 0; i < n; ++i) v[i] = to_float(x[perm ? perm[k0 + i] : k0 + i]);
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float sx = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t total = 0;
    int8_t* q = x8 + k0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t r = static_cast<int32_t>(std::nearbyint(v[i] * inv));
      q[i] = static_cast<int8_t>(std::clamp(r, -127, 127));
      total += q[i];
    }
    for (int64_t i = n; i < kChunk; ++i) q[i] = 0;
    xs[c] = sx;
    xsum[c] = sx * static_cast<float>(total);
  }
}

}  // namespace

int64_t quant_row_bytes(int bits, int64_t K) {
  const int64_t C = (K + kChunk - 1) / kChunk;
  return C * (kChunk * bits / 8) + C * 2 * static_cast<int64_t>(sizeof(float));
}

int64_t quant_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  const int64_t C = (K + kChunk - 1) / kChunk;
  // x8 [M, C * 128], xs and xsum [M, C], the fp32 partial sums [M, N]
  return M * C * kChunk + (2 * M * C + M * N) * static_cast<int64_t>(sizeof(float));
}

template <typename T>
Status quant_linear(T* y, const T* x, const uint8_t* w, const T* bias, const int64_t* perm,
                    int64_t M, int64_t N, int64_t K, int bits, int64_t ld_y, int64_t ld_x,
                    void* workspace, int num_threads, CpuIsa isa) {
  if (M < 0 || N < 0 || K < 0 || (bits != 4 && bits != 8) || ld_x < 0 || (M > 1 && ld_y < N))
    return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (y == nullptr || x == nullptr || w == nullptr || workspace == nullptr)
    return Status::kInvalidArgument;
  if (isa == CpuIsa::kAuto) {
    static const CpuIsa best = cpu_isa_supported(CpuIsa::kAvx512Vnni) ? CpuIsa::kAvx512Vnni
                                                                      : CpuIsa::kScalar;
    isa = best;
  }
  if (isa != CpuIsa::kScalar && isa != CpuIsa::kAvx512Vnni) return Status::kUnsupported;
  if (!cpu_isa_supported(isa)) return Status::kUnsupported;
  const int64_t C = (K + kChunk - 1) / kChunk;
  const int64_t q_bytes = C * (kChunk * bits / 8);
  int8_t* x8 = static_cast<int8_t*>(workspace);
  float* xs = reinterpret_cast<float*>(x8 + M * C * kChunk);
  float* xsum = xs + M * C;
  float* partial = xsum + M * C;
  const int threads = num_threads < 1 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 1 && M * K >= 4096)
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x8 + m * C * kChunk, xs + m * C, xsum + m * C, x + m * ld_x, perm, K, C);

  const QArgs a{x8, xs, xsum, w, M, N, C, quant_row_bytes(bits, K), q_bytes};
  const RowsFn rows = rows_fn(bits, isa);
  // Activation rows per pass over the weights: all of a decode batch, else as many as keep
  // their x8 in L2 (kPanelBytes).
  const int64_t fit = kPanelBytes / (C * kChunk);
  const int64_t panel = std::max(kMinPanelRows, fit / 4 * 4);
  const int64_t blocks = (N + kRows - 1) / kRows;
  int64_t nt = std::min<int64_t>(threads, blocks);
  if (M * N * K < kParallelMinMacs) nt = 1;
#pragma omp parallel num_threads(static_cast<int>(nt)) if (nt > 1)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), tn = omp_get_num_threads();
#else
    const int64_t t = 0, tn = 1;
#endif
    const int64_t n0 = std::min(N, blocks * t / tn * kRows);
    const int64_t n1 = std::min(N, blocks * (t + 1) / tn * kRows);
    for (int64_t m0 = 0; m0 < M; m0 += panel) {
      const int64_t m1 = std::min(M, m0 + panel);
      rows(a, m0, m1, n0, n1, partial + m0 * N);
      for (int64_t m = m0; m < m1; ++m)
        finish_row(y + m * ld_y, partial + m * N, w, a.row_bytes, q_bytes, xsum + m * C, bias, C,
                   n0, n1);
    }
  }
  return Status::kOk;
}

#define QF_INSTANTIATE(T)                                                                    \
  template Status quant_linear<T>(T*, const T*, const uint8_t*, const T*, const int64_t*,     \
                                  int64_t, int64_t, int64_t, int, int64_t, int64_t, void*,    \
                                  int, CpuIsa);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
