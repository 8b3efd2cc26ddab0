// Dual ReLU on CUDA: the Relu rule of csrc/select_ops.h in dual_select_cuda.
#include <torch/library.h>

#include "../select_ops.h"
#include "select_op.cuh"

namespace fgkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_relu_cuda(const at::Tensor& x, const at::Tensor& xt) {
  return dual_select_cuda<Relu>(x, xt, "dual_relu", [](auto p) { return Relu<decltype(p)>{}; });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) { m.impl("dual_relu", &dual_relu_cuda); }

}  // namespace fgkernels
