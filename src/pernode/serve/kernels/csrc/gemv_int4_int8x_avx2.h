#pragma once
// The int4 GEMV with int8 x on CPUs with AVX2 but not AVX-512 VNNI: the VNNI GEMV's arithmetic (quant_linear.h),
// with its vpdpbusd (four u8 x s8 products summed into an int32 lane) done as vpmaddubsw + vpmaddwd, and each
// 64-byte chunk of weights taken as two halves of 8 lanes. Like llama.cpp's AVX2 Q4 x Q8 dot products, it multiplies
// 32 weights per instruction pair instead of unpacking, converting and FMA-ing each weight as the float-x GEMV does.
//
// int4 only: a nibble (<= 15) times an int8 (|q| <= 127), summed in pairs, stays inside vpmaddubsw's int16
// (2 * 15 * 127 = 3810); int8 weights made unsigned (w + 128 <= 255) would saturate it, and keep float x anyway.
// The integer dot products are exact, so rows differ from the VNNI GEMV's only by the fp32 order of the lane sums.

#include "int8_input.h"

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PERNODE_AVX2_INT8X 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "horizontal_sum.h"

namespace pernode {
namespace quant {
namespace {

inline float qparam_to_float(float v) { return v; }
inline float qparam_to_float(uint16_t h) { return _cvtsh_ss(h); }

// The groups a chunk's 128 values fall in (at most 5: groups hold a multiple of 32 values), their qparams (fp32, or
// fp16 bits as stored) in the low lanes of one register; lanes then pick theirs with one permute.
inline __m256 load8_qparams(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_qparams(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

template <typename S>
inline __m256 chunk_qparams(const S* row, const ChunkGroups& cg, int64_t c, int64_t G) {
  const int64_t first = cg.first[c];
  if (first + 8 <= G) return load8_qparams(row + first);  // one load (and conversion) for all of them
  alignas(32) float window[8] = {};  // the row's last groups: never read past its end
  for (int64_t i = 0; i < std::min<int64_t>(G - first, 5); ++i) window[i] = qparam_to_float(row[first + i]);
  return _mm256_load_ps(window);
}

template <int MB, typename S>
void gemv_int4_int8x_avx2_rows(const QuantizedInput& qi, int64_t m0, const int32_t* w, const S* scale,
                               const S* bias, const ChunkGroups& cg, int64_t K, int64_t G, float* y, int64_t ldy,
                               int64_t n0, int64_t n1) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t words = K / 8;  // per weight row
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * words;
    const S* sr = scale + n * G;
    const S* br = bias ? bias + n * G : nullptr;
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < qi.chunks; ++c) {
      const __m256 sw_chunk = chunk_qparams(sr, cg, c, G);
      const __m256 zt_chunk = br ? chunk_qparams(br, cg, c, G) : _mm256_setzero_ps();
      for (int half = 0; half < 2; ++half) {
        const int64_t lane0 = c * 16 + 8 * half, real = std::min<int64_t>(8, words - lane0);
        if (real <= 0) break;
        const __m256i v = real == 8 ? _mm256_loadu_si256((const __m256i*)(wr + lane0))
                                    : _mm256_maskload_epi32(wr + lane0, _mm256_cmpgt_epi32(
                                          _mm256_set1_epi32(int32_t(real)), lane_index));
        const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi32(v, 4), nibble);
        const __m256i group = _mm256_loadu_si256((const __m256i*)(cg.lane_group.data() + lane0));  // < 5
        const __m256 sw = _mm256_permutevar8x32_ps(sw_chunk, group);
        const __m256 zt = br ? _mm256_permutevar8x32_ps(zt_chunk, group) : _mm256_setzero_ps();
        for (int m = 0; m < MB; ++m) {
          const int64_t row = m0 + m;
          const int8_t* xc = qi.bytes.data() + row * qi.row_bytes + c * 128 + 32 * half;  // low plane, then high
          const __m256i d = _mm256_add_epi32(
              _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xc)), ones),
              _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xc + 64))), ones));
          const int64_t at = row * qi.row_lanes + lane0;
          if (!br) {  // no zero point: sw * (sx * dot - 8 * sum(x)), as the VNNI GEMV
            const __m256 part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(qi.lane_scale.data() + at),
                                                _mm256_loadu_ps(qi.lane_offset.data() + at));
            tot[m] = _mm256_fmadd_ps(sw, part, tot[m]);
          } else {
            const __m256 s = _mm256_mul_ps(sw, _mm256_loadu_ps(qi.lane_scale.data() + at));
            tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, tot[m]);
            tot[m] = _mm256_fmadd_ps(zt, _mm256_loadu_ps(qi.lane_sum.data() + at), tot[m]);
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m) y[(m0 + m) * ldy + n] = simd::hsum256(tot[m]);
  }
}

// Output rows [n0, n1) for all M rows of x, up to 8 rows per pass over the weights.
template <typename S>
void gemv_int4_int8x_avx2(const QuantizedInput& qi, int64_t M, int64_t K, const int32_t* w, const S* scale,
                          const S* bias, const ChunkGroups& cg, int64_t G, float* y, int64_t N, int64_t n0,
                          int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: gemv_int4_int8x_avx2_rows<1>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      case 2: gemv_int4_int8x_avx2_rows<2>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      case 3: gemv_int4_int8x_avx2_rows<3>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      case 4: gemv_int4_int8x_avx2_rows<4>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      case 5: gemv_int4_int8x_avx2_rows<5>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      case 6: gemv_int4_int8x_avx2_rows<6>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      case 7: gemv_int4_int8x_avx2_rows<7>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
      default: gemv_int4_int8x_avx2_rows<8>(qi, m0, w, scale, bias, cg, K, G, y, N, n0, n1); break;
    }
  }
}

}  // namespace
}  // namespace quant
}  // namespace pernode
#endif
