// Dual ReLU on the CPU: y = max(x, 0), yt = xt where x > 0 or x is NaN, else 0 (torch.relu's
// derivative), in one pass over x and the slots.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dual_types.h"
#include "isa.h"

namespace fgkernels {
namespace {

// One span [0, n) of the primal and of every slot (slot t at offset t * slot_stride).
// !(x <= 0) keeps a NaN in the primal, as torch.relu does, and its tangent, as torch.relu's
// derivative does; elsewhere a select, not a product, so a NaN or Inf tangent at x <= 0 gives 0.
// The slots may have a narrower type than the primal; they are selected as bits (a zero of
// every floating type is all zero bits), which vectorizes for the 16-bit types too.
template <typename scalar_t, typename tangent_bits>
FGK_CPU_KERNEL void relu_span(const scalar_t* __restrict x, const tangent_bits* __restrict xt,
               scalar_t* __restrict y, tangent_bits* __restrict yt, int64_t n, int64_t T,
               int64_t slot_stride) {
  const scalar_t zero(0);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = !(x[i] <= zero) ? x[i] : zero;
  for (int64_t t = 0; t < T; ++t) {
    const tangent_bits* __restrict src = xt + t * slot_stride;
    tangent_bits* __restrict dst = yt + t * slot_stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = x[i] <= zero ? tangent_bits(0) : src[i];
  }
}

std::tuple<at::Tensor, at::Tensor> dual_relu_cpu(const at::Tensor& x_in, const at::Tensor& xt_in) {
  const int64_t T = check_tangent(x_in, xt_in, "xt");
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = in_format(x_in, fmt);
  const at::Tensor xt = slots_in_format(xt_in, fmt);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt, xt.scalar_type());
  const int64_t n = x.numel();
  dispatch_dual_types(x.scalar_type(), xt.scalar_type(), "dual_relu", [&](auto p, auto t) {
    using scalar_t = typename decltype(p)::type;
    using tangent_bits = bits_t<typename decltype(t)::type>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto* tp = static_cast<const tangent_bits*>(xt.const_data_ptr());
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    auto* ytp = static_cast<tangent_bits*>(yt.mutable_data_ptr());
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      relu_span(xp + i0, tp + i0, yp + i0, ytp + i0, i1 - i0, T, n);
    });
  });
  return {y, yt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_relu", &dual_relu_cpu); }

}  // namespace fgkernels
