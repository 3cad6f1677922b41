#pragma once
// Attention's two products by vdpbf16ps, straight from a bf16 cache, on CPUs with AVX512_BF16: q . k_t for the
// scores and sum_t p_t v_t for the output, in both of the kernel's paths (decode items: per-key dot products;
// prefill tiles: vectorised over rows). Included by paged_attention.h only.
//
// Widening bf16 keys and values to fp32 (a shuffle and a shift per 16 values, or a pass into an L1 buffer) and
// multiplying in fp32 cost more than the products themselves where few rows share each key (decodes), and half the
// bf16 unit's rate where many do (prefill). vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes in one instruction:
// twice the MACs of an fp32 FMA, with nothing widened.
//  * Scores: K is read as it lies, against q as bf16. The products of two bf16 are exact in fp32, so with a bf16 query
//    (a bf16 model) nothing is rounded that the fp32 path keeps; only the order of the additions differs. The softmax
//    scale is applied to the summed scores, so q stays exact whatever the scale.
//  * Output: two keys' values are interleaved into bf16 pairs (one unpack per 32 values) and multiplied by their
//    probabilities as a bf16 pair, as FlashAttention does on GPUs: p is rounded to bf16 (2^-9 relative), about the
//    rounding the bf16 output itself gets. The unpack leaves the lanes in a fixed permutation of head_dim, which the
//    item's output keeps until `unpermute_output` puts it back in order at the end.

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PERNODE_BF16_DOT 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attention_block_math.h"  // reduce_parked_scores
#include "attention_lanes.h"

namespace pernode {
namespace attention {
namespace {

inline __m512bh load_bf16_pairs(const void* p) { return (__m512bh)_mm512_loadu_si512(p); }

// s[r * ld + t] = scale * (q_r . k_t) for rows of bf16 q [rows][kD] against nk bf16 keys `k_stride` apart. Per (row,
// key) a vector of partial sums is parked in `tmp` and reduced kLanes keys at a time, as in scores_by_key; the rows
// of the block ahead (`next`) are requested one per key.
template <int kD, typename Next>
void scores_by_key_bf16(const c10::BFloat16* q, int rows, float scale, const c10::BFloat16* k, int64_t k_stride,
                        int nk, float* s, int ld, float* tmp, const Next& next) {
  static_assert(kD % 32 == 0, "a key is read 32 bf16 values at a time");
  constexpr int kNv = kD / 32;
  for (int c = 0; c < nk; c += kLanes) {
    const int n = std::min(kLanes, nk - c);
    for (int t = 0; t < n; ++t) {
      if (next.k && c + t < next.rows) next.fetch_row(c + t);
      const c10::BFloat16* kt = k + (c + t) * k_stride;
      __m512bh kv[kNv];
      for (int j = 0; j < kNv; ++j) kv[j] = load_bf16_pairs(kt + 32 * j);
      for (int r = 0; r < rows; ++r) {
        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), load_bf16_pairs(q + r * kD), kv[0]);
        for (int j = 1; j < kNv; ++j) acc = _mm512_dpbf16_ps(acc, load_bf16_pairs(q + r * kD + 32 * j), kv[j]);
        _mm512_storeu_ps(tmp + (r * kLanes + t) * kLanes, acc);
      }
    }
    reduce_parked_scores(tmp, rows, n, scale, s + c, ld);
  }
  next.fetch_rows(nk);
}

// Row r's probabilities p[r * ld + t], t < n, as bf16 pairs: pairs[r * ld / 2 + t / 2] = (p_t, p_t+1), zero past n.
inline void probability_pairs(const float* p, int rows, int ld, int n, uint32_t* pairs) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; c += 32) {
      const __mmask16 lo = n - c >= 16 ? 0xFFFF : __mmask16((1u << (n - c)) - 1u);
      const __mmask16 hi = n - c >= 32 ? 0xFFFF : n - c <= 16 ? 0 : __mmask16((1u << (n - c - 16)) - 1u);
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, p + r * ld + c + 16),
                                             _mm512_maskz_loadu_ps(lo, p + r * ld + c));
      _mm512_storeu_si512(pairs + r * (ld / 2) + c / 2, (__m512i)b);
    }
}

