// Causal multi-head attention over a paged KV cache on the CPU (reference.attention):
//   out[i,h] = sum_j softmax_j(scale * q[i,h] . k[s,j,h]) v[s,j,h],  j <= token_pos[i], s = token_seq[i]
// (token i of the step belongs to sequence s at position token_pos[i]: a decode step is one token
// per sequence, a prefill chunk several consecutive ones, and a step may pack both).
// Maths in fp32: dot products (four keys a pass), an online softmax over blocks of at most
// kKeyBlock keys that never cross a page (running max and sum, the accumulator rescaled when the
// max grows; the block's exps vectorised, SLEEF's expf_u10), one rounding of the output to T.
// Layout: q [N, H, D] with its own n/h strides and a contiguous head dim; k and v pages
// [pages, H, P, D] contiguous (a page holds P consecutive positions of each head, contiguous), key
// j of sequence s on page page_table[s, j / P]; out [N, H, D] contiguous. Parallelisation: OpenMP
// over (i, h) rows; a static schedule for decode steps (rows of equal work per sequence), a
// dynamic one when a sequence has several tokens (causal rows grow longer with the position).
// bf16 and fp16 with head dim 128 on AVX-512 BF16 run a prefill chunk in tiles of up to kTile
// tokens (one key read serves the tile), with the same bits per token as one token alone.
// attention_int8 reads an int8 cache (codes [pages, H, P, D], fp32 scales [pages, H, P, G]) as
// code * scale: the same online softmax, each (token, head) row alone (no tiles), AVX-512 for
// D = 64 / 128 with groups of a multiple of 16 elements, a portable clone otherwise.
// Constraints: 1 <= D <= kMaxHeadDim; the caller checks the page ids (ops/common.h).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/simd.h"
#include "../common/sleef_expf.h"
#include "../common/x86_reduce.h"
#include "kernels.h"

namespace qf::cpu {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kKeyBlock = 128;   // scores held at once per row (on the stack)

// s[i] = q . k_i * scale for 4 keys at once: one pass over d with four sums, so that the
// vectorised loop's horizontal reductions are shared by four keys, not paid per key.
template <typename T>
QF_INLINE void dot4(float* s, const float* q, const T* k0, const T* k1, const T* k2, const T* k3,
                    int64_t n, float scale) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < n; ++d) {
    a0 += q[d] * to_float(k0[d]);
    a1 += q[d] * to_float(k1[d]);
    a2 += q[d] * to_float(k2[d]);
    a3 += q[d] * to_float(k3[d]);
  }
  s[0] = a0 * scale, s[1] = a1 * scale, s[2] = a2 * scale, s[3] = a3 * scale;
}

template <typename T>
QF_INLINE float dot(const float* q, const T* k, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += q[d] * to_float(k[d]);
  return sum;
}

// Online-softmax state of one run of keys: running max m of the scores, sum l of exp(score - m),
// and acc = sum of exp(score - m) * v.
struct Partial {
  float m, l;
  float acc[kMaxHeadDim];
};

// Folds the n <= kKeyBlock keys at kb (and values at vb), ld_k and ld_v apart, into p. kD: the head dim at compile time (the
// accumulator then lives in registers across the block), or 0 for D at run time.
template <typename T, int kD>
QF_INLINE void attend_block(Partial& p, const float* qf, const T* kb, const T* vb, int64_t n,
                            int64_t D_, int64_t ld_k, int64_t ld_v, float scale) {
  const int64_t D = kD > 0 ? kD : D_;
  float s[kKeyBlock];
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    dot4(s + j, qf, kb + j * ld_k, kb + (j + 1) * ld_k, kb + (j + 2) * ld_k, kb + (j + 3) * ld_k,
         D, scale);
  for (; j < n; ++j) s[j] = dot(qf, kb + j * ld_k, D) * scale;
  float block_max = -INFINITY;
  for (j = 0; j < n; ++j) block_max = std::max(block_max, s[j]);
  const float m_new = std::max(p.m, block_max);
  const float correction = std::exp(p.m - m_new);  // 0 for the first block (m = -inf)
  // The block's probabilities (unnormalised), a vectorised exp; their sum in any fp32 order.
  float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
  for (j = 0; j < n; ++j) {
    s[j] = sleef_expf(s[j] - m_new);
    block_sum += s[j];
  }
  p.l = p.l * correction + block_sum;
  p.m = m_new;
  float acc[kD > 0 ? kD : kMaxHeadDim];
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] = p.acc[d] * correction;
  for (j = 0; j < n; ++j) {
    const float w = s[j];
    const T* vr = vb + j * ld_v;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += w * to_float(vr[d]);
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) p.acc[d] = acc[d];
}

// The keys of one (sequence, head) row in the pages: blocks of at most kKeyBlock consecutive
// keys that never cross a page, each contiguous (keys D elements apart).
template <typename T>
struct PagedRow {
  const T* k_pages;
  const T* v_pages;
  const int32_t* pages;  // the sequence's page table row
  int64_t h, H, P, D, n_keys;

  int64_t block_len(int64_t j0) const {
    return std::min({kKeyBlock, P - j0 % P, n_keys - j0});
  }
  int64_t offset(int64_t j0) const { return ((pages[j0 / P] * H + h) * P + j0 % P) * D; }
  const T* k(int64_t j0) const { return k_pages + offset(j0); }
  const T* v(int64_t j0) const { return v_pages + offset(j0); }
};

template <typename T, int kD>
QF_CPU_CLONES void attend_row(T* out,      // [D]
                              const T* q,  // [D]
                              const PagedRow<T>& row, float scale) {
  const int64_t D = row.D;
  float qf[kMaxHeadDim];
  for (int64_t d = 0; d < D; ++d) qf[d] = to_float(q[d]);
  Partial p;
  p.m = -INFINITY, p.l = 0.0f;
  for (int64_t d = 0; d < D; ++d) p.acc[d] = 0.0f;
  for (int64_t j0 = 0, n; j0 < row.n_keys; j0 += n) {
    n = row.block_len(j0);
    attend_block<T, kD>(p, qf, row.k(j0), row.v(j0), n, D, D, D, scale);
  }
  const float inv = 1.0f / p.l;
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(p.acc[d] * inv);
}

// ---- int8 cache (attention_int8) -------------------------------------------------------------
// The keys and values of one (sequence, head) row in an int8 cache: as PagedRow, with the G fp32
// scales of each position beside its D codes (each scale for D / G consecutive codes).
struct Int8Row {
  const int8_t* k_pages;
  const int8_t* v_pages;
  const float* k_scales;
  const float* v_scales;
  const int32_t* pages;  // the sequence's page table row
  int64_t h, H, P, D, G, n_keys;

  int64_t block_len(int64_t j0) const {
    return std::min({kKeyBlock, P - j0 % P, n_keys - j0});
  }
  int64_t slot(int64_t j0) const { return (pages[j0 / P] * H + h) * P + j0 % P; }
  const int8_t* k(int64_t j0) const { return k_pages + slot(j0) * D; }
  const int8_t* v(int64_t j0) const { return v_pages + slot(j0) * D; }
  const float* ks(int64_t j0) const { return k_scales + slot(j0) * G; }
  const float* vs(int64_t j0) const { return v_scales + slot(j0) * G; }
};

