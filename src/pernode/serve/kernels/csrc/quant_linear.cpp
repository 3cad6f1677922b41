// Registers the ops of quant_linear.h and int4_panel_gemm.h with torch's dispatcher (torch.ops.pernode.*); the
// kernels live in the headers so that decoder_stack.cpp calls the same functions without a dispatch.

#include "quant_linear.h"
#include "int4_panel_gemm.h"

#include <torch/library.h>

namespace pernode {

TORCH_LIBRARY_FRAGMENT(pernode, m) {
  m.def("woq_linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term, int bits, int group_size, int num_threads=0, bool quantize_input=False) -> Tensor");
  m.def("woq_panel_gemm(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term, int group_size, int num_threads=0) -> Tensor");
  m.def("woq_gemm_int16x(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term, int group_size, int num_threads=0) -> Tensor");
  m.def("woq_gemm(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(pernode, CPU, m) {
  m.impl("woq_linear", &quant::woq_linear);
  m.impl("woq_gemm", &quant::woq_gemm);
  m.impl("woq_gemm_int16x", &quant::woq_gemm_int16x);
  m.impl("woq_panel_gemm", &quant::woq_panel_gemm);
}

}  // namespace pernode
