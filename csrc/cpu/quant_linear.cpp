// Linear layer with int4 / int8 weights on the CPU (int4_gemm and int8_gemm; qwen_fast/qweight.py
// documents the layout): y[m, n] = sum_k x[m, k] * W[n, k] + bias[n], W[n, k] = s[n, c] * (q[n, k]
// - z[n, c]) for the 128-input chunk c = k / 128 of output n.
//
// Activations are quantized to int8 first, per row and chunk of 128 (as llama.cpp's Q8 blocks):
// sx = max|x| / 127, x8 = round(x / sx), so that a chunk's products are exact integer sums. Then,
// per output,
//   y = sum_c s[c] * sx[c] * (q_c . x8_c)  -  sum_c (s[c] * z[c]) * (sx[c] * sum(x8_c))  + bias,
// in fp32, rounded once to T. The error against fp32 maths on the dequantized weights is the
// activation rounding, |x - sx * x8| <= sx / 2 per element (tests/test_quant_linear.py bounds
// each output by it).
//
// Weight layout: outputs in tiles of 16 (N padded with zero rows), one tile a contiguous record
// of C chunks, each chunk the q of its 16 outputs x 128 inputs then 16 fp16 scales s and 16 zeros
// z (uint8 for int4, uint16 for int8; s * z is formed in fp32, exactly). The q are stored as 64-byte vectors whose 32-bit lane r holds four consecutive inputs
// of output r:
//   int8: vector j < 32, lane r = q[r, 4j .. 4j + 3]
//   int4: vector j < 16, lane r = q[r, 4j .. 4j + 3] in the low nibbles, q[r, 64 + 4j ..] in
//         the high nibbles
// so that one vpdpbusd (unsigned q times signed x8, four products per lane) against the four
// activation bytes broadcast to every lane adds four products to each of 16 outputs, and the
// scales load as a vector: no horizontal sums, and only a few instructions per chunk besides the
// multiply-adds. (The first layout, one row per output, needed a reduction and a broadcast
// scale per 128 weights and ran at about half the speed, hot in cache.)
// Decode reads several tiles far apart at a time (one sequential stream each, as linear.cpp);
// OpenMP over blocks of tiles; activation rows beyond 16 go in panels that keep their x8 in L2.
// ISA: AVX-512 VNNI; AVX2 (vpmaddubsw + vpmaddwd: for int8 the weights are offset to signed
// and the sign moved onto x8, as the unsigned x signed product of vpmaddubsw needs); a portable
// loop over the same layout (QF_CPU_CLONES); picked at run time or forced by the caller.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/simd.h"
#include "../common/x86_reduce.h"
#include "convert.h"
#include "kernels.h"
#include "shared_blocks.h"