// Any head dim and group (the AVX-512 kernel below takes D = 64 or 128 with groups of a multiple
// of 16): score_j = scale * sum_g s_kjg * (q . code_jg), acc += (p_j * s_vjg) * code_jg, the
// online softmax of attend_block (blocks of at most kKeyBlock keys within a page).
template <typename T>
QF_CPU_CLONES void attend_row_int8(T* out,      // [D]
                                   const T* q,  // [D]
                                   const Int8Row& row, float scale) {
  const int64_t D = row.D, G = row.G, gs = D / G;
  float qf[kMaxHeadDim], acc[kMaxHeadDim], s[kKeyBlock];
  for (int64_t d = 0; d < D; ++d) qf[d] = to_float(q[d]), acc[d] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t j0 = 0, n; j0 < row.n_keys; j0 += n) {
    n = row.block_len(j0);
    const int8_t* kb = row.k(j0);
    const float* ksb = row.ks(j0);
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int8_t* c = kb + j * D + g * gs;
        const float* qg = qf + g * gs;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t d = 0; d < gs; ++d) part += qg[d] * static_cast<float>(c[d]);
        sum += part * ksb[j * G + g];
      }
      s[j] = sum * scale;
    }
    float block_max = -INFINITY;
    for (int64_t j = 0; j < n; ++j) block_max = std::max(block_max, s[j]);
    const float m_new = std::max(m, block_max);
    const float correction = std::exp(m - m_new);  // 0 for the first block (m = -inf)
    float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = sleef_expf(s[j] - m_new);
      block_sum += s[j];
    }
    l = l * correction + block_sum;
    m = m_new;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
    const int8_t* vb = row.v(j0);
    const float* vsb = row.vs(j0);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < G; ++g) {
        const float w = s[j] * vsb[j * G + g];
        const int8_t* c = vb + j * D + g * gs;
        float* ag = acc + g * gs;
#pragma omp simd
        for (int64_t d = 0; d < gs; ++d) ag[d] += w * static_cast<float>(c[d]);
      }
  }
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(acc[d] * inv);
}

#if QF_X86_INTRINSICS
// 16-bit keys and values with a head dim of 128 (Qwen's) on AVX-512, the hot path, for bf16 and
// fp16 alike; what differs is in the element traits below (Bf16D128, Fp16D128):
//   - bf16: q . k by vdpbf16ps on the bf16 values as they are (each product exact in fp32, sums
//     in fp32); v widened by shifts, which split each 32 values into their even and odd
//     elements, so the accumulator holds them in that order until the output is written;
//   - fp16: k and v widened to fp32 by vcvtph2ps (exact), q . k by fp32 FMAs on q widened once
//     (each product exact: 11 x 11 significant bits), v's 32 values as their low and high 16.
// Both: four keys' sums reduced together (hsum4); p * v in fp32 FMAs, the 128 accumulators in
// eight registers. (AVX-512 BF16 is required for both: the fp16 traits use none of its
// instructions, but one target attribute covers the shared code.)
//
// Two kernels share this arithmetic: attend_row_d128 (one token and head: decode) and
// attend_tile_d128 (up to kTile consecutive tokens of one sequence and head: a prefill chunk,
// each key block read once for the tile). They give a token the same bits, whichever runs it and
// however the step's tokens are chunked (the prefix cache relies on it; tested):
//   - a key's score is a function of that key alone: every key's sum is the same chain of
//     instructions and goes through hsum4 (a short group is padded with zeros, never a different
//     reduction);
//   - the key blocks follow the pages for every token (PagedRow::block_len), and each block's
//     softmax update is one non-inlined function (softmax_block) that both kernels call;
//   - p * v accumulates in key order per lane, with FMAs on the same widened values.
constexpr int kDim128 = 128;
constexpr int64_t kPrefetchKeys = 32;       // near prefetch (prefetcht1), 8 KiB ahead
constexpr int64_t kFarPrefetchKeys = 128;   // far prefetch (prefetcht2), 32 KiB ahead
constexpr int kTile = 8;                    // tokens per tile (16 accumulators per column pair)

// Element traits: Q is a token's query as the dot product takes it; a key row is kChunks chunks,
// chunk(k, c) loads chunk c, step() adds its products to a chain; widen() gives 32 values of a
// value row as two fp32 vectors; store() writes acc / l in the element type from that order.
struct Bf16D128 {
  using T = bf16;
  static constexpr int kChunks = 4;           // 32 values each
  struct Q { __m512bh v[4]; };
  QF_TARGET_AVX512_BF16 static Q load_q(const bf16* q) {
    Q r;
    for (int i = 0; i < 4; ++i) r.v[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + 32 * i));
    return r;
  }
  QF_TARGET_AVX512_BF16 static __m512bh chunk(const bf16* k, int c) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + 32 * c));
  }
  QF_TARGET_AVX512_BF16 static __m512 step(__m512 a, __m512bh kc, const Q& q, int c) {
    return _mm512_dpbf16_ps(a, kc, q.v[c]);
  }
  QF_TARGET_AVX512_BF16 static void widen(const bf16* v, __m512& e, __m512& o) {
    const __m512i w = _mm512_loadu_si512(v);
    e = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    o = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536)));
  }
  // out = acc / l (acc in the even/odd order).
  QF_TARGET_AVX512_BF16 static void store(bf16* out, const float* acc, float l) {
    const __m512 inv = _mm512_set1_ps(1.0f / l);
    alignas(64) float even[16], odd[16];
    for (int i = 0; i < 4; ++i) {
      _mm512_store_ps(even, _mm512_mul_ps(_mm512_loadu_ps(acc + 32 * i), inv));
      _mm512_store_ps(odd, _mm512_mul_ps(_mm512_loadu_ps(acc + 32 * i + 16), inv));
      for (int e = 0; e < 16; ++e) {
        out[32 * i + 2 * e] = from_float<bf16>(even[e]);
        out[32 * i + 2 * e + 1] = from_float<bf16>(odd[e]);
      }
    }
  }
};

