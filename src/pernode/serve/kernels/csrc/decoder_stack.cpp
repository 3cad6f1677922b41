// Every decoder layer of a decode-sized step in one call: input RMSNorm -> qkv projection -> rotary -> K/V write ->
// paged attention -> o projection -> residual add + RMSNorm -> gate/up projection -> SiLU * up -> down projection
// -> residual add, layer after layer, with no Python between the ops.
//
// At decode a layer's ops are microseconds of work each, and from Python each cost a module call, argument parsing
// and a dispatch on top: ~130 us a layer, ~4 ms of a 14 ms batch-1 step over 30 layers. Here the same functions
// the per-op path dispatches to (quant_linear.h, dense_gemv.h, layer_ops.h, paged_attention.h) are called directly,
// in the same order and in the same dtypes, so the result is the per-op path's, bit for bit; the per-op path
// (models/llama.py) stays the reference and serves everything this does not cover.
//
// A projection is described by its tensors and five integers (see `Projection`): int4/int8 weight-only (the GEMV
// below its measured crossovers, int4 with int8 x the panel kernel from its own, the tiled GEMM from the GEMM's),
// or a float weight (the fp32 GEMV for up to 4 rows
// where allowed, else at::linear).

#include "dense_gemv.h"
#include "layer_ops.h"
#include "paged_attention.h"
#include "quant_linear.h"
#include "int4_panel_gemm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace pernode {
namespace {

constexpr int64_t kProjectionsPerLayer = 4;  // qkv, o, gate_up, down
// bits (0: float weight), group_size, flags, gemm_from_rows, panel_from_rows
constexpr int64_t kConfigPerProjection = 5;
constexpr int64_t kInt8Input = 1;            // flags: the int4 GEMV quantizes x to int8 per 32-value block
constexpr int64_t kDenseGemv = 2;            // flags: a float weight may take the fp32 GEMV at <= 4 rows
constexpr int64_t kInt16Gemm = 4;            // flags: an int4 projection's GEMM takes x as int16 (woq_gemm_int16x)
constexpr int64_t kDenseGemvMaxRows = 4;     // as dense_linear.MAX_ROWS

struct Projection {
  const at::Tensor* weight;
  c10::optional<at::Tensor> scale, zero_term, bias;
  int64_t bits, group_size, flags, gemm_from_rows, panel_from_rows;
};

// QuantLinear.forward / Linear.forward of models/llama.py, for a 2-D x.
at::Tensor project(const at::Tensor& x, const Projection& p, int64_t num_threads) {
  at::Tensor y;
  if (p.bits == 0) {
    if ((p.flags & kDenseGemv) && x.size(0) <= kDenseGemvMaxRows && x.scalar_type() == at::kFloat &&
        p.weight->scalar_type() == at::kFloat)
      return dense::dense_gemv(x, *p.weight, p.bias, num_threads);
    return at::linear(x, *p.weight, p.bias);
  }
  if (x.size(0) >= p.gemm_from_rows && (p.flags & kInt16Gemm))
    y = quant::woq_gemm_int16x(x, *p.weight, *p.scale, p.zero_term, p.group_size, num_threads);
  else if (x.size(0) >= p.gemm_from_rows)
    y = quant::woq_gemm(x, *p.weight, *p.scale, p.zero_term, p.bits, p.group_size);
  else if (p.bits == 4 && (p.flags & kInt8Input) && x.size(0) >= p.panel_from_rows)
    y = quant::woq_panel_gemm(x, *p.weight, *p.scale, p.zero_term, p.group_size, num_threads);
  else
    y = quant::woq_linear(x, *p.weight, *p.scale, p.zero_term, p.bits, p.group_size, num_threads,
                          (p.flags & kInt8Input) != 0);
  if (p.bias.has_value()) y = y + *p.bias;
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

at::Tensor decoder_stack(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& query_start_loc, const at::Tensor& seq_lens, at::TensorList norm_weights,
                         at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& scales,
                         const c10::List<c10::optional<at::Tensor>>& zero_terms,
                         const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef config,
                         at::TensorList kv_caches, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         double eps, double attn_scale, int64_t num_threads) {
  const int64_t layers = static_cast<int64_t>(kv_caches.size()) / 2;
  TORCH_CHECK(hidden.dim() == 2, "decoder_stack: hidden must be [num_tokens, hidden_size]");
  TORCH_CHECK(static_cast<int64_t>(norm_weights.size()) == 2 * layers &&
                  static_cast<int64_t>(weights.size()) == kProjectionsPerLayer * layers &&
                  static_cast<int64_t>(scales.size()) == kProjectionsPerLayer * layers &&
                  static_cast<int64_t>(zero_terms.size()) == kProjectionsPerLayer * layers &&
                  static_cast<int64_t>(biases.size()) == kProjectionsPerLayer * layers &&
                  static_cast<int64_t>(config.size()) == kConfigPerProjection * kProjectionsPerLayer * layers,
              "decoder_stack: per-layer lists must hold 2 norms, 4 projections and 2 caches for each of ", layers,
              " layers");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  std::vector<Projection> proj(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t* c = config.data() + i * kConfigPerProjection;
    proj[i] = Projection{&weights[i], scales.get(i), zero_terms.get(i), biases.get(i), c[0], c[1], c[2], c[3], c[4]};
    TORCH_CHECK(proj[i].bits == 0 || proj[i].scale.has_value(), "decoder_stack: a quantized projection needs scales");
  }
  at::Tensor x = hidden;
  for (int64_t l = 0; l < layers; ++l) {
    const Projection* p = proj.data() + l * kProjectionsPerLayer;
    // attention
    at::Tensor qkv = project(layer_ops::rms_norm(x, norm_weights[2 * l], eps), p[0], num_threads);
    layer_ops::rotary_embedding_(qkv, positions, cos, sin, num_heads + num_kv_heads, head_dim);
    auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
    at::Tensor q = parts[0].view({-1, num_heads, head_dim});
    at::Tensor k = parts[1].view({-1, num_kv_heads, head_dim});
    at::Tensor v = parts[2].view({-1, num_kv_heads, head_dim});
    const at::Tensor& k_cache = kv_caches[2 * l];
    const at::Tensor& v_cache = kv_caches[2 * l + 1];
    if (k.scalar_type() != k_cache.scalar_type()) k = k.to(k_cache.scalar_type()), v = v.to(v_cache.scalar_type());
    const int64_t slots = k_cache.size(0) * k_cache.size(1);
    k_cache.view({slots, num_kv_heads, head_dim}).index_copy_(0, slot_mapping, k);
    v_cache.view({slots, num_kv_heads, head_dim}).index_copy_(0, slot_mapping, v);
    at::Tensor attn = attention::paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                                 attn_scale, c10::nullopt, c10::nullopt);
    at::Tensor h = project(attn.reshape({-1, q_size}), p[1], num_threads);
    // MLP
    auto [residual, normed] = layer_ops::add_rms_norm(h, x, norm_weights[2 * l + 1], eps);
    at::Tensor gate_up = project(normed, p[2], num_threads);
    auto gu = gate_up.chunk(2, -1);
    at::Tensor act = at::silu(gu[0]) * gu[1];  // as silu_and_mul_reference: torch's vectorised ops
    x = residual + project(act, p[3], num_threads);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def(
      "decoder_stack(Tensor hidden, Tensor positions, Tensor cos, Tensor sin, Tensor slot_mapping, "
      "Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, Tensor[] norm_weights, Tensor[] weights, "
      "Tensor?[] scales, Tensor?[] zero_terms, Tensor?[] biases, int[] config, Tensor(a!)[] kv_caches, "
      "int num_heads, int num_kv_heads, int head_dim, float eps, float attn_scale, int num_threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) { m.impl("decoder_stack", &decoder_stack); }

}  // namespace pernode