// Value pairs read straight from the cache (decode: each pair of keys is read once per 4 rows, so unpacking them on
// the fly costs nothing extra): the two value rows t, t+1 interleaved into bf16 pairs, 64 columns from c0.
struct CacheValuePairs {
  const c10::BFloat16* v;
  int64_t stride;
  int nk;
  void operator()(int t, int c0, __m512bh (&vp)[4]) const {
    for (int g = 0; g < 2; ++g) {
      const __m512i a = _mm512_loadu_si512(v + t * stride + c0 + 32 * g);
      // a key past nk is never read: its probability is 0, but its memory could hold a NaN
      const __m512i b = t + 1 < nk ? _mm512_loadu_si512(v + (t + 1) * stride + c0 + 32 * g) : _mm512_setzero_si512();
      vp[2 * g] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      vp[2 * g + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
  }
};

// Value pairs unpacked once per block into a buffer [nk / 2][kD] (prefill: every 4 rows of a 64-row tile reuse them).
struct BufferValuePairs {
  const uint32_t* buf;
  int d;
  void operator()(int t, int c0, __m512bh (&vp)[4]) const {
    for (int j = 0; j < 4; ++j) vp[j] = load_bf16_pairs(buf + (t / 2) * d + c0 + 16 * j);
  }
};

template <int kD>
void fill_value_pairs(const c10::BFloat16* v, int64_t stride, int nk, uint32_t* buf) {
  const CacheValuePairs from_cache{v, stride, nk};
  for (int t = 0; t < nk; t += 2)
    for (int c0 = 0; c0 < kD; c0 += 64) {
      __m512bh vp[4];
      from_cache(t, c0, vp);
      for (int j = 0; j < 4; ++j) _mm512_storeu_si512(buf + (t / 2) * kD + c0 + 16 * j, (__m512i)vp[j]);
    }
}

// o[r] += sum_t p_t v_t over the 64 columns [c0, c0 + 64) of head_dim, kRows rows held in registers: per pair of
// keys, one vdpbf16ps per 16 lanes and row against the row's probability pair pairs[r * p_r + (t / 2) * p_t2]. o's
// lanes are permuted as `unpermute_output` describes.
template <int kRows, typename ValuePairs>
inline void pv_bf16_rows(const uint32_t* pairs, int64_t p_r, int64_t p_t2, const ValuePairs& values, int nk, float* o,
                         int d, int c0) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_loadu_ps(o + r * d + c0 + 16 * j);
  for (int t = 0; t < nk; t += 2) {
    __m512bh vp[4];
    values(t, c0, vp);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(int(pairs[r * p_r + (t / 2) * p_t2]));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], vp[j], pr);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + r * d + c0 + 16 * j, acc[r][j]);
}

// o[r] += sum_t p_t v_t for every row, 4 rows and 64 columns at a time. nk is odd only at a sequence's end.
template <int kD, typename ValuePairs>
void pv_bf16(const uint32_t* pairs, int64_t p_r, int64_t p_t2, const ValuePairs& values, int nk, float* o, int rows) {
  static_assert(kD % 64 == 0, "values are read 64 columns at a time");
  for (int c0 = 0; c0 < kD; c0 += 64) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) pv_bf16_rows<4>(pairs + r * p_r, p_r, p_t2, values, nk, o + r * kD, kD, c0);
    switch (rows - r) {
      case 3: pv_bf16_rows<3>(pairs + r * p_r, p_r, p_t2, values, nk, o + r * kD, kD, c0); break;
      case 2: pv_bf16_rows<2>(pairs + r * p_r, p_r, p_t2, values, nk, o + r * kD, kD, c0); break;
      case 1: pv_bf16_rows<1>(pairs + r * p_r, p_r, p_t2, values, nk, o + r * kD, kD, c0); break;
      default: break;
    }
  }
}