namespace qf::cpu {
namespace {

constexpr int64_t kChunk = 128;
constexpr int64_t kTile = 16;          // outputs per tile (the 32-bit lanes of a 512-bit vector)
constexpr int64_t kMinPanelRows = 16;  // activation rows that share one pass over the weights
constexpr int64_t kPanelBytes = 256 * 1024;
constexpr int64_t kParallelMinMacs = int64_t{1} << 16;
constexpr int64_t kMinGrabTiles = 16;  // the smallest block of tiles a thread takes at a time

constexpr int64_t q_bytes(int bits) { return kTile * kChunk * bits / 8; }  // per chunk record
constexpr int64_t zero_bytes(int bits) { return bits == 4 ? 1 : 2; }         // uint8 / uint16
// q, then 16 fp16 scales, then 16 zeros (qwen_fast/qweight.py)
constexpr int64_t record_bytes(int bits) { return q_bytes(bits) + 2 * kTile + zero_bytes(bits) * kTile; }

// Output r's scale and s * z of a chunk record whose q take qb bytes: s in fp32 exactly, s * z
// exactly (an fp16 scale times an integer below 2^16 needs at most 27 bits; GPTQ's below 2^9 at
// most 20), the values the first layout stored in fp32.
template <int BITS>
inline void scale_and_offset(const uint8_t* rec, int r, float& s, float& sz) {
  constexpr int64_t qb = q_bytes(BITS);
  uint16_t h;
  std::memcpy(&h, rec + qb + 2 * r, 2);
  s = to_float(fp16{h});
  uint32_t z;
  if constexpr (BITS == 4) {
    z = rec[qb + 2 * kTile + r];
  } else {
    uint16_t z16;
    std::memcpy(&z16, rec + qb + 2 * kTile + 2 * r, 2);
    z = z16;
  }
  sz = s * static_cast<float>(z);
}

struct QArgs {
  const int8_t* x8;     // [M, C * 128]
  const float* xs;      // [M, C] activation scales sx
  const int32_t* xtot;  // [M, C] sum(x8 of the chunk)
  const uint8_t* w;     // [tiles, C * record]
  float* acc;           // [M, tiles * 16]: the outputs before the bias
  int64_t M, tiles, C, tile_bytes;
};

// ---- portable tile: the same sums, one output at a time -----------------------------------------
template <int BITS>
QF_CPU_CLONES void tiles_portable(const QArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  constexpr int64_t rec = record_bytes(BITS), qb = q_bytes(BITS);
  const int64_t ld = a.tiles * kTile;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = a.w + t * a.tile_bytes;
    for (int64_t m = m0; m < m1; ++m) {
      float y[kTile] = {};
      for (int64_t c = 0; c < a.C; ++c) {
        const uint8_t* q = wt + c * rec;
        float s[2 * kTile];                      // the 16 scales, then the 16 s * z
        for (int r = 0; r < kTile; ++r) scale_and_offset<BITS>(q, r, s[r], s[kTile + r]);
        const int8_t* xc = a.x8 + (m * a.C + c) * kChunk;
        int32_t isum[kTile] = {};
        if constexpr (BITS == 4) {
          for (int j = 0; j < 16; ++j)
            for (int r = 0; r < kTile; ++r)
              for (int b = 0; b < 4; ++b) {
                const uint8_t v = q[64 * j + 4 * r + b];
                isum[r] += int32_t(v & 15) * xc[4 * j + b] + int32_t(v >> 4) * xc[64 + 4 * j + b];
              }
        } else {
          for (int j = 0; j < 32; ++j)
            for (int r = 0; r < kTile; ++r)
              for (int b = 0; b < 4; ++b)
                isum[r] += int32_t(q[64 * j + 4 * r + b]) * xc[4 * j + b];
        }
        const float sx = a.xs[m * a.C + c], xsum = sx * static_cast<float>(a.xtot[m * a.C + c]);
        for (int r = 0; r < kTile; ++r)
          y[r] = y[r] + static_cast<float>(isum[r]) * s[r] * sx - s[kTile + r] * xsum;
      }
      std::memcpy(a.acc + m * ld + t * kTile, y, sizeof(y));
    }
  }
}

#if QF_X86_INTRINSICS
#define QF_TARGET_AVX512_VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// Tiles t0 + g * step (g < G) against activation rows m0 .. m0 + MB - 1. Per chunk, two int32
// accumulators per (g, m) (int4: the low and the high nibbles, the high ones masked in place; int8: even and odd vectors, two
// dependency chains), then y += (s * acc) * sx - sz * xsum in fp32.
template <int BITS, int G, int MB>
QF_TARGET_AVX512_VNNI inline void tile_vnni(const QArgs& a, int64_t t0, int64_t step, int64_t m0) {
  constexpr int64_t rec = record_bytes(BITS), qb = q_bytes(BITS);
  __m512 y[G][MB];
  const uint8_t* wt[G];
  for (int g = 0; g < G; ++g) {
    wt[g] = a.w + (t0 + g * step) * a.tile_bytes;
    for (int m = 0; m < MB; ++m) y[g][m] = _mm512_setzero_ps();
  }
  const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8(static_cast<char>(0xf0));
  for (int64_t c = 0; c < a.C; ++c) {
    __m512i acc0[G][MB], acc1[G][MB];
    const int32_t* xc[MB];
    for (int m = 0; m < MB; ++m)
      xc[m] = reinterpret_cast<const int32_t*>(a.x8 + ((m0 + m) * a.C + c) * kChunk);
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < MB; ++m) acc0[g][m] = acc1[g][m] = _mm512_setzero_si512();
    if constexpr (BITS == 4) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        for (int g = 0; g < G; ++g) {
          const __m512i v = _mm512_loadu_si512(wt[g] + c * rec + 64 * j);
          // The high nibbles stay in place (16 q): their sum is 16 times theirs, exactly,
          // and is divided back once per chunk, which saves a shift per vector.
          const __m512i lo = _mm512_and_si512(v, low4);
          const __m512i hi = _mm512_and_si512(v, high4);
          for (int m = 0; m < MB; ++m) {
            acc0[g][m] = _mm512_dpbusd_epi32(acc0[g][m], lo, _mm512_set1_epi32(xc[m][j]));
            acc1[g][m] = _mm512_dpbusd_epi32(acc1[g][m], hi, _mm512_set1_epi32(xc[m][16 + j]));
          }
        }
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < 32; j += 2)
        for (int g = 0; g < G; ++g) {
          const __m512i v0 = _mm512_loadu_si512(wt[g] + c * rec + 64 * j);
          const __m512i v1 = _mm512_loadu_si512(wt[g] + c * rec + 64 * j + 64);
          for (int m = 0; m < MB; ++m) {
            acc0[g][m] = _mm512_dpbusd_epi32(acc0[g][m], v0, _mm512_set1_epi32(xc[m][j]));
            acc1[g][m] = _mm512_dpbusd_epi32(acc1[g][m], v1, _mm512_set1_epi32(xc[m][j + 1]));
          }
        }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 sv = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt[g] + c * rec + qb)));
      const uint8_t* zp = wt[g] + c * rec + qb + 2 * kTile;
      const __m512i zi =
          BITS == 4 ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp)))
                    : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp)));
      const __m512 szv = _mm512_mul_ps(sv, _mm512_cvtepi32_ps(zi));   // exact, as scale_and_offset
      for (int m = 0; m < MB; ++m) {
        const int64_t i = (m0 + m) * a.C + c;
        const __m512i hi_sum =
            BITS == 4 ? _mm512_srai_epi32(acc1[g][m], 4) : acc1[g][m];  // exact: a multiple of 16
        const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0[g][m], hi_sum)), sv);
        y[g][m] = _mm512_fmadd_ps(t, _mm512_set1_ps(a.xs[i]), y[g][m]);
        y[g][m] = _mm512_fnmadd_ps(szv, _mm512_set1_ps(a.xs[i] * static_cast<float>(a.xtot[i])),
                                   y[g][m]);
      }
    }
  }
  const int64_t ld = a.tiles * kTile;
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < MB; ++m)
      _mm512_storeu_ps(a.acc + (m0 + m) * ld + (t0 + g * step) * kTile, y[g][m]);
}

