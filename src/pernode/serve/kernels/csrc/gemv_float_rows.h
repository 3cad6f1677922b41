#pragma once
// The float-x GEMV of weight-only quantized weights, for up to 8 activation rows sharing one pass over the weights:
// int8 rows [N, K] and int4 rows packed 8 per int32 word (see quant_linear.h for the layout and the factored
// dequantisation). Each weight is converted to fp32 and FMA'd into one accumulator per activation row; group scales
// apply once per group (int8) or per 16-lane chunk (int4). AVX-512 (16 lanes), AVX2 + FMA (8 lanes), else scalar loops.
// Every row runs the same instruction sequence whatever the rows beside it, so its result does not depend on them
// (what exact speculative verification needs; tests/test_gemv_rows.py).

#include <ATen/ATen.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#ifndef PERNODE_PREFETCH_BYTES
#define PERNODE_PREFETCH_BYTES 2048
#endif
#include <cstdint>
#include <vector>

#include "horizontal_sum.h"

namespace pernode {
namespace quant {
namespace {


// Loops over the activation rows sharing a weight pass are unrolled, so each row's accumulator stays in a register
// (a loop GCC leaves rolled keeps the accumulator array on the stack, which made 4 rows cost 2x one row, not ~1.3x).
#define PERNODE_UNROLL_ROWS _Pragma("GCC unroll 8")
constexpr int64_t kMaxGemvRows = 8;  // activation rows sharing one pass over the weights
// Float x (no int8 quantisation): from this many rows on, dequantised tiles + one fp32 GEMM beat the GEMV.
constexpr int64_t kFloatGemvMaxRows = 8;
// Weights are streamed once per call; one thread's demand loads alone leave DRAM bandwidth unused (measured:
// the int4 GEMV went from ~6.5 to ~10 GB/s with a software prefetch this far ahead of each 64-byte load).
constexpr int64_t kPrefetchBytes = PERNODE_PREFETCH_BYTES;

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// CPUs with AVX2 and FMA but not AVX-512 (most x86 servers before Ice Lake / Zen 4): the same GEMVs 8 lanes wide.
#define PERNODE_AVX2 1
using simd::hsum256;
#endif

// ---- int8 weights ----------------------------------------------------------------------------------------------
template <int MB>
void gemv_int8_rows(const float* x, int64_t ldx, const int8_t* w, const float* scale, const float* bias,
                    const float* xsum, int64_t K, int64_t G, int64_t gs, float* y, int64_t ldy, int64_t n0,
                    int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    const float* sr = scale + n * G;
    float out[MB];
#if defined(__AVX512F__)
    if (gs % 16 == 0) {
      __m512 tot[MB];
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[MB];
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          if (k % 64 == 0) _mm_prefetch((const char*)(wr + k) + kPrefetchBytes, _MM_HINT_T0);
          __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k))));
          PERNODE_UNROLL_ROWS
          for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m]);
        }
        __m512 s = _mm512_set1_ps(sr[g]);
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(acc[m], s, tot[m]);
      }
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(tot[m]);
    } else
#elif defined(PERNODE_AVX2)
    if (gs % 8 == 0) {
      __m256 tot[MB];
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m256 acc[MB];
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
        int64_t k = g * gs;
        // 32 weights at a time as a sum tree (Q8_0's groups), so one row's FMAs do not wait on each other: one
        // FMA chain bound the lm_head at one row
        for (; k + 32 <= (g + 1) * gs; k += 32) {
          if (k % 64 == 0) _mm_prefetch((const char*)(wr + k) + kPrefetchBytes, _MM_HINT_T0);
          __m256 wv[4];
          for (int j = 0; j < 4; ++j)
            wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wr + k + 8 * j))));
          PERNODE_UNROLL_ROWS
          for (int m = 0; m < MB; ++m) {
            const float* xk = x + m * ldx + k;
            const __m256 lo = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xk + 8), _mm256_mul_ps(wv[0], _mm256_loadu_ps(xk)));
            const __m256 hi = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xk + 24), _mm256_mul_ps(wv[2], _mm256_loadu_ps(xk + 16)));
            acc[m] = _mm256_add_ps(acc[m], _mm256_add_ps(lo, hi));
          }
        }
        for (; k < (g + 1) * gs; k += 8) {
          if (k % 64 == 0) _mm_prefetch((const char*)(wr + k) + kPrefetchBytes, _MM_HINT_T0);
          __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wr + k))));
          PERNODE_UNROLL_ROWS
          for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m]);
        }
        __m256 s = _mm256_set1_ps(sr[g]);
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(acc[m], s, tot[m]);
      }
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) out[m] = hsum256(tot[m]);
    } else
#endif
    {
      for (int m = 0; m < MB; ++m) out[m] = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        for (int m = 0; m < MB; ++m) {
          float acc = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += float(wr[k]) * x[m * ldx + k];
          out[m] += acc * sr[g];
        }
      }
    }
    if (bias) {
      const float* br = bias + n * G;
      for (int m = 0; m < MB; ++m)
        for (int64_t g = 0; g < G; ++g) out[m] += br[g] * xsum[m * G + g];
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = out[m];
  }
}

