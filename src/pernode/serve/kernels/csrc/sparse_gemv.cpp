// fp32 y = x W^T (+ b) with W stored as compressed-tensors' sparse-bitmask: the nonzeros of each row, row-major
// (`values`, row n starting at row_offsets[n]), and a bitmask [N, ceil(K/8)] (column k at bit k%8 of byte k/8).
//
// Decode is bound by the bytes of weights it streams. At sparsity s a row costs (1 - s) * 4 + 1/8 bytes per
// column instead of 4, so above ~50% sparsity the stream shrinks ~2x. The price is the expansion: per 16
// columns, 2 mask bytes pick which lanes the next popcount(mask) values go to (AVX-512 vexpandps), then the same
// FMA as the dense GEMV. For up to 4 rows of x the expanded vector is used at once; for more rows each W row is
// expanded into a buffer in L1 first and dotted with the x rows from there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pernode {
namespace {

constexpr int64_t kMaxRowsFused = 4;

inline uint16_t mask16(const uint8_t* bits, int64_t k0) {  // bits for columns k0..k0+15 (k0 % 16 == 0)
  return static_cast<uint16_t>(bits[k0 / 8]) | (static_cast<uint16_t>(bits[k0 / 8 + 1]) << 8);
}

// Rows [n0, n1) for MB (<= 4) rows of x: expand 16 columns, FMA into MB accumulators.
template <int MB>
void fused_rows(const float* x, int64_t K, const float* values, const uint8_t* bitmask, int64_t KB,
                const int64_t* offsets, const float* b, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = values + offsets[n];
    const uint8_t* bits = bitmask + n * KB;
    float out[MB];
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const uint16_t mk = mask16(bits, k);
      if (!mk) continue;
      const __m512 wv = _mm512_maskz_expandloadu_ps(mk, v);
      v += __builtin_popcount(mk);
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int m = 0; m < MB; ++m) out[m] = 0.f;
#endif
    for (; k < K; ++k) {  // the ragged tail (and every column without AVX-512)
      if (bits[k / 8] >> (k % 8) & 1) {
        const float w = *v++;
        for (int m = 0; m < MB; ++m) out[m] += w * x[m * K + k];
      }
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = out[m] + (b ? b[n] : 0.f);
  }
}

// One W row expanded into buf [K] (zeros where pruned).
inline void expand_row(const float* v, const uint8_t* bits, int64_t K, float* buf) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= K; k += 16) {
    const uint16_t mk = mask16(bits, k);
    _mm512_storeu_ps(buf + k, _mm512_maskz_expandloadu_ps(mk, v));
    v += __builtin_popcount(mk);
  }
#endif
  for (; k < K; ++k) buf[k] = (bits[k / 8] >> (k % 8) & 1) ? *v++ : 0.f;
}

// Rows [n0, n1) for all M rows of x, through a per-row buffer.
void buffered_rows(const float* x, int64_t M, int64_t K, const float* values, const uint8_t* bitmask, int64_t KB,
                   const int64_t* offsets, const float* b, float* y, int64_t N, int64_t n0, int64_t n1) {
  std::vector<float> buf(K);
  for (int64_t n = n0; n < n1; ++n) {
    expand_row(values + offsets[n], bitmask + n * KB, K, buf.data());
    const float bias = b ? b[n] : 0.f;
    int64_t m = 0;
#if defined(__AVX512F__)
    for (; m + 4 <= M; m += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* x0 = x + m * K;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m512 wv = _mm512_loadu_ps(buf.data() + k);
        a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + k), a0);
        a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + K + k), a1);
        a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + 2 * K + k), a2);
        a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + 3 * K + k), a3);
      }
      float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                    _mm512_reduce_add_ps(a3)};
      for (; k < K; ++k)
        for (int r = 0; r < 4; ++r) s[r] += buf[k] * x0[r * K + k];
      for (int r = 0; r < 4; ++r) y[(m + r) * N + n] = s[r] + bias;
    }
#endif
    for (; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += buf[k] * x[m * K + k];
      y[m * N + n] = s + bias;
    }
  }
}

at::Tensor sparse_gemv(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& bitmask_in,
                       const at::Tensor& offsets_in, const c10::optional<at::Tensor>& bias_in, int64_t num_threads) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && values_in.scalar_type() == at::kFloat, "sparse_gemv: fp32 only");
  TORCH_CHECK(bitmask_in.scalar_type() == at::kByte && offsets_in.scalar_type() == at::kLong,
              "sparse_gemv: bitmask uint8, row_offsets int64");
  TORCH_CHECK(x_in.dim() == 2 && bitmask_in.dim() == 2 && offsets_in.dim() == 1, "sparse_gemv: shapes");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = bitmask_in.size(0), KB = bitmask_in.size(1);
  TORCH_CHECK(KB == (K + 7) / 8 && offsets_in.size(0) == N, "sparse_gemv: bitmask [N, ceil(K/8)], row_offsets [N]");
  auto x = x_in.contiguous();
  auto values = values_in.contiguous();
  auto bitmask = bitmask_in.contiguous();
  auto offsets = offsets_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const uint8_t* bp = bitmask.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const float* biasp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  auto rows = [&](int64_t n0, int64_t n1) {
    if (M > kMaxRowsFused) {
      buffered_rows(xp, M, K, vp, bp, KB, op, biasp, yp, N, n0, n1);
      return;
    }
    switch (M) {
      case 0: break;
      case 1: fused_rows<1>(xp, K, vp, bp, KB, op, biasp, yp, N, n0, n1); break;
      case 2: fused_rows<2>(xp, K, vp, bp, KB, op, biasp, yp, N, n0, n1); break;
      case 3: fused_rows<3>(xp, K, vp, bp, KB, op, biasp, yp, N, n0, n1); break;
      default: fused_rows<4>(xp, K, vp, bp, KB, op, biasp, yp, N, n0, n1); break;
    }
  };
  if (num_threads == 1)  // as dense_gemv.cpp: no fork-join per layer on an oversubscribed CPU
    rows(0, N);
  else
    at::parallel_for(0, N, 16, rows);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def("sparse_gemv(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? bias, int num_threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) { m.impl("sparse_gemv", sparse_gemv); }

}  // namespace pernode