// Rows [m0, m1) of tiles t0 + g * step: blocks of MB rows, the last block smaller.
template <int BITS, int G, int MB>
QF_TARGET_AVX512_VNNI inline void rows_vnni(const QArgs& a, int64_t t0, int64_t step, int64_t m0,
                                            int64_t m1) {
  int64_t m = m0;
  for (; m + MB <= m1; m += MB) tile_vnni<BITS, G, MB>(a, t0, step, m);
  if constexpr (MB > 1) {
    switch (m1 - m) {
      case 3: tile_vnni<BITS, G, 3>(a, t0, step, m); break;
      case 2: tile_vnni<BITS, G, 2>(a, t0, step, m); break;
      case 1: tile_vnni<BITS, G, 1>(a, t0, step, m); break;
      default: break;
    }
  }
}

// Tiles [t0, t1) for activation rows [m0, m1): G sequential streams (a G-th of the block each),
// the remainder one tile at a time. G and the row block by the register budget (3 G MB
// accumulators of 32): one or two rows take four streams, more rows two streams and blocks of 4.
template <int BITS, int G, int MB>
QF_TARGET_AVX512_VNNI void streams_vnni(const QArgs& a, int64_t m0, int64_t m1, int64_t t0,
                                        int64_t t1) {
  const int64_t per = (t1 - t0) / G;
  for (int64_t i = 0; i < per; ++i) rows_vnni<BITS, G, MB>(a, t0 + i, per, m0, m1);
  for (int64_t t = t0 + G * per; t < t1; ++t) rows_vnni<BITS, 1, MB>(a, t, 1, m0, m1);
}

template <int BITS>
QF_TARGET_AVX512_VNNI __attribute__((flatten)) void tiles_vnni(const QArgs& a, int64_t m0,
                                                               int64_t m1, int64_t t0,
                                                               int64_t t1) {
  switch (m1 - m0) {
    case 1: streams_vnni<BITS, 4, 1>(a, m0, m1, t0, t1); break;
    case 2: streams_vnni<BITS, 4, 2>(a, m0, m1, t0, t1); break;
    default: streams_vnni<BITS, 2, 4>(a, m0, m1, t0, t1); break;
  }
}

