#pragma once
// x quantized to int8 per 32-value block (q = rint(x * 127 / amax), as llama.cpp feeds its Q4 kernels Q8
// activations), laid out for the int8-x GEMVs' 64-byte weight chunks, with per-lane scales, sums and offset terms;
// and each chunk's weight groups. Shared by the VNNI GEMV (quant_linear.h), its AVX2 counterpart
// (gemv_int8x_avx2.h) and the int4 panel kernel (int4_panel_gemm.h).

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pernode {
namespace quant {
namespace {

// ---- int8 activations -----------------------------------------------------------------------------------------
constexpr int64_t kActBlock = 32;  // x values sharing one int8 scale

// x quantized per 32-value block and laid out for one weight format's 64-byte chunks.
struct QuantizedInput {
  int64_t chunk_values;  // weight values per 64-byte chunk: 128 (int4) or 64 (int8)
  int64_t chunks, row_bytes, row_lanes;
  std::vector<int8_t> bytes;       // [M][chunks][64 or 2 x 64]: int4 chunks hold a low- then a high-nibble plane
  std::vector<float> lane_scale;   // [M][chunks][16]: x scale of the block each 32-bit lane's values come from
  std::vector<float> lane_sum;     // [M][chunks][16]: sum of the dequantized x of each lane's values
  std::vector<float> lane_offset;  // lane_sum * -(the weights' stored offset: 8 for int4, 128 for int8 XOR 0x80)
  std::vector<float> dequantized;  // [M][K]: q * scale, for the float GEMV where VNNI is missing
};

#if defined(__AVX2__) && !defined(__AVX512F__)
// A 32-value block loaded into v, and its largest |x|.
inline float load_block_amax_avx2(const float* x, __m256 (&v)[4]) {
  __m256 mag = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    mag = _mm256_max_ps(mag, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[j]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mag), _mm256_extractf128_ps(mag, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// The int4 GEMV's x, one 32-value block with AVX2, written straight into its layout: the low-nibble plane takes the
// block's even values in order and the high plane its odd ones, 16 bytes each at byte k0 % 128 / 2 of the chunk.
// (int8 weights' x, only quantized for the float GEMV where VNNI is missing, takes the scalar loop.)
inline void quantize_int4_block_avx2(const float* x, float* deq, QuantizedInput& qi, int64_t m, int64_t k0) {
  __m256 v[4];
  const float amax = load_block_amax_avx2(x, v);
  const float inv = amax > 0.f ? 127.f / amax : 0.f, s = amax / 127.f;
  __m256i q[4];
  for (int j = 0; j < 4; ++j) {  // rounds to nearest even, as std::nearbyint; |x * inv| <= 127 up to one ulp
    q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
    _mm256_storeu_ps(deq + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(q[j]), _mm256_set1_ps(s)));
  }
  // 32 int8 in order: the two packs interleave 4-value pieces across the 128-bit halves, the permute undoes it
  __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, even_odd), 0xD8);  // [even 0-31 | odd 0-31]
  int8_t* chunk = qi.bytes.data() + m * qi.row_bytes + k0 / 128 * 128 + k0 % 128 / 2;
  _mm_storeu_si128((__m128i*)chunk, _mm256_castsi256_si128(b));
  _mm_storeu_si128((__m128i*)(chunk + 64), _mm256_extracti128_si256(b, 1));
  // each 8-value lane's sum: two rounds of pairwise adds leave its halves in the two 128-bit halves
  const __m256i sum4 = _mm256_hadd_epi32(_mm256_hadd_epi32(q[0], q[1]), _mm256_hadd_epi32(q[2], q[3]));
  const __m128 sums = _mm_mul_ps(_mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(sum4),
                                                                _mm256_extracti128_si256(sum4, 1))),
                                 _mm_set1_ps(s));
  const int64_t lane0 = m * qi.row_lanes + k0 / 8;
  _mm_storeu_ps(qi.lane_scale.data() + lane0, _mm_set1_ps(s));
  _mm_storeu_ps(qi.lane_sum.data() + lane0, sums);
  _mm_storeu_ps(qi.lane_offset.data() + lane0, _mm_mul_ps(sums, _mm_set1_ps(-8.f)));  // the nibbles' offset
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kKeepDequantized = false;  // every int8-x kernel multiplies the integers
#else
constexpr bool kKeepDequantized = true;
#endif
// From this many x rows a call that may use the intra-op threads quantizes its rows on them: at decode batches the
// serial quantization left the other thread waiting (3.5% of a 25-row two-thread step's samples). A row takes
// ~0.3-0.8 us (K = 576-1536), a fork-join a microsecond or two, so fewer rows stay on the caller's thread.
constexpr int64_t kParallelInputRows = 16;

// Quantizes x row by row, one 32-value block at a time; all index arithmetic is by compile-time powers of two
// (this runs once per call on K values, and runtime divisions here once cost more than the GEMV itself).
template <int BITS>
QuantizedInput quantize_input_blocks_t(const float* x, int64_t M, int64_t K, bool parallel) {
  constexpr int64_t kChunkValues = BITS == 4 ? 128 : 64, kValuesPerLane = kChunkValues / 16;
  constexpr int64_t kChunkBytes = BITS == 4 ? 128 : 64;
  QuantizedInput qi;
  qi.chunk_values = kChunkValues;
  qi.chunks = (K + kChunkValues - 1) / kChunkValues;
  qi.row_bytes = qi.chunks * kChunkBytes;
  qi.row_lanes = qi.chunks * 16;
  qi.bytes.assign(M * qi.row_bytes, 0);  // padding stays 0 so masked-off weights add nothing
  qi.lane_scale.assign(M * qi.row_lanes, 0.f);
  qi.lane_sum.assign(M * qi.row_lanes, 0.f);
  qi.lane_offset.assign(M * qi.row_lanes, 0.f);
  // The dequantized copy serves only the float GEMV that stands in where VNNI is missing; a VNNI build writes
  // each row's into one scratch row instead.
  qi.dequantized.resize(kKeepDequantized ? M * K : 0);
  constexpr float kOffset = BITS == 4 ? 8.f : 128.f;
  auto quantize_rows = [&](int64_t m_begin, int64_t m_end) {
    int8_t q[kActBlock];
    std::vector<float> scratch(kKeepDequantized ? 0 : K);
    for (int64_t m = m_begin; m < m_end; ++m) {
      const float* xr = x + m * K;
      float* deq = kKeepDequantized ? qi.dequantized.data() + m * K : scratch.data();
      for (int64_t k0 = 0; k0 < K; k0 += kActBlock) {
#if defined(__AVX512F__)
        const __m512 a = _mm512_loadu_ps(xr + k0), b = _mm512_loadu_ps(xr + k0 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float inv = amax > 0.f ? 127.f / amax : 0.f, s = amax / 127.f;
        // cvtps_epi32 rounds to nearest even (the default MXCSR mode), like std::nearbyint and torch.round;
        // |x * inv| <= 127 up to one ulp, so the rounded values need no clamp.
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(qb));
        _mm512_storeu_ps(deq + k0, _mm512_mul_ps(_mm512_cvtepi32_ps(qa), _mm512_set1_ps(s)));
        _mm512_storeu_ps(deq + k0 + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(qb), _mm512_set1_ps(s)));
#else
#if defined(__AVX2__)
        if (BITS == 4) {
          quantize_int4_block_avx2(xr + k0, deq + k0, qi, m, k0);
          continue;
        }
#endif
        float amax = 0.f;
        for (int t = 0; t < kActBlock; ++t) amax = std::max(amax, std::fabs(xr[k0 + t]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f, s = amax / 127.f;
        for (int t = 0; t < kActBlock; ++t) {
          q[t] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(xr[k0 + t] * inv))));
          deq[k0 + t] = float(q[t]) * s;
        }
#endif
        const int64_t c = k0 / kChunkValues, r0 = k0 % kChunkValues;
        int8_t* dst = qi.bytes.data() + m * qi.row_bytes + c * kChunkBytes;
        const int64_t lane0 = m * qi.row_lanes + c * 16 + r0 / kValuesPerLane;
        for (int t = 0; t < kActBlock; ++t) {
          const int64_t r = r0 + t;
          if (BITS == 4)  // lane i = word i of the chunk; value j of the word sits in byte 4i + j/2, nibble j%2
            dst[(r & 1) * 64 + 4 * (r / 8) + (r % 8) / 2] = q[t];
          else  // lane i holds values 4i..4i+3 in order
            dst[r] = q[t];
        }
        for (int l = 0; l < kActBlock / kValuesPerLane; ++l) {  // a lane never straddles two blocks
          int32_t sum = 0;
          for (int t = 0; t < kValuesPerLane; ++t) sum += q[l * kValuesPerLane + t];
          qi.lane_scale[lane0 + l] = s;
          qi.lane_sum[lane0 + l] = float(sum) * s;
          qi.lane_offset[lane0 + l] = -kOffset * float(sum) * s;
        }
      }
    }
  };
  if (parallel && M >= kParallelInputRows)  // rows are independent: the same bytes whichever thread writes them
    at::parallel_for(0, M, kParallelInputRows / 2, quantize_rows);
  else
    quantize_rows(0, M);
  return qi;
}

