#pragma once
// int4 weights x int8 activations for decode batches too large for the GEMV's passes (each pass serves 8 rows, so
// 48 rows re-read every weight 6 times and redo the per-lane scale arithmetic per row), too small for the
// dequantised-tile bf16 GEMM to pay for writing its tiles. A register-blocked micro-kernel in the manner of
// Goto & van de Geijn, "Anatomy of high-performance matrix multiplication" (TOMS 2008), on VNNI's vpdpbusd.
//
// Same arithmetic as the int8-x GEMV (quant_linear.h): x quantised per 32-value block (the same QuantizedInput, so
// the same int8 values and scales), the stored nibbles multiplied as unsigned bytes, and per block
//   y[m, n] += scale[n, g] * x_scale[m, b] * dot_b(u[n], q[m]) + zero_term[n, g] * x_sum[m, b]
// (zero_term: the GGUF min, or -8 * scale without one). Only the order of the fp32 additions differs from the
// GEMV's (per block here, per 8-value lane there), so the two agree to fp32 rounding, not bit for bit.
//
// Layout: output columns sit in the 16 lanes. A panel of 16 weight rows is transposed once per call into a buffer
// where, per 32-value block, 8 vectors of 64 bytes hold each row's 4 stored words as low- and high-nibble planes;
// every activation row then multiplies these with one broadcast 4-byte group of its own quantised x per vpdpbusd.
// So each weight is unpacked once per call whatever the row count, and the fp32 scale work is 4 instructions per
// 8 vpdpbusd (the GEMV's is 4 per 2). The transposition reads the weights as stored: no second copy of them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "panel_int8x_avx2.h"  // the AVX2 counterpart
#include "gemm_int8_int16x_avx512.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace pernode {
namespace quant {
namespace {

#if defined(PERNODE_VNNI)
constexpr int64_t kPanelCols = 16;      // output columns per strip: one vector's lanes
constexpr int64_t kPanelStrips = 2;     // strips sharing each activation broadcast (NR)
constexpr int64_t kPanelRows = 6;       // activation rows per register block (MR): 2 x 6 int + 2 x 6 fp32 accumulators
constexpr int64_t kBlockVectors = 8;    // weight vectors per 32-value block: 4 words x (low, high) nibble planes

// Activations per row and block: 8 dwords (word d's low-plane bytes, then its high-plane bytes, d = 0..3), the
// block's x scale and the sum of its dequantised values.
struct PanelInput {
  int64_t blocks;
  std::vector<int32_t> quads;  // [M][blocks][8]
  std::vector<float> scale, sum;  // [M][blocks]
};

PanelInput panel_input(const QuantizedInput& qi, int64_t M, int64_t K) {
  PanelInput pi;
  pi.blocks = K / kActBlock;
  pi.quads.resize(M * pi.blocks * 8);
  pi.scale.resize(M * pi.blocks);
  pi.sum.resize(M * pi.blocks);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* bytes = qi.bytes.data() + m * qi.row_bytes;
    for (int64_t b = 0; b < pi.blocks; ++b) {
      int32_t* dst = pi.quads.data() + (m * pi.blocks + b) * 8;
      float sum = 0.f;
      for (int64_t d = 0; d < 4; ++d) {
        const int64_t word = 4 * b + d, chunk = word / 16, lane = word % 16;
        std::memcpy(dst + 2 * d, bytes + chunk * 128 + 4 * lane, 4);       // low nibbles' x: values 0, 2, 4, 6
        std::memcpy(dst + 2 * d + 1, bytes + chunk * 128 + 64 + 4 * lane, 4);  // high: 1, 3, 5, 7
        sum += qi.lane_sum[m * qi.row_lanes + word];
      }
      pi.scale[m * pi.blocks + b] = qi.lane_scale[m * qi.row_lanes + 4 * b];
      pi.sum[m * pi.blocks + b] = sum;
    }
  }
  return pi;
}

// Rows [n0, n0 + 16) of the int4 weight (rows past N read as zeros) as [blocks][8][64] unsigned bytes: vector 2d
// holds each row's word d of the block masked to its low nibbles (lane = row), vector 2d + 1 its high nibbles.
// A 16 x 4-word transpose per block by permutes (vpgatherdd is microcoded and measured slower).
void transpose_strip(const int32_t* w, int64_t N, int64_t K, int64_t n0, uint8_t* dst) {
  const int64_t words = K / 8, blocks = K / kActBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  static const int32_t zeros[4] = {0, 0, 0, 0};
  const int32_t* row[16];
  for (int i = 0; i < 16; ++i) row[i] = n0 + i < N ? w + (n0 + i) * words : nullptr;
  // the next strip's rows, requested while this one is transposed: 16 rows read a block at a time are 16 streams,
  // more than the hardware prefetchers follow
  for (int64_t n = n0 + 16; n < std::min(N, n0 + 32); ++n)
    for (int64_t c = 0; c < words * 4; c += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + n * words) + c, _MM_HINT_T0);
  // A_q holds rows 4q..4q+3, 4 words each (dword 4r + d). T = words {0,1} (or {2,3}) of rows 0-7 from (A0, A1);
  // then Z_d = word d of rows 0-15 from (T of A0/A1, T of A2/A3).
  const __m512i pick01 = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i pick23 = _mm512_set_epi32(31, 27, 23, 19, 15, 11, 7, 3, 30, 26, 22, 18, 14, 10, 6, 2);
  const __m512i low_halves = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i high_halves = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i a[4];
    for (int q = 0; q < 4; ++q) {
      __m512i v = _mm512_setzero_si512();
      for (int r = 0; r < 4; ++r) {
        const int32_t* src = row[4 * q + r] ? row[4 * q + r] + 4 * b : zeros;
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)src), r);
      }
      a[q] = v;
    }
    const __m512i t01 = _mm512_permutex2var_epi32(a[0], pick01, a[1]);
    const __m512i t23 = _mm512_permutex2var_epi32(a[0], pick23, a[1]);
    const __m512i u01 = _mm512_permutex2var_epi32(a[2], pick01, a[3]);
    const __m512i u23 = _mm512_permutex2var_epi32(a[2], pick23, a[3]);
    const __m512i z[4] = {_mm512_permutex2var_epi32(t01, low_halves, u01),
                          _mm512_permutex2var_epi32(t01, high_halves, u01),
                          _mm512_permutex2var_epi32(t23, low_halves, u23),
                          _mm512_permutex2var_epi32(t23, high_halves, u23)};
    for (int d = 0; d < 4; ++d) {
      uint8_t* out = dst + (b * kBlockVectors + 2 * d) * 64;
      _mm512_storeu_si512(out, _mm512_and_si512(z[d], nibble));
      _mm512_storeu_si512(out + 64, _mm512_and_si512(_mm512_srli_epi16(z[d], 4), nibble));
    }
  }
}