struct Fp16D128 {
  using T = fp16;
  static constexpr int kChunks = 8;           // 16 values each
  struct Q { __m512 v[8]; };
  QF_TARGET_AVX512_BF16 static __m512 load16(const fp16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  QF_TARGET_AVX512_BF16 static Q load_q(const fp16* q) {
    Q r;
    for (int i = 0; i < 8; ++i) r.v[i] = load16(q + 16 * i);
    return r;
  }
  QF_TARGET_AVX512_BF16 static __m512 chunk(const fp16* k, int c) { return load16(k + 16 * c); }
  QF_TARGET_AVX512_BF16 static __m512 step(__m512 a, __m512 kc, const Q& q, int c) {
    return _mm512_fmadd_ps(kc, q.v[c], a);
  }
  QF_TARGET_AVX512_BF16 static void widen(const fp16* v, __m512& e, __m512& o) {
    e = load16(v);
    o = load16(v + 16);
  }
  // out = acc / l (acc in the natural order), rounded to fp16 by vcvtps2ph (to nearest even,
  // as from_float<fp16>).
  QF_TARGET_AVX512_BF16 static void store(fp16* out, const float* acc, float l) {
    const __m512 inv = _mm512_set1_ps(1.0f / l);
    for (int i = 0; i < 8; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i),
                          _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), inv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// q . k of one key: the lanes' partial sums, one chain over the chunks.
template <class E>
QF_TARGET_AVX512_BF16 inline __m512 dot_d128(const typename E::Q& q, const typename E::T* k) {
  __m512 a = E::step(_mm512_setzero_ps(), E::chunk(k, 0), q, 0);
  for (int c = 1; c < E::kChunks; ++c) a = E::step(a, E::chunk(k, c), q, c);
  return a;
}

// Scores (unscaled) of keys j .. j + 3 of k into s[j ..].
template <class E>
QF_TARGET_AVX512_BF16 inline void scores_d128(float* s, const typename E::Q& q,
                                              const typename E::T* k, int64_t j) {
  constexpr int64_t ld = kDim128;
  hsum4(dot_d128<E>(q, k + j * ld), dot_d128<E>(q, k + (j + 1) * ld),
        dot_d128<E>(q, k + (j + 2) * ld), dot_d128<E>(q, k + (j + 3) * ld), s + j);
}

// Scores of the n keys at kb into s: groups of four, the last one padded with zero sums (the
// same reduction as a full group: each key's lanes are summed alone inside hsum4).
template <class E>
QF_TARGET_AVX512_BF16 inline void score_keys_d128(float* s, const typename E::Q& q,
                                                  const typename E::T* kb, int64_t n) {
  constexpr int64_t ld = kDim128;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) scores_d128<E>(s, q, kb, j);
  if (j < n) {
    __m512 d[4];
    for (int r = 0; r < 4; ++r)
      d[r] = j + r < n ? dot_d128<E>(q, kb + (j + r) * ld) : _mm512_setzero_ps();
    alignas(16) float t[4];
    hsum4(d[0], d[1], d[2], d[3], t);
    for (int64_t r = 0; j + r < n; ++r) s[j + r] = t[r];
  }
}

// exp(d) for 16 lanes: sleef_expf's operations (common/sleef_expf.h) in AVX-512.
QF_TARGET_AVX512_BF16 inline __m512 exp16(__m512 d) {
  const __m512 qf = _mm512_roundscale_ps(
      _mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137426645954152985934f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 in_range = _mm512_cmp_ps_mask(qf, _mm512_set1_ps(-1000.0f), _CMP_GT_OQ) &
                             _mm512_cmp_ps_mask(qf, _mm512_set1_ps(1000.0f), _CMP_LT_OQ);
  const __m512i q = _mm512_maskz_cvtps_epi32(in_range, qf);
  const __m512 qq = _mm512_cvtepi32_ps(q);
  __m512 s = _mm512_fmadd_ps(qq, _mm512_set1_ps(-0.693145751953125f), d);
  s = _mm512_fmadd_ps(qq, _mm512_set1_ps(-1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  const __m512i q_half = _mm512_srai_epi32(q, 1);
  const __m512i bias = _mm512_set1_epi32(0x7f);
  const __m512 p0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q_half, bias), 23));
  const __m512 p1 = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(q, q_half), bias), 23));
  u = _mm512_mul_ps(_mm512_mul_ps(u, p0), p1);
  u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u,
                           _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u,
                              _mm512_set1_ps(INFINITY));
}

// score_keys_d128 for two tokens at once (each key chunk loaded once for both): the same chains
// and the same hsum4 for each key, so the same sums as one token alone.
template <class E>
QF_TARGET_AVX512_BF16 inline void score_keys2_d128(float* s0, float* s1, const typename E::Q& q0,
                                                   const typename E::Q& q1,
                                                   const typename E::T* kb, int64_t n) {
  constexpr int64_t ld = kDim128;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 a[4], b[4];
    for (int r = 0; r < 4; ++r) {
      const auto k = E::chunk(kb + (j + r) * ld, 0);
      a[r] = E::step(_mm512_setzero_ps(), k, q0, 0);
      b[r] = E::step(_mm512_setzero_ps(), k, q1, 0);
    }
    for (int c = 1; c < E::kChunks; ++c)
      for (int r = 0; r < 4; ++r) {
        const auto k = E::chunk(kb + (j + r) * ld, c);
        a[r] = E::step(a[r], k, q0, c);
        b[r] = E::step(b[r], k, q1, c);
      }
    hsum4(a[0], a[1], a[2], a[3], s0 + j);
    hsum4(b[0], b[1], b[2], b[3], s1 + j);
  }
  if (j < n) {
    score_keys_d128<E>(s0 + j, q0, kb + j * ld, n - j);
    score_keys_d128<E>(s1 + j, q1, kb + j * ld, n - j);
  }
}

// One key block's online-softmax update of one token: scales its n scores s, updates the
// running max m and sum l, and leaves the block's unnormalised probabilities in s; returns the
// factor to rescale the accumulator by. The row and the tile kernels both call it (the same
// instructions, so the same bits for a token in both).
QF_TARGET_AVX512_BF16 __attribute__((noinline)) float softmax_block(float* s, int64_t n,
                                                                   float scale, float& m,
                                                                   float& l) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), vscale);
    _mm512_mask_storeu_ps(s + j, k, x);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(vmax));
  const float correction = std::exp(m - m_new);  // 0 for the first block (m = -inf)
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm));
    _mm512_mask_storeu_ps(s + j, k, e);
    vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
  }
  l = l * correction + _mm512_reduce_add_ps(vsum);
  m = m_new;
  return correction;
}


// acc += p_j * v[j] for one key (acc in the order of E::widen).
template <class E>
QF_TARGET_AVX512_BF16 inline void accumulate_d128(__m512 (&acc)[8], float p_j,
                                                  const typename E::T* vr) {
  const __m512 p = _mm512_set1_ps(p_j);
  for (int i = 0; i < 4; ++i) {
    __m512 e, o;
    E::widen(vr + 32 * i, e, o);
    acc[2 * i] = _mm512_fmadd_ps(e, p, acc[2 * i]);
    acc[2 * i + 1] = _mm512_fmadd_ps(o, p, acc[2 * i + 1]);
  }
}

// Prefetches keys pk .. pk + 3 and values pv .. pv + 3 of the row (pv <= pk) with locality
// kHint, if they exist.
template <int kHint, typename T>
QF_TARGET_AVX512_BF16 inline void prefetch4(const PagedRow<T>& row, int64_t pk, int64_t pv,
                                            std::integral_constant<int, kHint>) {
  if (pk + 4 > row.n_keys) return;
  for (int r = 0; r < 4; ++r) {
    const char* kp = reinterpret_cast<const char*>(row.k(pk + r));
    const char* vp = reinterpret_cast<const char*>(row.v(pv + r));
    for (int o = 0; o < kDim128 * 2; o += 64) {
      __builtin_prefetch(kp + o, 0, kHint);
      __builtin_prefetch(vp + o, 0, kHint);
    }
  }
}

