#pragma once
// The sum of a vector register's lanes, for the GEMVs' per-row accumulators (AVX2 + FMA paths, no AVX-512).

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define PERNODE_HSUM256 1

namespace pernode {
namespace simd {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace simd
}  // namespace pernode
#endif