// ---- prefill: many rows, vectorised over rows ----

// q rows (bf16, `stride` elements apart) as pairs transposed: qtp[j * mp + r] = (q[r][2j], q[r][2j + 1]); rows past
// `rows` are zero.
inline void transpose_q_pairs(const c10::BFloat16* q, int64_t stride, int rows, int mp, int d, uint32_t* qtp) {
  for (int j = 0; j < d / 2; ++j) {
    for (int r = 0; r < rows; ++r) std::memcpy(qtp + j * mp + r, q + r * stride + 2 * j, sizeof(uint32_t));
    for (int r = rows; r < mp; ++r) qtp[j * mp + r] = 0;
  }
}

// s[t * mp + r] = scale * (q_r . k_t), kKeys keys at a time: each q pair vector is loaded once per pass and each key
// pair, read from the cache as it lies, is a broadcast.
template <int kD, int kKeys>
inline void scores_by_row_bf16_pass(const uint32_t* qtp, int mp, const c10::BFloat16* k, int64_t k_stride, float scale,
                                    float* s) {
  for (int rv = 0; rv < mp; rv += kLanes) {
    __m512 acc[kKeys];
    for (int i = 0; i < kKeys; ++i) acc[i] = _mm512_setzero_ps();
    for (int j = 0; j < kD / 2; ++j) {
      const __m512bh qv = load_bf16_pairs(qtp + j * mp + rv);
      for (int i = 0; i < kKeys; ++i) {
        int32_t kp;
        std::memcpy(&kp, k + i * k_stride + 2 * j, sizeof kp);
        acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_set1_epi32(kp));
      }
    }
    for (int i = 0; i < kKeys; ++i) _mm512_storeu_ps(s + i * mp + rv, _mm512_mul_ps(acc[i], _mm512_set1_ps(scale)));
  }
}

template <int kD, int kKeysPerPass>
void scores_by_row_bf16(const uint32_t* qtp, int mp, const c10::BFloat16* k, int64_t k_stride, int nk, float scale,
                        float* s) {
  int t = 0;
  for (; t + kKeysPerPass <= nk; t += kKeysPerPass)
    scores_by_row_bf16_pass<kD, kKeysPerPass>(qtp, mp, k + t * k_stride, k_stride, scale, s + t * mp);
  for (; t < nk; ++t) scores_by_row_bf16_pass<kD, 1>(qtp, mp, k + t * k_stride, k_stride, scale, s + t * mp);
}

// Probabilities s[t * mp + r] as bf16 pairs over keys: pairs[(t / 2) * mp + r] = (p[t][r], p[t + 1][r]), 0 past nk.
inline void probability_pairs_by_row(const float* s, int mp, int nk, uint32_t* pairs) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int t = 0; t < nk; t += 2)
    for (int rv = 0; rv < mp; rv += kLanes) {
      const __m512 a = _mm512_loadu_ps(s + t * mp + rv);
      const __m512 b = t + 1 < nk ? _mm512_loadu_ps(s + (t + 1) * mp + rv) : _mm512_setzero_ps();
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's 16 in the low half, b's in the high
      _mm512_storeu_si512(pairs + (t / 2) * mp + rv, _mm512_permutexvar_epi16(idx, ab));
    }
}

// pv_bf16's lanes back in head_dim order. Within each 32 columns, unpacklo/unpackhi work per 128-bit lane L: lane
// 4L + i of the "lo" vector holds column 8L + i, of the "hi" vector column 8L + 4 + i.
template <int kD>
void unpermute_output(float* o, int rows) {
  float tmp[kD];
  for (int r = 0; r < rows; ++r) {
    float* orow = o + r * kD;
    for (int g = 0; g < kD; g += 32)
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 16; ++j) tmp[g + 8 * (j / 4) + 4 * h + j % 4] = orow[g + 16 * h + j];
    std::memcpy(orow, tmp, sizeof tmp);
  }
}

}  // namespace
}  // namespace attention
}  // namespace pernode
#endif