// A strip's qparams per block, fp32: the scale and zero term of the group holding the block (lanes = rows; 0 past N).
// 16 groups of the 16 rows at a time: loaded row by row (widened from fp16 where stored so), turned lane = row by a
// 16 x 16 transpose (gemm_int8_int16x_avx512.h), each group's vector stored for its blocks. One scalar conversion and
// store per value cost a third of a decode-sized call.
inline __m512 load_qparams16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_qparams16(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

template <typename S>
void strip_qparam_rows(const S* p, int64_t N, int64_t G, int64_t n0, int64_t g0, __mmask16 groups,
                       __m512i (&r)[16]) {
  for (int i = 0; i < 16; ++i)
    r[i] = n0 + i < N ? _mm512_castps_si512(load_qparams16(p + (n0 + i) * G + g0, groups)) : _mm512_setzero_si512();
  transpose_16x16(r);  // r[g]: group g0 + g of the 16 rows
}

template <typename S>
void strip_qparams(const S* scale, const S* bias, int64_t N, int64_t G, int64_t gs, int64_t n0, float* sw,
                   float* zt) {
  const int64_t blocks_per_group = gs / kActBlock;
  const __m512 minus8 = _mm512_set1_ps(-8.f);
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const int64_t ng = std::min<int64_t>(16, G - g0);
    const __mmask16 groups = (__mmask16)(ng == 16 ? 0xFFFF : (1u << ng) - 1u);
    __m512i s[16], z[16];
    strip_qparam_rows(scale, N, G, n0, g0, groups, s);
    if (bias) strip_qparam_rows(bias, N, G, n0, g0, groups, z);
    for (int64_t g = 0; g < ng; ++g) {
      const __m512 sv = _mm512_castsi512_ps(s[g]);
      const __m512 zv = bias ? _mm512_castsi512_ps(z[g]) : _mm512_mul_ps(minus8, sv);
      for (int64_t b = (g0 + g) * blocks_per_group; b < (g0 + g + 1) * blocks_per_group; ++b) {
        _mm512_storeu_ps(sw + b * kPanelCols, sv);
        _mm512_storeu_ps(zt + b * kPanelCols, zv);
      }
    }
  }
}

