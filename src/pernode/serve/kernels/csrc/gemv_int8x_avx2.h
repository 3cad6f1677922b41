#pragma once
// Integer GEMVs on CPUs with AVX2 but not AVX-512 VNNI, in place of unpacking, converting and FMA-ing each weight:
//  * int4 weights x int8 x (the decode default): like llama.cpp's AVX2 Q4 x Q8 dot products, vpmaddubsw multiplies
//    32 nibbles (the unsigned side, <= 15) by 32 int8 x; the lo- and hi-nibble products are added in int16
//    (2 * 2 * 15 * 127 = 7620 fits) before one vpmaddwd widens them: one FMA per 64 weights.
//  * int8 weights x int16 x (what "float x" means for int8 weights here, e.g. the Q8_0 lm_head): the weights widened
//    to int16 and multiplied by vpmaddwd, one FMA per 32 weights; x per 32 values to ~1e-5 of the block's largest
//    |x|, where int8 x would flip the default model's near-tie first tokens.
// Both compute
//
//   y[m, n] = sum_b  cvt(dot_b) . (sx_b * sw_b)          8 lanes, the integer dot of each 32-value block
//           + sum_g  coef[n, g] * xsum[m, g]             the zero-point / nibble-offset term, once per row
//
// with sx_b and sw_b the x-block and weight-group scales, xsum[m, g] the sum of group g's x and coef the stored zero
// term (for int4 without one, the nibbles' offset, -8 * scale). Up to 4 weight rows share each x load, with
// independent accumulators, so the loop keeps several FMA chains in flight; each (x row, weight row) accumulator sees
// the same operations in the same order whatever the rows beside it, so a row's result does not depend on how many
// rows share its call. The integer dot products are exact; int4 rows differ from the VNNI GEMV's only by the order of
// fp32 additions.

#include "int8_input.h"

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PERNODE_AVX2_INT8X 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gemv_float_rows.h"  // kPrefetchBytes
#include "horizontal_sum.h"

namespace pernode {
namespace quant {
namespace {

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

inline __m256 load8_qparams(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_qparams(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline float qparam_to_float(float v) { return v; }
inline float qparam_to_float(uint16_t h) { return _cvtsh_ss(h); }

// A weight row's G group qparams as fp32 in dst[0, round_up8(G)), zero past G. The last 8 are one load where the
// buffer holds 8 values from there (`overread`: the rows after this one), else a scalar loop.
template <typename S>
inline void qparams_to_float(const S* src, float* dst, int64_t G, bool overread) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) _mm256_storeu_ps(dst + g, load8_qparams(src + g));
  if (g == G) return;
  if (overread) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i real = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(G - g)), lane);
    _mm256_storeu_ps(dst + g, _mm256_and_ps(load8_qparams(src + g), _mm256_castsi256_ps(real)));
    return;
  }
  for (int64_t t = 0; t < 8; ++t) dst[g + t] = g + t < G ? qparam_to_float(src[g + t]) : 0.f;
}

// What a call shares across its weight rows: x's per-block scales and per-group sums, zero-padded to 8.
struct XBlocks {
  int64_t blocks, blocks_padded, groups_padded;
  std::vector<float> xscale;  // [M][blocks_padded]: each 32-value block's x scale
  std::vector<float> xsum;    // [M][groups_padded]: sum of the dequantized x of each weight group
};

inline XBlocks int8_x_blocks(const QuantizedInput& qi, int64_t M, int64_t K, int64_t G) {
  const int64_t gs = K / G, lane_values = 8;
  XBlocks p;
  p.blocks = K / 32, p.blocks_padded = round_up8(p.blocks), p.groups_padded = round_up8(G);
  p.xscale.assign(M * p.blocks_padded, 0.f);
  p.xsum.assign(M * p.groups_padded, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < p.blocks; ++b)  // lane_scale repeats each block's scale over its 4 lanes
      p.xscale[m * p.blocks_padded + b] = qi.lane_scale[m * qi.row_lanes + 32 * b / lane_values];
    for (int64_t k = 0; k < K; k += lane_values)  // lane_sum holds each 8-value lane's sum
      p.xsum[m * p.groups_padded + k / gs] += qi.lane_sum[m * qi.row_lanes + k / lane_values];
  }
  return p;
}

