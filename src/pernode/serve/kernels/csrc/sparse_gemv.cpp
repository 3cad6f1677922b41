// y = x W^T (+ b) with W stored as compressed-tensors' sparse-bitmask: the nonzeros of each row, row-major
// (`values`, row n starting at row_offsets[n]), and a bitmask [N, ceil(K/8)] (column k at bit k%8 of byte k/8).
// fp32 or bf16 (x and values the same dtype); bf16 products are summed in fp32 and y is rounded to bf16 once.
//
// Decode is bound by the bytes of weights it streams. At sparsity s a row costs (1 - s) * 4 + 1/8 bytes per
// column instead of 4 (bf16: (1 - s) * 2 + 1/8 instead of 2), so above ~50% sparsity the stream shrinks ~2x. The
// price is the expansion: per 16 columns, 2 mask bytes pick which lanes the next popcount(mask) values go to
// (AVX-512 vexpandps; bf16 values are widened to fp32 first, a masked load never reading past the row's values),
// then the same FMA as the dense GEMV. AVX2 has no expand: per 8 columns one mask byte indexes a table of lane
// permutations (vpermps) applied to the next popcount(mask) values, loaded without reading past them. For up to 4 rows of x the expanded vector is used at once; for more rows
// each W row is expanded into a buffer in L1 first and dotted with the x rows from there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "horizontal_sum.h"  // PERNODE_HSUM256: AVX2 + FMA without AVX-512

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pernode {
namespace {

constexpr int64_t kMaxRowsFused = 4;
using bf16_bits = uint16_t;  // a bf16 value's raw bits: the high half of the fp32 with the same value

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Whether the 16-column SIMD path exists for a value type on the CPU this was built for (-march=native).
template <typename V> constexpr bool kSimd = false;
#if defined(__AVX512F__)
template <> constexpr bool kSimd<float> = true;
inline __m512 expand16(const float* v, uint16_t mk) { return _mm512_maskz_expandloadu_ps(mk, v); }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
template <> constexpr bool kSimd<bf16_bits> = true;
inline __m512 expand16(const bf16_bits* v, uint16_t mk) {
  const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(mk)) - 1);  // the next popcount values
  const __m256i raw = _mm256_maskz_loadu_epi16(first, v);
  const __m512 packed = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_maskz_expand_ps(mk, packed);
}
#endif
#endif

#if defined(PERNODE_HSUM256)
#define PERNODE_SPARSE_AVX2 1
// Lane i of 8 columns whose mask byte is mk reads value popcount(mk & ((1 << i) - 1)) when bit i is set, and lane 7
// otherwise (a masked load leaves it zero when fewer than 8 values are loaded); `keep` is all ones in set lanes.
struct ExpandTable {
  alignas(32) int32_t lanes[256][8];
  alignas(32) int32_t keep[256][8];
  constexpr ExpandTable() : lanes(), keep() {
    for (int mk = 0; mk < 256; ++mk)
      for (int i = 0, next = 0; i < 8; ++i) {
        lanes[mk][i] = (mk >> i & 1) ? next++ : 7;
        keep[mk][i] = (mk >> i & 1) ? -1 : 0;
      }
  }
};
constexpr ExpandTable kExpand;

inline __m256i table_row(const int32_t (&row)[8]) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(row)); }

// expand8 with a plain load: it reads 8 values whatever popcount(mk), so only where 8 values follow v in memory.
inline __m256 expand8_unmasked(const float* v, unsigned mk) {
  const __m256 spread = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), table_row(kExpand.lanes[mk]));
  return _mm256_and_ps(spread, _mm256_castsi256_ps(table_row(kExpand.keep[mk])));
}

template <typename V> constexpr bool kSimd8 = false;
template <> constexpr bool kSimd8<float> = true;
template <> constexpr bool kSimd8<bf16_bits> = true;

inline __m256 expand8(const float* v, unsigned mk) {
  const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(__builtin_popcount(mk)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 packed = _mm256_maskload_ps(v, first);  // masked-off lanes are not read, and read as zero
  return _mm256_permutevar8x32_ps(packed, table_row(kExpand.lanes[mk]));
}
inline __m256 expand8(const bf16_bits* v, unsigned mk) {
  alignas(16) bf16_bits next[8] = {};
  std::memcpy(next, v, __builtin_popcount(mk) * sizeof(bf16_bits));  // never past the row's values
  const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(next))), 16);
  return _mm256_permutevar8x32_ps(_mm256_castsi256_ps(wide), table_row(kExpand.lanes[mk]));
}
#endif

inline uint16_t mask16(const uint8_t* bits, int64_t k0) {  // bits for columns k0..k0+15 (k0 % 16 == 0)
  return static_cast<uint16_t>(bits[k0 / 8]) | (static_cast<uint16_t>(bits[k0 / 8 + 1]) << 8);
}