// Software-pipelined over blocks: the values of block b are accumulated in the same loop that
// computes the scores of block b + 1, so that the key and the value streams are read at once
// (at decode the cache is cold: the weights in between evict every layer's keys and values).
// Both streams are prefetched twice, 32 keys (8 KiB) and 128 keys (32 KiB) ahead, through the
// page table, so that the prefetches run on across block and page boundaries (the hardware
// prefetcher alone runs too short a way ahead, and stops at every page).
// Measured (benchmarks/bench_paged.py --part pages: 24 layers at 4096 cached tokens, pages of
// 64, 2 threads), attention / linear reading the same bytes, in the same run:
//   prefetch 16 keys ahead within a block (before):  0.70-0.75 at a 60-65 GB/s read pass,
//                                                    0.84-0.88 at 35-37 GB/s
//   32 keys ahead across blocks:                      0.80-0.81 / 0.92-0.95
//   32 and 128 ahead (this):                          0.89-0.92 / 0.94-0.97
//   prefetcht0 (into L1) 16 ahead:                    0.56-0.58 at 63 GB/s
// Earlier: splitting the keys into 2 or 4 runs in lockstep, for more streams, lost to the
// register spills.
template <class E>
QF_TARGET_AVX512_BF16 __attribute__((flatten)) void attend_row_d128(
    typename E::T* out, const typename E::T* q, const PagedRow<typename E::T>& row, float scale) {
  using T = typename E::T;
  constexpr int64_t ld = kDim128;
  const int64_t n_keys = row.n_keys;
  const typename E::Q qv = E::load_q(q);
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  float m = -INFINITY, l = 0.0f;
  alignas(64) float buf[2][kKeyBlock];
  int64_t n = row.block_len(0);
  score_keys_d128<E>(buf[0], qv, row.k(0), n);
  for (int64_t j0 = 0, b = 0; j0 < n_keys; j0 += n, b ^= 1) {
    float* s = buf[b];
    float* s_next = buf[b ^ 1];
    n = row.block_len(j0);
    const int64_t j1 = j0 + n;
    const int64_t n_next = j1 < n_keys ? row.block_len(j1) : 0;
    const T* k_next = n_next > 0 ? row.k(j1) : nullptr;
    const __m512 c = _mm512_set1_ps(softmax_block(s, n, scale, m, l));
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_mul_ps(acc[i], c);
    const T* vb = row.v(j0);
    int64_t j = 0;
    for (; j + 4 <= n && j + 4 <= n_next; j += 4) {  // both streams
      // The keys a distance on from the ones scored, and the values the same distance on from
      // the ones accumulated, wherever their pages are (across block and page boundaries).
      prefetch4(row, j1 + j + kPrefetchKeys, j0 + j + kPrefetchKeys, std::integral_constant<int, 2>());
      prefetch4(row, j1 + j + kFarPrefetchKeys, j0 + j + kFarPrefetchKeys,
                std::integral_constant<int, 1>());
      scores_d128<E>(s_next, qv, k_next, j);
      for (int r = 0; r < 4; ++r) accumulate_d128<E>(acc, s[j + r], vb + (j + r) * ld);
    }
    for (int64_t i = j; i < n; ++i) accumulate_d128<E>(acc, s[i], vb + i * ld);
    if (n_next > j) score_keys_d128<E>(s_next + j, qv, k_next + j * ld, n_next - j);
  }
  alignas(64) float accs[kDim128];
  for (int i = 0; i < 8; ++i) _mm512_store_ps(accs + 16 * i, acc[i]);
  E::store(out, accs, l);
}

// p * v of one key block for the nt tokens of a tile, column pair by column pair (32 of the 128
// values, as E::widen splits them), each value row loaded and widened once for every token.
// Token t takes the block's keys j < nk[t] (probabilities p[t]); acc[t] is its accumulator in
// memory (E::widen's order), rescaled by corr[t] first. kMasked: some token takes fewer keys
// than the block has (the block on the diagonal); a masked FMA leaves the others' sums untouched.
template <class E, int kNt, bool kMasked>
QF_TARGET_AVX512_BF16 inline void tile_pv_d128(float (*acc)[kDim128], const float (*p)[kKeyBlock],
                                               const float* corr, const int64_t* nk,
                                               const typename E::T* vb, int64_t n) {
  constexpr int64_t ld = kDim128;
  for (int i = 0; i < 4; ++i) {
    __m512 ae[kNt], ao[kNt];
    for (int t = 0; t < kNt; ++t) {
      const __m512 c = _mm512_set1_ps(corr[t]);
      ae[t] = _mm512_mul_ps(_mm512_load_ps(acc[t] + 32 * i), c);
      ao[t] = _mm512_mul_ps(_mm512_load_ps(acc[t] + 32 * i + 16), c);
    }
    for (int64_t j = 0; j < n; ++j) {
      __m512 e, o;
      E::widen(vb + j * ld + 32 * i, e, o);
      for (int t = 0; t < kNt; ++t) {
        const __m512 pj = _mm512_set1_ps(p[t][j]);
        if constexpr (kMasked) {
          const __mmask16 k = j < nk[t] ? 0xFFFF : 0;
          ae[t] = _mm512_mask3_fmadd_ps(e, pj, ae[t], k);
          ao[t] = _mm512_mask3_fmadd_ps(o, pj, ao[t], k);
        } else {
          ae[t] = _mm512_fmadd_ps(e, pj, ae[t]);
          ao[t] = _mm512_fmadd_ps(o, pj, ao[t]);
        }
      }
    }
    for (int t = 0; t < kNt; ++t) {
      _mm512_store_ps(acc[t] + 32 * i, ae[t]);
      _mm512_store_ps(acc[t] + 32 * i + 16, ao[t]);
    }
  }
}

template <class E, int kNt>
QF_TARGET_AVX512_BF16 inline void tile_pv_dispatch(float (*acc)[kDim128],
                                                  const float (*p)[kKeyBlock],
                                                  const float* corr, const int64_t* nk,
                                                  const typename E::T* vb, int64_t n) {
  bool full = true;
  for (int t = 0; t < kNt; ++t) full = full && nk[t] == n;
  if (full)
    tile_pv_d128<E, kNt, false>(acc, p, corr, nk, vb, n);
  else
    tile_pv_d128<E, kNt, true>(acc, p, corr, nk, vb, n);
}

// nt (1 .. kTile) consecutive tokens of one sequence and head, token t at position
// last.n_keys - nt + t: q_t = q + t * sq_n, out_t = out + t * so_n; `last` is the row of the
// tile's last token. The key blocks are that token's (the others' are the same blocks, their
// last one cut shorter): each block's keys are scored for every token, two tokens at a time, and
// its values are read once for all of them.
// Measured (bf16; 24 layers of 16 heads, 240 tokens after 1472 cached, pages of 64, 2 threads,
// one run): 18.4 ms a layer with the tile (one token's scores at a time) against 38 ms token by
// token; 14.6 ms with two tokens' scores at a time. p * v is then about 60% of the time, at about
// 75% of the FMA rate.
template <class E>
QF_TARGET_AVX512_BF16 __attribute__((flatten)) void attend_tile_d128(
    typename E::T* out, int64_t so_n, const typename E::T* q, int64_t sq_n,
    const PagedRow<typename E::T>& last, int nt, float scale) {
  using T = typename E::T;
  alignas(64) float acc[kTile][kDim128];
  alignas(64) float p[kTile][kKeyBlock];
  float m[kTile], l[kTile], corr[kTile];
  int64_t nk[kTile];
  typename E::Q qv[kTile];
  for (int t = 0; t < nt; ++t) {
    qv[t] = E::load_q(q + t * sq_n);
    for (int64_t d = 0; d < kDim128; ++d) acc[t][d] = 0.0f;
    m[t] = -INFINITY, l[t] = 0.0f;
  }
  const int64_t n_keys = last.n_keys, first_keys = n_keys - (nt - 1);
  for (int64_t j0 = 0, n; j0 < n_keys; j0 += n) {
    n = last.block_len(j0);
    const T* kb = last.k(j0);
    const T* vb = last.v(j0);
    // Token t's block: the keys j0 .. its own n_keys (block_len of its row); two tokens' scores
    // at a time.
    for (int t = 0; t < nt; ++t) nk[t] = std::max<int64_t>(0, std::min(n, first_keys + t - j0));
    int t = 0;
    for (; t + 2 <= nt; t += 2)
      score_keys2_d128<E>(p[t], p[t + 1], qv[t], qv[t + 1], kb, nk[t + 1]);
    if (t < nt) score_keys_d128<E>(p[t], qv[t], kb, nk[t]);
    for (t = 0; t < nt; ++t)       // a token with no key here keeps its sums as they are
      corr[t] = nk[t] > 0 ? softmax_block(p[t], nk[t], scale, m[t], l[t]) : 1.0f;
    switch (nt) {
      case 1: tile_pv_dispatch<E, 1>(acc, p, corr, nk, vb, n); break;
      case 2: tile_pv_dispatch<E, 2>(acc, p, corr, nk, vb, n); break;
      case 3: tile_pv_dispatch<E, 3>(acc, p, corr, nk, vb, n); break;
      case 4: tile_pv_dispatch<E, 4>(acc, p, corr, nk, vb, n); break;
      case 5: tile_pv_dispatch<E, 5>(acc, p, corr, nk, vb, n); break;
      case 6: tile_pv_dispatch<E, 6>(acc, p, corr, nk, vb, n); break;
      case 7: tile_pv_dispatch<E, 7>(acc, p, corr, nk, vb, n); break;
      default: tile_pv_dispatch<E, 8>(acc, p, corr, nk, vb, n); break;
    }
  }
  for (int t = 0; t < nt; ++t) E::store(out + t * so_n, acc[t], l[t]);
}

