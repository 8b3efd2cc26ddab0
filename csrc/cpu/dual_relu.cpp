// Dual ReLU on the CPU: the Relu rule of csrc/select_ops.h in dual_select_cpu.
#include <torch/library.h>

#include "../select_ops.h"
#include "select_op.h"

namespace fgkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_relu_cpu(const at::Tensor& x, const at::Tensor& xt) {
  return dual_select_cpu<Relu>(x, xt, "dual_relu",
                               [](auto tag) { return Relu<typename decltype(tag)::type>{}; });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_relu", &dual_relu_cpu); }

}  // namespace fgkernels
