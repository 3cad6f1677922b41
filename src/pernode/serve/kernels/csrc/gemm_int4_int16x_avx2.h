#pragma once
// int4 weights x int16 activations for compute-bound steps (prefill chunks, large decode batches) on CPUs with AVX2
// but not AVX-512: vpmaddwd multiplies 16 int16 pairs per instruction, and on Zen 3 two of them with their int32
// adds issue per cycle, ~1.7x the MACs of two fp32 FMAs (benchmarks/gemm_isa.py). The dequantised-tile fp32 GEMM
// (dequant_tiles.h) reached ~70% of the fp32 peak; this one multiplies the stored nibbles as integers instead.
//
// x is quantised per 32-value block to int16 (q = rint(x * 32767 / amax)): ~1e-5 of the block's largest |x|, where
// int8 x (~4e-3) flips the default model's near-tie chat answer when it prefills the prompt. Per block b and
// weight row n (zt: the zero term, the GGUF min or -8 * scale without one):
//
//   y[m, n] = sum_b  cvt(dot_b(u[n], q[m])) * (scale[n, b] * sx[m, b])  +  zt[n, b] * sum_b(x[m])
//
// with the block's integer dot exact in int32 and in fp32 (32 * 15 * 32767 < 2^24), and sum_b(x) the block's float
// sum. A register-blocked micro-kernel in the manner of Goto & van de Geijn, "Anatomy of high-performance matrix
// multiplication" (TOMS 2008): output columns in the 8 lanes, 2 strips of 8 columns share each x broadcast, and 3 x
// rows share each weight load (12 accumulators + 2 weights + 1 x of the 16 registers). Each strip is unpacked once
// per call into int16 pairs, so every x row after the first reuses it from cache. Each (x row, output column)
// accumulates in the same order whatever the rows beside it: a row's result does not depend on its batch.

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PERNODE_AVX2_INT16X_GEMM 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "int8_input.h"  // load_block_amax_avx2

namespace pernode {
namespace quant {
namespace {

constexpr int64_t kStripCols = 8;      // output columns per strip: one vector's lanes
constexpr int64_t kPanelStripsI16 = 2;  // strips sharing each x broadcast (NR)
constexpr int64_t kPanelRowsI16 = 4;    // x rows sharing each weight load (MR)
constexpr int64_t kPairsPerBlock = 16;  // 32 values as 16 int16 pairs

// x per row and 32-value block: 16 dwords, pair p = 4d + i holding (x[8d + i], x[8d + i + 4]) as two int16 (the
// order a weight word's nibbles unpack in, see pack_strip), the block's scale and the sum of its float values.
struct Int16Pairs {
  int64_t blocks;
  std::vector<int32_t> pairs;     // [M][blocks][16]
  std::vector<float> scale, sum;  // [M][blocks]
};

// Rows [m0, m1) of x into xp (sized for all of them).
inline void int16_pairs_rows(const float* x, int64_t K, int64_t m0, int64_t m1, Int16Pairs& xp) {
  const __m128i low16 = _mm_set1_epi32(0xFFFF);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t b = 0; b < xp.blocks; ++b) {
      __m256 v[4];  // v[d]: values 8d..8d+7 of the block
      const float amax = load_block_amax_avx2(x + m * K + 32 * b, v);
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      int32_t* dst = xp.pairs.data() + (m * xp.blocks + b) * kPairsPerBlock;
      for (int d = 0; d < 4; ++d) {  // rounds to nearest even; |x * inv| <= 32767 up to one ulp
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[d], _mm256_set1_ps(inv)));
        const __m128i pair = _mm_or_si128(_mm_and_si128(_mm256_castsi256_si128(q), low16),
                                          _mm_slli_epi32(_mm256_extracti128_si256(q, 1), 16));
        _mm_storeu_si128((__m128i*)(dst + 4 * d), pair);
      }
      const __m256 s = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      xp.scale[m * xp.blocks + b] = amax / 32767.f;
      xp.sum[m * xp.blocks + b] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
}

inline Int16Pairs int16_pairs_alloc(int64_t M, int64_t K) {
  Int16Pairs xp;
  xp.blocks = K / 32;
  xp.pairs.resize(M * K / 2);
  xp.scale.resize(M * xp.blocks);
  xp.sum.resize(M * xp.blocks);
  return xp;
}

inline Int16Pairs int16_pairs(const float* x, int64_t M, int64_t K) {
  Int16Pairs xp = int16_pairs_alloc(M, K);
  int16_pairs_rows(x, K, 0, M, xp);
  return xp;
}

// Words 4b..4b+3 of 8 weight rows (nullptr: a row past N, read as zeros) transposed by unpacks: z[d] holds word d
// of each row, lane = row.
inline void transpose_words_8x4(const int32_t* const (&row)[8], int64_t b, __m256i (&z)[4]) {
  static const int32_t zeros[4] = {0, 0, 0, 0};
  __m256i a[4];  // a[r] = [row r words 0-3 | row r + 4 words 0-3]
  for (int r = 0; r < 4; ++r) {
    const int32_t* lo = row[r] ? row[r] + 4 * b : zeros;
    const int32_t* hi = row[r + 4] ? row[r + 4] + 4 * b : zeros;
    a[r] = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)hi), _mm_loadu_si128((const __m128i*)lo));
  }
  const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpacklo_epi32(a[2], a[3]);
  const __m256i t2 = _mm256_unpackhi_epi32(a[0], a[1]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
  z[0] = _mm256_unpacklo_epi64(t0, t1), z[1] = _mm256_unpackhi_epi64(t0, t1);
  z[2] = _mm256_unpacklo_epi64(t2, t3), z[3] = _mm256_unpackhi_epi64(t2, t3);
}

