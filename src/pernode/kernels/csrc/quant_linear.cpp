// Weight-only quantized linear on CPU: y = x W^T with W stored as int8 [N, K] or int4 packed 8 per int32 along K
// (compressed-tensors "pack-quantized": value k at bits 4*(k%8) of word k/8, stored unsigned as q + 8).
//
// Dequantisation factors out of each group's dot product:
//   y[m, n] = sum_g scale[n, g] * dot_g(u[n], x[m]) + bias[n, g] * sum_g(x[m])
// where u is the stored integer (signed int8, or the unsigned nibble) and bias = -(offset + zero_point) * scale.
// So the inner loop is convert-and-FMA on raw integers; scales are applied once per group.
//
// Small batches (decode): a GEMV that streams each weight row once and reuses it for up to 4 activation rows;
// OpenMP (at::parallel_for) over output rows. int4 rows are read 64 bytes (128 values) at a time: lane i holds
// word i, and shifting by 4j exposes value 8i + j, so x is permuted once per call to match.
// Large batches: dequantise W to fp32 in one parallel pass and hand it to at::mm.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pernode {
namespace {

constexpr int64_t kMaxGemvRows = 4;  // activation rows sharing one pass over the weights

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
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[MB];
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k))));
          for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m]);
        }
        __m512 s = _mm512_set1_ps(sr[g]);
        for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(acc[m], s, tot[m]);
      }
      for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(tot[m]);
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
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < NB; ++b) {
      __mmask16 wm = (__mmask16)((1u << nw[b]) - 1u);
      __m512i v = _mm512_maskz_loadu_epi32(wm, wr + b * 16);
      __m512 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
      const float* xb = xp + b * 128;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        __m512 wv = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4 * j), mask4));
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xb + m * ldxp + j * 16), acc[m]);
      }
      int64_t ng = std::min<int64_t>(16, G - g0[b]);
      __m512 s = _mm512_permutexvar_ps(_mm512_loadu_si512(idx.data() + b * 16),
                                       _mm512_maskz_loadu_ps((__mmask16)((1u << ng) - 1u), sr + g0[b]));
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(acc[m], s, tot[m]);
    }
    float out[MB];
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(tot[m]);
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
    if (bias) {
      const float* br = bias + n * G;
      for (int m = 0; m < MB; ++m)
        for (int64_t g = 0; g < G; ++g) out[m] += br[g] * xsum[m * G + g];
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = out[m];
  }
}

void dequant_all(const at::Tensor& w, const float* scale, const float* bias, int64_t bits, int64_t N, int64_t K,
                 int64_t G, int64_t gs, float* dst) {
  at::parallel_for(0, N, 16, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) {
      float* d = dst + n * K;
      const float* sr = scale + n * G;
      const float* br = bias ? bias + n * G : nullptr;
      for (int64_t g = 0; g < G; ++g) {
        const float s = sr[g], z = br ? br[g] : 0.f;
        float* dg = d + g * gs;
        if (bits == 8) {
          const int8_t* wg = w.data_ptr<int8_t>() + n * K + g * gs;
          for (int64_t k = 0; k < gs; ++k) dg[k] = float(wg[k]) * s + z;
        } else {
          const int32_t* wg = w.data_ptr<int32_t>() + n * (K / 8) + g * gs / 8;
          for (int64_t k8 = 0; k8 < gs / 8; ++k8) {
            const int32_t v = wg[k8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) dg[8 * k8 + j] = float((v >> (4 * j)) & 0xF) * s + z;
          }
        }
      }
    }
  });
}

at::Tensor woq_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in,
                      const c10::optional<at::Tensor>& bias_in, int64_t bits, int64_t group_size,
                      int64_t num_threads) {
  TORCH_CHECK(bits == 4 || bits == 8, "woq_linear: bits must be 4 or 8");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "woq_linear: weight must be a contiguous 2-D tensor");
  auto x = x_in.to(at::kFloat).contiguous();
  auto scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  const int64_t gs = group_size > 0 ? group_size : K;
  TORCH_CHECK(K % gs == 0 && K / gs == G, "woq_linear: scale has ", G, " groups, expected ", K / gs);
  TORCH_CHECK(bits == 8 ? w.size(1) == K : w.size(1) * 8 == K, "woq_linear: weight shape does not match x");
  TORCH_CHECK(bits == 8 ? w.scalar_type() == at::kChar : w.scalar_type() == at::kInt, "woq_linear: weight dtype");
  auto y = at::empty({M, N}, x.options());

  if (M > 2 * kMaxGemvRows) {  // batch: the matmul's compute dwarfs one pass that dequantises W to fp32
    auto wf = at::empty({N, K}, x.options());
    dequant_all(w, scale.data_ptr<float>(), bp, bits, N, K, G, gs, wf.data_ptr<float>());
    return at::mm(x, wf.t());
  }

  // Per-group sums of x, for the zero-point/offset term.
  std::vector<float> xsum(bp ? M * G : 0);
  if (bp)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x.data_ptr<float>()[m * K + k];
        xsum[m * G + g] = s;
      }
  const float* xs = x.data_ptr<float>();
  std::vector<float> xp;
  const int64_t NB = (K + 127) / 128;
  if (bits == 4) {
    xp.assign(M * NB * 128, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        int64_t b = k / 128, i = (k % 128) / 8, j = k % 8;
        xp[m * NB * 128 + b * 128 + j * 16 + i] = xs[m * K + k];
      }
  }
  float* yp = y.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  auto rows = [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvRows) {
      int64_t mb = std::min(kMaxGemvRows, M - m0);
      const float* xsm = bp ? xsum.data() + m0 * G : nullptr;
      if (bits == 8) {
        const int8_t* wp = w.data_ptr<int8_t>();
        const float* xm = xs + m0 * K;
        float* ym = yp + m0 * N;
        switch (mb) {
          case 1: gemv_int8_rows<1>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
          case 2: gemv_int8_rows<2>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
          case 3: gemv_int8_rows<3>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
          default: gemv_int8_rows<4>(xm, K, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        }
      } else {
        const int32_t* wp = w.data_ptr<int32_t>();
        const int64_t ld = NB * 128;
        const float* xm = xp.data() + m0 * ld;
        float* ym = yp + m0 * N;
        switch (mb) {
          case 1: gemv_int4_rows<1>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
          case 2: gemv_int4_rows<2>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
          case 3: gemv_int4_rows<3>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
          default: gemv_int4_rows<4>(xm, ld, wp, sp, bp, xsm, K, G, gs, ym, N, n0, n1); break;
        }
      }
    }
  };
  // num_threads == 1 runs on the caller's thread: on an oversubscribed CPU a fork-join per layer waits for the
  // slowest, descheduled thread, which costs far more than the second core gains for a memory-bound GEMV.
  if (num_threads == 1)
    rows(0, N);
  else
    at::parallel_for(0, N, 16, rows);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def("woq_linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term, int bits, int group_size, int num_threads=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) { m.impl("woq_linear", &woq_linear); }

}  // namespace pernode
