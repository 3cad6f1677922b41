#pragma once
// One block's math for the paged attention kernel (paged_attention.h, which includes this only): the prefetch of a
// block ahead, the scores of each path (decode: per-key dot products; prefill: a small matmul vectorised over rows),
// their online softmax, o += p v, and the per-token scales of an int8 cache.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention_lanes.h"  // vf/vi (kLanes wide), loads, horizontal sums, exp

namespace pernode {
namespace attention {
namespace {

// head_dim columns whose accumulators stay in registers during o += p v: 4 rows x 4 vectors, half of AVX-512's 32
// registers; 4 rows x 2 vectors, half of AVX2's 16
constexpr int kPvColumns = kLanes == 16 ? 64 : 16;
constexpr int kKeysPerPass = 8;  // keys whose scores are accumulated together in the row-vectorised path
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// n rows of d elements, `stride` elements apart, widened to fp32 rows `ld` apart.
template <typename T>
void load_rows(const void* src, int64_t stride, int n, int d, float* dst, int ld) {
  const T* s = static_cast<const T*>(src);
  for (int r = 0; r < n; ++r)
    for (int j = 0; j < d; j += kLanes) vstore(dst + r * ld + j, vload_as(s + r * stride + j));
}

// ---- prefetch -----------------------------------------------------------------------------------------------------

// A K/V block a little ahead of the one being computed, whose rows are requested meanwhile: blocks sit at random
// places in the cache, out of the hardware prefetchers' reach. Into L2 (T1 hint): into L1, the requests stall on its
// few miss buffers.
struct NextBlock {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t stride_bytes = 0, row_bytes = 0;
  int rows = 0;