// ---- AVX2: a tile as two halves of 8 outputs (the two 256-bit halves of each 64-byte vector) ----
// int4: vpmaddubsw(q, x8) sums pairs of products (|.| <= 2 * 15 * 127), the low and high nibbles'
// pairs added in int16 (<= 7620), then vpmaddwd by ones to int32. int8: q (unsigned, up to 255)
// times x8 could overflow vpmaddubsw's int16 pairs, so w = q - 128 (signed) is multiplied as
// |w| times x8 carrying w's sign (|pairs| <= 2 * 128 * 127 < 2^15), and the 128 * sum(x8) that
// the offset removed is added back per chunk.
template <int BITS, int MB>
QF_TARGET_AVX2 inline void tile_avx2(const QArgs& a, int64_t t, int64_t m0) {
  constexpr int64_t rec = record_bytes(BITS), qb = q_bytes(BITS);
  const uint8_t* wt = a.w + t * a.tile_bytes;
  __m256 y[2][MB];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < MB; ++m) y[h][m] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i bias8 = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < a.C; ++c) {
    const int32_t* xc[MB];
    __m256i acc[2][MB];
    for (int m = 0; m < MB; ++m) {
      xc[m] = reinterpret_cast<const int32_t*>(a.x8 + ((m0 + m) * a.C + c) * kChunk);
      acc[0][m] = acc[1][m] = _mm256_setzero_si256();
    }
    const uint8_t* q = wt + c * rec;
    for (int j = 0; j < (BITS == 4 ? 16 : 32); ++j)
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * j + 32 * h));
        if constexpr (BITS == 4) {
          const __m256i lo = _mm256_and_si256(v, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int m = 0; m < MB; ++m) {
            const __m256i p = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xc[m][j])),
                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xc[m][16 + j])));
            acc[h][m] = _mm256_add_epi32(acc[h][m], _mm256_madd_epi16(p, ones));
          }
        } else {
          const __m256i w = _mm256_xor_si256(v, bias8);  // q - 128 as int8
          const __m256i aw = _mm256_abs_epi8(w);          // |w|, 128 read as unsigned
          for (int m = 0; m < MB; ++m) {
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(xc[m][j]), w);
            acc[h][m] = _mm256_add_epi32(acc[h][m],
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
          }
        }
      }
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + qb + 16 * h)));
      const uint8_t* zp = q + qb + 2 * kTile + zero_bytes(BITS) * 8 * h;
      const __m256i zi =
          BITS == 4 ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp)))
                    : _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp)));
      const __m256 szv = _mm256_mul_ps(sv, _mm256_cvtepi32_ps(zi));
      for (int m = 0; m < MB; ++m) {
        const int64_t i = (m0 + m) * a.C + c;
        __m256i total = acc[h][m];
        if constexpr (BITS == 8) total = _mm256_add_epi32(total, _mm256_set1_epi32(128 * a.xtot[i]));
        const __m256 tf = _mm256_mul_ps(_mm256_cvtepi32_ps(total), sv);
        y[h][m] = _mm256_fmadd_ps(tf, _mm256_set1_ps(a.xs[i]), y[h][m]);
        y[h][m] = _mm256_fnmadd_ps(szv, _mm256_set1_ps(a.xs[i] * static_cast<float>(a.xtot[i])),
                                   y[h][m]);
      }
    }
  }
  const int64_t ld = a.tiles * kTile;
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < MB; ++m) _mm256_storeu_ps(a.acc + (m0 + m) * ld + t * kTile + 8 * h, y[h][m]);
}

template <int BITS>
QF_TARGET_AVX2 __attribute__((flatten)) void tiles_avx2(const QArgs& a, int64_t m0, int64_t m1,
                                                        int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) tile_avx2<BITS, 2>(a, t, m);
    if (m < m1) tile_avx2<BITS, 1>(a, t, m);
  }
}
#endif  // QF_X86_INTRINSICS

using TilesFn = void (*)(const QArgs&, int64_t, int64_t, int64_t, int64_t);