// int8 keys and values with a head dim of kC * 16 (64 or 128) and groups of kCpg * 16 elements
// on AVX-512 (with BF16 for softmax_block's target, shared with the 16-bit kernels): each 16
// codes widened to fp32 (vpmovsxbd + vcvtdq2ps, exact); a key's score is one chain of FMAs per
// group on q in fp32, each group's sum times its scale folded into the key's lane sums (an FMA
// per group), the four keys' lanes reduced together (hsum4); p * v as FMAs of the widened codes
// with p_j * s_vjg. The pages are half the bytes of bf16's, so the loop is the same software
// pipeline as attend_row_d128 (the values of block b accumulated while the keys of block b + 1
// are scored, both streams prefetched twice through the page table, at the same byte distances).
// Measured (decode, 16 heads x 4096 keys, pages of 64, bf16 q, caches evicted before each run,
// 1 thread of the 2-core Zen 4, same run): bf16 cache 1.6-1.7 ms, this kernel 1.15-1.35 ms;
// without the prefetches (see prefetch4) 1.8 ms: a page's 8 KiB of one head start cold.
// With the data in cache it computes 16 x 1024 keys in 196 us (22 GB/s of int8 a core): compute
// bound, by the widening of the codes (vpmovsxbd) more than the FMAs; both threads of the 2-vCPU
// machine gave about 22 GB/s together (0.78 ms against the bf16 cache's 1.22 ms). bf16 queries
// with one scale a position (the default) run int8_vnni below instead.
namespace int8_impl {

constexpr int64_t kPrefetchKeys = 64;       // near prefetch, 8 KiB ahead at D = 128
constexpr int64_t kFarPrefetchKeys = 256;   // far prefetch, 32 KiB ahead at D = 128

QF_TARGET_AVX512_BF16 inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// q . k of one key, its G = kC / kCpg group sums each times its scale: the lanes' partial sums.
template <int kC, int kCpg>
QF_TARGET_AVX512_BF16 inline __m512 dot(const __m512 (&q)[kC], const int8_t* k, const float* s) {
  __m512 a = _mm512_setzero_ps();
  for (int c0 = 0; c0 < kC; c0 += kCpg) {
    __m512 p = _mm512_mul_ps(widen16(k + 16 * c0), q[c0]);
    for (int c = c0 + 1; c < c0 + kCpg; ++c) p = _mm512_fmadd_ps(widen16(k + 16 * c), q[c], p);
    a = _mm512_fmadd_ps(p, _mm512_set1_ps(s[c0 / kCpg]), a);
  }
  return a;
}

// Scores (unscaled) of the n keys at kb (scales ksb) into s: groups of four, the last one padded
// with zero sums (the same reduction for every key).
template <int kC, int kCpg>
QF_TARGET_AVX512_BF16 inline void score4(float* s, const __m512 (&q)[kC], const int8_t* kb,
                                         const float* ksb, int64_t j) {
  constexpr int64_t D = 16 * kC, G = kC / kCpg;
  hsum4(dot<kC, kCpg>(q, kb + j * D, ksb + j * G), dot<kC, kCpg>(q, kb + (j + 1) * D, ksb + (j + 1) * G),
        dot<kC, kCpg>(q, kb + (j + 2) * D, ksb + (j + 2) * G),
        dot<kC, kCpg>(q, kb + (j + 3) * D, ksb + (j + 3) * G), s + j);
}

template <int kC, int kCpg>
QF_TARGET_AVX512_BF16 inline void score_keys(float* s, const __m512 (&q)[kC], const int8_t* kb,
                                             const float* ksb, int64_t n) {
  constexpr int64_t D = 16 * kC, G = kC / kCpg;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) score4<kC, kCpg>(s, q, kb, ksb, j);
  if (j < n) {
    __m512 d[4];
    for (int r = 0; r < 4; ++r)
      d[r] = j + r < n ? dot<kC, kCpg>(q, kb + (j + r) * D, ksb + (j + r) * G) : _mm512_setzero_ps();
    alignas(16) float t[4];
    hsum4(d[0], d[1], d[2], d[3], t);
    for (int64_t r = 0; j + r < n; ++r) s[j + r] = t[r];
  }
}

// acc += p_j * v[j] for one key: code * (p_j * scale of its group).
template <int kC, int kCpg>
QF_TARGET_AVX512_BF16 inline void accumulate(__m512 (&acc)[kC], float p_j, const int8_t* v,
                                             const float* s) {
  for (int c0 = 0; c0 < kC; c0 += kCpg) {
    const __m512 w = _mm512_set1_ps(p_j * s[c0 / kCpg]);
    for (int c = c0; c < c0 + kCpg; ++c) acc[c] = _mm512_fmadd_ps(widen16(v + 16 * c), w, acc[c]);
  }
}

// A position of a row walked forward by the prefetches: its page-table index and offset kept
// up to date by additions instead of a division for each prefetch (four every four keys; no
// measurable change in time here, but no cost either).
struct Cursor {
  int64_t j, page, off;  // j = page * P + off
  Cursor(const Int8Row& row, int64_t j0) : j(j0), page(j0 / row.P), off(j0 % row.P) {}
  void advance(const Int8Row& row, int64_t by) {
    j += by, off += by;
    while (off >= row.P) off -= row.P, ++page;
  }
};

// Prefetches the codes and scales of the four positions at c of `pages` / `scales` with
// locality kHint, if they exist, and moves c on by four.
template <int kHint>
QF_TARGET_AVX512_BF16 inline void prefetch4(const Int8Row& row, const int8_t* pages,
                                            const float* scales, Cursor& c) {
  // Without this, GCC 12 dropped these prefetches altogether (not one prefetch instruction was
  // left in the int8 kernels' code, and the decode ran 1.8 ms instead of 1.2 above): the empty
  // volatile asm is an effect it keeps, at no cost.
  asm volatile("");
  if (c.j + 4 <= row.n_keys) {
    const int64_t D = row.D;
    if (c.off + 4 <= row.P) {  // one page: 4 * D contiguous codes
      const int64_t slot = (row.pages[c.page] * row.H + row.h) * row.P + c.off;
      const char* p = reinterpret_cast<const char*>(pages + slot * D);
      for (int64_t o = 0; o < 4 * D; o += 64) __builtin_prefetch(p + o, 0, kHint);
      __builtin_prefetch(scales + slot * row.G, 0, kHint);
    } else {
      for (int r = 0; r < 4; ++r) {
        const int64_t slot = row.slot(c.j + r);
        const char* p = reinterpret_cast<const char*>(pages + slot * D);
        for (int64_t o = 0; o < D; o += 64) __builtin_prefetch(p + o, 0, kHint);
        __builtin_prefetch(scales + slot * row.G, 0, kHint);
      }
    }
  }
  c.advance(row, 4);
}

