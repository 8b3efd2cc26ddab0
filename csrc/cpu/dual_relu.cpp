// Dual ReLU on the CPU: y = max(x, 0), yt = xt * [x > 0], in one pass over x and the slots.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

namespace fgkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_relu_cpu(const at::Tensor& x_in, const at::Tensor& xt_in) {
  const int64_t T = check_tangent(x_in, xt_in, "xt");
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = in_format(x_in, fmt);
  const at::Tensor xt = slots_in_format(xt_in, fmt);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_relu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = xt.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* ytp = yt.mutable_data_ptr<scalar_t>();
    const scalar_t zero(0);
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      // !(x <= 0) keeps a NaN in the primal, as torch.relu does; the tangent is xt·[x > 0].
      for (int64_t i = i0; i < i1; ++i) yp[i] = !(xp[i] <= zero) ? xp[i] : zero;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = i0; i < i1; ++i) ytp[t * n + i] = xp[i] > zero ? tp[t * n + i] : zero;
    });
  });
  return {y, yt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_relu", &dual_relu_cpu); }

}  // namespace fgkernels