// MR activation rows x NR strips over every block: y[m0 + r][n0 + 16 j + lane].
template <int MR, int NR>
void panel_block(const PanelInput& pi, int64_t m0, const uint8_t* wbuf, const float* sw, const float* zt,
                 int64_t strip_bytes, int64_t strip_params, float* y, int64_t ldy, int64_t n0, int64_t N) {
  const int64_t blocks = pi.blocks;
  __m512 tot[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) tot[r][j] = _mm512_setzero_ps();
  const int32_t* xq[MR];
  const float *xs[MR], *xsum[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    xq[r] = pi.quads.data() + (m0 + r) * blocks * 8;
    xs[r] = pi.scale.data() + (m0 + r) * blocks;
    xsum[r] = pi.sum.data() + (m0 + r) * blocks;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[MR][NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int v = 0; v < kBlockVectors; ++v) {
      __m512i wv[NR];
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(wbuf + j * strip_bytes + (b * kBlockVectors + v) * 64);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xb = _mm512_set1_epi32(xq[r][b * 8 + v]);
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], wv[j], xb);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m512 s = _mm512_loadu_ps(sw + j * strip_params + b * kPanelCols);
      const __m512 z = _mm512_loadu_ps(zt + j * strip_params + b * kPanelCols);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        tot[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), _mm512_mul_ps(s, _mm512_set1_ps(xs[r][b])),
                                    tot[r][j]);
        tot[r][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[r][b]), tot[r][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) {
    const int64_t c0 = n0 + j * kPanelCols;
    if (c0 >= N) break;
    const __mmask16 cols = (__mmask16)(N - c0 >= 16 ? 0xFFFF : ((1u << (N - c0)) - 1u));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * ldy + c0, cols, tot[r][j]);
  }
}

template <int NR>
void panel_rows(const PanelInput& pi, int64_t M, const uint8_t* wbuf, const float* sw, const float* zt,
                int64_t strip_bytes, int64_t strip_params, float* y, int64_t n0, int64_t N) {
  int64_t m0 = 0;
  for (; m0 + kPanelRows <= M; m0 += kPanelRows)
    panel_block<kPanelRows, NR>(pi, m0, wbuf, sw, zt, strip_bytes, strip_params, y, N, n0, N);
  switch (M - m0) {
    case 1: panel_block<1, NR>(pi, m0, wbuf, sw, zt, strip_bytes, strip_params, y, N, n0, N); break;
    case 2: panel_block<2, NR>(pi, m0, wbuf, sw, zt, strip_bytes, strip_params, y, N, n0, N); break;
    case 3: panel_block<3, NR>(pi, m0, wbuf, sw, zt, strip_bytes, strip_params, y, N, n0, N); break;
    case 4: panel_block<4, NR>(pi, m0, wbuf, sw, zt, strip_bytes, strip_params, y, N, n0, N); break;
    case 5: panel_block<5, NR>(pi, m0, wbuf, sw, zt, strip_bytes, strip_params, y, N, n0, N); break;
    default: break;
  }
  static_assert(kPanelRows == 6, "the tail switch covers kPanelRows - 1 rows");
}

// Output columns [16 * kPanelStrips * p0, ... p1) for all M rows.
template <typename S>
void panel_gemm_range(const PanelInput& pi, int64_t M, const int32_t* w, const S* scale, const S* bias, int64_t N,
                      int64_t K, int64_t G, int64_t gs, float* y, int64_t p0, int64_t p1) {
  const int64_t blocks = K / kActBlock, strip_bytes = blocks * kBlockVectors * 64, strip_params = blocks * kPanelCols;
  std::vector<uint8_t> wbuf(kPanelStrips * strip_bytes);
  std::vector<float> sw(kPanelStrips * strip_params), zt(kPanelStrips * strip_params);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanelStrips * kPanelCols;
    int strips = 0;
    for (; strips < kPanelStrips && n0 + strips * kPanelCols < N; ++strips) {
      const int64_t ns = n0 + strips * kPanelCols;
      transpose_strip(w, N, K, ns, wbuf.data() + strips * strip_bytes);
      strip_qparams(scale, bias, N, G, gs, ns, sw.data() + strips * strip_params,
                    zt.data() + strips * strip_params);
    }
    if (strips == kPanelStrips)
      panel_rows<kPanelStrips>(pi, M, wbuf.data(), sw.data(), zt.data(), strip_bytes, strip_params, y, n0, N);
    else
      panel_rows<1>(pi, M, wbuf.data(), sw.data(), zt.data(), strip_bytes, strip_params, y, n0, N);
    static_assert(kPanelStrips == 2, "a panel is two strips or its last one");
  }
}
#endif  // PERNODE_VNNI

