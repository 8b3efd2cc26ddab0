// Dual ReLU on the CPU: y = max(x, 0), yt = xt where x > 0 or x is NaN, else 0 (torch.relu's
// derivative).
#include <torch/library.h>

#include "select_op.h"

namespace fgkernels {
namespace {

// !(x <= 0) keeps a NaN in the primal, as torch.relu does, and its tangent, as torch.relu's
// derivative does.
template <typename T>
struct Relu {
  using scalar_t = T;
  bool keep(T x) const { return !(x <= T(0)); }
  T primal(T x) const { return keep(x) ? x : T(0); }
};

std::tuple<at::Tensor, at::Tensor> dual_relu_cpu(const at::Tensor& x, const at::Tensor& xt) {
  return dual_select_cpu<Relu>(x, xt, "dual_relu",
                               [](auto tag) { return Relu<typename decltype(tag)::type>{}; });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_relu", &dual_relu_cpu); }

}  // namespace fgkernels
