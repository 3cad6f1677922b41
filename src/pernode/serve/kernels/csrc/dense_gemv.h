#pragma once
// fp32 y = x W^T (+ b) for decode-sized batches (1..8 rows), W row-major [N, K] as nn.Linear stores it.
//
// oneDNN's fp32 GEMM streams a large W at ~10 GB/s for one row on this class of CPU and takes ~2.5x longer for
// 2-3 rows than for 4 (a small-M path); decode is exactly that shape. Here each W row is read once per call,
// dotted with up to 4 x rows at a time, with a software prefetch ahead of the stream, over output rows split
// across threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

#include "horizontal_sum.h"

namespace pernode {
namespace dense {
namespace {

constexpr int64_t kMaxRowsPerPass = 4;
constexpr int64_t kPrefetchBytes = 2048;

template <int MB>
void dense_rows(const float* x, int64_t K, const float* w, const float* b, float* y, int64_t N, int64_t n0,
                int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    float out[MB];
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 wv = _mm512_loadu_ps(wr + k);
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#elif defined(__AVX2__) && defined(__FMA__)  // 8 lanes wide on CPUs without AVX-512
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < MB; ++m) out[m] = simd::hsum256(acc[m]);
#else
    for (int m = 0; m < MB; ++m) out[m] = 0.f;
#endif
    for (; k < K; ++k)
      for (int m = 0; m < MB; ++m) out[m] += wr[k] * x[m * K + k];
    for (int m = 0; m < MB; ++m) y[m * N + n] = out[m] + (b ? b[n] : 0.f);
  }
}

at::Tensor dense_gemv(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
                      int64_t num_threads) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat, "dense_gemv: fp32 only");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1), "dense_gemv: shapes");
  auto x = x_in.contiguous();
  auto w = w_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  auto rows = [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
      const float* xm = xp + m0 * K;
      float* ym = yp + m0 * N;
      switch (std::min(kMaxRowsPerPass, M - m0)) {
        case 1: dense_rows<1>(xm, K, wp, bp, ym, N, n0, n1); break;
        case 2: dense_rows<2>(xm, K, wp, bp, ym, N, n0, n1); break;
        case 3: dense_rows<3>(xm, K, wp, bp, ym, N, n0, n1); break;
        default: dense_rows<4>(xm, K, wp, bp, ym, N, n0, n1); break;
      }
    }
  };
  if (num_threads == 1)  // see quant_linear.cpp: a fork-join per layer stalls on an oversubscribed CPU
    rows(0, N);
  else
    at::parallel_for(0, N, 16, rows);
  return y;
}

}  // namespace
}  // namespace dense
}  // namespace pernode
