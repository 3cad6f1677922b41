#pragma once
// Weight-only quantized linear on CPU: y = x W^T with W stored as int8 [N, K] or int4 packed 8 per int32 along K
// (compressed-tensors "pack-quantized": value k at bits 4*(k%8) of word k/8, stored unsigned as q + 8).
//
// Dequantisation factors out of each group's dot product:
//   y[m, n] = sum_g scale[n, g] * dot_g(u[n], x[m]) + bias[n, g] * sum_g(x[m])
// where u is the stored integer (signed int8, or the unsigned nibble) and bias = -(offset + zero_point) * scale.
// A missing bias (zero_term) means no zero point: for int4 the nibbles' offset alone, bias = -8 * scale.
// So the inner loop multiplies raw integers; scales are applied once per group (or per 16-lane chunk).
//
// Small batches (decode, speculative verify steps) run a GEMV that streams each weight row once and reuses it for up
// to 8 activation rows held in registers (8 accumulators of 16 lanes: a third of AVX-512's 32 registers);
// OpenMP (at::parallel_for) over output rows. Two flavours:
//  * float x: convert each weight to fp32 and FMA (exact up to fp32 rounding). On AVX2 without AVX-512, int8 weights
//    (the Q8_0 lm_head) take x as int16 per 32 values instead and multiply with vpmaddwd (gemv_int8x_avx2.h):
//    ~1e-5 of a block's largest |x|, 1.9x the fp32 GEMV's speed there.
//  * int8 x (`quantize_input`, the decode default): x is quantized per 32-value block (q = rint(x * 127/amax)),
//    as llama.cpp does for its Q8 activations, so a VNNI `vpdpbusd` multiplies 64 weight bytes by 64 x bytes and
//    sums groups of 4 in one instruction: ~4x fewer instructions than unpack + convert + FMA, which lets the int4
//    GEMV run at memory speed. u8 x s8: the unsigned operand is the weight (the int4 nibble, or int8 XOR 0x80 =
//    w + 128, whose extra 128 * sum(x) is subtracted per group).
// int4 rows are read 64 bytes (128 values) at a time: lane i holds word i (values 8i..8i+7); x is laid out once
// per call to match (permuted floats, or low/high-nibble byte planes for VNNI).
// Large batches: dequantise W to fp32 a cache-sized tile at a time, each tile one at::mm.
// woq_gemm (compute-bound steps: prefill chunks, large decode batches) does the same in x's dtype: on a CPU with
// AVX512_BF16 or AMX, bf16 tiles go through oneDNN's bf16 GEMM, ~2.5x the fp32 rate; the tiles are dequantised
// 16 values at a time with AVX-512, 8 with AVX2 (dequant_tiles.h), so the dequantisation stays a small fraction of
// the GEMM.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <cstdint>
#include <vector>

#include "dequant_tiles.h"  // tiled_matmul, tiled_gemm: GEMMs over dequantised weight tiles
#include "gemv_float_rows.h"
#include "int8_input.h"
#include "gemv_int8x_avx2.h"
#include "gemm_int4_int16x_avx2.h"

