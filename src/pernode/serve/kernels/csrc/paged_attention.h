#pragma once
// Paged attention on CPU: causal attention of a flattened batch of prefill chunks and decodes, K/V read block by block
// through the block table. Online softmax of FlashAttention (arXiv 2205.14135, 2307.08691) over PagedAttention's paged
// cache (arXiv 2309.06180); long contexts with too few work items are split over threads as in flash-decoding.
//
// A work item is (sequence, kv head, tile of queries, range of kv blocks). Its rows are every (query, head) pair of the
// kv head's group, so each K/V block is read once per group and then reused from L1 by all rows of the tile.
// Two ways to get the scores of one block, chosen by the row count:
//   few rows (decodes):  per-key dot products vectorised over head_dim; softmax vectorised over keys.
//   many rows (prefill): a small matmul vectorised over rows, with Q transposed once per tile, so K needs no transpose;
//                        softmax vectorised over rows.
// Math is fp32 throughout: bf16/fp16 K/V are widened in registers as they are read (decode) or once per block into an
// L1 buffer (prefill). Blocks lie at random places in memory, so each item prefetches its blocks a little ahead.
// An int8 cache (serve/kernels/kv_quant.py) brings one fp32 scale per (token, kv head): in the decode path the scores
// q.k_t are multiplied by k_scale[t] and the probabilities by v_scale[t] before o += p v, so the int8 values are only
// widened, never rescaled element by element; in the prefill path the widened block rows are scaled once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "attention_bf16_dot.h"  // the decode path's products by vdpbf16ps where the CPU has it
#include "attention_lanes.h"  // vf/vi (kLanes wide), loads, horizontal sums, exp

