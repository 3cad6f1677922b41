#pragma once
// One work item of the paged attention kernel (paged_attention.h, which includes this only): the problem it reads,
// its per-thread scratch, and the item itself (a sequence's kv head and tile of queries over a range of kv blocks),
// then the merge of a split item's slices. The per-block math is attention_block_math.h and attention_bf16_dot.h.

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "attention_bf16_dot.h"  // both paths' products by vdpbf16ps where the CPU has it
#include "attention_block_math.h"  // one block's scores, softmax and o += p v; prefetch; int8 scales
#include "attention_lanes.h"  // vf/vi (kLanes wide), loads, horizontal sums, exp

namespace pernode {
namespace attention {
namespace {

constexpr int kRowVectorMinRows = 12;  // from here the row-vectorised matmul beats per-key dot products (measured)
constexpr int kPrefetchBlocks = 2;     // how far ahead K/V blocks are requested: enough to cover DRAM latency
// Keys (whole blocks) whose scores a decode item computes before one online-softmax update: the update's fixed cost
// per row (a max, a sum, the exp of the rescale, o rescaled) is then paid per chunk, not per block, where at 16-token
// blocks it was a quarter of the decode path's time. A chunk's K/V stays in L2 between its two passes.
constexpr int kDecodeChunkKeys = 512;

// n rows of d elements, `stride` elements apart, widened to fp32 rows `ld` apart.
using LoadRowsFn = void (*)(const void* src, int64_t stride, int n, int d, float* dst, int ld);
// One fp32 row narrowed to the output dtype, multiplied by `mul` on the way.
using StoreRowFn = void (*)(const float* src, float mul, void* dst, int d);

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
  bool q_bf16;  // query is bf16: with a bf16 cache, both paths take it as it is (vdpbf16ps)
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

// ---- one work item ------------------------------------------------------------------------------------------------

template <int kD, typename T>
void run_item(const Problem& P, const Item& it, Scratch& S, Partials& parts) {
  const int d = kD ? kD : P.head_dim;
  const int G = P.group, bs = P.block_size;
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
#if defined(PERNODE_BF16_DOT)
  const bool bf16_q = bf16_dot || bf16_prefill;  // the vdpbf16ps paths read q as it is; the fp32 ones, widened
#else
  constexpr bool bf16_q = false;
#endif
  for (int i = 0; i < nq; ++i) {
    const char* src = P.query + ((tok0 + i) * P.hq + int64_t(it.kv_head) * G) * d * P.q_elem_size;
#if defined(PERNODE_BF16_DOT)
    if (bf16_q) std::memcpy(qb + i * G * d, src, sizeof(c10::BFloat16) * G * d);
#endif
    if (!bf16_q) P.load_q(src, d, G, d, S.q + i * G * d, d);
  }
  for (int r = 0; r < rows; ++r) {
    if (!bf16_q)
      for (int j = 0; j < d; j += kLanes) vstore(S.q + r * d + j, vload(S.q + r * d + j) * P.scale);
    S.pos[r] = first_pos + r / G;
  }
  for (int r = rows; r < mp; ++r) S.pos[r] = first_pos + nq - 1;  // padding rows mimic the last row
#if defined(PERNODE_BF16_DOT)
  if (bf16_prefill) transpose_q_pairs(qb, d, rows, mp, d, reinterpret_cast<uint32_t*>(S.qt));
#else
  constexpr bool bf16_prefill = false;
#endif
  if (by_row && !bf16_prefill) {
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
        scores_by_row_bf16<kD, kKeysPerPass>(reinterpret_cast<const uint32_t*>(S.qt), mp, k, token_stride, nk,
                                             P.scale, S.s);
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

}  // namespace
}  // namespace attention
}  // namespace pernode