// The first word of each of the strip's 8 weight rows, nullptr past N.
inline void strip_rows(const int32_t* w, int64_t N, int64_t K, int64_t n0, const int32_t* (&row)[8]) {
  for (int r = 0; r < 8; ++r) row[r] = n0 + r < N ? w + (n0 + r) * (K / 8) : nullptr;
}

inline float qparam_f32(float v) { return v; }
inline float qparam_f32(uint16_t h) { return _cvtsh_ss(h); }  // fp16 bits

// Block b's scale and zero term of the strip's rows (lane = row; 0 past N): fp32 or fp16-bit qparams [N, G].
template <typename S>
inline void strip_qparams(const S* scale, const S* bias, int64_t N, int64_t G, int64_t gs, int64_t n0, int64_t b,
                          float* sw, float* zt) {
  for (int r = 0; r < 8; ++r) {
    const int64_t n = n0 + r, at = n * G + b * 32 / gs;
    const float s = n < N ? qparam_f32(scale[at]) : 0.f;
    sw[b * kStripCols + r] = s;
    zt[b * kStripCols + r] = n >= N ? 0.f : bias ? qparam_f32(bias[at]) : -8.f * s;
  }
}

// One block's integer dots (dot, fp32, lane = column) into a strip row's totals in L1: tot += dot * (s * sx) + z * xsum,
// with s/z the block's weight scales and zero terms (lanes) and sx/xsum the x row's block scale and sum.
inline void add_block(float* tot, __m256 dot, __m256 s, __m256 z, float sx, float xsum) {
  const __m256 t = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_set1_ps(sx)), _mm256_load_ps(tot));
  _mm256_store_ps(tot, _mm256_fmadd_ps(z, _mm256_set1_ps(xsum), t));
}

// MR rows of one strip's totals into y [., N] at column c0, the columns past N left alone.
template <int MR>
inline void store_strip(const float (&tot)[MR][kStripCols], float* y, int64_t N, int64_t m0, int64_t c0) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i cols = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(std::min<int64_t>(N - c0, 8))), lane);
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) _mm256_maskstore_ps(y + (m0 + r) * N + c0, cols, _mm256_load_ps(tot[r]));
}

// ---- the drivers both AVX2 panel kernels share ------------------------------------------------------------------
// A Kernel names its x (X), how many 8-lane vectors a packed strip holds per 32-value block (kVectors), how one
// block's transposed words become them (unpack) and its micro-kernel (block<MR, NR>: MR x rows against NR strips).