namespace pernode {
namespace attention {
namespace {

// A sequence bringing at most this many new tokens is a decode or a speculative verification (k + 1 <= 17 tokens,
// config.MAX_SPECULATIVE_TOKENS): each of its queries is a work item of its own, exactly the item a decode at that
// position would be (same rows, path, kv range and split), so a verified token's attention is bit for bit its decode's.
constexpr int kMaxDecodeQueries = 32;
constexpr int kTileRows = 64;          // rows (query x group head) per tile: enough reuse of each block, fits L1/L2
constexpr int kRowVectorMinRows = 12;  // from here the row-vectorised matmul beats per-key dot products (measured)
constexpr int64_t kMinParallelWork = 1 << 18;  // rows x keys x head_dim under which one thread does it all
constexpr int kSplitMinTokens = 256;   // a kv slice shorter than this is not worth its merge
constexpr int kPrefetchBlocks = 2;     // how far ahead K/V blocks are requested: enough to cover DRAM latency
// head_dim columns whose accumulators stay in registers during o += p v: 4 rows x 4 vectors, half of AVX-512's 32
// registers; 4 rows x 2 vectors, half of AVX2's 16
constexpr int kPvColumns = kLanes == 16 ? 64 : 16;
constexpr int kKeysPerPass = 8;
// Keys (whole blocks) whose scores a decode item computes before one online-softmax update: the update's fixed cost
// per row (a max, a sum, the exp of the rescale, o rescaled) is then paid per chunk, not per block, where at 16-token
// blocks it was a quarter of the decode path's time. A chunk's K/V stays in L2 between its two passes.
constexpr int kDecodeChunkKeys = 512;        // keys whose scores are accumulated together in the row-vectorised path
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// n rows of d elements, `stride` elements apart, widened to fp32 rows `ld` apart.
using LoadRowsFn = void (*)(const void* src, int64_t stride, int n, int d, float* dst, int ld);
// One fp32 row narrowed to the output dtype, multiplied by `mul` on the way.
using StoreRowFn = void (*)(const float* src, float mul, void* dst, int d);

template <typename T>
void load_rows(const void* src, int64_t stride, int n, int d, float* dst, int ld) {
  const T* s = static_cast<const T*>(src);
  for (int r = 0; r < n; ++r)
    for (int j = 0; j < d; j += kLanes) vstore(dst + r * ld + j, vload_as(s + r * stride + j));
}

template <typename T>
void store_row(const float* src, float mul, void* dst, int d) {
  T* o = static_cast<T*>(dst);
  for (int j = 0; j < d; ++j) o[j] = static_cast<T>(src[j] * mul);
}

LoadRowsFn pick_loader(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return load_rows<float>;
    case at::kBFloat16: return load_rows<c10::BFloat16>;
    default: return load_rows<c10::Half>;
  }
}

StoreRowFn pick_storer(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return store_row<float>;
    case at::kBFloat16: return store_row<c10::BFloat16>;
    default: return store_row<c10::Half>;
  }
}

// ---- the problem and its work items ----------------------------------------------------------------------------

struct Problem {
  const char* query;  // [T, Hq, D]
  const char* k_cache;  // [num_blocks, block_size, Hkv, D]
  const char* v_cache;
  char* out;  // [T, Hq, D], query's dtype
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* query_start_loc;
  const int32_t* seq_lens;
  int hq, hkv, group, head_dim, block_size;
  int64_t q_elem_size;
  bool q_bf16;  // query is bf16: with a bf16 cache, the decode scores can take it as it is (vdpbf16ps)
  float scale;
  const float* k_scale;  // [num_blocks, block_size, Hkv] for an int8 cache, else nullptr
  const float* v_scale;
  LoadRowsFn load_q;
  StoreRowFn store_out;
};

struct Item {
  int32_t seq, kv_head;
  int32_t q_begin, q_end;  // queries of the tile, counted within the sequence's chunk
  int32_t blk_begin, blk_end;  // kv blocks of this item (a slice when the sequence is split)
  int64_t partial_row;  // -1: writes the output; else its rows in the partial buffers, merged afterwards
  int64_t cost;
};

struct Partials {
  std::vector<float> o, m, l;  // [rows, D], [rows], [rows]
};

// Per-thread buffers, sized once per call for the largest tile: q, q transposed, o, scores, m, l, alpha, widened
// K and V blocks (prefill), partial dot products (decode); positions of the rows.
struct Scratch {
  std::unique_ptr<float[]> mem;
  // qb: the rows' q as bf16 (half a float each); sd: a decode chunk's scores; pb: probabilities as bf16 pairs
  float *q, *qt, *o, *s, *m, *l, *alpha, *k, *v, *tmp, *qb, *sd, *pb;
  int decode_ld;  // floats per row of sd: a chunk of whole blocks, rounded up, and a vector of slack
  int32_t* pos;
  std::unique_ptr<int32_t[]> pos_mem;

