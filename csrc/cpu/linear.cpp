// Linear layer on the CPU: y[m, n] = round(sum_k x[m, k] * w[n, k] + bias[n]); products and sums
// in fp32, the bias added in fp32, one rounding to T (reference.linear).
// Layout: x [M, ld_x] (K contiguous elements a row), w [N, K] contiguous, y [M, ld_y], bias [N].
// Parallelisation: the weights stream from memory once (up to 16 rows of x; more rows are taken
// in panels that fit in L2, the weights once per panel). Each OpenMP thread owns a block of
// output columns n; for each group of kRows weight rows (at decode sizes one from each of kRows
// sequential streams, see columns()) it forms the dot products with all the panel's rows of x
// (register tiles of kRows x MB fp32 accumulators) while those weight rows sit in L1.
// ISA: explicit kernels for AVX-512 BF16 (vdpbf16ps on bf16 pairs), AVX-512 and AVX2 (16-bit
// values widened to fp32, then FMA) and plain C++, picked at run time or forced by the caller.
// Constraints: M, N, K >= 0, any row strides; each output is one thread's fixed-order sum, so
// results do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/simd.h"
#include "../common/x86_reduce.h"
#include "kernels.h"
#include "shared_blocks.h"

#if QF_X86_INTRINSICS
#include <immintrin.h>
// The shared tile helpers hold vector types without a target attribute of their own; they are
// only ever inlined (flatten) into an entry point built for the ISA, so no vector crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's own AVX-512 headers trip it (_mm512_undefined_*: GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qf::cpu {
namespace {

// Weight rows per register tile: kRows independent streams per thread, each weight vector used
// for MB activation rows, and few enough accumulators (kRows x MB) to stay in registers.
constexpr int kRows = 4;
constexpr int64_t kCacheLine = 64;
// Activation rows per panel: at least the decode sizes, else as many as fit in kPanelBytes.
constexpr int64_t kMinPanelRows = 16;
constexpr int64_t kPanelBytes = 256 * 1024;
// Decode tiles prefetch the next rows of their streams into L2 from this many activation rows.
constexpr int64_t kPrefetchMinRows = 3;
// Below this many multiply-adds the OpenMP fork/join costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t{1} << 16;
// The smallest share of a decode GEMV a thread takes at a time (kRows-row blocks).
constexpr int64_t kMinGrabBlocks = 16;

template <typename T>
struct Args {
  T* y;           // [M, ld_y]
  const T* x;     // [M, ld_x]
  const T* w;     // [N, K]
  const T* bias;  // [N] or nullptr
  int64_t M, N, K, ld_y, ld_x;
};



// ---- the tile loop, shared by every ISA ---------------------------------------------------------
// `Ops` gives the ISA's vector types and operations for one storage type: Vec (kStep elements of
// K as loaded and widened), Acc (fp32 partial sums), zero, load, load_partial (the first n < kStep
// elements, the rest zero) and fma (acc + w . x over one Vec); hsum / hsum4 (overloaded on Acc)
// sum the lanes of one / four accumulators. kMaxMB is the most activation rows a tile holds.
// These helpers are plain `inline`; each ISA's entry point below carries the target attribute
// and `flatten`, which inlines all of them into it.

// acc[r][m] += w[r, :kStep] . x[m, :kStep]; kPartial: only the first n elements (n < kStep).
template <class Ops, int R, int MB, bool kPartial>
inline void tile_step(typename Ops::Acc (&acc)[R][MB],
                      const typename Ops::Elem* w,  // [R, ldw], at the step's first column
                      const typename Ops::Elem* x,  // [MB, ld_x], at the step's first column
                      int64_t ldw, int64_t ld_x, int64_t n) {
  typename Ops::Vec xv[MB];
  for (int m = 0; m < MB; ++m)
    xv[m] = kPartial ? Ops::load_partial(x + m * ld_x, n) : Ops::load(x + m * ld_x);
  for (int r = 0; r < R; ++r) {
    const typename Ops::Vec wv =
        kPartial ? Ops::load_partial(w + r * ldw, n) : Ops::load(w + r * ldw);
    for (int m = 0; m < MB; ++m) acc[r][m] = Ops::fma(acc[r][m], wv, xv[m]);
  }
}

// What a tile prefetches: bytes [begin, end) of each of `rows` regions, the first at `next` and
// `stride` bytes apart, `step` bytes per k step from begin.
struct Prefetch {
  const char* next;
  int64_t begin, end, step, rows, stride;
};

// y[m0 : m0 + MB, n0 + r * step] for r < R, rounded once after adding the bias in fp32.
template <class Ops, int R, int MB>
inline void tile(const Args<typename Ops::Elem>& a, int64_t n0, int64_t step, int64_t m0,
                 Prefetch pf) {
  using T = typename Ops::Elem;
  typename Ops::Acc acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = Ops::zero();
  const T* w = a.w + n0 * a.K;
  const T* x = a.x + m0 * a.ld_x;
  const int64_t ldw = step * a.K;  // between the tile's weight rows
  int64_t k = 0;
  for (; k + Ops::kStep <= a.K; k += Ops::kStep) {
    for (int64_t i = pf.begin; i < pf.begin + pf.step && i < pf.end; i += kCacheLine)
      for (int64_t r = 0; r < pf.rows; ++r)
        __builtin_prefetch(pf.next + r * pf.stride + i, 0, 2);  // into L2 (prefetcht1)
    pf.begin += pf.step;
    tile_step<Ops, R, MB, false>(acc, w + k, x + k, ldw, a.ld_x, Ops::kStep);
  }
  if constexpr (Ops::kStep > 1) {
    if (k < a.K) tile_step<Ops, R, MB, true>(acc, w + k, x + k, ldw, a.ld_x, a.K - k);
  }
  float b[R];
  for (int r = 0; r < R; ++r) b[r] = a.bias != nullptr ? to_float(a.bias[n0 + r * step]) : 0.0f;
  for (int m = 0; m < MB; ++m) {
    float sum[R];
    if constexpr (R == 4) {
      hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m], sum);
    } else {
      for (int r = 0; r < R; ++r) sum[r] = hsum(acc[r][m]);
    }
    for (int r = 0; r < R; ++r)
      a.y[(m0 + m) * a.ld_y + n0 + r * step] = from_float<T>(sum[r] + b[r]);
  }
}