// x quantized to int16 per 32-value block (q = rint(x * 32767 / amax)) for int8 weights, in order, with the plan's
// block scales and (float) group sums: ~1e-5 of a block's largest |x| where int8 x errs by ~4e-3, which is enough
// to flip the default model's near-tie first tokens on its Q8_0 lm_head.
struct Int16Input {
  std::vector<int16_t> values;  // [M][K]
  XBlocks plan;
};

inline Int16Input quantize_input_int16(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t gs = K / G;
  Int16Input xi;
  XBlocks& p = xi.plan;
  p.blocks = K / 32, p.blocks_padded = round_up8(p.blocks), p.groups_padded = round_up8(G);
  p.xscale.assign(M * p.blocks_padded, 0.f);
  p.xsum.assign(M * p.groups_padded, 0.f);
  xi.values.resize(M * K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < p.blocks; ++b) {
      __m256 v[4];
      const float amax = load_block_amax_avx2(x + m * K + 32 * b, v);
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
      int16_t* dst = xi.values.data() + m * K + 32 * b;  // packs interleave 4-value pieces across halves: undone
      _mm256_storeu_si256((__m256i*)dst, _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
      _mm256_storeu_si256((__m256i*)(dst + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
      p.xscale[m * p.blocks_padded + b] = amax / 32767.f;
      p.xsum[m * p.groups_padded + 32 * b / gs] += simd::hsum256(sum);
    }
  }
  return xi;
}

#define PERNODE_UNROLL _Pragma("GCC unroll 8")

// Where a call's x rows are: int8 (QuantizedInput's layout) or int16 (Int16Input, in order).
struct XRows {
  const void* data;
  int64_t row_bytes;
};

// The weight and x operands a block multiplies: int4 weights with int8 x, or int8 weights with int16 x.
enum Operands { kInt4Int8x = 4, kInt8Int16x = 16 };

// One 64-value step of NR weight rows against MB x rows: the rows' nibbles unpacked once, each x load shared by
// the NR rows. A step whose second block is past the row's end (K % 64 == 32) reads 4 words.
template <int MB, int NR, bool HALF>
inline void int4_int8x_step(const int32_t* const* wr, const int8_t* const* xr, const float* cs, int64_t B,
                            __m256 (&acc)[MB][NR]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i xlo[MB], xhi[MB];
  PERNODE_UNROLL
  for (int m = 0; m < MB; ++m) {
    xlo[m] = _mm256_loadu_si256((const __m256i*)xr[m]);
    xhi[m] = _mm256_loadu_si256((const __m256i*)(xr[m] + 64));
  }
  PERNODE_UNROLL
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch((const char*)wr[r] + kPrefetchBytes, _MM_HINT_T0);  // one thread's demand loads leave DRAM idle
    const __m256i v = HALF ? _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)wr[r]))
                           : _mm256_loadu_si256((const __m256i*)wr[r]);
    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    PERNODE_UNROLL
    for (int m = 0; m < MB; ++m) {
      const float* c = cs + (m * NR + r) * B;  // this step's two blocks
      const __m256 pair = _mm256_castpd_ps(_mm256_broadcast_sd((const double*)c));  // [c0 c1 c0 c1 | c0 c1 ..]
      const __m256 scale = _mm256_permutevar_ps(pair, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));  // [c0 x4 | c1 x4]
      const __m256i d16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[m]), _mm256_maddubs_epi16(hi, xhi[m]));
      acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d16, ones)), scale, acc[m][r]);
    }
  }
}