  Scratch(int max_rows, int d, int bs) {
    const int mp = round_up(max_rows, kLanes), bsp = round_up(bs, kLanes);
    decode_ld = round_up(std::max(1, kDecodeChunkKeys / bs) * bs, kLanes) + kLanes;
    const size_t sizes[] = {size_t(max_rows) * d, size_t(d) * mp, size_t(max_rows) * d,
                            size_t(mp) * bsp, size_t(mp), size_t(mp),
                            size_t(mp), size_t(bs) * d, size_t(bs) * d,
                            size_t(kRowVectorMinRows) * kLanes * kLanes, size_t(max_rows) * d / 2,
                            size_t(kRowVectorMinRows) * decode_ld,
                            std::max(size_t(kRowVectorMinRows) * decode_ld / 2, size_t(bsp / 2 + 1) * mp)};
    size_t total = 0;
    for (size_t n : sizes) total += round_up(int(n), kLanes);
    mem.reset(new (std::align_val_t(64)) float[total]);
    float* p = mem.get();
    float** slots[] = {&q, &qt, &o, &s, &m, &l, &alpha, &k, &v, &tmp, &qb, &sd, &pb};
    for (int i = 0; i < 13; ++i) {
      *slots[i] = p;
      p += round_up(int(sizes[i]), kLanes);
    }
    pos_mem.reset(new int32_t[mp]);
    pos = pos_mem.get();
  }
  static int round_up(int x, int m) { return (x + m - 1) / m * m; }
};

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
    for (int r = 0; r < rows; ++r) {
      float* tr = tmp + r * kLanes * kLanes;
      for (int t = n; t < kLanes; ++t) vstore(tr + t * kLanes, vf{});
      vstore(s + r * ld + c, reduce_lanes(tr));
    }
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

// ---- one work item ------------------------------------------------------------------------------------------------

template <int kD, typename T>
void run_item(const Problem& P, const Item& it, Scratch& S, Partials& parts) {
  const int d = kD ? kD : P.head_dim;
  const int G = P.group, bs = P.block_size, bsp = Scratch::round_up(bs, kLanes);
  const int nq = it.q_end - it.q_begin, rows = nq * G, mp = Scratch::round_up(rows, kLanes);
  const int q_len = P.query_start_loc[it.seq + 1] - P.query_start_loc[it.seq];
  const int seq_len = P.seq_lens[it.seq];
  const int first_pos = seq_len - q_len + it.q_begin;  // absolute position of the tile's first query
  const int kv_len = first_pos + nq;  // keys any row of the tile can see
  const bool by_row = rows >= kRowVectorMinRows;
#if defined(PERNODE_BF16_DOT)
  constexpr bool kBf16Cache = std::is_same_v<T, c10::BFloat16> && kD % 32 == 0 && kD != 0;
  const bool bf16_dot = kBf16Cache && P.q_bf16 && !by_row;
  const bool bf16_pv = bf16_dot && kD % 64 == 0 && bs % 2 == 0;  // whole key pairs in every block
  const bool bf16_prefill = kBf16Cache && kD % 64 == 0 && P.q_bf16 && by_row;
  c10::BFloat16* qb = reinterpret_cast<c10::BFloat16*>(S.qb);
  uint32_t* pb = reinterpret_cast<uint32_t*>(S.pb);
#endif

  // Rows are (query i, group head g) -> r = i * G + g; a query's G heads are contiguous in `query`.
  const int64_t tok0 = P.query_start_loc[it.seq] + it.q_begin;
  for (int i = 0; i < nq; ++i) {
    const char* src = P.query + ((tok0 + i) * P.hq + int64_t(it.kv_head) * G) * d * P.q_elem_size;
    P.load_q(src, d, G, d, S.q + i * G * d, d);
#if defined(PERNODE_BF16_DOT)
    if (bf16_dot || bf16_prefill) std::memcpy(qb + i * G * d, src, sizeof(c10::BFloat16) * G * d);
#endif
  }
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < d; j += kLanes) vstore(S.q + r * d + j, vload(S.q + r * d + j) * P.scale);
    S.pos[r] = first_pos + r / G;
  }
  for (int r = rows; r < mp; ++r) S.pos[r] = first_pos + nq - 1;  // padding rows mimic the last row
  if (by_row) {
    for (int j = 0; j < d; ++j) {
      for (int r = 0; r < rows; ++r) S.qt[j * mp + r] = S.q[r * d + j];
      for (int r = rows; r < mp; ++r) S.qt[j * mp + r] = 0.0f;
    }
  }
  std::fill(S.o, S.o + rows * d, 0.0f);
  std::fill(S.m, S.m + mp, kNegInf);
  std::fill(S.l, S.l + mp, 0.0f);

  const int32_t* table = P.block_tables + it.seq * P.block_table_stride;
  const int64_t token_stride = int64_t(P.hkv) * d;
  const int64_t block_stride = int64_t(bs) * token_stride;
  const T* k_cache = reinterpret_cast<const T*>(P.k_cache);
  const T* v_cache = reinterpret_cast<const T*>(P.v_cache);
  auto block_offset = [&](int b) { return int64_t(table[b]) * block_stride + int64_t(it.kv_head) * d; };
  auto block_at = [&](int b) {
    const int64_t off = block_offset(b) * int64_t(sizeof(T));
    return NextBlock{P.k_cache + off, P.v_cache + off, token_stride * int64_t(sizeof(T)), d * int64_t(sizeof(T)), bs};
  };
  for (int b = it.blk_begin; b < std::min(it.blk_end, it.blk_begin + kPrefetchBlocks); ++b) block_at(b).fetch_rows(0);

  float ks[kMaxBlockSize], vs[kMaxBlockSize];  // a block's per-token scales (int8 cache)
  auto load_scales = [&](int b, int nk) {
    const int64_t at = int64_t(table[b]) * bs * P.hkv + it.kv_head;
    for (int t = 0; t < nk; ++t) {
      ks[t] = P.k_scale[at + int64_t(t) * P.hkv];
      vs[t] = P.v_scale[at + int64_t(t) * P.hkv];
    }
  };

  auto nk_of = [&](int b) { return std::min(bs, kv_len - b * bs); };
  if (!by_row) {
    // s[r][n]: a chunk's scores block after block, then one softmax update per row, then o += p v block by block.
    const int chunk_blocks = std::max(1, kDecodeChunkKeys / bs), ld = S.decode_ld;
    for (int b0 = it.blk_begin; b0 < it.blk_end && b0 * bs < kv_len; b0 += chunk_blocks) {
      const int b1 = std::min({it.blk_end, b0 + chunk_blocks, (kv_len + bs - 1) / bs});
      for (int b = b0, n = 0; b < b1; n += bs, ++b) {
        const int nk = nk_of(b);
        const T* k = k_cache + block_offset(b);
        NextBlock next;
        if (b + kPrefetchBlocks < it.blk_end) next = block_at(b + kPrefetchBlocks);
#if defined(PERNODE_BF16_DOT)
        if constexpr (kBf16Cache) {
          if (bf16_dot) scores_by_key_bf16<kD>(qb, rows, P.scale, k, token_stride, nk, S.sd + n, ld, S.tmp, next);
          else scores_by_key<kD, T>(S.q, rows, d, k, token_stride, nk, S.sd + n, ld, S.tmp, next);
        } else {
          scores_by_key<kD, T>(S.q, rows, d, k, token_stride, nk, S.sd + n, ld, S.tmp, next);
        }
#else
        scores_by_key<kD, T>(S.q, rows, d, k, token_stride, nk, S.sd + n, ld, S.tmp, next);
#endif
        if (P.k_scale) {
          load_scales(b, nk);
          scale_columns(S.sd + n, rows, ld, ks, nk);
        }
      }
      const int key0 = b0 * bs, n_keys = std::min((b1 - b0) * bs, kv_len - key0);
      for (int r = 0; r < rows; ++r)
        softmax_row(S.sd + r * ld, Scratch::round_up(n_keys, kLanes), std::min(n_keys, S.pos[r] - key0 + 1), S.m[r],
                    S.l[r], S.o + r * d, d);
#if defined(PERNODE_BF16_DOT)
      if constexpr (kBf16Cache && kD % 64 == 0) {
        if (bf16_pv) {
          probability_pairs(S.sd, rows, ld, n_keys, pb);
          for (int b = b0, n = 0; b < b1; n += bs, ++b)
            pv_bf16<kD>(pb + n / 2, ld / 2, 1, CacheValuePairs{v_cache + block_offset(b), token_stride, nk_of(b)},
                        nk_of(b), S.o, rows);
          continue;
        }
      }
#endif
      for (int b = b0, n = 0; b < b1; n += bs, ++b) {
        const int nk = nk_of(b);
        if (P.v_scale) {  // after l took the sum of the unscaled p
          load_scales(b, nk);
          scale_columns(S.sd + n, rows, ld, vs, nk);
        }
        pv<kD, T>(S.sd + n, ld, 1, v_cache + block_offset(b), token_stride, nk, S.o, rows, d);
      }
    }
  }

  for (int b = it.blk_begin; by_row && b < it.blk_end; ++b) {
    const int key0 = b * bs;
    const int nk = std::min(bs, kv_len - key0);
    if (nk <= 0) break;
    const T* k = k_cache + block_offset(b);
    const T* v = v_cache + block_offset(b);
    NextBlock next;
    if (b + kPrefetchBlocks < it.blk_end) next = block_at(b + kPrefetchBlocks);
    if (P.k_scale) load_scales(b, nk);
    // s[t][r]: softmax state vectorised over rows. Plenty of math per block here: one prefetch burst is fine.
    next.fetch_rows(0);
#if defined(PERNODE_BF16_DOT)
    if constexpr (kBf16Cache && kD % 64 == 0) {
      if (bf16_prefill) {
        uint32_t* qtp = reinterpret_cast<uint32_t*>(S.qt);
        if (b == it.blk_begin) transpose_q_pairs(qb, d, rows, mp, d, qtp);
        scores_by_row_bf16<kD, kKeysPerPass>(qtp, mp, k, token_stride, nk, P.scale, S.s);
        softmax_rows(S.s, mp, nk, key0, S.pos, S.m, S.l, S.alpha);
        for (int r = 0; r < rows; ++r)
          if (S.alpha[r] != 1.0f)
            for (int j = 0; j < d; j += kLanes) vstore(S.o + r * d + j, vload(S.o + r * d + j) * S.alpha[r]);
        uint32_t* value_pairs = reinterpret_cast<uint32_t*>(S.v);
        fill_value_pairs<kD>(v, token_stride, nk, value_pairs);
        probability_pairs_by_row(S.s, mp, nk, pb);
        pv_bf16<kD>(pb, 1, mp, BufferValuePairs{value_pairs, d}, nk, S.o, rows);
        continue;
      }
    }
#endif
    const float *kf = reinterpret_cast<const float*>(k), *vf_ = reinterpret_cast<const float*>(v);
    int64_t kv_stride = token_stride;
    if constexpr (!std::is_same_v<T, float>) {  // widened once, then reused by every row of the tile
      load_rows<T>(k, token_stride, nk, d, S.k, d);
      load_rows<T>(v, token_stride, nk, d, S.v, d);
      if (P.k_scale) {
        scale_rows(S.k, nk, d, ks);
        scale_rows(S.v, nk, d, vs);
      }
      kf = S.k;
      vf_ = S.v;
      kv_stride = d;
    }
    scores_by_row<kD>(S.qt, mp, d, kf, kv_stride, nk, S.s);
    softmax_rows(S.s, mp, nk, key0, S.pos, S.m, S.l, S.alpha);
    for (int r = 0; r < rows; ++r)
      if (S.alpha[r] != 1.0f)
        for (int j = 0; j < d; j += kLanes) vstore(S.o + r * d + j, vload(S.o + r * d + j) * S.alpha[r]);
    pv<kD, float>(S.s, 1, mp, vf_, kv_stride, nk, S.o, rows, d);
  }