// Weight rows [n0, n0 + 8) (rows past N as zeros) as [blocks][Kernel::kVectors][8 lanes], lane = row, by an 8 x 4-word
// transpose per block; and the strip's scale and zero term per block, lane = row.
template <typename Kernel, typename S>
void pack_strip(const int32_t* w, const S* scale, const S* bias, int64_t N, int64_t K, int64_t G, int64_t gs,
                int64_t n0, int32_t* dst, float* sw, float* zt) {
  const int32_t* row[8];
  strip_rows(w, N, K, n0, row);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256i z[4];
    transpose_words_8x4(row, b, z);
    Kernel::unpack(z, dst + b * Kernel::kVectors * kStripCols);
    strip_qparams(scale, bias, N, G, gs, n0, b, sw, zt);
  }
}

template <typename Kernel, int NR>
void panel_rows(const typename Kernel::X& x, int64_t m0, int64_t m1, const int32_t* wbuf, const float* sw,
                const float* zt, int64_t strip_words, int64_t strip_params, float* y, int64_t N, int64_t n0) {
  for (; m0 + kPanelRowsI16 <= m1; m0 += kPanelRowsI16)
    Kernel::template block<kPanelRowsI16, NR>(x, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0);
  switch (m1 - m0) {
    case 1: Kernel::template block<1, NR>(x, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    case 2: Kernel::template block<2, NR>(x, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    case 3: Kernel::template block<3, NR>(x, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0); break;
    default: break;
  }
  static_assert(kPanelRowsI16 == 4, "the tail covers kPanelRowsI16 - 1 rows");
}

// x rows per pass over a thread's panels: their operands (~74-197 KB at K = 576-1536 for int16 x) stay in L2 while
// each panel's unpacked weights stream past them, instead of all of x streaming from L3 once per panel.
constexpr int64_t kChunkRowsI16 = 64;

// Panels [p0, p1) of 16 output columns for all M rows of x: y [M, N] fp32; qparams fp32 or fp16 bits [N, G] (bias
// may be null). The panels' weights are unpacked once, then multiplied by x kChunkRowsI16 rows at a time.
template <typename Kernel, typename S>
void run_panels(const typename Kernel::X& x, int64_t M, const int32_t* w, const S* scale, const S* bias, int64_t N,
                int64_t K, int64_t G, float* y, int64_t p0, int64_t p1) {
  const int64_t gs = K / G, strip_words = K / 32 * Kernel::kVectors * kStripCols;
  const int64_t strip_params = K / 32 * kStripCols, panel_cols = kPanelStripsI16 * kStripCols;
  const int64_t panel_words = kPanelStripsI16 * strip_words, panel_params = kPanelStripsI16 * strip_params;
  std::vector<int32_t> wbuf((p1 - p0) * panel_words);
  std::vector<float> sw((p1 - p0) * panel_params), zt((p1 - p0) * panel_params);
  for (int64_t p = p0; p < p1; ++p)
    for (int s = 0; s < kPanelStripsI16 && p * panel_cols + s * kStripCols < N; ++s) {
      const int64_t at = (p - p0) * panel_words + s * strip_words, pt = (p - p0) * panel_params + s * strip_params;
      pack_strip<Kernel>(w, scale, bias, N, K, G, gs, p * panel_cols + s * kStripCols, wbuf.data() + at,
                         sw.data() + pt, zt.data() + pt);
    }
  for (int64_t m0 = 0; m0 < M; m0 += kChunkRowsI16) {
    const int64_t m1 = std::min(M, m0 + kChunkRowsI16);
    for (int64_t p = p0; p < p1; ++p) {
      const int32_t* wp = wbuf.data() + (p - p0) * panel_words;
      const float *sp = sw.data() + (p - p0) * panel_params, *zp = zt.data() + (p - p0) * panel_params;
      const int64_t n0 = p * panel_cols;
      if (n0 + kStripCols < N)
        panel_rows<Kernel, 2>(x, m0, m1, wp, sp, zp, strip_words, strip_params, y, N, n0);
      else
        panel_rows<Kernel, 1>(x, m0, m1, wp, sp, zp, strip_words, strip_params, y, N, n0);
    }
  }
  static_assert(kPanelStripsI16 == 2, "a panel is two strips or its last one");
}

// ---- int16 x ----------------------------------------------------------------------------------------------------
// MR x rows from m0 against NR strips: y[m0 + r][n0 + 8 j + lane] for every block.
// Not inlined: inside its callers' loops the register allocator spilled the weight vectors (2x slower).
template <int MR, int NR>
__attribute__((noinline)) void int16x_block(const Int16Pairs& xp, int64_t m0, const int32_t* wbuf, const float* sw, const float* zt,
                         int64_t strip_words, int64_t strip_params, float* y, int64_t N, int64_t n0) {
  // the fp32 totals live in L1, not registers: the loop's 2 * MR * NR accumulators would not fit beside the weights
  alignas(32) float tot[NR][MR][kStripCols] = {};
  const int32_t* xq[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) xq[r] = xp.pairs.data() + (m0 + r) * xp.blocks * kPairsPerBlock;
  for (int64_t b = 0; b < xp.blocks; ++b) {
    __m256i acc[MR][NR];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_si256();
    const int32_t* wb[NR];  // one base per strip, so each load below is base + constant
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) wb[j] = wbuf + j * strip_words + b * kPairsPerBlock * kStripCols;
#pragma GCC unroll 16
    for (int p = 0; p < kPairsPerBlock; ++p) {
      __m256i wv[NR];
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) {
        wv[j] = _mm256_loadu_si256((const __m256i*)(wb[j] + p * kStripCols));
        asm("" : "+x"(wv[j]));  // one load per weight vector, not one folded into each of the MR multiplies
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256i xb = _mm256_set1_epi32(xq[r][b * kPairsPerBlock + p]);
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) {
          acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(wv[j], xb));
          // keeps each sum one chain in its register: left alone, the compiler reassociates the integer adds into
          // trees of temporaries and spills them (measured 1.9x slower)
          asm("" : "+x"(acc[r][j]));
        }
      }
    }
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
      const __m256 s = _mm256_loadu_ps(sw + j * strip_params + b * kStripCols);
      const __m256 z = _mm256_loadu_ps(zt + j * strip_params + b * kStripCols);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (m0 + r) * xp.blocks + b;
        add_block(tot[j][r], _mm256_cvtepi32_ps(acc[r][j]), s, z, xp.scale[at], xp.sum[at]);
      }
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NR; ++j)
    if (n0 + j * kStripCols < N) store_strip<MR>(tot[j], y, N, m0, n0 + j * kStripCols);
}