// Columns n0 + r * row_step (r < R) for every activation row: the R weight rows stay in L1
// meanwhile. With use_pf the next R rows (n0 + R when the rows are consecutive, n0 + 1 + r *
// row_step when they are streams) are prefetched into L2, a share in each of the M / kMaxMB
// tiles, so that memory streams while the tiles compute: without it a core alternates between
// waiting for weights and computing (bf16, one thread, 6144x2048: M = 4 at 12 GB/s instead of 18,
// M = 16 at 7.3 instead of 9.7). Prefetching into L1 instead gains little: its few miss buffers
// cap the stream. (Prefetching the whole next group during the first tile was ~7% faster at
// K = 5504, M = 8..16, ~15% slower at K = 2048, which four of Qwen's five projections have.)
template <class Ops, int R>
inline void all_rows(const Args<typename Ops::Elem>& a, int64_t n0, int64_t row_step, bool use_pf) {
  using T = typename Ops::Elem;
  const int64_t steps = a.K / Ops::kStep;
  const int64_t tiles = (a.M + Ops::kMaxMB - 1) / Ops::kMaxMB;
  const int64_t row_bytes = a.K * static_cast<int64_t>(sizeof(T));
  const bool streams = row_step > 1;
  const int64_t group = streams ? row_bytes : R * row_bytes;
  const int64_t share = (group + tiles - 1) / tiles;
  // Only a whole next group, and not for the scalar path.
  const bool prefetch = use_pf && Ops::kStep > 1 && steps > 0 && (streams || n0 + 2 * R <= a.N);
  const char* next = reinterpret_cast<const char*>(a.w + (prefetch ? n0 + (streams ? 1 : R) : 0) * a.K);
  const int64_t step = steps > 0 ? (share + steps - 1) / steps : 0;
  auto pf = [&](int64_t t) {
    return Prefetch{next, t * share, prefetch ? group : 0, step, streams ? R : 1, row_step * row_bytes};
  };
  int64_t m = 0, t = 0;
  for (; m + Ops::kMaxMB <= a.M; m += Ops::kMaxMB, ++t)
    tile<Ops, R, Ops::kMaxMB>(a, n0, row_step, m, pf(t));
  const int64_t rest = a.M - m;
  if constexpr (Ops::kMaxMB > 3) {
    if (rest == 3) tile<Ops, R, 3>(a, n0, row_step, m, pf(t));
  }
  if constexpr (Ops::kMaxMB > 2) {
    if (rest == 2) tile<Ops, R, 2>(a, n0, row_step, m, pf(t));
  }
  if (rest == 1) tile<Ops, R, 1>(a, n0, row_step, m, pf(t));
}