namespace pernode {
namespace quant {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PERNODE_VNNI 1
// bits 4: w is int32 words, 16 per chunk; bits 8: w is int8, 64 per chunk (XOR 0x80 makes it unsigned, w + 128).
// Per lane: y += scale * x_scale * dot(u, q), all 16 lanes at once. The int4 offset without a zero point rides on
// the x side (lane_offset); a zero term (zero points, GGUF's mins) is added per group after the chunks.
// Group qparams as stored: fp32, or fp16 bits where they are exact in fp16 (GGUF's own scales and mins), which
// halves their share of the bytes a decode step streams (a quarter of a Q4_1 layer's).
inline __m512 load_qparams(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_qparams(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// With a zero term (bias: zero points, or GGUF's mins), its share sum_g bias[n, g] * xsum[m, g] is added once per
// group after the chunk loop, from the groups' x sums (group_sums), rather than once per 16 lanes per x row in it:
// the loop's per-row work is then the two products, a conversion and one FMA.
template <int MB, int BITS, typename S>
void gemv_vnni_rows(const QuantizedInput& qi, const GroupSums& gsum, int64_t m0, const void* w, const S* scale,
                    const S* bias, const ChunkGroups& cg, int64_t K, int64_t G, float* y, int64_t ldy, int64_t n0,
                    int64_t n1) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(char(0x80));
  const int64_t row_stride = BITS == 4 ? K / 2 : K;  // bytes per weight row
  const int8_t* xq[MB];
  const float *sx[MB], *xo[MB], *xg[MB];
  PERNODE_UNROLL_ROWS
  for (int m = 0; m < MB; ++m) {
    xq[m] = qi.bytes.data() + (m0 + m) * qi.row_bytes;
    sx[m] = qi.lane_scale.data() + (m0 + m) * qi.row_lanes;
    xo[m] = qi.lane_offset.data() + (m0 + m) * qi.row_lanes;
    xg[m] = bias ? gsum.sums.data() + (m0 + m) * gsum.groups_padded : nullptr;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const char* wr = static_cast<const char*>(w) + n * row_stride;
    const S* sr = scale + n * G;
    const S* br = bias ? bias + n * G : nullptr;
    __m512 tot[MB];
    PERNODE_UNROLL_ROWS
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < qi.chunks; ++c) {
      const __mmask16 lanes = cg.lane_mask[c], groups = cg.group_mask[c];
      const __m512i lane_group = _mm512_loadu_si512(cg.lane_group.data() + c * 16);
      _mm_prefetch(wr + c * 64 + kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = _mm512_maskz_loadu_epi32(lanes, wr + c * 64);
      const __m512 sw = _mm512_permutexvar_ps(lane_group, load_qparams(sr + cg.first[c], groups));
      __m512i lo, hi;
      if (BITS == 4) {
        lo = _mm512_and_si512(v, nibble);
        hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), nibble);
      } else {
        lo = _mm512_maskz_mov_epi32(lanes, _mm512_xor_si512(v, sign));  // padding lanes stay 0, not 128
      }
      if (!br) {  // no zero point: the offset term is x-side only, sw * (sx * dot - offset * sum(x))
        PERNODE_UNROLL_ROWS
        for (int m = 0; m < MB; ++m) {
          const int8_t* xc = xq[m] + c * (BITS == 4 ? 128 : 64);
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xc));
          if (BITS == 4) d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xc + 64));
          const __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sx[m] + c * 16),
                                              _mm512_loadu_ps(xo[m] + c * 16));
          tot[m] = _mm512_fmadd_ps(sw, part, tot[m]);
        }
        continue;
      }
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) {
        const int8_t* xc = xq[m] + c * (BITS == 4 ? 128 : 64);
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xc));
        if (BITS == 4) d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xc + 64));
        const __m512 s = _mm512_mul_ps(sw, _mm512_loadu_ps(sx[m] + c * 16));
        tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, tot[m]);
      }
    }
    for (int64_t g = 0; br && g < G; g += 16) {  // the zero term, 16 groups at a time
      const __mmask16 real = __mmask16((1u << std::min<int64_t>(16, G - g)) - 1u);
      __m512 zt = load_qparams(br + g, real);
      if (BITS == 8) zt = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), load_qparams(sr + g, real), zt);  // the XOR's +128
      PERNODE_UNROLL_ROWS
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(zt, _mm512_loadu_ps(xg[m] + g), tot[m]);
    }
    PERNODE_UNROLL_ROWS
    for (int m = 0; m < MB; ++m) y[(m0 + m) * ldy + n] = _mm512_reduce_add_ps(tot[m]);
  }
}
#endif

// y = x W^T in x's dtype (fp32 or bf16) for compute-bound row counts.
at::Tensor woq_gemm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in,
                    const c10::optional<at::Tensor>& bias_in, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "woq_gemm: bits must be 4 or 8");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "woq_gemm: weight must be a contiguous 2-D tensor");
  TORCH_CHECK(x_in.dim() == 2, "woq_gemm: x must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "woq_gemm: x must be float32 or bfloat16");
  auto x = x_in.contiguous();
  auto scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t K = x.size(1), N = w.size(0), G = scale.size(1);
  const int64_t gs = group_size > 0 ? group_size : K;
  TORCH_CHECK(K % gs == 0 && K / gs == G, "woq_gemm: scale has ", G, " groups, expected ", K / gs);
  TORCH_CHECK(bits == 8 ? w.size(1) == K : w.size(1) * 8 == K, "woq_gemm: weight shape does not match x");
  TORCH_CHECK(bits == 8 ? w.scalar_type() == at::kChar : w.scalar_type() == at::kInt, "woq_gemm: weight dtype");
  TORCH_CHECK(scale.size(0) == N && (!bias.defined() || bias.sizes() == scale.sizes()), "woq_gemm: qparam shapes");
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kBFloat16)
    return tiled_gemm<c10::BFloat16>(x, w, scale.data_ptr<float>(), bp, bits, N, K, G, gs);
  return tiled_gemm<float>(x, w, scale.data_ptr<float>(), bp, bits, N, K, G, gs);
}