template <typename T, int kC, int kCpg>
QF_TARGET_AVX512_BF16 __attribute__((flatten)) void attend_row(T* out, const T* q,
                                                             const Int8Row& row, float scale) {
  constexpr int64_t D = 16 * kC, G = kC / kCpg;
  const int64_t n_keys = row.n_keys;
  __m512 qv[kC], acc[kC];
  {
    alignas(64) float qf[D];
    for (int64_t d = 0; d < D; ++d) qf[d] = to_float(q[d]);
    for (int c = 0; c < kC; ++c) qv[c] = _mm512_load_ps(qf + 16 * c), acc[c] = _mm512_setzero_ps();
  }
  float m = -INFINITY, l = 0.0f;
  alignas(64) float buf[2][kKeyBlock];
  int64_t n = row.block_len(0);
  score_keys<kC, kCpg>(buf[0], qv, row.k(0), row.ks(0), n);
  for (int64_t j0 = 0, b = 0; j0 < n_keys; j0 += n, b ^= 1) {
    float* s = buf[b];
    float* s_next = buf[b ^ 1];
    n = row.block_len(j0);
    const int64_t j1 = j0 + n;
    const int64_t n_next = j1 < n_keys ? row.block_len(j1) : 0;
    const int8_t* k_next = n_next > 0 ? row.k(j1) : nullptr;
    const float* ks_next = n_next > 0 ? row.ks(j1) : nullptr;
    const __m512 c = _mm512_set1_ps(softmax_block(s, n, scale, m, l));
    for (int i = 0; i < kC; ++i) acc[i] = _mm512_mul_ps(acc[i], c);
    const int8_t* vb = row.v(j0);
    const float* vsb = row.vs(j0);
    // The keys a distance on from the ones scored, and the values the same distance on from the
    // ones accumulated, wherever their pages are.
    Cursor kn(row, j1 + kPrefetchKeys), kf(row, j1 + kFarPrefetchKeys);
    Cursor vn(row, j0 + kPrefetchKeys), vf(row, j0 + kFarPrefetchKeys);
    int64_t j = 0;
    for (; j + 4 <= n && j + 4 <= n_next; j += 4) {  // both streams
      prefetch4<2>(row, row.k_pages, row.k_scales, kn);
      prefetch4<2>(row, row.v_pages, row.v_scales, vn);
      prefetch4<1>(row, row.k_pages, row.k_scales, kf);
      prefetch4<1>(row, row.v_pages, row.v_scales, vf);
      score4<kC, kCpg>(s_next, qv, k_next, ks_next, j);
      for (int r = 0; r < 4; ++r)
        accumulate<kC, kCpg>(acc, s[j + r], vb + (j + r) * D, vsb + (j + r) * G);
    }
    for (int64_t i = j; i < n; ++i) accumulate<kC, kCpg>(acc, s[i], vb + i * D, vsb + i * G);
    if (n_next > j)
      score_keys<kC, kCpg>(s_next + j, qv, k_next + j * D, ks_next + j * G, n_next - j);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / l);
  alignas(64) float o[D];
  for (int c = 0; c < kC; ++c) _mm512_store_ps(o + 16 * c, _mm512_mul_ps(acc[c], inv));
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(o[d]);
}

}  // namespace int8_impl

// bf16 queries over an int8 cache with a head dim of 128 and one scale per position and head
// (the default cache), with integer dot products (AVX-512 VNNI) instead of widening every code to
// fp32 (the fp32 kernel's bottleneck). Two roundings that the fp32 kernel does not make:
//   - q . k: q = qs * (hi + lo / 32768) with int16 hi and lo (qs = max|q| / 32767; lo rounds the
//     rest, exact by an FMA: q within max|q| * 2^-31), the two sums of int16 * code exact in int32
//     (vpdpwssd), combined in fp32, then times qs * s_kj;
//   - p * v: each key block's weights w_j = p_j * s_vj rounded to 16 bits (W = max_j w_j / 65535,
//     omega_j = round(w_j / W), split into two bytes), the sums of omega_j * code exact in int32
//     (vpdpbusd over four keys at a time, each 32-bit lane holding one element of four keys'
//     value rows, transposed by byte and word unpacks), then times W into the fp32 accumulator.
// Both well below bf16's rounding of the output (tests/test_kv_int8.py holds it to the attention
// rule of test_attention.py: within twice the reference's own rounding error, and bit-identical
// in at least 99% of the elements; with q rounded to int16 alone, 98.7% were); fp16 and fp32
// queries, other head dims and several scales a position run the fp32 kernels. Every row is one
// call of the same function: the same bits for a token however the step is chunked.
// Measured (same runs as above, 16 heads x 4096 keys): in cache 145 us against the fp32
// kernel's 186-194 us for 1024 keys; from memory 0.98-1.13 ms against 1.11-1.21 ms on one thread,
// 0.75-0.76 against 0.78-0.85 ms on two (the bf16 cache: 1.64-1.70 and 1.20-1.21 ms). Full-size
// int4 decode at 4096 cached positions (benchmarks/bench_kv_int8.py, alternating, noisy shared
// machine): 1.17-1.31x the bf16 cache's speed with it, 1.22x with the fp32 kernel.
#define QF_TARGET_AVX512_VNNI_BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))

namespace int8_vnni {

constexpr int64_t kD = 128;

// The lanes of q . code / qs of one key (each lane two elements' products): q = qs * (hi + lo /
// 32768) with int16 hi and lo, the two sums exact in int32, combined in fp32.
QF_TARGET_AVX512_VNNI_BF16 inline __m512 key_dot(const __m512i (&q16)[8], const int8_t* k) {
  __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
  for (int c = 0; c < 4; ++c) {
    const __m512i k16 =
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 32 * c)));
    a = _mm512_dpwssd_epi32(a, k16, q16[c]);
    b = _mm512_dpwssd_epi32(b, k16, q16[4 + c]);
  }
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), _mm512_set1_ps(1.0f / 32768.0f),
                         _mm512_cvtepi32_ps(a));
}

// Scores of the n keys at kb (unscaled by `scale`): hsum4 of four keys' lanes at a time (a short
// group padded with zero lanes), then times qs * s_kj; prefetching the keys on through c1, c2.
QF_TARGET_AVX512_VNNI_BF16 inline void score_keys(float* s, const __m512i (&q16)[8],
                                                  const int8_t* kb, const float* ksb, int64_t n,
                                                  float qs, const Int8Row& row,
                                                  int8_impl::Cursor& c1, int8_impl::Cursor& c2) {
  for (int64_t j = 0; j < n; j += 4) {
    int8_impl::prefetch4<2>(row, row.k_pages, row.k_scales, c1);
    int8_impl::prefetch4<1>(row, row.k_pages, row.k_scales, c2);
    __m512 d[4];
    for (int r = 0; r < 4; ++r)
      d[r] = j + r < n ? key_dot(q16, kb + (j + r) * kD) : _mm512_setzero_ps();
    hsum4(d[0], d[1], d[2], d[3], s + j);   // s has room past n
  }
  const __m512 vq = _mm512_set1_ps(qs);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(s + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j),
                                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(k, ksb + j), vq)));
  }
}