// Output columns [n0, n1): one thread's share. Up to kMinPanelRows activation rows (decode) are
// one panel, so the weights stream once; more rows are taken a panel at a time, a panel being as
// many rows as fit in kPanelBytes, so that they stay in L2 while the weights stream past them
// (once per panel) instead of being fetched from L3 again for every group of weight rows.
// Decode reads the thread's weight rows as kRows sequential streams far apart (a quarter of its
// rows each), a tile taking the next row of each: a core keeps more memory requests in flight
// with several long sequential streams than with one, or with kRows neighbouring rows, whose
// 4-8 KiB each end at a page boundary where the hardware prefetcher stops. bf16, 2 threads, Zen
// 4, M = 1 (GB/s; a plain one-stream read 44): neighbouring rows + software prefetch 46-47, four
// streams 53 (a read of four streams 58); lm_head at a quiet moment 45.5 -> 58.6. Software
// prefetch on top only pays from M = 3 (M = 4: 30 -> 32 GB/s, M = 8: 24 -> 29; M = 1: 34 -> 32).
// Panels keep neighbouring rows (bf16 M = 48: 8.1 against 7.3 GB/s as streams).
template <class Ops>
inline void columns(const Args<typename Ops::Elem>& a, int64_t n0, int64_t n1) {
  using T = typename Ops::Elem;
  const int64_t fit = kPanelBytes / (a.K * static_cast<int64_t>(sizeof(T)) + 1);
  const int64_t panel = fit > kMinPanelRows ? fit / Ops::kMaxMB * Ops::kMaxMB : kMinPanelRows;
  for (int64_t m0 = 0; m0 < a.M; m0 += panel) {
    Args<T> p = a;
    p.x += m0 * a.ld_x;
    p.y += m0 * a.ld_y;
    p.M = a.M - m0 < panel ? a.M - m0 : panel;
    if (p.M > kMinPanelRows) {  // prefill panels: kRows consecutive rows a tile
      int64_t n = n0;
      for (; n + kRows <= n1; n += kRows) all_rows<Ops, kRows>(p, n, 1, true);
      for (; n < n1; ++n) all_rows<Ops, 1>(p, n, 1, true);
    } else {  // decode: kRows streams, a tile taking the next row of each
      const int64_t per = (n1 - n0) / kRows;
      const bool prefetch = p.M >= kPrefetchMinRows;
      for (int64_t i = 0; i < per; ++i) all_rows<Ops, kRows>(p, n0 + i, per, prefetch && i + 1 < per);
      for (int64_t n = n0 + kRows * per; n < n1; ++n) all_rows<Ops, 1>(p, n, 1, false);
    }
  }
}

// ---- scalar: one fp32 sum per output, in k order ----------------------------------------------
template <typename T>
struct Scalar {
  using Elem = T;
  using Vec = float;
  using Acc = float;
  static constexpr int kStep = 1;
  static constexpr int kMaxMB = 4;
  static Acc zero() { return 0.0f; }
  static Vec load(const T* p) { return to_float(*p); }
  static Vec load_partial(const T* p, int64_t) { return to_float(*p); }  // unused: kStep == 1
  static Acc fma(Acc acc, Vec w, Vec x) { return acc + w * x; }
};

template <typename T>
__attribute__((flatten)) void columns_scalar(const Args<T>& a, int64_t n0, int64_t n1) {
  columns<Scalar<T>>(a, n0, n1);
}

#if QF_X86_INTRINSICS

// Two fp32 vectors widened from one load of 16-bit values. w and x are split the same way, so
// w.a * x.a + w.b * x.b sums every product once (in another order than k, which fp32
// accumulation allows).
struct Pair256 {
  __m256 a, b;
};
struct Pair512 {
  __m512 a, b;
};

// bf16 is the top half of an fp32: in each 32-bit lane, the element in the high half is the lane
// with its low 16 bits cleared, the element in the low half the lane shifted left by 16.
QF_TARGET_AVX2 inline Pair256 widen_bf16(__m256i v) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536)))};
}
QF_TARGET_AVX512 inline Pair512 widen_bf16(__m512i v) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536)))};
}


// The first n (< kStep) elements at p in a zero-filled buffer: AVX2 has no 16-bit masked load.
template <typename T, int kStep>
struct Padded {
  alignas(32) T v[kStep];
  Padded(const T* p, int64_t n) {
    std::memset(v, 0, sizeof v);
    std::memcpy(v, p, static_cast<size_t>(n) * sizeof(T));
  }
};

template <typename T>
struct Avx2;

