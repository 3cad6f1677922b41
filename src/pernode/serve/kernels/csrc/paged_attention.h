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
// Math is fp32: bf16/fp16 K/V are widened in registers as they are read (decode) or once per block into an L1 buffer
// (prefill), except that on AVX512_BF16 a bf16 cache under a bf16 query is multiplied by vdpbf16ps as it lies
// (attention_bf16_dot.h). A decode item scores a chunk of blocks before each softmax update. Blocks lie at random
// places in memory, so each item prefetches its blocks a little ahead.
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

#include "attention_work_item.h"  // one work item: its problem, scratch and per-block math

namespace pernode {
namespace attention {
namespace {

// A sequence bringing at most this many new tokens is a decode or a speculative verification (k + 1 <= 17 tokens,
// config.MAX_SPECULATIVE_TOKENS): each of its queries is a work item of its own, exactly the item a decode at that
// position would be (same rows, path, kv range and split), so a verified token's attention is bit for bit its decode's.
constexpr int kMaxDecodeQueries = 32;
constexpr int kTileRows = 64;          // rows (query x group head) per tile: enough reuse of each block, fits L1/L2
constexpr int64_t kMinParallelWork = 1 << 18;  // rows x keys x head_dim under which one thread does it all
constexpr int kSplitMinTokens = 256;   // a kv slice shorter than this is not worth its merge

// ---- the query's and output's dtypes ----------------------------------------------------------------------------

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

// ---- all items ------------------------------------------------------------------------------------------------------

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