// acc (fp32, in the lane order of the transposed rows: see store) += sum_j p_j * s_vj * v_j over
// the n keys at vb, through 16-bit weights and int32 sums.
QF_TARGET_AVX512_VNNI_BF16 inline void accumulate_block(__m512 (&acc)[8], const float* p,
                                                        const int8_t* vb, const float* vsb,
                                                        int64_t n, const Int8Row& row,
                                                        int8_impl::Cursor& c1,
                                                        int8_impl::Cursor& c2) {
  // w = p * s_v, W = max w / 65535, omega = round(w / W) as two bytes (16 keys a vector).
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j),
                                             _mm512_maskz_loadu_ps(k, vsb + j)));
  }
  const float wmax = _mm512_reduce_max_ps(vmax);
  const float W = wmax > 0.0f ? wmax / 65535.0f : 1.0f;
  const __m512 inv_w = _mm512_set1_ps(1.0f / W);
  alignas(64) uint8_t hi8[kKeyBlock + 16], lo8[kKeyBlock + 16];
  for (int64_t j = 0; j < n + 4; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF)
                        : n > j ? __mmask16((1u << (n - j)) - 1) : __mmask16(0);
    const __m512 w = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j), _mm512_maskz_loadu_ps(k, vsb + j));
    __m512i o = _mm512_cvt_roundps_epu32(_mm512_mul_ps(w, inv_w),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    o = _mm512_min_epu32(o, _mm512_set1_epi32(65535));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi8 + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(o, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo8 + j),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(o, _mm512_set1_epi32(255))));
  }
  __m512i hi[8], lo[8];
  for (int c = 0; c < 8; ++c) hi[c] = lo[c] = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 4) {
    int8_impl::prefetch4<2>(row, row.v_pages, row.v_scales, c1);
    int8_impl::prefetch4<1>(row, row.v_pages, row.v_scales, c2);
    const int8_t* r[4];
    for (int t = 0; t < 4; ++t) r[t] = vb + std::min(j + t, n - 1) * kD;  // weight 0 past n
    uint32_t bh, bl;
    __builtin_memcpy(&bh, hi8 + j, 4);
    __builtin_memcpy(&bl, lo8 + j, 4);
    const __m512i ah = _mm512_set1_epi32(static_cast<int>(bh));
    const __m512i al = _mm512_set1_epi32(static_cast<int>(bl));
    for (int h = 0; h < 2; ++h) {
      const __m512i x0 = _mm512_loadu_si512(r[0] + 64 * h), x1 = _mm512_loadu_si512(r[1] + 64 * h);
      const __m512i x2 = _mm512_loadu_si512(r[2] + 64 * h), x3 = _mm512_loadu_si512(r[3] + 64 * h);
      const __m512i t0 = _mm512_unpacklo_epi8(x0, x1), t1 = _mm512_unpackhi_epi8(x0, x1);
      const __m512i t2 = _mm512_unpacklo_epi8(x2, x3), t3 = _mm512_unpackhi_epi8(x2, x3);
      const __m512i u[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2),
                            _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
      for (int k = 0; k < 4; ++k) {
        hi[4 * h + k] = _mm512_dpbusd_epi32(hi[4 * h + k], ah, u[k]);
        lo[4 * h + k] = _mm512_dpbusd_epi32(lo[4 * h + k], al, u[k]);
      }
    }
  }
  // hi * 256 + lo <= 255 * 127 * 128 * 257 < 2^31: exact in int32.
  const __m512 vW = _mm512_set1_ps(W);
  for (int c = 0; c < 8; ++c)
    acc[c] = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi[c], 8), lo[c])), vW, acc[c]);
}

template <typename T>
QF_TARGET_AVX512_VNNI_BF16 __attribute__((flatten)) void attend_row(T* out, const T* q,
                                                                  const Int8Row& row,
                                                                  float scale) {
  alignas(64) float qf[kD];
  float qmax = 0.0f;
  for (int64_t d = 0; d < kD; ++d) qf[d] = to_float(q[d]), qmax = std::max(qmax, std::fabs(qf[d]));
  const float qs = qmax > 0.0f ? qmax / 32767.0f : 1.0f;
  // q = qs * (hi + lo / 32768): hi = round(q / qs), lo = round of the (exact, by FMA) rest.
  alignas(64) int16_t qi[2][kD];
  for (int64_t d = 0; d < kD; ++d) {
    const float hi = std::max(-32767.0f, std::min(32767.0f, std::nearbyint(qf[d] / qs)));
    const float rest = std::fma(-hi, qs, qf[d]);
    qi[0][d] = static_cast<int16_t>(hi);
    qi[1][d] = static_cast<int16_t>(
        std::max(-32767.0f, std::min(32767.0f, std::nearbyint(rest / qs * 32768.0f))));
  }
  __m512i q16[8];
  for (int c = 0; c < 8; ++c) q16[c] = _mm512_load_si512(qi[c / 4] + 32 * (c % 4));
  __m512 acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = _mm512_setzero_ps();
  float m = -INFINITY, l = 0.0f;
  alignas(64) float s[kKeyBlock + 16];
  int8_impl::Cursor kn(row, int8_impl::kPrefetchKeys), kf(row, int8_impl::kFarPrefetchKeys);
  int8_impl::Cursor vn(row, int8_impl::kPrefetchKeys), vf(row, int8_impl::kFarPrefetchKeys);
  for (int64_t j0 = 0, n; j0 < row.n_keys; j0 += n) {
    n = row.block_len(j0);
    score_keys(s, q16, row.k(j0), row.ks(j0), n, qs, row, kn, kf);
    const __m512 c = _mm512_set1_ps(softmax_block(s, n, scale, m, l));
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_mul_ps(acc[i], c);
    accumulate_block(acc, s, row.v(j0), row.vs(j0), n, row, vn, vf);
  }
  // Lane i of acc[4 h + k] is element 64 h + 16 (i / 4) + 4 k + i % 4.
  const __m512 inv = _mm512_set1_ps(1.0f / l);
  alignas(64) float o[8][16];
  for (int c = 0; c < 8; ++c) _mm512_store_ps(o[c], _mm512_mul_ps(acc[c], inv));
  for (int c = 0; c < 8; ++c)
    for (int i = 0; i < 16; ++i)
      out[64 * (c / 4) + 16 * (i / 4) + 4 * (c % 4) + i % 4] = from_float<T>(o[c][i]);
}

}  // namespace int8_vnni

// The traits of T for the head-dim-128 kernels (void: none).
template <typename T>
using D128 = std::conditional_t<std::is_same_v<T, bf16>, Bf16D128,
                                std::conditional_t<std::is_same_v<T, fp16>, Fp16D128, void>>;
#endif  // QF_X86_INTRINSICS

// The row worker for T and D: the AVX-512 BF16 path where it applies, else the generic one.
template <typename T>
using RowFn = void (*)(T*, const T*, const PagedRow<T>&, float);

template <typename T>
RowFn<T> row_fn(int64_t D) {
#if QF_X86_INTRINSICS
  if constexpr (!std::is_void_v<D128<T>>) {
    static const bool bf16_isa = cpu_isa_supported(CpuIsa::kAvx512Bf16);
    if (D == kDim128 && bf16_isa) return attend_row_d128<D128<T>>;
  }
#endif
  if (D == 128) return attend_row<T, 128>;  // Qwen's head dim: the accumulator unrolled
  return attend_row<T, 0>;
}

// The int8 row worker for T, D and G: the AVX-512 kernel for D = 64 / 128 with groups of a
// multiple of 16 elements (on a CPU with AVX-512 BF16), else the portable one.
template <typename T>
using Int8RowFn = void (*)(T*, const T*, const Int8Row&, float);