// Float x laid out once per call as the float GEMV reads it.
struct FloatInput {
  const float* x;            // [M][K] (int8 GEMV)
  std::vector<float> xsum;   // [M][G] per-group sums, for the zero-point/offset term (only with a bias)
  std::vector<float> xp;     // [M][NB][128] permuted per 128-value block (int4 GEMV)
};

FloatInput prepare_float_input(const float* xs, int64_t M, int64_t K, int64_t bits, int64_t G, int64_t gs,
                               bool with_sums) {
  FloatInput fi{xs, {}, {}};
  if (with_sums) {
    fi.xsum.assign(M * G, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) fi.xsum[m * G + g] += xs[m * K + k];
  }
  if (bits == 4) {
    const int64_t NB = (K + 127) / 128;
    fi.xp.assign(M * NB * 128, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        int64_t b = k / 128, i = (k % 128) / 8, j = k % 8;
        fi.xp[m * NB * 128 + b * 128 + j * 16 + i] = xs[m * K + k];
      }
  }
  return fi;
}

// The float GEMV over output rows [n0, n1).
void gemv_float(const FloatInput& fi, int64_t M, int64_t K, int64_t bits, const at::Tensor& w, const float* sp,
                const float* bp, int64_t G, int64_t gs, float* yp, int64_t N, int64_t n0, int64_t n1) {
  const float* xs = fi.x;
  const int64_t NB = (K + 127) / 128;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvRows) {
    int64_t mb = std::min(kMaxGemvRows, M - m0);
    const float* xsm = fi.xsum.empty() ? nullptr : fi.xsum.data() + m0 * G;
    float* ym = yp + m0 * N;
    if (bits == 8) {
      const int8_t* wp = w.data_ptr<int8_t>();
      const float* xm = xs + m0 * K;
      switch (mb) {
        case 1: gemv_int8_rows<1>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 2: gemv_int8_rows<2>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 3: gemv_int8_rows<3>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 4: gemv_int8_rows<4>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 5: gemv_int8_rows<5>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 6: gemv_int8_rows<6>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 7: gemv_int8_rows<7>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        default: gemv_int8_rows<8>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
      }
    } else {
      const int32_t* wp = w.data_ptr<int32_t>();
      const int64_t ld = NB * 128;
      const float* xm = fi.xp.data() + m0 * ld;
      switch (mb) {
        case 1: gemv_int4_rows<1>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 2: gemv_int4_rows<2>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 3: gemv_int4_rows<3>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 4: gemv_int4_rows<4>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 5: gemv_int4_rows<5>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 6: gemv_int4_rows<6>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        case 7: gemv_int4_rows<7>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        default: gemv_int4_rows<8>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
      }
    }
  }
}

#if defined(PERNODE_VNNI)
template <typename S>
void gemv_vnni(const QuantizedInput& qi, const GroupSums& gsum, int64_t M, int64_t K, int64_t bits,
               const at::Tensor& w, const S* sp, const S* bp, const ChunkGroups& cg, int64_t G, float* yp, int64_t N,
               int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvRows) {
    const int64_t mb = std::min(kMaxGemvRows, M - m0);
    const void* wp = w.data_ptr();
#define PERNODE_VNNI_CASE(MBV)                                                                 \
  if (bits == 4) gemv_vnni_rows<MBV, 4, S>(qi, gsum, m0, wp, sp, bp, cg, K, G, yp, N, n0, n1); \
  else gemv_vnni_rows<MBV, 8, S>(qi, gsum, m0, wp, sp, bp, cg, K, G, yp, N, n0, n1);
    switch (mb) {
      case 1: PERNODE_VNNI_CASE(1) break;
      case 2: PERNODE_VNNI_CASE(2) break;
      case 3: PERNODE_VNNI_CASE(3) break;
      case 4: PERNODE_VNNI_CASE(4) break;
      case 5: PERNODE_VNNI_CASE(5) break;
      case 6: PERNODE_VNNI_CASE(6) break;
      case 7: PERNODE_VNNI_CASE(7) break;
      default: PERNODE_VNNI_CASE(8) break;
    }
#undef PERNODE_VNNI_CASE
  }
}
#endif

