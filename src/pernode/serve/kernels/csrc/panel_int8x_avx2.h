#pragma once
// int4 weights x int8 x, register-blocked over rows, for decode steps of many sequences on CPUs with AVX2 but not
// AVX-512: the AVX2 counterpart of the VNNI panel kernel (int4_panel_gemm.h). The int8-x GEMV (gemv_int8x_avx2.h)
// serves 8 rows per pass, so 48 rows re-read and re-unpack every weight 6 times; here each panel of 16 weight rows
// is unpacked once per call and multiplied by x 4 rows at a time.
//
// Same int8 x as the GEMV (QuantizedInput: the same values, scales and sums), read in place: for block b, the low-
// nibble plane holds its even values and the high plane its odd ones, so word d's low nibbles (values 8d, 8d+2, ..)
// meet one dword of the low plane and its high nibbles one dword of the high plane. Per 4 values and 8 output columns
// vpmaddubsw multiplies the nibbles (unsigned, <= 15) by x (|q| <= 127) and adds pairs: the block's 8 products per
// lane sum in int16 (8 * 2 * 15 * 127 = 30480 fits) before one vpmaddwd widens them. Per block b and weight row n:
//
//   y[m, n] = sum_b  cvt(dot_b(u[n], q[m])) * (scale[n, b] * sx[m, b])  +  zt[n, b] * xsum[m, b]
//
// (zt: the zero term, the GGUF min or -8 * scale; xsum: the block's sum of dequantized x). The GEMV computes the same
// integers; only the order of the fp32 additions differs. Each (x row, output column) accumulates in the same order
// whatever the rows beside it.

#include "gemm_int4_int16x_avx2.h"  // run_panels and the strip helpers both kernels share

#if defined(PERNODE_AVX2_INT16X_GEMM)  // AVX2 + FMA without AVX-512
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int8_input.h"

namespace pernode {
namespace quant {
namespace {

constexpr int64_t kNibbleVectors = 8;  // per 32-value block: 4 words x (low, high) nibble planes

// The panel's view of x: QuantizedInput's int4 layout in place, and each block's scale and dequantized sum.
struct Int8Blocks {
  const int8_t* bytes;
  int64_t row_bytes, blocks;
  std::vector<float> scale, sum;  // [M][blocks]
};

inline Int8Blocks int8_blocks(const QuantizedInput& qi, int64_t M, int64_t K) {
  Int8Blocks xb{qi.bytes.data(), qi.row_bytes, K / 32, {}, {}};
  xb.scale.resize(M * xb.blocks);
  xb.sum.resize(M * xb.blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < xb.blocks; ++b) {  // lanes 4b..4b+3 hold block b's values, 8 each
      const float* lanes = qi.lane_sum.data() + m * qi.row_lanes + 4 * b;
      xb.scale[m * xb.blocks + b] = qi.lane_scale[m * qi.row_lanes + 4 * b];
      xb.sum[m * xb.blocks + b] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    }
  return xb;
}

// MR x rows from m0 against NR strips, every block. Not inlined, as int16x_block and for the same reason.
template <int MR, int NR>
__attribute__((noinline)) void int8x_block(const Int8Blocks& xb, int64_t m0, const int32_t* wbuf, const float* sw,
                                           const float* zt, int64_t strip_words, int64_t strip_params, float* y,
                                           int64_t N, int64_t n0) {
  alignas(32) float tot[NR][MR][kStripCols] = {};  // in L1: see int16x_block
  const int8_t* xr[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) xr[r] = xb.bytes + (m0 + r) * xb.row_bytes;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < xb.blocks; ++b) {
    const int64_t xo = b / 4 * 128 + (b % 4) * 16;  // block b's even values in the chunk's low plane; odd at + 64
    __m256i acc[MR][NR];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_si256();
    const int32_t* wb[NR];
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) wb[j] = wbuf + j * strip_words + b * kNibbleVectors * kStripCols;
#pragma GCC unroll 8
    for (int v = 0; v < kNibbleVectors; ++v) {  // v = 2d + plane
      __m256i wv[NR];
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) {
        wv[j] = _mm256_loadu_si256((const __m256i*)(wb[j] + v * kStripCols));
        asm("" : "+x"(wv[j]));  // as in int16x_block: one load per weight vector
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int32_t quad;
        std::memcpy(&quad, xr[r] + xo + (v % 2) * 64 + 4 * (v / 2), 4);
        const __m256i xq = _mm256_set1_epi32(quad);
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) {
          acc[r][j] = _mm256_add_epi16(acc[r][j], _mm256_maddubs_epi16(wv[j], xq));
          asm("" : "+x"(acc[r][j]));  // as in int16x_block: one add chain per accumulator
        }
      }
    }
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
      const __m256 s = _mm256_loadu_ps(sw + j * strip_params + b * kStripCols);
      const __m256 z = _mm256_loadu_ps(zt + j * strip_params + b * kStripCols);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (m0 + r) * xb.blocks + b;
        add_block(tot[j][r], _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][j], ones)), s, z, xb.scale[at], xb.sum[at]);
      }
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NR; ++j)
    if (n0 + j * kStripCols < N) store_strip<MR>(tot[j], y, N, m0, n0 + j * kStripCols);
}

// The int8-x panel as a Kernel: a strip per block is 8 vectors of u8 x 4, vector 2d holding word d's low nibbles
// (lane = row), 2d + 1 its high nibbles: the values that meet one dword of x's low and high plane.
struct Int8xKernel {
  using X = Int8Blocks;
  static constexpr int64_t kVectors = kNibbleVectors;
  static void unpack(const __m256i (&z)[4], int32_t* out) {
    const __m256i nibbles = _mm256_set1_epi8(0x0F);
    for (int d = 0; d < 4; ++d) {
      _mm256_storeu_si256((__m256i*)(out + 2 * d * kStripCols), _mm256_and_si256(z[d], nibbles));
      _mm256_storeu_si256((__m256i*)(out + (2 * d + 1) * kStripCols),
                          _mm256_and_si256(_mm256_srli_epi16(z[d], 4), nibbles));
    }
  }
  template <int MR, int NR>
  static void block(const X& x, int64_t m0, const int32_t* wbuf, const float* sw, const float* zt,
                    int64_t strip_words, int64_t strip_params, float* y, int64_t N, int64_t n0) {
    int8x_block<MR, NR>(x, m0, wbuf, sw, zt, strip_words, strip_params, y, N, n0);
  }
};

// Panels [p0, p1) of 16 output columns for all M rows of x: y [M, N] fp32; qparams fp32 or fp16 bits [N, G].
template <typename S>
void panel_int8x_avx2(const Int8Blocks& xb, int64_t M, const int32_t* w, const S* scale, const S* bias, int64_t N,
                      int64_t K, int64_t G, float* y, int64_t p0, int64_t p1) {
  run_panels<Int8xKernel>(xb, M, w, scale, bias, N, K, G, y, p0, p1);
}

}  // namespace
}  // namespace quant
}  // namespace pernode
#endif