// Rows [n0, n1) for MB (<= 4) rows of x (fp32): expand 16 columns, FMA into MB accumulators.
template <int MB, typename V>
void fused_rows(const float* x, int64_t K, const V* values, const V* values_end, const uint8_t* bitmask, int64_t KB,
                const int64_t* offsets, const float* b, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const V* v = values + offsets[n];
    const uint8_t* bits = bitmask + n * KB;
    float out[MB];
    for (int m = 0; m < MB; ++m) out[m] = 0.f;
    int64_t k = 0;
#if defined(__AVX512F__)
    if constexpr (kSimd<V>) {
      __m512 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) {
        const uint16_t mk = mask16(bits, k);
        if (!mk) continue;
        const __m512 wv = expand16(v, mk);
        v += __builtin_popcount(mk);
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
      }
      for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
    }
#elif defined(PERNODE_SPARSE_AVX2)
    if constexpr (kSimd8<V>) {
      __m256 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
      // 32 columns a step: the four 8-column expansions find their values from one mask word's popcounts, so the
      // loop-carried chain is one popcount and add per 32 columns instead of per 8.
      for (; k + 32 <= K; k += 32) {
        uint32_t mk;
        std::memcpy(&mk, bits + k / 8, sizeof mk);
        const V* v1 = v + __builtin_popcount(mk & 0xFFu);
        const V* v2 = v + __builtin_popcount(mk & 0xFFFFu);
        const V* v3 = v + __builtin_popcount(mk & 0xFFFFFFu);
        __m256 w0, w1, w2, w3;
        if (std::is_same_v<V, float> && v + 32 <= values_end) {  // 8 values after each start: plain loads
          const auto* f = reinterpret_cast<const float*>(v);
          w0 = expand8_unmasked(f, mk & 0xFFu);
          w1 = expand8_unmasked(reinterpret_cast<const float*>(v1), mk >> 8 & 0xFFu);
          w2 = expand8_unmasked(reinterpret_cast<const float*>(v2), mk >> 16 & 0xFFu);
          w3 = expand8_unmasked(reinterpret_cast<const float*>(v3), mk >> 24);
        } else {
          w0 = expand8(v, mk & 0xFFu), w1 = expand8(v1, mk >> 8 & 0xFFu);
          w2 = expand8(v2, mk >> 16 & 0xFFu), w3 = expand8(v3, mk >> 24);
        }
        v += __builtin_popcount(mk);
        for (int m = 0; m < MB; ++m) {
          const float* xm = x + m * K + k;
          const __m256 lo = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(xm)));
          const __m256 hi = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), _mm256_mul_ps(w2, _mm256_loadu_ps(xm + 16)));
          acc[m] = _mm256_add_ps(acc[m], _mm256_add_ps(lo, hi));
        }
      }
      for (; k + 8 <= K; k += 8) {
        const unsigned mk = bits[k / 8];
        const __m256 wv = expand8(v, mk);
        v += __builtin_popcount(mk);
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
      }
      for (int m = 0; m < MB; ++m) out[m] = simd::hsum256(acc[m]);
    }
#endif
    for (; k < K; ++k) {  // the ragged tail (and every column without the SIMD path)
      if (bits[k / 8] >> (k % 8) & 1) {
        const float w = to_float(*v++);
        for (int m = 0; m < MB; ++m) out[m] += w * x[m * K + k];
      }
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = out[m] + (b ? b[n] : 0.f);
  }
}