// x as fp32 rows: bf16 widened into `widened` by a plain loop (an aten::to per call costs more in dispatch than the
// conversion itself, ~120 calls a decode step), any other dtype converted into `holder`, which keeps it alive.
inline const float* fp32_rows(const at::Tensor& x_in, at::Tensor& holder, std::vector<float>& widened) {
  if (x_in.scalar_type() == at::kBFloat16) {
    const auto xc = x_in.contiguous();
    const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
    widened.resize(xc.numel());
    for (int64_t i = 0; i < xc.numel(); ++i) widened[i] = static_cast<float>(src[i]);
    return widened.data();
  }
  holder = x_in.to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

at::Tensor woq_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in,
                      const c10::optional<at::Tensor>& bias_in, int64_t bits, int64_t group_size,
                      int64_t num_threads, bool quantize_input) {
  TORCH_CHECK(bits == 4 || bits == 8, "woq_linear: bits must be 4 or 8");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "woq_linear: weight must be a contiguous 2-D tensor");
  TORCH_CHECK(x_in.dim() == 2, "woq_linear: x must be 2-D");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
#if defined(PERNODE_VNNI) || defined(PERNODE_AVX2_INT8X)
  // fp16 qparams (see load_qparams) go to the int8-x GEMV as stored; every other path reads fp32
  const bool half_qparams = quantize_input && scale_in.scalar_type() == at::kHalf &&
                            (!has_bias || bias_in->scalar_type() == at::kHalf)
#if !defined(PERNODE_VNNI)
                            && bits == 4  // the AVX2 int8-x GEMV is int4's only
#endif
      ;
#else
  const bool half_qparams = false;
#endif
  auto scale = half_qparams ? scale_in.contiguous() : scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (has_bias) bias = half_qparams ? bias_in->contiguous() : bias_in->to(at::kFloat).contiguous();
  const float* bp = bias.defined() && !half_qparams ? bias.data_ptr<float>() : nullptr;
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0), G = scale.size(1);
  const int64_t gs = group_size > 0 ? group_size : K;
  TORCH_CHECK(K % gs == 0 && K / gs == G, "woq_linear: scale has ", G, " groups, expected ", K / gs);
  TORCH_CHECK(bits == 8 ? w.size(1) == K : w.size(1) * 8 == K, "woq_linear: weight shape does not match x");
  TORCH_CHECK(bits == 8 ? w.scalar_type() == at::kChar : w.scalar_type() == at::kInt, "woq_linear: weight dtype");
  TORCH_CHECK(!quantize_input || (K % kActBlock == 0 && gs % kActBlock == 0),
              "woq_linear: quantize_input needs the input size and group size to be multiples of ", kActBlock);
  // bf16 x (the default dtype's decode steps) comes back as bf16 y; the widening and narrowing are plain loops here:
  // two aten::to per call cost more in dispatch than the conversions themselves (~120 calls a decode step).
  const bool bf16_io = x_in.scalar_type() == at::kBFloat16;
  if (!quantize_input && M > kFloatGemvMaxRows) {  // batch: the matmul's compute dwarfs dequantising W
    auto y = tiled_matmul(x_in.to(at::kFloat).contiguous(), w, scale.data_ptr<float>(), bp, bits, N, K, G, gs);
    return bf16_io ? y.to(at::kBFloat16) : y;
  }
  at::Tensor x;
  std::vector<float> x_widened, y_wide;
  const float* xptr = fp32_rows(x_in, x, x_widened);
  at::Tensor y = at::empty({M, N}, x_in.options().dtype(bf16_io ? at::kBFloat16 : at::kFloat));
  if (bf16_io) y_wide.resize(M * N);
  float* yp = bf16_io ? y_wide.data() : y.data_ptr<float>();
  const float* sp = half_qparams ? nullptr : scale.data_ptr<float>();
  std::function<void(int64_t, int64_t)> rows;
  FloatInput fi;
  QuantizedInput qi;
  GroupSums gsum;
  std::unique_ptr<ChunkGroups> cg;
