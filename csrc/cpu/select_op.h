// A dual select op on the CPU: an elementwise y = f(x) whose derivative is 1 or 0 (ReLU,
// hardtanh), so that every tangent slot is a select, not a product:
//   y = op.primal(x),  yt[t] = op.keep(x) ? xt[t] : 0,
// in one pass over x and the slots. A select gives 0 for a NaN or Inf tangent where the slope
// is 0, as torch's derivative kernels of these ops do. The slots may be narrower than the
// primal; they are selected as bits (a zero of every floating type is all zero bits), which
// vectorizes for the 16-bit types too. An op file registers dual_select_cpu<Op> of its rule
// (csrc/select_ops.h: a struct template over the primal's type) as its CPU kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "../checks.h"
#include "../dual_types.h"
#include "isa.h"

namespace fgkernels {

// One span [0, n) of the primal and of every slot (slot t at offset t * slot_stride). Static:
// each kernel file has its own versions, called directly rather than through the PLT.
template <typename Op, typename tangent_bits>
FGK_CPU_KERNEL static void select_span(const Op op, const typename Op::scalar_t* __restrict x,
                                       const tangent_bits* __restrict xt,
                                       typename Op::scalar_t* __restrict y,
                                       tangent_bits* __restrict yt, int64_t n, int64_t T,
                                       int64_t slot_stride) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = op.primal(x[i]);
  for (int64_t t = 0; t < T; ++t) {
    const tangent_bits* __restrict src = xt + t * slot_stride;
    tangent_bits* __restrict dst = yt + t * slot_stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = op.keep(x[i]) ? src[i] : tangent_bits(0);
  }
}

// The op on (x, xt): y in x's kernel format, yt stacked in it, of xt's dtype. `make_op` builds
// the Op<scalar_t> of the op's arguments (the bounds, converted to the primal's type).
template <template <typename> class Op, typename MakeOp>
std::tuple<at::Tensor, at::Tensor> dual_select_cpu(const at::Tensor& x_in,
                                                   const at::Tensor& xt_in, const char* name,
                                                   MakeOp&& make_op) {
  const int64_t T = check_tangent(x_in, xt_in, "xt");
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = in_format(x_in, fmt);
  const at::Tensor xt = slots_in_format(xt_in, fmt);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt, xt.scalar_type());
  const int64_t n = x.numel();
  dispatch_dual_types(x.scalar_type(), xt.scalar_type(), name, [&](auto p, auto t) {
    using scalar_t = typename decltype(p)::type;
    using tangent_bits = bits_t<typename decltype(t)::type>;
    const Op<scalar_t> op = make_op(TypeTag<scalar_t>{});
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const auto* tp = static_cast<const tangent_bits*>(xt.const_data_ptr());
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    auto* ytp = static_cast<tangent_bits*>(yt.mutable_data_ptr());
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      select_span(op, xp + i0, tp + i0, yp + i0, ytp + i0, i1 - i0, T, n);
    });
  });
  return {y, yt};
}

}  // namespace fgkernels
