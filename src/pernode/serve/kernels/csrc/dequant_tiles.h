#pragma once
// GEMMs over a weight-only quantized W (int8 [N, K], or int4 packed 8 per int32 along K as in quant_linear.h)
// dequantised a tile of output rows at a time: `dequant_rows_to` writes rows [n0, n1) as T (fp32, or bf16 for a bf16
// GEMM) into a buffer that stays in cache, and `tiled_matmul` / `tiled_gemm` hand each tile to at::mm. Each group of
// `gs` weights is u * scale + bias (bias: the zero term; int4 without one uses -8 * scale, the stored offset).
// Dequantised 16 values at a time with AVX-512, 8 with AVX2: a scalar shift-and-mask per weight made dequantising
// cost more than the GEMM itself for decode batches of 9-64 rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace pernode {
namespace quant {
namespace {

// One group of `gs` weights of row n, dequantised to T: u * scale + bias (bias: the zero term; int4 without one
// uses -8 * scale, the stored offset).
template <typename T>
inline void store_values(T* dst, const float* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = T(v[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store16(c10::BFloat16* dst, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(v));
#else  // round to nearest even by hand: bf16 is the top half of the fp32 bits
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
#endif
}
// u * s + z as a multiply and an add, rounded twice as the scalar loop is (not one fused multiply-add), so the tiles
// are bit for bit the same whichever vector unit dequantised them
inline __m512 scaled16(__m512 u, __m512 vs, __m512 vz) { return _mm512_add_ps(_mm512_mul_ps(u, vs), vz); }
#endif

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512BW__))
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
inline void store8(c10::BFloat16* dst, __m256 v) {  // round to nearest even, as c10::BFloat16(float) does
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128((__m128i*)dst, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}
// 8 unsigned bytes (the low half of b) as floats, times s plus z: a multiply and an add, rounded twice as the scalar
// loop is (the kernels build with -ffp-contract=off), so the tiles are bit for bit what they were without AVX2
inline __m256 scaled8(__m128i b, __m256 vs, __m256 vz) {
  return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), vs), vz);
}
#endif

template <typename T>
void dequant_rows_to(const void* w, const float* scale, const float* bias, int64_t bits, int64_t K, int64_t G,
                     int64_t gs, int64_t n0, int64_t n1, T* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    T* d = dst + (n - n0) * K;
    const float* sr = scale + n * G;
    const float* br = bias ? bias + n * G : nullptr;
    for (int64_t g = 0; g < G; ++g) {
      const float s = sr[g], z = br ? br[g] : (bits == 4 ? -8.f * s : 0.f);
      T* dg = d + g * gs;
      int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
      if (bits == 8) {
        const int8_t* wg = static_cast<const int8_t*>(w) + n * K + g * gs;
        for (; k + 16 <= gs; k += 16) {
          const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wg + k))));
          store16(dg + k, scaled16(v, vs, vz));
        }
      } else {
        // 16 bytes = 32 values in order: byte t holds value 2t (low nibble) and 2t + 1 (high nibble).
        const uint8_t* wg = reinterpret_cast<const uint8_t*>(static_cast<const int32_t*>(w) + n * (K / 8)) + g * gs / 2;
        const __m128i lo4 = _mm_set1_epi8(0x0F);
        for (; k + 32 <= gs; k += 32) {
          const __m128i b = _mm_loadu_si128((const __m128i*)(wg + k / 2));
          const __m128i lo = _mm_and_si128(b, lo4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), lo4);
          const __m512 v0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
          const __m512 v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)));
          store16(dg + k, scaled16(v0, vs, vz));
          store16(dg + k + 16, scaled16(v1, vs, vz));
        }
      }