TilesFn tiles_fn(int bits, CpuIsa isa) {
#if QF_X86_INTRINSICS
  if (isa == CpuIsa::kAvx512Vnni) return bits == 4 ? tiles_vnni<4> : tiles_vnni<8>;
  if (isa == CpuIsa::kAvx2) return bits == 4 ? tiles_avx2<4> : tiles_avx2<8>;
#endif
  (void)isa;
  return bits == 4 ? tiles_portable<4> : tiles_portable<8>;
}

// x8 / xs / xtot of one activation row: K values, gathered through perm when given.
template <typename T>
QF_CPU_CLONES void quantize_row(int8_t* x8, float* xs, int32_t* xtot, const T* x,
                                const int64_t* perm, int64_t K, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const int64_t k0 = c * kChunk, n = std::min(kChunk, K - k0);
    float v[kChunk];
    bool widened = false;
    if constexpr (std::is_same_v<T, fp16>) {
      if (perm == nullptr) {
        to_float_n(v, x + k0, n);   // convert.h
        widened = true;
      }
    }
    if (!widened)
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
    xtot[c] = total;
  }
}

#if QF_X86_INTRINSICS
// quantize_row without perm, 16 values a vector: the same operations in the same order per
// element (the widening is exact, max ignores NaN as std::max(amax, |v|) does, the rounding is
// to nearest even as nearbyint's default mode, a NaN converts to INT32_MIN and clamps to -127 as
// the scalar cast does on x86), so the bytes, scales and sums are the scalar loop's. It runs
// between two GEMVs on one thread while the other waits: 1.1 ns an element before (1.7% of an
// int4 decode step).
template <typename T>
QF_TARGET_AVX512_VNNI __m512 widen16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, fp16>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

template <typename T>
QF_TARGET_AVX512_VNNI void quantize_row_avx512(int8_t* x8, float* xs, int32_t* xtot, const T* x,
                                               int64_t K, int64_t C) {
  constexpr int kVecs = kChunk / 16;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t c = 0; c < C; ++c) {
    const int64_t k0 = c * kChunk, n = std::min(kChunk, K - k0);
    __m512 v[kVecs];
    __m512 amax = _mm512_setzero_ps();
    for (int j = 0; j < kVecs; ++j) {
      const int64_t left = n - 16 * j;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff)
                          : left <= 0 ? __mmask16(0)
                                      : static_cast<__mmask16>((1u << left) - 1);
      v[j] = widen16(x + k0 + 16 * j, m);
      amax = _mm512_max_ps(_mm512_and_ps(v[j], sign), amax);   // NaN: keeps amax
    }
    const float a = _mm512_reduce_max_ps(amax);
    const float sx = a / 127.0f;
    const float inv = a > 0.0f ? 127.0f / a : 0.0f;
    const __m512 invv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i total = _mm512_setzero_si512();
    for (int j = 0; j < kVecs; ++j) {
      const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v[j], invv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(r), lo), hi);
      total = _mm512_add_epi32(total, q);        // padding lanes are 0 * inv = 0
      _mm_storeu_si128(reinterpret_cast<__m128i*>(x8 + k0 + 16 * j), _mm512_cvtepi32_epi8(q));
    }
    xs[c] = sx;
    xtot[c] = _mm512_reduce_add_epi32(total);
  }
}
#endif

// y[n] = acc[n] + bias[n] for n in [n0, n1) of one activation row, rounded to T.
template <typename T>
QF_CPU_CLONES void finish_row(T* y, const float* acc, const T* bias, int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<T, fp16>) {   // runs through convert.h
    constexpr int64_t kRun = 256;
    for (int64_t i0 = n0; i0 < n1; i0 += kRun) {
      const int64_t n = std::min(kRun, n1 - i0);
      if (bias == nullptr) {
        from_float_n(y + i0, acc + i0, n);
        continue;
      }
      float t[kRun];
      to_float_n(t, bias + i0, n);
      for (int64_t i = 0; i < n; ++i) t[i] = acc[i0 + i] + t[i];
      from_float_n(y + i0, t, n);
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n)
    y[n] = from_float<T>(bias != nullptr ? acc[n] + to_float(bias[n]) : acc[n]);
}

int64_t chunks(int64_t K) { return (K + kChunk - 1) / kChunk; }
int64_t tiles(int64_t N) { return (N + kTile - 1) / kTile; }

}  // namespace

int64_t quant_tile_bytes(int bits, int64_t K) { return chunks(K) * record_bytes(bits); }