// The dense dot products of the buffered path, as wide as the vector unit.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kVec = 16;
inline Vec vec_zero() { return _mm512_setzero_ps(); }
inline Vec vec_load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vec_fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vec_sum(Vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(PERNODE_SPARSE_AVX2)
using Vec = __m256;
constexpr int64_t kVec = 8;
inline Vec vec_zero() { return _mm256_setzero_ps(); }
inline Vec vec_load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vec_fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vec_sum(Vec a) { return simd::hsum256(a); }
#endif

// One W row expanded into buf [K] (fp32, zeros where pruned).
template <typename V>
inline void expand_row(const V* v, const uint8_t* bits, int64_t K, float* buf) {
  int64_t k = 0;
#if defined(__AVX512F__)
  if constexpr (kSimd<V>) {
    for (; k + 16 <= K; k += 16) {
      const uint16_t mk = mask16(bits, k);
      _mm512_storeu_ps(buf + k, expand16(v, mk));
      v += __builtin_popcount(mk);
    }
  }
#elif defined(PERNODE_SPARSE_AVX2)
  if constexpr (kSimd8<V>) {
    for (; k + 8 <= K; k += 8) {
      const unsigned mk = bits[k / 8];
      _mm256_storeu_ps(buf + k, mk ? expand8(v, mk) : _mm256_setzero_ps());
      v += __builtin_popcount(mk);
    }
  }
#endif
  for (; k < K; ++k) buf[k] = (bits[k / 8] >> (k % 8) & 1) ? to_float(*v++) : 0.f;
}

// Rows [n0, n1) for all M rows of x, through a per-row buffer.
template <typename V>
void buffered_rows(const float* x, int64_t M, int64_t K, const V* values, const uint8_t* bitmask, int64_t KB,
                   const int64_t* offsets, const float* b, float* y, int64_t N, int64_t n0, int64_t n1) {
  std::vector<float> buf(K);
  for (int64_t n = n0; n < n1; ++n) {
    expand_row(values + offsets[n], bitmask + n * KB, K, buf.data());
    const float bias = b ? b[n] : 0.f;
    int64_t m = 0;
#if defined(__AVX512F__) || defined(PERNODE_SPARSE_AVX2)
    for (; m + 4 <= M; m += 4) {
      Vec a[4] = {vec_zero(), vec_zero(), vec_zero(), vec_zero()};
      const float* x0 = x + m * K;
      int64_t k = 0;
      for (; k + kVec <= K; k += kVec) {
        const Vec wv = vec_load(buf.data() + k);
        for (int r = 0; r < 4; ++r) a[r] = vec_fma(wv, vec_load(x0 + r * K + k), a[r]);
      }
      float s[4];
      for (int r = 0; r < 4; ++r) s[r] = vec_sum(a[r]);
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

template <typename V>
void run_rows(const float* xp, int64_t M, int64_t K, const V* vp, const V* v_end, const uint8_t* bp, int64_t KB,
              const int64_t* op, const float* biasp, float* yp, int64_t N, int64_t num_threads) {
  auto rows = [&](int64_t n0, int64_t n1) {
    if (M > kMaxRowsFused) {
      buffered_rows<V>(xp, M, K, vp, bp, KB, op, biasp, yp, N, n0, n1);
      return;
    }
    switch (M) {
      case 0: break;
      case 1: fused_rows<1, V>(xp, K, vp, v_end, bp, KB, op, biasp, yp, N, n0, n1); break;
      case 2: fused_rows<2, V>(xp, K, vp, v_end, bp, KB, op, biasp, yp, N, n0, n1); break;
      case 3: fused_rows<3, V>(xp, K, vp, v_end, bp, KB, op, biasp, yp, N, n0, n1); break;
      default: fused_rows<4, V>(xp, K, vp, v_end, bp, KB, op, biasp, yp, N, n0, n1); break;
    }
  };
  if (num_threads == 1)  // as dense_gemv.cpp: no fork-join per layer on an oversubscribed CPU
    rows(0, N);
  else
    at::parallel_for(0, N, 16, rows);
}

at::Tensor sparse_gemv(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& bitmask_in,
                       const at::Tensor& offsets_in, const c10::optional<at::Tensor>& bias_in, int64_t num_threads) {
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && values_in.scalar_type() == dtype,
              "sparse_gemv: x and values both float32 or both bfloat16, got ", x_in.scalar_type(), " and ",
              values_in.scalar_type());
  TORCH_CHECK(bitmask_in.scalar_type() == at::kByte && offsets_in.scalar_type() == at::kLong,
              "sparse_gemv: bitmask uint8, row_offsets int64");
  TORCH_CHECK(x_in.dim() == 2 && bitmask_in.dim() == 2 && offsets_in.dim() == 1, "sparse_gemv: shapes");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = bitmask_in.size(0), KB = bitmask_in.size(1);
  TORCH_CHECK(KB == (K + 7) / 8 && offsets_in.size(0) == N, "sparse_gemv: bitmask [N, ceil(K/8)], row_offsets [N]");
  auto x = x_in.to(at::kFloat).contiguous();  // bf16 x: M x K widened once, so the inner loop is the fp32 one
  auto values = values_in.contiguous();
  auto bitmask = bitmask_in.contiguous();
  auto offsets = offsets_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = bitmask.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const float* biasp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (dtype == at::kFloat) {
    const float* vp = values.data_ptr<float>();
    run_rows<float>(xp, M, K, vp, vp + values.numel(), bp, KB, op, biasp, yp, N, num_threads);
    return y;
  }
  const auto* vp = reinterpret_cast<const bf16_bits*>(values.data_ptr<at::BFloat16>());
  run_rows<bf16_bits>(xp, M, K, vp, vp + values.numel(), bp, KB, op, biasp, yp, N, num_threads);
  return y.to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def("sparse_gemv(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? bias, int num_threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) { m.impl("sparse_gemv", sparse_gemv); }

}  // namespace pernode