#if defined(PERNODE_AVX2_INT8X)
  XBlocks plan;
  Int16Input xi;
  if (!quantize_input && bits == 8 && K % 32 == 0 && gs % 32 == 0) {  // int8 weights: int16 x (gemv_int8x_avx2.h)
    xi = quantize_input_int16(xptr, M, K, G);
    const int8_t* wp = w.data_ptr<int8_t>();
    rows = [&, wp](int64_t n0, int64_t n1) { gemv_int8_int16x_avx2(xi, M, K, wp, sp, bp, G, yp, N, n0, n1); };
  } else
#endif
  if (!quantize_input) {
    fi = prepare_float_input(xptr, M, K, bits, G, gs, bp != nullptr || bits == 4);
    rows = [&](int64_t n0, int64_t n1) { gemv_float(fi, M, K, bits, w, sp, bp, G, gs, yp, N, n0, n1); };
  } else {
    qi = quantize_input_blocks(xptr, M, K, bits, num_threads != 1);
#if defined(PERNODE_VNNI)
    cg = std::make_unique<ChunkGroups>(bits == 4 ? K / 8 : K / 4, bits == 4 ? 8 : 4, G, gs);
    if (bias.defined()) gsum = group_sums(qi, M, K, G, gs);
    if (half_qparams) {
      const auto* sh = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
      const auto* bh = bias.defined() ? reinterpret_cast<const uint16_t*>(bias.data_ptr<at::Half>()) : nullptr;
      rows = [&, sh, bh](int64_t n0, int64_t n1) {
        gemv_vnni(qi, gsum, M, K, bits, w, sh, bh, *cg, G, yp, N, n0, n1);
      };
    } else {
      rows = [&](int64_t n0, int64_t n1) { gemv_vnni(qi, gsum, M, K, bits, w, sp, bp, *cg, G, yp, N, n0, n1); };
    }
#else
#if defined(PERNODE_AVX2_INT8X)
    if (bits == 4) {  // int4 x int8 with vpmaddubsw + vpmaddwd (gemv_int8x_avx2.h)
      plan = int8_x_blocks(qi, M, K, G);
      const int32_t* wp = w.data_ptr<int32_t>();
      if (half_qparams) {
        const auto* sh = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
        const auto* bh = bias.defined() ? reinterpret_cast<const uint16_t*>(bias.data_ptr<at::Half>()) : nullptr;
        rows = [&, wp, sh, bh](int64_t n0, int64_t n1) {
          gemv_int4_int8x_avx2(qi, plan, M, K, wp, sh, bh, G, yp, N, n0, n1);
        };
      } else {
        rows = [&, wp](int64_t n0, int64_t n1) { gemv_int4_int8x_avx2(qi, plan, M, K, wp, sp, bp, G, yp, N, n0, n1); };
      }
    } else
#endif
    {  // the float GEMV on the dequantized int8 x gives the same numbers, slower
      fi = prepare_float_input(qi.dequantized.data(), M, K, bits, G, gs, bp != nullptr || bits == 4);
      rows = [&](int64_t n0, int64_t n1) { gemv_float(fi, M, K, bits, w, sp, bp, G, gs, yp, N, n0, n1); };
    }
#endif
  }
  // num_threads == 1 runs on the caller's thread: on an oversubscribed CPU a fork-join per layer waits for the
  // slowest, descheduled thread, which costs far more than the second core gains for a memory-bound GEMV.
  if (num_threads == 1)
    rows(0, N);
  else
    at::parallel_for(0, N, 16, rows);
  if (bf16_io) {  // rounds to nearest even, as y.to(bfloat16) does
    c10::BFloat16* dst = y.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) dst[i] = c10::BFloat16(y_wide[i]);
  }
  return y;
}

}  // namespace
}  // namespace quant
}  // namespace pernode
