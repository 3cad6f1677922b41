#pragma once
// The paged attention kernel's vectors: GCC/Clang vector extensions as wide as the CPU's vector unit, and what the
// kernel does with them besides + - * (loads that widen bf16/fp16/int8 to fp32, horizontal sums and maxima, the
// lane-wise reduction of kLanes vectors, exp for the softmax). Included by paged_attention.h only.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pernode {
namespace attention {
namespace {

// GCC/Clang vector extensions as wide as the vector unit: 16 floats with AVX-512, 8 elsewhere (AVX2, 2x NEON).
// Wider than the registers, gcc lowers them to scalar code in places and spills the accumulators (a 16-float build on
// AVX2 ran prefill attention at 4 GFLOP/s, a tenth of SDPA's).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vsplat(float x) { return vf{} + x; }
inline vi viota() {
  vi v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

// Two-input shuffle (lanes 0..kLanes-1 from a, kLanes..2*kLanes-1 from b): gcc and clang spell it differently.
#if defined(__clang__)
#define PERNODE_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PERNODE_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

#if defined(__AVX512F__)
inline float hsum(vf v) {
  v += PERNODE_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += PERNODE_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += PERNODE_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] + v[1];
}

inline float hmax(vf v) {
  v = vmax(v, PERNODE_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, PERNODE_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, PERNODE_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return std::max(v[0], v[1]);
}

// Lane t of the result = the sum of all lanes of a[t]: kLanes horizontal sums for the price of ~3.
inline vf reduce_lanes(const float* a) {  // a: kLanes vectors, one after another
  vf z[8], s[4], r[2];
  for (int i = 0; i < 8; ++i) {  // lane 2k+e: pair k of a[2i+e]
    const vf x = vload(a + (2 * i) * kLanes), y = vload(a + (2 * i + 1) * kLanes);
    z[i] = PERNODE_SHUFFLE(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           PERNODE_SHUFFLE(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int i = 0; i < 4; ++i)  // lane 4k+e: quad k of a[4i+e]
    s[i] = PERNODE_SHUFFLE(z[2 * i], z[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           PERNODE_SHUFFLE(z[2 * i], z[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  for (int i = 0; i < 2; ++i)  // lane 8k+e: half k of a[8i+e]
    r[i] = PERNODE_SHUFFLE(s[2 * i], s[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           PERNODE_SHUFFLE(s[2 * i], s[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  return PERNODE_SHUFFLE(r[0], r[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         PERNODE_SHUFFLE(r[0], r[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
#else  // 8 lanes: the same steps, one fewer
inline float hsum(vf v) {
  v += PERNODE_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += PERNODE_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v[0] + v[1];
}

inline float hmax(vf v) {
  v = vmax(v, PERNODE_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmax(v, PERNODE_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  return std::max(v[0], v[1]);
}

inline vf reduce_lanes(const float* a) {  // a: 8 vectors, one after another
  vf z[4], s[2];
  for (int i = 0; i < 4; ++i) {  // lane 2k+e: pair k of a[2i+e]
    const vf x = vload(a + (2 * i) * kLanes), y = vload(a + (2 * i + 1) * kLanes);
    z[i] = PERNODE_SHUFFLE(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + PERNODE_SHUFFLE(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i)  // lane 4k+e: quad k of a[4i+e]
    s[i] = PERNODE_SHUFFLE(z[2 * i], z[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           PERNODE_SHUFFLE(z[2 * i], z[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return PERNODE_SHUFFLE(s[0], s[1], 0, 1, 2, 3, 8, 9, 10, 11) + PERNODE_SHUFFLE(s[0], s[1], 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

// exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, degree-5 polynomial in r, ~1 ulp); plain vector ops, no libm call.
inline vf vexp_nonpos(vf x) {
  x = vmax(x, vsplat(-87.0f));
  const vf round_magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + round_magic) - round_magic;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * (r * r) + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// ---- conversions between the tensors' dtypes and fp32 -------------------------------------------------------------

// kLanes consecutive elements widened to fp32.
template <typename T>
inline vf vload_as(const T* p);

template <>
inline vf vload_as<float>(const float* p) {
  return vload(p);
}

template <>
inline vf vload_as<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32. gcc lowers the generic widening poorly on AVX-512, hence the intrinsic.
#if defined(__AVX512F__)
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  typedef uint16_t vu16 __attribute__((vector_size(kLanes * 2)));
  typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 bits = __builtin_convertvector(h, vu32) << 16;
#endif
  vf f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <>
inline vf vload_as<int8_t>(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  vf f;
  std::memcpy(&f, &w, sizeof f);
  return f;
#else
  typedef int8_t vi8 __attribute__((vector_size(kLanes)));
  vi8 b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vf);
#endif
}

template <>
inline vf vload_as<c10::Half>(const c10::Half* p) {
  vf f;
#if defined(__AVX512F__)
  const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&f, &w, sizeof f);
#elif defined(__F16C__)
  const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&f, &w, sizeof f);
#else
  for (int i = 0; i < kLanes; ++i) f[i] = static_cast<float>(p[i]);
#endif
  return f;
}

}  // namespace
}  // namespace attention
}  // namespace pernode