// y = x W^T for int4 W ([N, K/8] words) and x quantised to int8 per 32 values. fp32 or bf16 x; y in x's dtype.
// scale/zero_term: fp32, or both fp16 (as the GEMV takes them). num_threads == 1 runs on the caller's thread.
at::Tensor woq_panel_gemm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in,
                          const c10::optional<at::Tensor>& bias_in, int64_t group_size, int64_t num_threads) {
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.scalar_type() == at::kInt,
              "woq_panel_gemm: weight must be contiguous int4 words [N, K/8] (int32)");
  TORCH_CHECK(x_in.dim() == 2, "woq_panel_gemm: x must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "woq_panel_gemm: x must be float32 or bfloat16");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  const int64_t gs = group_size > 0 ? group_size : K;
  TORCH_CHECK(w.size(1) * 8 == K, "woq_panel_gemm: weight shape does not match x");
  TORCH_CHECK(K % kActBlock == 0 && gs % kActBlock == 0 && K % gs == 0,
              "woq_panel_gemm: the input size and group size must be multiples of ", kActBlock);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const bool half = scale_in.scalar_type() == at::kHalf && (!has_bias || bias_in->scalar_type() == at::kHalf);
  auto scale = half ? scale_in.contiguous() : scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (has_bias) bias = half ? bias_in->contiguous() : bias_in->to(at::kFloat).contiguous();
  const int64_t G = scale.size(1);
  TORCH_CHECK(scale.size(0) == N && G == K / gs && (!has_bias || bias.sizes() == scale.sizes()),
              "woq_panel_gemm: qparam shapes");
#if defined(PERNODE_VNNI)
  std::vector<float> x_widened;
  at::Tensor x;
  const float* xptr = fp32_rows(x_in, x, x_widened);  // quant_linear.h
  const PanelInput pi = panel_input(quantize_input_blocks(xptr, M, K, 4, num_threads != 1), M, K);
  at::Tensor y32 = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  float* yp = y32.data_ptr<float>();
  const int32_t* wp = w.data_ptr<int32_t>();
  const int64_t panels = (N + kPanelStrips * kPanelCols - 1) / (kPanelStrips * kPanelCols);
  auto run = [&](int64_t p0, int64_t p1) {
    if (half)
      panel_gemm_range(pi, M, wp, reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                       has_bias ? reinterpret_cast<const uint16_t*>(bias.data_ptr<at::Half>()) : nullptr, N, K, G, gs,
                       yp, p0, p1);
    else
      panel_gemm_range(pi, M, wp, scale.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr, N, K, G, gs,
                       yp, p0, p1);
  };
  if (num_threads == 1)
    run(0, panels);
  else
    at::parallel_for(0, panels, 1, run);
  return x_in.scalar_type() == at::kBFloat16 ? y32.to(at::kBFloat16) : y32;
#elif defined(PERNODE_AVX2_INT16X_GEMM)  // AVX2 without AVX-512: panel_int8x_avx2.h
  std::vector<float> x_widened;
  at::Tensor x;
  const float* xptr = fp32_rows(x_in, x, x_widened);  // quant_linear.h
  const QuantizedInput qi = quantize_input_blocks(xptr, M, K, 4, num_threads != 1);
  const Int8Blocks xb = int8_blocks(qi, M, K);
  at::Tensor y32 = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  const int32_t* wp = w.data_ptr<int32_t>();
  const int64_t panels = (N + kPanelStripsI16 * kStripCols - 1) / (kPanelStripsI16 * kStripCols);
  auto run = [&](int64_t p0, int64_t p1) {
    if (half)
      panel_int8x_avx2(xb, M, wp, reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                       has_bias ? reinterpret_cast<const uint16_t*>(bias.data_ptr<at::Half>()) : nullptr, N, K, G,
                       y32.data_ptr<float>(), p0, p1);
    else
      panel_int8x_avx2(xb, M, wp, scale.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr, N, K, G,
                       y32.data_ptr<float>(), p0, p1);
  };
  if (num_threads == 1)
    run(0, panels);
  else
    at::parallel_for(0, panels, 1, run);
  return x_in.scalar_type() == at::kBFloat16 ? y32.to(at::kBFloat16) : y32;
#else  // neither: the int8-x GEMV computes the same products
  return woq_linear(x_in, w, scale_in, bias_in, 4, group_size, num_threads, true);
#endif
}