// What float and fp16 share: kStep values loaded as one fp32 vector, one FMA.
struct Avx2Fma {
  using Vec = __m256;
  using Acc = __m256;
  static constexpr int kStep = 8;
  static constexpr int kMaxMB = 2;  // 16 ymm registers: 8 accumulators + x + w
  QF_TARGET_AVX2 static Acc zero() { return _mm256_setzero_ps(); }
  QF_TARGET_AVX2 static Acc fma(Acc acc, Vec w, Vec x) { return _mm256_fmadd_ps(w, x, acc); }
};

template <>
struct Avx2<float> : Avx2Fma {
  using Elem = float;
  QF_TARGET_AVX2 static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  QF_TARGET_AVX2 static Vec load_partial(const float* p, int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
  }
};

template <>
struct Avx2<fp16> : Avx2Fma {
  using Elem = fp16;
  QF_TARGET_AVX2 static Vec load(const fp16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  QF_TARGET_AVX2 static Vec load_partial(const fp16* p, int64_t n) {
    return load(Padded<fp16, kStep>(p, n).v);
  }
};

template <>
struct Avx2<bf16> {
  using Elem = bf16;
  using Vec = Pair256;
  using Acc = __m256;
  static constexpr int kStep = 16;
  static constexpr int kMaxMB = 2;  // 8 accumulators + 2 x pairs + 1 w pair = 14 registers
  QF_TARGET_AVX2 static Acc zero() { return _mm256_setzero_ps(); }
  QF_TARGET_AVX2 static Vec load(const bf16* p) {
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  QF_TARGET_AVX2 static Vec load_partial(const bf16* p, int64_t n) {
    return load(Padded<bf16, kStep>(p, n).v);
  }
  QF_TARGET_AVX2 static Acc fma(Acc acc, Vec w, Vec x) {
    return _mm256_fmadd_ps(w.b, x.b, _mm256_fmadd_ps(w.a, x.a, acc));
  }
};

QF_TARGET_AVX512 inline __mmask16 first16(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}
QF_TARGET_AVX512 inline __mmask32 first32(int64_t n) {
  return static_cast<__mmask32>((1u << n) - 1u);
}

template <typename T>
struct Avx512;

// As Avx2Fma, 16 lanes wide.
struct Avx512Fma {
  using Vec = __m512;
  using Acc = __m512;
  static constexpr int kStep = 16;
  static constexpr int kMaxMB = 4;  // 16 accumulators + 4 x + 1 w of 32 zmm registers
  QF_TARGET_AVX512 static Acc zero() { return _mm512_setzero_ps(); }
  QF_TARGET_AVX512 static Acc fma(Acc acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
};

template <>
struct Avx512<float> : Avx512Fma {
  using Elem = float;
  QF_TARGET_AVX512 static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  QF_TARGET_AVX512 static Vec load_partial(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(first16(n), p);
  }
};

// What fp16 and bf16 share: 32 values (a cache line) a step, widened to two fp32 vectors. At
// 16 a step (one vector) the loop's own instructions kept too few weight lines in flight for
// fp16 at M = 1 (c_attn: 0.85 ms against torch's 0.77; now 0.55).
struct Avx512PairFma {
  using Vec = Pair512;
  using Acc = __m512;
  static constexpr int kStep = 32;
  static constexpr int kMaxMB = 4;  // 16 accumulators + 4 x pairs + 1 w pair = 26 registers
  QF_TARGET_AVX512 static Acc zero() { return _mm512_setzero_ps(); }
  QF_TARGET_AVX512 static Acc fma(Acc acc, Vec w, Vec x) {
    return _mm512_fmadd_ps(w.b, x.b, _mm512_fmadd_ps(w.a, x.a, acc));
  }
};

template <>
struct Avx512<fp16> : Avx512PairFma {  // the low and the high 16 values, each loaded as 256 bits
  using Elem = fp16;
  QF_TARGET_AVX512 static Vec load(const fp16* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)))};
  }
  QF_TARGET_AVX512 static Vec load_partial(const fp16* p, int64_t n) {  // p + 16 only if n > 16
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first16(n < 16 ? n : 16), p)),
            _mm512_cvtph_ps(n > 16 ? _mm256_maskz_loadu_epi16(first16(n - 16), p + 16)
                                   : _mm256_setzero_si256())};
  }
};

template <>
struct Avx512<bf16> : Avx512PairFma {
  using Elem = bf16;
  QF_TARGET_AVX512 static Vec load(const bf16* p) { return widen_bf16(_mm512_loadu_si512(p)); }
  QF_TARGET_AVX512 static Vec load_partial(const bf16* p, int64_t n) {
    return widen_bf16(_mm512_maskz_loadu_epi16(first32(n), p));
  }
};

