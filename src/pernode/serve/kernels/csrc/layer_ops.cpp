// Registers the ops of layer_ops.h with torch's dispatcher (torch.ops.pernode.*); the kernels live in the
// header so that decoder_stack.cpp calls the same functions without a dispatch.

#include "layer_ops.h"

#include <torch/library.h>

namespace pernode {

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding_(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, int head_dim) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) {
  m.impl("rms_norm", &layer_ops::rms_norm);
  m.impl("rotary_embedding_", &layer_ops::rotary_embedding_);
  m.impl("add_rms_norm", &layer_ops::add_rms_norm);
  m.impl("silu_and_mul", &layer_ops::silu_and_mul);
}

}  // namespace pernode
