// Dual hardtanh on the CPU: the Hardtanh rule of csrc/select_ops.h in dual_select_cpu, the
// bounds in the primal's type (its clamp) and in the type it compares in (its slope).
#include <torch/library.h>

#include "../select_ops.h"
#include "select_op.h"

namespace fgkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_hardtanh_cpu(const at::Tensor& x, const at::Tensor& xt,
                                                     double min_val, double max_val) {
  check_hardtanh_bounds(min_val, max_val);
  return dual_select_cpu<Hardtanh>(x, xt, "dual_hardtanh", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Hardtanh<T>{T(min_val), T(max_val), wide_t<T>(min_val), wide_t<T>(max_val)};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_hardtanh", &dual_hardtanh_cpu); }

}  // namespace fgkernels