#elif defined(__AVX2__)
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
      if (bits == 8) {
        const int8_t* wg = static_cast<const int8_t*>(w) + n * K + g * gs;
        for (; k + 8 <= gs; k += 8) {
          const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wg + k))));
          store8(dg + k, _mm256_add_ps(_mm256_mul_ps(v, vs), vz));
        }
      } else {  // the AVX-512 path's byte order, 8 values per store
        const uint8_t* wg = reinterpret_cast<const uint8_t*>(static_cast<const int32_t*>(w) + n * (K / 8)) + g * gs / 2;
        const __m128i lo4 = _mm_set1_epi8(0x0F);
        for (; k + 32 <= gs; k += 32) {
          const __m128i b = _mm_loadu_si128((const __m128i*)(wg + k / 2));
          const __m128i lo = _mm_and_si128(b, lo4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), lo4);
          const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);  // values 0-15, 16-31
          store8(dg + k, scaled8(first, vs, vz));
          store8(dg + k + 8, scaled8(_mm_srli_si128(first, 8), vs, vz));
          store8(dg + k + 16, scaled8(second, vs, vz));
          store8(dg + k + 24, scaled8(_mm_srli_si128(second, 8), vs, vz));
        }
      }
#endif
      float tail[64];
      for (; k < gs; k += 64) {  // what the vector loops left (or everything without AVX2)
        const int64_t count = std::min<int64_t>(64, gs - k);
        for (int64_t t = 0; t < count; ++t) {
          const int64_t kk = g * gs + k + t;
          const float u = bits == 8 ? float(static_cast<const int8_t*>(w)[n * K + kk])
                                    : float((static_cast<const int32_t*>(w)[n * (K / 8) + kk / 8] >> (4 * (kk % 8))) & 0xF);
          tail[t] = u * s + z;
        }
        store_values(dg + k, tail, count);
      }
    }
  }
}

// Batches: W is dequantised kTileRows output rows at a time into a buffer that stays in cache, each tile one fp32
// GEMM, so no fp32 copy of the whole W is written (113 MB for SmolLM2's quantized lm_head).
constexpr int64_t kTileRows = 128;

at::Tensor tiled_matmul(const at::Tensor& x, const at::Tensor& w, const float* scale, const float* bias,
                        int64_t bits, int64_t N, int64_t K, int64_t G, int64_t gs) {
  auto y = at::empty({x.size(0), N}, x.options());  // each tile's GEMM writes its columns in place (ldc = N)
  // Inference mode is thread-local: worker threads must share the caller's, or writing into yt (an inference
  // tensor when the caller runs under torch.inference_mode) is refused.
  const bool inference_mode = c10::InferenceMode::is_enabled();
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard(inference_mode);
    auto tile = at::empty({kTileRows, K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, N - n0);
      dequant_rows_to<float>(w.data_ptr(), scale, bias, bits, K, G, gs, n0, n0 + rows, tile.data_ptr<float>());
      auto out = y.narrow(1, n0, rows);
      at::mm_out(out, x, tile.narrow(0, 0, rows).t());
    }
  });
  return y;
}

// ---- GEMM in x's dtype over dequantised tiles ----------------------------------------------------------------
// Output rows per tile: enough tiles for every thread, each tile's weights at most ~512 KiB (they are re-read by the
// GEMM from cache), rows a multiple of 16.
int64_t gemm_tile_rows(int64_t N, int64_t K, int64_t elem_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cache_rows = std::max<int64_t>(16, (512 * 1024) / std::max<int64_t>(1, K * elem_bytes));
  const int64_t tiles = std::max<int64_t>(threads, (N + cache_rows - 1) / cache_rows);
  const int64_t rows = (N + tiles - 1) / tiles;
  return std::max<int64_t>(16, (rows + 15) / 16 * 16);
}

template <typename T>
at::Tensor tiled_gemm(const at::Tensor& x, const at::Tensor& w, const float* scale, const float* bias, int64_t bits,
                      int64_t N, int64_t K, int64_t G, int64_t gs) {
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());  // each tile's GEMM writes its columns in place (BLAS's ldc = N)
  const int64_t tile_rows = gemm_tile_rows(N, K, x.element_size());
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const void* wp = w.data_ptr();
  at::parallel_for(0, (N + tile_rows - 1) / tile_rows, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard(inference_mode);
    auto tile = at::empty({tile_rows, K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile_rows, rows = std::min(tile_rows, N - n0);
      dequant_rows_to<T>(wp, scale, bias, bits, K, G, gs, n0, n0 + rows, tile.data_ptr<T>());
      auto out = y.narrow(1, n0, rows);
      at::mm_out(out, x, tile.narrow(0, 0, rows).t());
    }
  });
  return y;
}

}  // namespace
}  // namespace quant
}  // namespace pernode