#if defined(PERNODE_BF16_DOT)
  if constexpr (kBf16Cache && kD % 64 == 0)
    if (bf16_pv || bf16_prefill) unpermute_output<kD>(S.o, rows);
#endif
  if (it.partial_row >= 0) {
    std::memcpy(parts.o.data() + it.partial_row * d, S.o, sizeof(float) * rows * d);
    std::memcpy(parts.m.data() + it.partial_row, S.m, sizeof(float) * rows);
    std::memcpy(parts.l.data() + it.partial_row, S.l, sizeof(float) * rows);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t head = int64_t(it.kv_head) * G + r % G;
    char* dst = P.out + ((tok0 + r / G) * P.hq + head) * d * P.q_elem_size;
    P.store_out(S.o + r * d, 1.0f / S.l[r], dst, d);
  }
}

// Merge the slices of one split (sequence, kv head, tile): rescale each to the common max, add, normalise.
void merge_slices(const Problem& P, const std::vector<Item>& items, int first, int count, const Partials& parts,
                  std::vector<float>& acc) {
  const Item& it0 = items[first];
  const int d = P.head_dim, G = P.group;
  const int rows = (it0.q_end - it0.q_begin) * G;
  const int64_t tok0 = P.query_start_loc[it0.seq] + it0.q_begin;
  acc.resize(d);
  for (int r = 0; r < rows; ++r) {
    float m = kNegInf;
    for (int i = 0; i < count; ++i) m = std::max(m, parts.m[items[first + i].partial_row + r]);
    std::fill(acc.begin(), acc.end(), 0.0f);
    float l = 0.0f;
    for (int i = 0; i < count; ++i) {
      const int64_t pr = items[first + i].partial_row + r;
      if (parts.l[pr] == 0.0f) continue;
      const float w = std::exp(parts.m[pr] - m);
      l += w * parts.l[pr];
      const float* o = parts.o.data() + pr * d;
      for (int j = 0; j < d; ++j) acc[j] += w * o[j];
    }
    const int64_t head = int64_t(it0.kv_head) * G + r % G;
    P.store_out(acc.data(), 1.0f / l, P.out + ((tok0 + r / G) * P.hq + head) * d * P.q_elem_size, d);
  }
}

