// Registers the ops of dense_gemv.h with torch's dispatcher (torch.ops.pernode.*); the kernels live in the
// header so that decoder_stack.cpp calls the same functions without a dispatch.

#include "dense_gemv.h"

#include <torch/library.h>

namespace pernode {

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def("dense_gemv(Tensor x, Tensor weight, Tensor? bias, int num_threads=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) { m.impl("dense_gemv", &dense::dense_gemv); }

}  // namespace pernode
