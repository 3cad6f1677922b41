#pragma once
// int8 weights x int16 activations for many rows on AVX-512 VNNI: vpdpwssd multiplies 16 pairs of int16 and adds
// them into 16 int32 lanes, the bf16 unit's MACs per cycle (benchmarks/gemm_isa.py), with exact integer products.
// It serves the Q8_0 lm_head of large decode steps, whose logits stay fp32 (models/fp32_logits.py): the float-x
// GEMV re-reads the 49152 x 576 table once per 8 rows, and a bf16 tile GEMM would round every w = q * scale to
// 8 bits of mantissa and x to bf16.
//
// x is quantised per 32-value block to int16 (q = rint(x * 32767 / amax)): ~1e-5 of the block's largest |x|, the
// logits within ~2e-3 of fp32's where int8 x moves them by ~0.09 (docs/benchmarks.md). Per block b and weight row n:
//
//   y[m, n] = sum_b  cvt(dot_b(w[n], q[m])) * (scale[n, b] * sx[m, b])  +  zt[n, b] * sum_b(x[m])
//
// (zt: the zero term of asymmetric int8, absent for Q8_0), the block's integer dot exact in int32 and in fp32
// (32 * 128 * 32767 < 2^28, and cvt rounds only past 2^24: at most 1 ulp of the block's sum). A register-blocked
// micro-kernel in the manner of Goto & van de Geijn, "Anatomy of high-performance matrix multiplication" (TOMS 2008):
// output columns in the 16 lanes, 2 strips share each x broadcast and 6 x rows each weight load (12 int32 and 12
// fp32 accumulators). Each strip of 16 weight rows is sign-extended to int16 pairs and transposed once per call, then
// every x row multiplies it from cache. A row's result does not depend on the rows beside it.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PERNODE_AVX512_INT16X_GEMM 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pernode {
namespace quant {
namespace {

constexpr int64_t kLanes = 16;        // output columns per strip: one vector's lanes
constexpr int64_t kStripsW8 = 2;      // strips sharing each x broadcast (NR)
constexpr int64_t kRowsW8 = 6;        // x rows sharing each weight load (MR)
constexpr int64_t kBlockPairs = 16;   // 32 values as 16 int16 pairs

// x per row and 32-value block: 16 dwords, pair p holding (x[2p], x[2p + 1]) as int16, the block's scale and the sum
// of its float values.
struct Int16Rows {
  int64_t blocks;
  std::vector<int32_t> pairs;     // [M][blocks][16]
  std::vector<float> scale, sum;  // [M][blocks]
};

inline Int16Rows int16_rows(const float* x, int64_t M, int64_t K) {
  Int16Rows xr;
  xr.blocks = K / 32;
  xr.pairs.resize(M * K / 2);
  xr.scale.resize(M * xr.blocks);
  xr.sum.resize(M * xr.blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < xr.blocks; ++b) {
      const float* src = x + m * K + 32 * b;
      const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
      // rounds to nearest even; |x * inv| <= 32767 up to one ulp, which the saturating narrow absorbs
      const __m256i q0 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)));
      const __m256i q1 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
      int32_t* dst = xr.pairs.data() + (m * xr.blocks + b) * kBlockPairs;
      _mm256_storeu_si256((__m256i*)dst, q0);  // values 0-15 in order: pairs 0-7
      _mm256_storeu_si256((__m256i*)(dst + 8), q1);
      xr.scale[m * xr.blocks + b] = amax / 32767.f;
      xr.sum[m * xr.blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    }
  return xr;
}

// r[i] (dword p: row i's pair p) -> r[p] (lane i: row i's pair p), a 16 x 16 transpose of dwords: 4 x 4 transposes
// inside each 128-bit lane by unpacks, then the lanes gathered across the vectors by 128-bit shuffles.
inline void transpose_16x16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], lane L: rows 4i..4i+3 of column 4L + j
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a0 = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i a1 = _mm512_shuffle_i32x4(u[j], u[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i b0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i b1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    r[j] = _mm512_shuffle_i32x4(a0, b0, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + j] = _mm512_shuffle_i32x4(a0, b0, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + j] = _mm512_shuffle_i32x4(a1, b1, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + j] = _mm512_shuffle_i32x4(a1, b1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Weight rows [n0, n0 + 16) (rows past N as zeros) as [blocks][16 pairs][16 lanes] int16 pairs, lane = row, and the
// strip's scale and zero term per block (lane = row; 0 past N). qparams [N, G], fp32; bias may be null.
inline void pack_strip_w8(const int8_t* w, const float* scale, const float* bias, int64_t N, int64_t K, int64_t G,
                          int64_t n0, int32_t* dst, float* sw, float* zt) {
  const int64_t gs = K / G;
  // the next strip's rows, requested while this one is transposed: 16 rows read a block at a time are 16 streams,
  // more than the hardware prefetchers follow
  for (int64_t n = n0 + 16; n < std::min(N, n0 + 32); ++n)
    for (int64_t c = 0; c < K; c += 64) _mm_prefetch(reinterpret_cast<const char*>(w + n * K + c), _MM_HINT_T0);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = n0 + i < N ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + (n0 + i) * K + 32 * b)))
                        : _mm512_setzero_si512();
    transpose_16x16(r);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + (b * kBlockPairs + p) * kLanes, r[p]);
  }
  const int rows = int(std::min<int64_t>(16, N - n0));
  for (int64_t b = 0; b < K / 32; ++b) {  // qparams of the group holding block b, lane = row
    const int64_t g = b * 32 / gs;
    for (int i = 0; i < 16; ++i) {
      sw[b * kLanes + i] = i < rows ? scale[(n0 + i) * G + g] : 0.f;
      zt[b * kLanes + i] = i < rows && bias ? bias[(n0 + i) * G + g] : 0.f;
    }
  }
}