int64_t quant_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  const int64_t C = chunks(K);
  // x8 [M, C * 128], xs and xtot [M, C], the fp32 outputs [M, tiles * 16]
  return M * C * kChunk + (2 * M * C + M * tiles(N) * kTile) * 4;
}

namespace {

// One weight of a call: outputs y [M, ld_y] (the first N columns) of w, plus bias.
template <typename T>
struct Job {
  T* y;
  const uint8_t* w;
  const T* bias;
  int64_t N, ld_y;
};

// The weights of `jobs` against the same x: x quantized once, then one pass over each weight.
template <typename T>
Status run_jobs(const Job<T>* jobs, int n_jobs, const T* x, const int64_t* perm, int64_t M,
                int64_t K, int bits, int64_t ld_x, void* workspace, int num_threads, CpuIsa isa) {
  if (isa == CpuIsa::kAuto) {
    static const CpuIsa best = cpu_isa_supported(CpuIsa::kAvx512Vnni) ? CpuIsa::kAvx512Vnni
                               : cpu_isa_supported(CpuIsa::kAvx2)      ? CpuIsa::kAvx2
                                                                       : CpuIsa::kScalar;
    isa = best;
  }
  if (isa != CpuIsa::kScalar && isa != CpuIsa::kAvx2 && isa != CpuIsa::kAvx512Vnni)
    return Status::kUnsupported;
  if (!cpu_isa_supported(isa)) return Status::kUnsupported;
  constexpr int kMaxJobs = 2;
  if (n_jobs < 1 || n_jobs > kMaxJobs) return Status::kInvalidArgument;
  const int64_t C = chunks(K);
  int64_t all_tiles = 0, all_n = 0;
  for (int j = 0; j < n_jobs; ++j) all_tiles += tiles(jobs[j].N), all_n += jobs[j].N;
  int8_t* x8 = static_cast<int8_t*>(workspace);
  float* xs = reinterpret_cast<float*>(x8 + M * C * kChunk);
  int32_t* xtot = reinterpret_cast<int32_t*>(xs + M * C);
  float* acc = reinterpret_cast<float*>(xtot + M * C);  // job j's [M, tiles_j * 16], one after another
  const int threads = num_threads < 1 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 1 && M * K >= 4096)
  for (int64_t m = 0; m < M; ++m)
#if QF_X86_INTRINSICS
    if (perm == nullptr && isa == CpuIsa::kAvx512Vnni)
      quantize_row_avx512(x8 + m * C * kChunk, xs + m * C, xtot + m * C, x + m * ld_x, K, C);
    else
#endif
      quantize_row(x8 + m * C * kChunk, xs + m * C, xtot + m * C, x + m * ld_x, perm, K, C);