// One 32-value step (one block) of NR int8 weight rows against MB int16 x rows: the weights widened to int16,
// vpmaddwd sums pairs of products in int32 (|sum| <= 4 * 128 * 32767 per lane, exact in fp32 too).
template <int MB, int NR>
inline void int8_int16x_step(const int8_t* const* wr, const int16_t* const* xr, const float* cs, int64_t B,
                             __m256 (&acc)[MB][NR]) {
  __m256i x0[MB], x1[MB];
  PERNODE_UNROLL
  for (int m = 0; m < MB; ++m) {
    x0[m] = _mm256_loadu_si256((const __m256i*)xr[m]);
    x1[m] = _mm256_loadu_si256((const __m256i*)(xr[m] + 16));
  }
  PERNODE_UNROLL
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch((const char*)wr[r] + kPrefetchBytes, _MM_HINT_T0);
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wr[r]));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr[r] + 16)));
    PERNODE_UNROLL
    for (int m = 0; m < MB; ++m) {
      const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(w0, x0[m]), _mm256_madd_epi16(w1, x1[m]));
      acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(cs + (m * NR + r) * B), acc[m][r]);
    }
  }
}

// NR weight rows from n against MB x rows from m0. sw and coef hold NR rows of round_up8(G) floats, cs MB * NR
// rows of round_up8(K / 32).
template <int MB, int NR, int OPS, typename S>
void gemv_int8x_avx2_block(const XRows& x, const XBlocks& p, int64_t m0, const void* w,
                                const S* scale, const S* bias, int64_t K, int64_t G, int64_t N, float* y, int64_t ldy,
                                int64_t n, float* sw, float* coef, float* cs) {
  constexpr int BITS = OPS == kInt4Int8x ? 4 : 8;
  const int64_t gs = K / G, Gp = p.groups_padded, Bp = p.blocks_padded;
  const bool group_term = bias || BITS == 4;
  PERNODE_UNROLL
  for (int r = 0; r < NR; ++r) {
    const bool overread = (n + r) * G + Gp <= N * G;
    qparams_to_float(scale + (n + r) * G, sw + r * Gp, G, overread);
    if (bias) {
      qparams_to_float(bias + (n + r) * G, coef + r * Gp, G, overread);
    } else if (BITS == 4) {  // no zero point: the nibbles' offset, -8 * scale
      for (int64_t g = 0; g < Gp; g += 8)
        _mm256_storeu_ps(coef + r * Gp + g, _mm256_mul_ps(_mm256_set1_ps(-8.f), _mm256_loadu_ps(sw + r * Gp + g)));
    }
  }
  // cs[m][r][b]: the product of x row m's and weight row r's scales for block b
  PERNODE_UNROLL
  for (int m = 0; m < MB; ++m)
    PERNODE_UNROLL
    for (int r = 0; r < NR; ++r) {
      const float* xs = p.xscale.data() + (m0 + m) * Bp;
      float* c = cs + (m * NR + r) * Bp;
      if (gs == 32) {
        for (int64_t b = 0; b < Bp; b += 8)
          _mm256_storeu_ps(c + b, _mm256_mul_ps(_mm256_loadu_ps(sw + r * Gp + b), _mm256_loadu_ps(xs + b)));
      } else {
        for (int64_t b = 0; b < Bp; ++b) c[b] = sw[r * Gp + b * 32 / gs] * xs[b];  // pad: xs is 0
      }
    }
  using XValue = std::conditional_t<OPS == kInt8Int16x, int16_t, int8_t>;
  const XValue* xr[MB];
  __m256 acc[MB][NR];
  PERNODE_UNROLL
  for (int m = 0; m < MB; ++m) {
    xr[m] = reinterpret_cast<const XValue*>(static_cast<const char*>(x.data) + (m0 + m) * x.row_bytes);
    PERNODE_UNROLL
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  }
  if constexpr (OPS == kInt4Int8x) {
    const int32_t* wr[NR];
    PERNODE_UNROLL
    for (int r = 0; r < NR; ++r) wr[r] = static_cast<const int32_t*>(w) + (n + r) * (K / 8);
    const int64_t full = K / 64;  // whole 64-value steps; x's layout alternates them: low half, high half of a chunk
    for (int64_t h = 0; h < full; ++h) {
      int4_int8x_step<MB, NR, false>(wr, xr, cs + 2 * h, Bp, acc);
      PERNODE_UNROLL
      for (int r = 0; r < NR; ++r) wr[r] += 8;
      PERNODE_UNROLL
      for (int m = 0; m < MB; ++m) xr[m] += h % 2 ? 96 : 32;
    }
    if (K % 64) int4_int8x_step<MB, NR, true>(wr, xr, cs + 2 * full, Bp, acc);
  } else {
    const int8_t* wr[NR];
    PERNODE_UNROLL
    for (int r = 0; r < NR; ++r) wr[r] = static_cast<const int8_t*>(w) + (n + r) * K;
    for (int64_t b = 0; b < K / 32; ++b) {  // int16 x is in order
      int8_int16x_step<MB, NR>(wr, xr, cs + b, Bp, acc);
      PERNODE_UNROLL
      for (int r = 0; r < NR; ++r) wr[r] += 32;
      PERNODE_UNROLL
      for (int m = 0; m < MB; ++m) xr[m] += 32;
    }
  }
  PERNODE_UNROLL
  for (int m = 0; m < MB; ++m)
    PERNODE_UNROLL
    for (int r = 0; r < NR; ++r) {  // + sum_g coef[g] * xsum[g], in the same lanes before the one horizontal sum
      const float* xsum = p.xsum.data() + (m0 + m) * Gp;
      __m256 total = acc[m][r];
      for (int64_t g = 0; group_term && g < Gp; g += 8)
        total = _mm256_fmadd_ps(_mm256_loadu_ps(coef + r * Gp + g), _mm256_loadu_ps(xsum + g), total);
      y[(m0 + m) * ldy + n + r] = simd::hsum256(total);
    }
}

