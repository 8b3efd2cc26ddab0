// Dual hardtanh on the CPU: y = clamp(x, min_val, max_val), yt = xt strictly inside the bounds
// and where x is NaN, else 0 (torch's hardtanh_backward as its scalar loop defines it, the
// bounds in the primal's type).
#include <torch/library.h>

#include "select_op.h"

namespace fgkernels {
namespace {

// A NaN fails every comparison: it stays in the primal (as torch.clamp keeps it) and keeps its
// tangent (as torch.relu's derivative does).
template <typename T>
struct Hardtanh {
  using scalar_t = T;
  T lo, hi;
  bool keep(T x) const { return !(x <= lo || x >= hi); }
  T primal(T x) const { return x < lo ? lo : (x > hi ? hi : x); }
};

std::tuple<at::Tensor, at::Tensor> dual_hardtanh_cpu(const at::Tensor& x, const at::Tensor& xt,
                                                     double min_val, double max_val) {
  TORCH_CHECK(min_val <= max_val, "dual_hardtanh: min_val (", min_val,
              ") must not be greater than max_val (", max_val, ")");
  return dual_select_cpu<Hardtanh>(x, xt, "dual_hardtanh", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Hardtanh<T>{T(min_val), T(max_val)};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_hardtanh", &dual_hardtanh_cpu); }

}  // namespace fgkernels