  QArgs args[kMaxJobs];
  int64_t first_tile[kMaxJobs + 1] = {0};
  for (int j = 0, off = 0; j < n_jobs; ++j) {
    const int64_t T_ = tiles(jobs[j].N);
    args[j] = QArgs{x8, xs, xtot, jobs[j].w, acc + off, M, T_, C, quant_tile_bytes(bits, K)};
    off += M * T_ * kTile;
    first_tile[j + 1] = first_tile[j] + T_;
  }
  const TilesFn run = tiles_fn(bits, isa);
  // Outputs [n0, n1) of job j from its fp32 sums: bias added, rounded to T.
  const auto finish = [&](int j, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
    const Job<T>& b = jobs[j];
    const int64_t n0 = std::min(b.N, t0 * kTile), n1 = std::min(b.N, t1 * kTile);
    for (int64_t m = m0; m < m1; ++m)
      finish_row(b.y + m * b.ld_y, args[j].acc + m * args[j].tiles * kTile, b.bias, n0, n1);
  };
  // Activation rows per pass over the weights: all of a decode batch, else as many as keep
  // their x8 in L2 (kPanelBytes).
  const int64_t fit = kPanelBytes / (C * kChunk);
  const int64_t panel = std::max(kMinPanelRows, fit / 4 * 4);
  int64_t nt = std::min<int64_t>(threads, all_tiles);
  if (M * all_n * K < kParallelMinMacs) nt = 1;
  // One panel (decode): the threads take blocks of tiles from a shared counter over every
  // job's tiles (shared_blocks.h; at least kMinGrabTiles, never across two weights). A static
  // half each left one thread waiting at the join: int4 decode, 2 threads, libgomp's spin was
  // 14.7% of the step's thread time (perf), 10.7% after (the rest is the other thread waiting
  // through the step's serial parts), and the step's share of the read pass went from 0.74 to
  // 0.79 (alternating runs). Every output is still one tile's sum in the same order: the
  // results do not change.
  if (M <= panel && nt > 1) {
    std::atomic<int64_t> next{0};
    const auto job_of = [&](int64_t tile) {   // the job whose tiles hold global tile `tile`
      int j = 0;
      while (first_tile[j + 1] <= tile) ++j;
      return j;
    };
#pragma omp parallel num_threads(static_cast<int>(nt))
    take_shared_blocks(
        next, all_tiles, kMinGrabTiles, nt,
        [&](int64_t cur) { return first_tile[job_of(cur) + 1]; },   // never across two weights
        [&](int64_t g0, int64_t g1) {
          const int j = job_of(g0);
          const int64_t t0 = g0 - first_tile[j], t1 = g1 - first_tile[j];
          run(args[j], 0, M, t0, t1);
          finish(j, t0, t1, 0, M);
        });
    return Status::kOk;
  }
  for (int j = 0; j < n_jobs; ++j) {
    const int64_t T_ = args[j].tiles;
    const int64_t nj = std::min<int64_t>(nt, T_);
#pragma omp parallel num_threads(static_cast<int>(nj)) if (nj > 1)
    {
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num(), tn = omp_get_num_threads();
#else
      const int64_t t = 0, tn = 1;
#endif
      const int64_t t0 = T_ * t / tn, t1 = T_ * (t + 1) / tn;
      for (int64_t m0 = 0; m0 < M; m0 += panel) {
        const int64_t m1 = std::min(M, m0 + panel);
        run(args[j], m0, m1, t0, t1);
        finish(j, t0, t1, m0, m1);
      }
    }
  }
  return Status::kOk;
}

}  // namespace

template <typename T>
Status quant_linear(T* y, const T* x, const uint8_t* w, const T* bias, const int64_t* perm,
                    int64_t M, int64_t N, int64_t K, int bits, int64_t ld_y, int64_t ld_x,
                    void* workspace, int num_threads, CpuIsa isa) {
  if (M < 0 || N < 0 || K < 0 || (bits != 4 && bits != 8) || ld_x < 0 || (M > 1 && ld_y < N))
    return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (y == nullptr || x == nullptr || w == nullptr || workspace == nullptr)
    return Status::kInvalidArgument;
  const Job<T> job{y, w, bias, N, ld_y};
  return run_jobs(&job, 1, x, perm, M, K, bits, ld_x, workspace, num_threads, isa);
}

template <typename T>
Status quant_linear_pair(T* y1, T* y2, const T* x, const uint8_t* w1, const uint8_t* w2,
                         int64_t M, int64_t N1, int64_t N2, int64_t K, int bits, int64_t ld_y1,
                         int64_t ld_y2, int64_t ld_x, void* workspace, int num_threads,
                         CpuIsa isa) {
  if (M < 0 || N1 < 1 || N2 < 1 || K < 0 || (bits != 4 && bits != 8) || ld_x < 0 ||
      (M > 1 && (ld_y1 < N1 || ld_y2 < N2)))
    return Status::kInvalidArgument;
  if (M == 0) return Status::kOk;
  if (y1 == nullptr || y2 == nullptr || x == nullptr || w1 == nullptr || w2 == nullptr ||
      workspace == nullptr)
    return Status::kInvalidArgument;
  const Job<T> jobs[2] = {{y1, w1, nullptr, N1, ld_y1}, {y2, w2, nullptr, N2, ld_y2}};
  return run_jobs(jobs, 2, x, nullptr, M, K, bits, ld_x, workspace, num_threads, isa);
}

#define QF_INSTANTIATE(T)                                                                    \
  template Status quant_linear<T>(T*, const T*, const uint8_t*, const T*, const int64_t*,     \
                                  int64_t, int64_t, int64_t, int, int64_t, int64_t, void*,    \
                                  int, CpuIsa);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE
#define QF_INSTANTIATE(T)                                                                     \
  template Status quant_linear_pair<T>(T*, T*, const T*, const uint8_t*, const uint8_t*, int64_t, \
                                       int64_t, int64_t, int64_t, int, int64_t, int64_t, int64_t, \
                                       void*, int, CpuIsa);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
