// Dual hardtanh on CUDA: the Hardtanh rule of csrc/select_ops.h in dual_select_cuda, the bounds
// in the primal's type (its clamp) and in the type it compares in (its slope).
#include <torch/library.h>

#include "../select_ops.h"
#include "select_op.cuh"

namespace fgkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_hardtanh_cuda(const at::Tensor& x, const at::Tensor& xt,
                                                      double min_val, double max_val) {
  check_hardtanh_bounds(min_val, max_val);
  return dual_select_cuda<Hardtanh>(x, xt, "dual_hardtanh", [&](auto p) {
    using T = decltype(p);
    return Hardtanh<T>{cuda::narrow<T>(min_val), cuda::narrow<T>(max_val),
                       static_cast<wide_t<T>>(min_val), static_cast<wide_t<T>>(max_val)};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) { m.impl("dual_hardtanh", &dual_hardtanh_cuda); }

}  // namespace fgkernels
