// Registers the ops of paged_attention.h with torch's dispatcher (torch.ops.pernode.*); the kernels live in the
// header so that decoder_stack.cpp calls the same functions without a dispatch.

#include "paged_attention.h"

#include <torch/library.h>

namespace pernode {

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def(
      "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start_loc, "
      "Tensor seq_lens, float scale, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) { m.impl("paged_attention", &attention::paged_attention); }

}  // namespace pernode