  void fetch_row(int t) const {
    for (int64_t c = 0; c < row_bytes; c += 64) {
      __builtin_prefetch(k + t * stride_bytes + c, 0, 2);
      __builtin_prefetch(v + t * stride_bytes + c, 0, 2);
    }
  }
  void fetch_rows(int from) const {
    if (k)
      for (int t = from; t < rows; ++t) fetch_row(t);
  }
};

// ---- decode path: few rows, vectorised over head_dim and keys ------------------------------------------------------

// s[r * ld + t] = scale * (sum of the lanes of row r's partial-sum vector for key t), t < kLanes: the vectors that
// the per-key paths parked in `tmp`, n of kLanes keys real (the rest zeroed first).
inline void reduce_parked_scores(float* tmp, int rows, int n, float scale, float* s, int ld) {
  for (int r = 0; r < rows; ++r) {
    float* tr = tmp + r * kLanes * kLanes;
    for (int t = n; t < kLanes; ++t) vstore(tr + t * kLanes, vf{});
    vstore(s + r * ld, scale == 1.0f ? reduce_lanes(tr) : reduce_lanes(tr) * scale);
  }
}

// s[r * ld + t] = q_r . k_t: per (row, key) a vector of partial sums, parked in `tmp` and reduced kLanes keys at a time.
// K is read straight from the cache and widened in registers, once per key for all rows. The rows of the block ahead
// are requested one per key: spread out, the requests overlap with the math instead of stalling on full miss buffers.
template <int kD, typename T>
void scores_by_key(const float* q, int rows, int d_rt, const T* k, int64_t k_stride, int nk, float* s, int ld,
                   float* tmp, const NextBlock& next) {
  constexpr int kNv = kD / kLanes;
  for (int c = 0; c < nk; c += kLanes) {
    const int n = std::min(kLanes, nk - c);
    for (int t = 0; t < n; ++t) {
      if (next.k && c + t < next.rows) next.fetch_row(c + t);
      const T* kt = k + (c + t) * k_stride;
      if constexpr (kD != 0) {
        vf kv[kNv];
        for (int j = 0; j < kNv; ++j) kv[j] = vload_as(kt + j * kLanes);
        for (int r = 0; r < rows; ++r) {
          vf acc = vload(q + r * kD) * kv[0];
          for (int j = 1; j < kNv; ++j) acc += vload(q + r * kD + j * kLanes) * kv[j];
          vstore(tmp + (r * kLanes + t) * kLanes, acc);
        }
      } else {
        for (int r = 0; r < rows; ++r) {
          vf acc = vf{};
          for (int j = 0; j < d_rt; j += kLanes) acc += vload(q + r * d_rt + j) * vload_as(kt + j);
          vstore(tmp + (r * kLanes + t) * kLanes, acc);
        }
      }
    }
    reduce_parked_scores(tmp, rows, n, 1.0f, s + c, ld);
  }
  next.fetch_rows(nk);
}

// Turns row r's scores s[0, nk) into probabilities against its running max, rescales its output; keys at or past
// `visible` are masked. State per row: m (running max), l (running sum).
inline void softmax_row(float* sr, int bsp, int visible, float& m, float& l, float* o, int d) {
  const vi iota = viota();
  vf mx = vsplat(kNegInf);
  for (int c = 0; c < bsp; c += kLanes) mx = vmax(mx, (iota + c) < visible ? vload(sr + c) : vsplat(kNegInf));
  const float m_new = std::max(m, hmax(mx));
  if (m_new == kNegInf) {  // the row sees nothing here (a later slice of a split sequence)
    std::fill(sr, sr + bsp, 0.0f);
    return;
  }
  vf sum = vf{};
  for (int c = 0; c < bsp; c += kLanes) {
    const vf pr = (iota + c) < visible ? vexp_nonpos(vload(sr + c) - m_new) : vf{};
    vstore(sr + c, pr);
    sum += pr;
  }
  const float alpha = std::exp(m - m_new);
  if (alpha != 1.0f)
    for (int j = 0; j < d; j += kLanes) vstore(o + j, vload(o + j) * alpha);
  l = l * alpha + hsum(sum);
  m = m_new;
}

// ---- prefill path: many rows, vectorised over rows ----------------------------------------------------------------

// s[t * mp + r] = sum_d qt[d][r] * k_t[d], kKeys keys at a time so each qt vector is loaded once per pass and each k
// element is a broadcast: a small matmul with Q transposed once per tile, K as it lies in the cache.
template <int kD, int kKeys>
inline void scores_by_row_pass(const float* qt, int mp, int d, const float* k, int64_t k_stride, float* s) {
  for (int rv = 0; rv < mp; rv += kLanes) {
    vf acc[kKeys];
    for (int i = 0; i < kKeys; ++i) acc[i] = vf{};
    for (int j = 0; j < (kD ? kD : d); ++j) {
      const vf qv = vload(qt + j * mp + rv);
      for (int i = 0; i < kKeys; ++i) acc[i] += qv * k[i * k_stride + j];
    }
    for (int i = 0; i < kKeys; ++i) vstore(s + i * mp + rv, acc[i]);
  }
}

template <int kD>
void scores_by_row(const float* qt, int mp, int d, const float* k, int64_t k_stride, int nk, float* s) {
  int t = 0;
  for (; t + kKeysPerPass <= nk; t += kKeysPerPass)
    scores_by_row_pass<kD, kKeysPerPass>(qt, mp, d, k + t * k_stride, k_stride, s + t * mp);
  for (; t < nk; ++t) scores_by_row_pass<kD, 1>(qt, mp, d, k + t * k_stride, k_stride, s + t * mp);
}

// The online softmax of a tile, kLanes rows at a time: s[t][r] becomes p[t][r], m/l/alpha updated per row.
inline void softmax_rows(float* s, int mp, int nk, int key0, const int32_t* pos, float* m, float* l, float* alpha) {
  for (int rv = 0; rv < mp; rv += kLanes) {
    vi row_pos;
    std::memcpy(&row_pos, pos + rv, sizeof row_pos);
    const int visible = std::min(nk, pos[rv + kLanes - 1] - key0 + 1);  // rows are sorted by position
    vf mx = vsplat(kNegInf);
    for (int t = 0; t < visible; ++t)
      mx = vmax(mx, (key0 + t) <= row_pos ? vload(s + t * mp + rv) : vsplat(kNegInf));
    const vf m_old = vload(m + rv);
    const vf m_new = vmax(m_old, mx);
    const vi seen = m_new > kNegInf;
    const vf m_sub = seen ? m_new : vf{};  // rows that saw nothing keep p = 0 and alpha = 1
    vf sum = vf{};
    for (int t = 0; t < nk; ++t) {
      const vf pt = (key0 + t) <= row_pos ? vexp_nonpos(vload(s + t * mp + rv) - m_sub) : vf{};
      vstore(s + t * mp + rv, pt);
      sum += pt;
    }
    const vf a = seen ? vexp_nonpos(m_old - m_sub) : vsplat(1.0f);
    vstore(l + rv, vload(l + rv) * a + sum);
    vstore(m + rv, m_new);
    vstore(alpha + rv, a);
  }
}

// ---- o += p v (both paths) ----------------------------------------------------------------------------------------

// o[r] += sum_t p[r * p_r + t * p_t] * v_t for kRows rows held in registers while the block's values stream by,
// over a slice of up to kPvColumns columns of head_dim (half the vector registers hold the accumulators).
template <int kD, typename T, int kRows>
inline void pv_rows(const float* p, int64_t p_r, int64_t p_t, const T* v, int64_t v_stride, int nk, float* o,
                    int d_rt) {
  if constexpr (kD == 0) {
    // Head size known only at run time: rows stay in memory.
    for (int t = 0; t < nk; ++t)
      for (int j = 0; j < d_rt; j += kLanes) {
        const vf vt = vload_as(v + t * v_stride + j);
        for (int i = 0; i < kRows; ++i)
          vstore(o + i * d_rt + j, vload(o + i * d_rt + j) + p[i * p_r + t * p_t] * vt);
      }
  } else {
    constexpr int kNv = std::min(kD, kPvColumns) / kLanes;
    for (int c = 0; c < kD; c += kNv * kLanes) {
      vf acc[kRows][kNv];
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < kNv; ++j) acc[i][j] = vload(o + i * kD + c + j * kLanes);
      for (int t = 0; t < nk; ++t) {
        vf vt[kNv];
        for (int j = 0; j < kNv; ++j) vt[j] = vload_as(v + t * v_stride + c + j * kLanes);
        for (int i = 0; i < kRows; ++i) {
          const float pt = p[i * p_r + t * p_t];
          for (int j = 0; j < kNv; ++j) acc[i][j] += pt * vt[j];
        }
      }
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < kNv; ++j) vstore(o + i * kD + c + j * kLanes, acc[i][j]);
    }
  }
}

// The last `rest` (< kRows) rows in one pass, so V is read once for them too.
template <int kD, typename T, int kRows>
inline void pv_rest(int rest, const float* p, int64_t p_r, int64_t p_t, const T* v, int64_t v_stride, int nk,
                    float* o, int d) {
  if constexpr (kRows > 0) {
    if (rest == kRows) return pv_rows<kD, T, kRows>(p, p_r, p_t, v, v_stride, nk, o, d);
    pv_rest<kD, T, kRows - 1>(rest, p, p_r, p_t, v, v_stride, nk, o, d);
  }
}

template <int kD, typename T>
void pv(const float* p, int64_t p_r, int64_t p_t, const T* v, int64_t v_stride, int nk, float* o, int rows, int d) {
  constexpr int kRows = 4;
  int r = 0;
  for (; r + kRows <= rows; r += kRows) pv_rows<kD, T, kRows>(p + r * p_r, p_r, p_t, v, v_stride, nk, o + r * d, d);
  pv_rest<kD, T, kRows - 1>(rows - r, p + r * p_r, p_r, p_t, v, v_stride, nk, o + r * d, d);
}

// ---- per-token scales of an int8 cache -----------------------------------------------------------------------------

constexpr int kMaxBlockSize = 1024;

// x[r * ld + t] *= scale[t] for t < n: scores by key scale, or probabilities by value scale.
inline void scale_columns(float* x, int rows, int ld, const float* scale, int n) {
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < n; ++t) x[r * ld + t] *= scale[t];
}

// Row t of x [n, d] times scale[t]: widened int8 rows back to their real values.
inline void scale_rows(float* x, int n, int d, const float* scale) {
  for (int t = 0; t < n; ++t) {
    const vf st = vsplat(scale[t]);
    for (int j = 0; j < d; j += kLanes) vstore(x + t * d + j, vload(x + t * d + j) * st);
  }
}

}  // namespace
}  // namespace attention
}  // namespace pernode