// The int16-x GEMM as a Kernel: a strip per block is 16 vectors, pair p = 4d + i holding nibbles i and i + 4 of word
// d as two int16, (word >> 4i) & 0x000F000F, the order int16_pairs lays x out in.
struct Int16xKernel {
  using X = Int16Pairs;
  static constexpr int64_t kVectors = kPairsPerBlock;
  static void unpack(const __m256i (&z)[4], int32_t* out) {
    const __m256i mask = _mm256_set1_epi32(0x000F000F);
    for (int d = 0; d < 4; ++d)
      for (int i = 0; i < 4; ++i)
        _mm256_storeu_si256((__m256i*)(out + (4 * d + i) * kStripCols),
                            _mm256_and_si256(_mm256_srli_epi32(z[d], 4 * i), mask));
  }
  template <int MR, int NR>
  static void block(const X& x, int64_t m0, const int32_t* wbuf, const float* sw, const float* zt,
                    int64_t strip_words, int64_t strip_params, float* y, int64_t N, int64_t n0) {
    int16x_block<MR, NR>(x, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0);
  }
};

// Panels [p0, p1) of 16 output columns for all M rows of x: y [M, N] fp32. scale/bias: fp32 [N, G] (bias may be null).
inline void gemm_int4_int16x_avx2(const Int16Pairs& xp, int64_t M, const int32_t* w, const float* scale,
                                  const float* bias, int64_t N, int64_t K, int64_t G, float* y, int64_t p0,
                                  int64_t p1) {
  run_panels<Int16xKernel>(xp, M, w, scale, bias, N, K, G, y, p0, p1);
}

}  // namespace
}  // namespace quant
}  // namespace pernode
#endif