// `parallel`: the caller may use the intra-op threads (its num_threads is not 1).
QuantizedInput quantize_input_blocks(const float* x, int64_t M, int64_t K, int64_t bits, bool parallel = false) {
  return bits == 4 ? quantize_input_blocks_t<4>(x, M, K, parallel) : quantize_input_blocks_t<8>(x, M, K, parallel);
}

// Each row's sum of dequantized x over each weight group, zero-padded to a multiple of 16 groups: what a weight
// row's zero term multiplies (sum_g bias[n, g] * sums[m, g]), summed once per call from the lanes' sums.
struct GroupSums {
  int64_t groups_padded = 0;
  std::vector<float> sums;  // [M][groups_padded]
};

inline GroupSums group_sums(const QuantizedInput& qi, int64_t M, int64_t K, int64_t G, int64_t gs) {
  const int64_t values_per_lane = qi.chunk_values / 16;
  GroupSums out;
  out.groups_padded = (G + 15) / 16 * 16;
  out.sums.assign(M * out.groups_padded, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t l = 0; l * values_per_lane < K; ++l)
      out.sums[m * out.groups_padded + l * values_per_lane / gs] += qi.lane_sum[m * qi.row_lanes + l];
  return out;
}

// Per 64-byte chunk of a weight row: which 32-bit lanes are real, the first weight group it touches, how many
// groups from there exist, and each lane's group relative to the first (to gather 16 lanes' scales in one permute).
struct ChunkGroups {
  std::vector<uint16_t> lane_mask, group_mask;
  std::vector<int32_t> first, lane_group;
  ChunkGroups(int64_t row_lanes_total, int64_t values_per_lane, int64_t G, int64_t gs) {
    const int64_t chunks = (row_lanes_total + 15) / 16;
    lane_mask.resize(chunks), group_mask.resize(chunks), first.resize(chunks), lane_group.resize(chunks * 16);
    for (int64_t c = 0; c < chunks; ++c) {
      first[c] = int32_t(c * 16 * values_per_lane / gs);
      lane_mask[c] = uint16_t((1u << std::min<int64_t>(16, row_lanes_total - c * 16)) - 1u);
      group_mask[c] = uint16_t((1u << std::min<int64_t>(16, G - first[c])) - 1u);
      for (int i = 0; i < 16; ++i)
        lane_group[c * 16 + i] =
            int32_t(std::min<int64_t>((c * 16 + i) * values_per_lane / gs, G - 1) - first[c]);
    }
  }
};

}  // namespace
}  // namespace quant
}  // namespace pernode