template <int kD, typename T>
void run_all(const Problem& P, const std::vector<Item>& items, const std::vector<int64_t>& order,
             const std::vector<std::pair<int, int>>& merges, Partials& parts, int max_rows, int max_threads) {
  // Items differ a lot in cost (causal tiles, ragged contexts): handed out one at a time, longest first, rather than
  // in static chunks, so no thread idles while another still has a queue; a preempted thread delays only its item.
  std::atomic<int64_t> next{0};
  const int64_t n = order.size();
  const int64_t threads = std::min<int64_t>(max_threads, n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(max_rows, P.head_dim, P.block_size);
    for (int64_t i = next++; i < n; i = next++) run_item<kD, T>(P, items[order[i]], scratch, parts);
  });
  // Few and small (splits only happen when items are few): not worth another fork.
  std::vector<float> acc;
  for (const auto& [first, count] : merges) merge_slices(P, items, first, count, parts, acc);
}

bool supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// An int8 cache needs both scale tensors, [num_blocks, block_size, Hkv] fp32; a float cache none.
void check_scales(const at::Tensor& k_cache, const c10::optional<at::Tensor>& k_scale,
                  const c10::optional<at::Tensor>& v_scale) {
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == k_scale.has_value() && quantized == v_scale.has_value(),
              "k_scale and v_scale are required with an int8 cache and only then; cache dtype ", k_cache.scalar_type());
  if (!quantized) return;
  for (const at::Tensor* t : {&*k_scale, &*v_scale}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "k_scale and v_scale must be contiguous float32 CPU tensors, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->size(0) == k_cache.size(0) && t->size(1) == k_cache.size(1) &&
                    t->size(2) == k_cache.size(2),
                "k_scale and v_scale must be [num_blocks, block_size, num_kv_heads] = ", k_cache.sizes().slice(0, 3),
                ", got ", t->sizes());
  }
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, double scale, const c10::optional<at::Tensor>& k_scale,
                           const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_heads, head_dim], got ", query.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(supported_dtype(query.scalar_type()) &&
                  (supported_dtype(k_cache.scalar_type()) || k_cache.scalar_type() == at::kChar) &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "dtypes must be float32, bfloat16 or float16 (caches alike, or int8 with scales), got query ",
              query.scalar_type(), ", k_cache ", k_cache.scalar_type(), ", v_cache ", v_cache.scalar_type());
  check_scales(k_cache, k_scale, v_scale);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  for (const at::Tensor* t : {&query, &k_cache, &v_cache, &block_tables, &query_start_loc, &seq_lens})
    TORCH_CHECK(t->device().is_cpu(), "pernode::paged_attention is the CPU kernel; got a tensor on ", t->device());
  for (const at::Tensor* t : {&block_tables, &query_start_loc, &seq_lens})
    TORCH_CHECK(t->scalar_type() == at::kInt, "block_tables, query_start_loc and seq_lens must be int32, got ",
                t->scalar_type());
  const int64_t hq = query.size(1), hkv = k_cache.size(2), d = query.size(2), bs = k_cache.size(1);
  const int64_t num_blocks = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == d, "head_dim of query (", d, ") and k_cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(d % 16 == 0 && d <= 512, "head_dim must be a multiple of 16 up to 512, got ", d,
              "; use paged_attention_reference for other sizes");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "num_heads (", hq, ") must be a multiple of num_kv_heads (", hkv, ")");
  TORCH_CHECK(bs >= 1 && bs <= kMaxBlockSize, "block_size must be in [1, ", kMaxBlockSize, "], got ", bs);
  const int64_t S = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == S + 1,
              "query_start_loc must have num_seqs + 1 = ", S + 1, " entries, got ", query_start_loc.sizes());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) >= S,
              "block_tables must be [num_seqs, max_blocks] with num_seqs = ", S, ", got ", block_tables.sizes());

  const at::Tensor q = query.contiguous();
  const at::Tensor bt = block_tables.contiguous(), qsl = query_start_loc.contiguous(), sl = seq_lens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());

  Problem P;
  P.query = static_cast<const char*>(q.data_ptr());
  P.k_cache = static_cast<const char*>(k_cache.data_ptr());
  P.v_cache = static_cast<const char*>(v_cache.data_ptr());
  P.out = static_cast<char*>(out.data_ptr());
  P.block_tables = bt.data_ptr<int32_t>();
  P.block_table_stride = bt.size(1);
  P.query_start_loc = qsl.data_ptr<int32_t>();
  P.seq_lens = sl.data_ptr<int32_t>();
  P.hq = hq;
  P.hkv = hkv;
  P.group = hq / hkv;
  P.head_dim = d;
  P.block_size = bs;
  P.q_elem_size = q.element_size();
  P.q_bf16 = q.scalar_type() == at::kBFloat16;
  P.scale = float(scale);
  P.k_scale = k_scale ? k_scale->data_ptr<float>() : nullptr;
  P.v_scale = v_scale ? v_scale->data_ptr<float>() : nullptr;
  P.load_q = pick_loader(q.scalar_type());
  P.store_out = pick_storer(q.scalar_type());

  // Work items: one per (sequence, query tile, kv head), checked against the metadata on the way. A decode-like
  // sequence (kMaxDecodeQueries) has tiles of one query.
  const int G = P.group;
  const int tile_q = std::max(1, kTileRows / G);
  const int64_t T = q.size(0);
  std::vector<Item> items;
  int max_rows = 1;
  // What the kv split below looks at, counted so that a decode-like sequence weighs the same whatever its query
  // count: as one query at its last position (`unit_cost`) and hkv items. A verify step thus splits each query's
  // item exactly as the decode step at that query's position would (at batch 1; in a batch, alike when the other
  // sequences are alike).
  int64_t split_items = 0, split_cost = 0;
  std::vector<int64_t> unit_cost(S, -1);  // per decode-like sequence: hkv * G * seq_len
  for (int64_t s = 0; s < S; ++s) {
    const int q0 = P.query_start_loc[s], q1 = P.query_start_loc[s + 1], L = P.seq_lens[s];
    const int q_len = q1 - q0;
    TORCH_CHECK(q0 >= 0 && q_len >= 0 && q1 <= T, "query_start_loc[", s, ":", s + 2, "] = [", q0, ", ", q1,
                "] must be non-decreasing and within the ", T, " query tokens");
    if (q_len == 0) continue;
    TORCH_CHECK(L >= q_len, "seq_lens[", s, "] = ", L, " is shorter than its ", q_len,
                " new query tokens; seq_lens counts cached plus new tokens");
    const int64_t n_blocks = (L + bs - 1) / bs;
    TORCH_CHECK(n_blocks <= bt.size(1), "seq_lens[", s, "] = ", L, " needs ", n_blocks,
                " blocks but block_tables has ", bt.size(1), " columns");
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int32_t id = P.block_tables[s * P.block_table_stride + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", s, ", ", b, "] = ", id,
                  " is outside the cache's ", num_blocks, " blocks");
    }
    const bool decode_like = q_len <= kMaxDecodeQueries;
    const int tile = decode_like ? 1 : tile_q;
    if (decode_like) {
      unit_cost[s] = hkv * G * int64_t(L);
      split_items += hkv;
      split_cost += unit_cost[s];
    }
    for (int qb = 0; qb < q_len; qb += tile) {
      const int qe = std::min(q_len, qb + tile);
      const int kv_len = L - q_len + qe;
      const int rows = (qe - qb) * G;
      max_rows = std::max(max_rows, rows);
      for (int h = 0; h < hkv; ++h) {
        items.push_back({int32_t(s), h, qb, qe, 0, int32_t((kv_len + bs - 1) / bs), -1, int64_t(rows) * kv_len});
        if (!decode_like) {
          ++split_items;
          split_cost += int64_t(rows) * kv_len;
        }
      }
    }
  }
  if (items.empty()) return out;

  // Too few items to keep every thread busy (small batches, long contexts): slice the kv range of the longest ones.
  // Below ~20 us of work, waking other threads costs more than it saves.
  int64_t total_cost = 0;
  for (const Item& it : items) total_cost += it.cost;
  const int max_threads = at::get_num_threads();
  int threads = total_cost * d < kMinParallelWork ? 1 : max_threads;
  std::vector<std::pair<int, int>> merges;  // (first item, slices) of each split item
  Partials parts;
  if (max_threads > 1 && split_items < 2 * max_threads) {
    const int64_t want = (4 * max_threads + split_items - 1) / split_items;
    const int min_blocks = std::max<int>(1, kSplitMinTokens / bs);
    std::vector<Item> sliced;
    int64_t partial_rows = 0;
    for (const Item& it : items) {
      const int n_blk = it.blk_end - it.blk_begin;
      int64_t cost = split_cost;  // a decode-like item: the step's cost had its sequence been a decode here
      if (unit_cost[it.seq] >= 0) cost += hkv * G * int64_t(P.seq_lens[it.seq] - (P.query_start_loc[it.seq + 1] -
                                          P.query_start_loc[it.seq]) + it.q_end) - unit_cost[it.seq];
      const int slices = cost * d < kMinParallelWork ? 1 : int(std::min<int64_t>(want, n_blk / min_blocks));
      if (slices <= 1) {
        sliced.push_back(it);
        continue;
      }
      const int rows = (it.q_end - it.q_begin) * G;
      merges.push_back({int(sliced.size()), slices});
      for (int i = 0; i < slices; ++i) {
        Item part = it;
        part.blk_begin = it.blk_begin + int64_t(n_blk) * i / slices;
        part.blk_end = it.blk_begin + int64_t(n_blk) * (i + 1) / slices;
        part.partial_row = partial_rows;
        part.cost = it.cost / slices;
        partial_rows += rows;
        sliced.push_back(part);
      }
    }
    items.swap(sliced);
    if (!merges.empty()) threads = max_threads;
    parts.o.resize(partial_rows * d);
    parts.m.resize(partial_rows);
    parts.l.resize(partial_rows);
  }

  // Longest first, handed out dynamically: a greedy schedule close to balanced.
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });

  const at::ScalarType kv_type = k_cache.scalar_type();
  auto run = [&](auto kv_tag) {
    using T = decltype(kv_tag);
    switch (d) {
      case 64: return run_all<64, T>(P, items, order, merges, parts, max_rows, threads);
      case 128: return run_all<128, T>(P, items, order, merges, parts, max_rows, threads);
      default: return run_all<0, T>(P, items, order, merges, parts, max_rows, threads);
    }
  };
  if (kv_type == at::kFloat) run(float{});
  else if (kv_type == at::kBFloat16) run(c10::BFloat16{});
  else if (kv_type == at::kChar) run(int8_t{});
  else run(c10::Half{});
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace pernode