template <typename T>
Int8RowFn<T> int8_row_fn(int64_t D, int64_t G) {
#if QF_X86_INTRINSICS
  static const bool isa = cpu_isa_supported(CpuIsa::kAvx512Bf16);
  static const bool vnni = isa && cpu_isa_supported(CpuIsa::kAvx512Vnni);
  const int64_t gs = D / G;
  if constexpr (std::is_same_v<T, bf16>) {
    if (vnni && D == 128 && G == 1) return int8_vnni::attend_row<T>;
  }
  if (isa && gs % 16 == 0) {
    if (D == 128) {
      switch (gs / 16) {
        case 1: return int8_impl::attend_row<T, 8, 1>;
        case 2: return int8_impl::attend_row<T, 8, 2>;
        case 4: return int8_impl::attend_row<T, 8, 4>;
        case 8: return int8_impl::attend_row<T, 8, 8>;
        default: break;
      }
    } else if (D == 64) {
      switch (gs / 16) {
        case 1: return int8_impl::attend_row<T, 4, 1>;
        case 2: return int8_impl::attend_row<T, 4, 2>;
        case 4: return int8_impl::attend_row<T, 4, 4>;
        default: break;
      }
    }
  }
#endif
  return attend_row_int8<T>;
}

}  // namespace

template <typename T>
Status attention(T* out, const T* q, const T* k_pages, const T* v_pages,
                 const int32_t* page_table, const int32_t* token_seq, const int32_t* token_pos,
                 int64_t N, int64_t H, int64_t D, int64_t P, int64_t ld_pt, int64_t sq_n,
                 int64_t sq_h, float scale) {
  if (N < 0 || H < 0 || D < 1 || D > kMaxHeadDim || P < 1 || ld_pt < 0)
    return Status::kInvalidArgument;
  const int64_t rows = N * H;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || q == nullptr || k_pages == nullptr || v_pages == nullptr ||
      page_table == nullptr || token_seq == nullptr || token_pos == nullptr)
    return Status::kInvalidArgument;
  bool several = false;  // a sequence with several tokens in this step (a prefill chunk)
  for (int64_t i = 0; i < N; ++i) {
    if (token_seq[i] < 0 || token_pos[i] < 0 || token_pos[i] / P >= ld_pt)
      return Status::kInvalidArgument;
    several = several || (i > 0 && token_seq[i] == token_seq[i - 1]);
  }
  const RowFn<T> fn = row_fn<T>(D);
  auto attend = [&](int64_t r) {
    const int64_t h = r % H, i = r / H;
    const PagedRow<T> row{k_pages, v_pages, page_table + token_seq[i] * ld_pt, h, H, P, D,
                          int64_t{token_pos[i]} + 1};
    fn(out + r * D, q + i * sq_n + h * sq_h, row, scale);
  };
  if (!several) {
    // Decode: rows of equal work per sequence, split in contiguous runs. (dynamic, 4 here took
    // 64 against 33-40 us a layer at 150 cached tokens, 24 layers' caches, 2 threads.)
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) attend(r);
    return Status::kOk;
  }
#if QF_X86_INTRINSICS
  if constexpr (!std::is_void_v<D128<T>>) {
    if (fn == attend_row_d128<D128<T>>) {
      // Tiles: runs of up to kTile consecutive tokens of one sequence at consecutive positions
      // (a prefill chunk), times the heads; a tile's key blocks are read once for its tokens.
      std::vector<std::pair<int64_t, int>> tiles;
      for (int64_t i = 0; i < N;) {
        int nt = 1;
        while (nt < kTile && i + nt < N && token_seq[i + nt] == token_seq[i] &&
               token_pos[i + nt] == token_pos[i + nt - 1] + 1)
          ++nt;
        tiles.emplace_back(i, nt);
        i += nt;
      }
      const int64_t items = static_cast<int64_t>(tiles.size()) * H;
      // The longest rows first (tiles later in a chunk read more keys): dynamic, from the end.
#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
      for (int64_t w = items - 1; w >= 0; --w) {
        const auto [i0, nt] = tiles[w / H];
        const int64_t h = w % H, last = i0 + nt - 1;
        const PagedRow<T> row{k_pages, v_pages, page_table + token_seq[i0] * ld_pt, h, H, P,
                              D, int64_t{token_pos[last]} + 1};
        if (nt == 1)
          attend_row_d128<D128<T>>(out + (i0 * H + h) * D, q + i0 * sq_n + h * sq_h, row, scale);
        else
          attend_tile_d128<D128<T>>(out + (i0 * H + h) * D, H * D, q + i0 * sq_n + h * sq_h,
                                    sq_n, row, nt, scale);
      }
      return Status::kOk;
    }
  }
#endif
#pragma omp parallel for schedule(dynamic, 4) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) attend(r);
  return Status::kOk;
}

template <typename T>
Status attention_int8(T* out, const T* q, const int8_t* k_pages, const int8_t* v_pages,
                      const float* k_scales, const float* v_scales, const int32_t* page_table,
                      const int32_t* token_seq, const int32_t* token_pos, int64_t N, int64_t H,
                      int64_t D, int64_t P, int64_t ld_pt, int64_t sq_n, int64_t sq_h,
                      float scale, int64_t G) {
  if (N < 0 || H < 0 || D < 1 || D > kMaxHeadDim || P < 1 || ld_pt < 0 || G < 1 || D % G)
    return Status::kInvalidArgument;
  const int64_t rows = N * H;
  if (rows == 0) return Status::kOk;
  if (out == nullptr || q == nullptr || k_pages == nullptr || v_pages == nullptr ||
      k_scales == nullptr || v_scales == nullptr || page_table == nullptr ||
      token_seq == nullptr || token_pos == nullptr)
    return Status::kInvalidArgument;
  bool several = false;  // a sequence with several tokens in this step (a prefill chunk)
  for (int64_t i = 0; i < N; ++i) {
    if (token_seq[i] < 0 || token_pos[i] < 0 || token_pos[i] / P >= ld_pt)
      return Status::kInvalidArgument;
    several = several || (i > 0 && token_seq[i] == token_seq[i - 1]);
  }
  // Every (token, head) row alone, by one function of its own keys: a token's bits do not depend
  // on how the step is chunked or packed. (A prefill chunk re-reads its keys per token; the
  // 16-bit kernels' tiles would cut that.)
  const Int8RowFn<T> fn = int8_row_fn<T>(D, G);
  auto attend = [&](int64_t r) {
    const int64_t h = r % H, i = r / H;
    const Int8Row row{k_pages, v_pages, k_scales, v_scales, page_table + token_seq[i] * ld_pt,
                      h, H, P, D, G, int64_t{token_pos[i]} + 1};
    fn(out + r * D, q + i * sq_n + h * sq_h, row, scale);
  };
  if (!several) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) attend(r);
    return Status::kOk;
  }
  // Causal rows grow with the position: dynamic, the longest (the last tokens') first.
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1)
  for (int64_t r = rows - 1; r >= 0; --r) attend(r);
  return Status::kOk;
}

#define QF_INSTANTIATE(T)                                                                   \
  template Status attention_int8<T>(T*, const T*, const int8_t*, const int8_t*, const float*, \
                                    const float*, const int32_t*, const int32_t*,          \
                                    const int32_t*, int64_t, int64_t, int64_t, int64_t,    \
                                    int64_t, int64_t, int64_t, float, int64_t);           \
  template Status attention<T>(T*, const T*, const T*, const T*, const int32_t*,            \
                               const int32_t*, const int32_t*, int64_t, int64_t, int64_t,   \
                               int64_t, int64_t, int64_t, int64_t, float);
QF_INSTANTIATE(float)
QF_INSTANTIATE(bf16)
QF_INSTANTIATE(fp16)
#undef QF_INSTANTIATE

}  // namespace qf::cpu