template <int MB, int OPS, typename S>
void gemv_int8x_avx2_rows(const XRows& x, const XBlocks& p, int64_t m0, const void* w,
                               const S* scale, const S* bias, int64_t K, int64_t G, int64_t N, float* y,
                               int64_t n0, int64_t n1) {
  constexpr int NR = MB <= 2 ? 4 : MB <= 4 ? 2 : 1;  // accumulators: MB * NR <= 8 of the 16 registers
  std::vector<float> sw(NR * p.groups_padded), coef(NR * p.groups_padded), cs(MB * NR * p.blocks_padded);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR)
    gemv_int8x_avx2_block<MB, NR, OPS>(x, p, m0, w, scale, bias, K, G, N, y, N, n, sw.data(), coef.data(), cs.data());
  for (; n < n1; ++n)
    gemv_int8x_avx2_block<MB, 1, OPS>(x, p, m0, w, scale, bias, K, G, N, y, N, n, sw.data(), coef.data(), cs.data());
}

// Output rows [n0, n1) for all M rows of x, up to 8 rows per pass over the weights.
template <int OPS, typename S>
void gemv_int8x_avx2_ops(const XRows& x, const XBlocks& p, int64_t M, int64_t K, const void* w,
                          const S* scale, const S* bias, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: gemv_int8x_avx2_rows<1, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      case 2: gemv_int8x_avx2_rows<2, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      case 3: gemv_int8x_avx2_rows<3, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      case 4: gemv_int8x_avx2_rows<4, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      case 5: gemv_int8x_avx2_rows<5, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      case 6: gemv_int8x_avx2_rows<6, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      case 7: gemv_int8x_avx2_rows<7, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
      default: gemv_int8x_avx2_rows<8, OPS>(x, p, m0, w, scale, bias, K, G, N, y, n0, n1); break;
    }
  }
}

template <typename S>
void gemv_int4_int8x_avx2(const QuantizedInput& qi, const XBlocks& p, int64_t M, int64_t K, const int32_t* w,
                          const S* scale, const S* bias, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  gemv_int8x_avx2_ops<kInt4Int8x>(XRows{qi.bytes.data(), qi.row_bytes}, p, M, K, w, scale, bias, G, y, N, n0, n1);
}

// int8 weights with int16 x (int16_input.h): the float-x GEMV's numbers to ~1e-5 of each block's largest |x|, with
// vpmaddwd instead of converting every weight to fp32.
template <typename S>
void gemv_int8_int16x_avx2(const Int16Input& xi, int64_t M, int64_t K, const int8_t* w, const S* scale,
                           const S* bias, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  gemv_int8x_avx2_ops<kInt8Int16x>(XRows{xi.values.data(), K * int64_t(sizeof(int16_t))}, xi.plan, M, K, w, scale,
                                   bias, G, y, N, n0, n1);
}

}  // namespace
}  // namespace quant
}  // namespace pernode
#endif