// bf16 weights and activations fed to vdpbf16ps as they are: each fp32 lane accumulates the two
// exact bf16 x bf16 products of its pair. (Activations of another dtype would have to be rounded
// to bf16 first; ops/linear.cpp only passes bf16 x with bf16 weights, so nothing is rounded.) The
// instruction treats bf16 denormal inputs (|v| < 2^-126) as zero, far below the fp32 error bound.
struct Avx512Bf16 {
  using Elem = bf16;
  using Vec = __m512bh;
  using Acc = __m512;
  static constexpr int kStep = 32;
  static constexpr int kMaxMB = 4;
  QF_TARGET_AVX512_BF16 static Acc zero() { return _mm512_setzero_ps(); }
  QF_TARGET_AVX512_BF16 static Vec load(const bf16* p) {
    return reinterpret_cast<Vec>(_mm512_loadu_si512(p));
  }
  QF_TARGET_AVX512_BF16 static Vec load_partial(const bf16* p, int64_t n) {
    return reinterpret_cast<Vec>(_mm512_maskz_loadu_epi16(first32(n), p));
  }
  QF_TARGET_AVX512_BF16 static Acc fma(Acc acc, Vec w, Vec x) {
    return _mm512_dpbf16_ps(acc, w, x);
  }
};

template <typename T>
QF_TARGET_AVX2 __attribute__((flatten)) void columns_avx2(const Args<T>& a, int64_t n0,
                                                           int64_t n1) {
  columns<Avx2<T>>(a, n0, n1);
}

template <typename T>
QF_TARGET_AVX512 __attribute__((flatten)) void columns_avx512(const Args<T>& a, int64_t n0,
                                                               int64_t n1) {
  columns<Avx512<T>>(a, n0, n1);
}

QF_TARGET_AVX512_BF16 __attribute__((flatten)) void columns_avx512_bf16(const Args<bf16>& a,
                                                                         int64_t n0, int64_t n1) {
  columns<Avx512Bf16>(a, n0, n1);
}
#endif  // QF_X86_INTRINSICS

template <typename T>
using ColumnsFn = void (*)(const Args<T>&, int64_t, int64_t);

// The worker for a supported `isa` (fp32 and fp16 have no BF16 instruction to use: AVX-512).
template <typename T>
ColumnsFn<T> columns_fn(CpuIsa isa) {
#if QF_X86_INTRINSICS
  switch (isa) {
    case CpuIsa::kAvx512Bf16:
      if constexpr (std::is_same_v<T, bf16>) return columns_avx512_bf16;
      return columns_avx512<T>;
    case CpuIsa::kAvx512: return columns_avx512<T>;
    case CpuIsa::kAvx2: return columns_avx2<T>;
    default: break;
  }
#endif
  return columns_scalar<T>;
}

}  // namespace

template <typename T>
Status linear(T* y, const T* x, const T* w, const T* bias, int64_t M, int64_t N, int64_t K,
              int64_t ld_y, int64_t ld_x, int num_threads, CpuIsa isa) {
  if (M < 0 || N < 0 || K < 0 || ld_x < 0 || (M > 1 && ld_y < N)) return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (y == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return Status::kInvalidArgument;
  if (isa == CpuIsa::kAuto) {
    static const CpuIsa best = best_cpu_isa();
    isa = best;
  }
  if (!cpu_isa_supported(isa)) return Status::kUnsupported;
  const ColumnsFn<T> work = columns_fn<T>(isa);
  const Args<T> a{y, x, w, bias, M, N, K, ld_y, ld_x};
  // Whole tiles of kRows columns per thread, split as evenly as they go.
  const int64_t blocks = (N + kRows - 1) / kRows;
  int64_t threads = num_threads < 1 ? 1 : num_threads;
  if (threads > blocks) threads = blocks;
  if (M * N * K < kParallelMinMacs) threads = 1;
  if (threads == 1) {
    work(a, 0, N);
    return Status::kOk;
  }
  if (M <= kMinPanelRows) {
    // Decode (one panel): blocks of rows taken from a shared counter (shared_blocks.h).
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(threads))
    take_shared_blocks(
        next, blocks, kMinGrabBlocks, threads, [&](int64_t) { return blocks; },
        [&](int64_t b0, int64_t b1) { work(a, b0 * kRows, std::min(N, b1 * kRows)); });
    return Status::kOk;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    const int64_t n0 = blocks * t / nt * kRows;
    const int64_t n1 = blocks * (t + 1) / nt * kRows;
    work(a, n0, n1 < N ? n1 : N);
  }
  return Status::kOk;
}

#define QF_INSTANTIATE(T)                                                                     \
  template Status linear<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                            int64_t, int, CpuIsa);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