// MR x rows from m0 against NR strips: y[m0 + r][n0 + 16 j + lane], every block.
template <int MR, int NR, bool kBias>
__attribute__((noinline)) void w8_block(const Int16Rows& xr, int64_t m0, const int32_t* wbuf, const float* sw,
                                        const float* zt, int64_t strip_words, int64_t strip_params, float* y,
                                        int64_t N, int64_t n0) {
  __m512 tot[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) tot[r][j] = _mm512_setzero_ps();
  const int32_t* xq[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) xq[r] = xr.pairs.data() + (m0 + r) * xr.blocks * kBlockPairs;
  for (int64_t b = 0; b < xr.blocks; ++b) {
    __m512i acc[MR][NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int p = 0; p < kBlockPairs; ++p) {
      __m512i wv[NR];
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(wbuf + j * strip_words + (b * kBlockPairs + p) * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xb = _mm512_set1_epi32(xq[r][b * kBlockPairs + p]);
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpwssd_epi32(acc[r][j], wv[j], xb);
      }
    }
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
      const __m512 s = _mm512_loadu_ps(sw + j * strip_params + b * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (m0 + r) * xr.blocks + b;
        tot[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), _mm512_mul_ps(s, _mm512_set1_ps(xr.scale[at])),
                                    tot[r][j]);
        if (kBias)
          tot[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(zt + j * strip_params + b * kLanes),
                                      _mm512_set1_ps(xr.sum[at]), tot[r][j]);
      }
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NR; ++j) {
    const int64_t c0 = n0 + j * kLanes;
    if (c0 >= N) break;
    const __mmask16 cols = (__mmask16)(N - c0 >= 16 ? 0xFFFF : ((1u << (N - c0)) - 1u));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * N + c0, cols, tot[r][j]);
  }
}

template <int NR, bool kBias>
void w8_rows(const Int16Rows& xr, int64_t M, const int32_t* wbuf, const float* sw, const float* zt,
             int64_t strip_words, int64_t strip_params, float* y, int64_t N, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kRowsW8 <= M; m0 += kRowsW8)
    w8_block<kRowsW8, NR, kBias>(xr, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0);
  switch (M - m0) {
    case 1: w8_block<1, NR, kBias>(xr, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    case 2: w8_block<2, NR, kBias>(xr, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    case 3: w8_block<3, NR, kBias>(xr, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    case 4: w8_block<4, NR, kBias>(xr, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    case 5: w8_block<5, NR, kBias>(xr, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    default: break;
  }
  static_assert(kRowsW8 == 6, "the tail covers kRowsW8 - 1 rows");
}

// Panels [p0, p1) of 32 output columns for all M rows: each panel's two strips packed, then every row multiplied.
// y [M, N] fp32; w int8 [N, K]; qparams fp32 [N, G] (bias may be null).
inline void gemm_int8_int16x_avx512(const Int16Rows& xr, int64_t M, const int8_t* w, const float* scale,
                                    const float* bias, int64_t N, int64_t K, int64_t G, float* y, int64_t p0,
                                    int64_t p1) {
  const int64_t strip_words = K / 2 * kLanes, strip_params = K / 32 * kLanes, panel_cols = kStripsW8 * kLanes;
  std::vector<int32_t> wbuf(kStripsW8 * strip_words);
  std::vector<float> sw(kStripsW8 * strip_params), zt(kStripsW8 * strip_params);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * panel_cols;
    const int strips = n0 + kLanes < N ? 2 : 1;
    for (int s = 0; s < strips; ++s)
      pack_strip_w8(w, scale, bias, N, K, G, n0 + s * kLanes, wbuf.data() + s * strip_words,
                    sw.data() + s * strip_params, zt.data() + s * strip_params);
    if (strips == 2 && bias)
      w8_rows<2, true>(xr, M, wbuf.data(), sw.data(), zt.data(), strip_words, strip_params, y, N, n0);
    else if (strips == 2)
      w8_rows<2, false>(xr, M, wbuf.data(), sw.data(), zt.data(), strip_words, strip_params, y, N, n0);
    else if (bias)
      w8_rows<1, true>(xr, M, wbuf.data(), sw.data(), zt.data(), strip_words, strip_params, y, N, n0);
    else
      w8_rows<1, false>(xr, M, wbuf.data(), sw.data(), zt.data(), strip_words, strip_params, y, N, n0);
  }
  static_assert(kStripsW8 == 2, "a panel is two strips or its last one");
}

}  // namespace
}  // namespace quant
}  // namespace pernode
#endif