// ---- int4 weights ----------------------------------------------------------------------------------------------
// xp: x permuted per 128-value block: xp[m][b][j][i] = x[m][128 b + 8 i + j] (0 past K).
template <int MB>
void gemv_int4_rows(const float* xp, int64_t ldxp, const int32_t* w, const float* scale, const float* bias,
                    const float* xsum, int64_t K, int64_t G, int64_t gs, float* y, int64_t ldy, int64_t n0,
                    int64_t n1) {
  const int64_t KW = K / 8;  // words per row
  const int64_t NB = (K + 127) / 128;
#if defined(__AVX512F__)
  // Per block: the first group it touches, the group of each lane relative to it, and how many words it has.
  std::vector<int32_t> g0(NB), nw(NB);
  std::vector<int32_t> idx(NB * 16);
  for (int64_t b = 0; b < NB; ++b) {
    g0[b] = int32_t(b * 128 / gs);
    nw[b] = int32_t(std::min<int64_t>(16, KW - b * 16));
    for (int i = 0; i < 16; ++i) idx[b * 16 + i] = int32_t(std::min<int64_t>((b * 128 + 8 * i) / gs, G - 1) - g0[b]);
  }
  const __m512i mask4 = _mm512_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * KW;
    const float* sr = scale + n * G;
    __m512 tot[MB];
    PERNODE_UNROLL_ROWS
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < NB; ++b) {
      __mmask16 wm = (__mmask16)((1u << nw[b]) - 1u);
      __m512i v = _mm512_maskz_loadu_epi32(wm, wr + b * 16);
      __m512 acc[MB];
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
      const float* xb = xp + b * 128;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        __m512 wv = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4 * j), mask4));
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xb + m * ldxp + j * 16), acc[m]);
      }
      int64_t ng = std::min<int64_t>(16, G - g0[b]);
      __m512 s = _mm512_permutexvar_ps(_mm512_loadu_si512(idx.data() + b * 16),
                                       _mm512_maskz_loadu_ps((__mmask16)((1u << ng) - 1u), sr + g0[b]));
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(acc[m], s, tot[m]);
    }
    float out[MB];
    PERNODE_UNROLL_ROWS
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(tot[m]);
#elif defined(PERNODE_AVX2)
  // A 128-value block is two halves of 8 words; lane i of half h holds word 8h + i, whose group is looked up once
  // per call (gathered scales), as the AVX-512 path permutes them.
  std::vector<int32_t> grp(NB * 16);
  for (int64_t b = 0; b < NB; ++b)
    for (int i = 0; i < 16; ++i) grp[b * 16 + i] = int32_t(std::min<int64_t>((b * 128 + 8 * i) / gs, G - 1));
  const __m256i mask4 = _mm256_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * KW;
    const float* sr = scale + n * G;
    __m256 tot[MB];
    PERNODE_UNROLL_ROWS
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < NB; ++b) {
      for (int h = 0; h < 2; ++h) {
        const int64_t w0 = b * 16 + h * 8;
        if (w0 >= KW) break;
        const int64_t nwh = std::min<int64_t>(8, KW - w0);
        __m256i v;
        if (nwh == 8) {
          v = _mm256_loadu_si256((const __m256i*)(wr + w0));
        } else {
          const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
          v = _mm256_maskload_epi32(wr + w0, _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(nwh)), lane));
        }
        __m256 acc[MB];
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
        const float* xb = xp + b * 128 + h * 8;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          __m256 wv = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * j), mask4));
          PERNODE_UNROLL_ROWS
          for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + m * ldxp + j * 16), acc[m]);
        }
        __m256 s = _mm256_i32gather_ps(sr, _mm256_loadu_si256((const __m256i*)(grp.data() + b * 16 + h * 8)), 4);
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(acc[m], s, tot[m]);
      }
    }
    float out[MB];
    PERNODE_UNROLL_ROWS
    for (int m = 0; m < MB; ++m) out[m] = hsum256(tot[m]);
#else
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * KW;
    const float* sr = scale + n * G;
    float out[MB];
    for (int m = 0; m < MB; ++m) {
      out[m] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        float u = float((wr[k / 8] >> (4 * (k % 8))) & 0xF);
        int64_t b = k / 128, i = (k % 128) / 8, j = k % 8;
        out[m] += u * xp[m * ldxp + b * 128 + j * 16 + i] * sr[k / gs];
      }
    }
#endif
    {  // zero-point/offset term; without a bias, the int4 offset alone
      for (int m = 0; m < MB; ++m)
        for (int64_t g = 0; g < G; ++g) out[m] += (bias ? bias[n * G + g] : -8.f * sr[g]) * xsum[m * G + g];
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = out[m];
  }
}

}  // namespace
}  // namespace quant
}  // namespace pernode