// y = x W^T with x quantised to int16 per 32 values and multiplied as integers, for int4 W ([N, K/8] words) on AVX2
// without AVX-512 (gemm_int4_int16x_avx2.h) and int8 W ([N, K]) on AVX-512 VNNI (gemm_int8_int16x_avx512.h);
// elsewhere the dequantised-tile GEMM (woq_gemm). fp32 or bf16 x, y in x's dtype; scale/zero_term fp32 or fp16.
// num_threads == 1 runs on the caller's thread.
at::Tensor woq_gemm_int16x(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in,
                           const c10::optional<at::Tensor>& bias_in, int64_t group_size, int64_t num_threads) {
  const bool int8_weights = w.scalar_type() == at::kChar;
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && (w.scalar_type() == at::kInt || int8_weights),
              "woq_gemm_int16x: weight must be contiguous int4 words [N, K/8] (int32) or int8 [N, K]");
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "woq_gemm_int16x: x must be 2-D float32 or bfloat16");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  const int64_t gs = group_size > 0 ? group_size : K;
  TORCH_CHECK(w.size(1) * (int8_weights ? 1 : 8) == K, "woq_gemm_int16x: weight shape does not match x");
  TORCH_CHECK(K % 32 == 0 && gs % 32 == 0 && K % gs == 0,
              "woq_gemm_int16x: the input size and group size must be multiples of 32");
  auto scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t G = K / gs;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G &&
                  (!bias.defined() || bias.sizes() == scale.sizes()),
              "woq_gemm_int16x: qparams must be [", N, ", ", G, "]");
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  std::function<void(int64_t, int64_t)> run;  // panels [p0, p1) of 32 (AVX-512) or 16 (AVX2) output columns
  int64_t panels = 0;
  std::vector<float> x_widened;
  at::Tensor x;
  float* yp = nullptr;  // y, allocated once an integer path is chosen; the lambdas read it when they run
#if defined(PERNODE_AVX512_INT16X_GEMM)
  Int16Rows xr;
  if (int8_weights) {
    xr = int16_rows(fp32_rows(x_in, x, x_widened), M, K);  // fp32_rows: quant_linear.h
    const int8_t* wp = w.data_ptr<int8_t>();
    panels = (N + kStripsW8 * kLanes - 1) / (kStripsW8 * kLanes);
    run = [&, wp](int64_t p0, int64_t p1) { gemm_int8_int16x_avx512(xr, M, wp, sp, bp, N, K, G, yp, p0, p1); };
  }
#endif
#if defined(PERNODE_AVX2_INT16X_GEMM)
  Int16Pairs xp;
  if (!int8_weights) {
    const float* xptr = fp32_rows(x_in, x, x_widened);
    xp = int16_pairs_alloc(M, K);
    if (num_threads == 1 || M < 64)
      int16_pairs_rows(xptr, K, 0, M, xp);
    else
      at::parallel_for(0, M, 32, [&](int64_t m0, int64_t m1) { int16_pairs_rows(xptr, K, m0, m1, xp); });
    const int32_t* wp = w.data_ptr<int32_t>();
    panels = (N + kPanelStripsI16 * kStripCols - 1) / (kPanelStripsI16 * kStripCols);
    run = [&, wp](int64_t p0, int64_t p1) { gemm_int4_int16x_avx2(xp, M, wp, sp, bp, N, K, G, yp, p0, p1); };
  }
#endif
  if (!run) return woq_gemm(x_in, w, scale_in, bias_in, int8_weights ? 8 : 4, group_size);  // no integer path here
  at::Tensor y32 = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  yp = y32.data_ptr<float>();
  if (num_threads == 1)
    run(0, panels);
  else
    at::parallel_for(0, panels, 1, run);
  return x_in.scalar_type() == at::kBFloat16 ? y32.to(at::kBFloat16) : y32;
}

}  // namespace
}  // namespace quant
}  // namespace pernode
