// Registers the batch-norm kernels of dual_batch_norm_kernel.cu as the CUDA implementations of
// the batch-norm ops. Uses only device-generic c10 headers (DeviceGuard, Stream), so it also
// compiles against a CPU build of torch; the kernels are reached through the plain launchers of
// dual_kernels.h.
#include <algorithm>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../batch_norm_common.h"
#include "dual_kernels.h"
#include "launch.h"

namespace fgkernels {
namespace {

cuda::Layout layout_of(const DualInput& in) { return {in.outer, in.channels, in.inner}; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_bn_stats_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in) {
  TORCH_CHECK(x_in.numel() > 0, "dual_bn_stats: x must not be empty, got shape ", x_in.sizes());
  c10::DeviceGuard guard(x_in.device());
  const DualInput in = prepare_input(x_in, xt_in);
  const int64_t count = in.outer * in.inner;
  const int64_t splits = in.inner == 1
      ? std::clamp<int64_t>(in.outer / cuda::kStatsSplitRowsChannelsLast, 1, 65535)
      : std::clamp<int64_t>(count / cuda::kStatsSplitElements, 1, 1024);
  const auto options = in.x.options().dtype(acc_type(in.x));
  auto partial = at::empty({splits, 2 + 2 * in.T, in.channels}, options);
  auto mean = at::empty({in.channels}, options), var = at::empty({in.channels}, options);
  auto tmean = at::empty({in.T, in.channels}, options);
  auto tcov = at::empty({in.T, in.channels}, options);
  const at::Tensor k = stat_shifts(in);
  cuda::BNStatsParams p{};
  p.x = in.x.const_data_ptr();
  p.xt = in.T ? in.xt.const_data_ptr() : nullptr;
  p.shift = k.const_data_ptr();
  p.partial = partial.mutable_data_ptr();
  p.mean = mean.mutable_data_ptr();
  p.var = var.mutable_data_ptr();
  p.tmean = tmean.mutable_data_ptr();
  p.tcov = tcov.mutable_data_ptr();
  p.layout = layout_of(in);
  p.slots = in.T;
  p.splits = splits;
  p.dtype = dtype_of(in.x.scalar_type());
  p.tangent_dtype = dtype_of(in.tangent_type);
  FGK_CHECK_LAUNCH(cuda::launch_bn_stats(p, current_stream(in.x)), "dual_bn_stats");
  return {mean, var, tmean, tcov};
}

void launch_apply(const DualInput& in, at::IntArrayRef x_slot, const at::Tensor& center,
                  const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& t_xscale,
                  const at::Tensor& t_shift, bool relu, at::Tensor& y, at::Tensor& yt) {
  const int64_t T = static_cast<int64_t>(x_slot.size());
  TORCH_CHECK(T <= cuda::kMaxSlots, "dual_bn_apply on CUDA: at most ", cuda::kMaxSlots,
              " output slots (x_slot), got ", T);
  const auto opts = in.x.options().dtype(acc_type(in.x));
  auto coef = [&](const at::Tensor& t) { return t.to(opts).contiguous(); };
  const auto m = coef(center), s = coef(scale), h = coef(shift), b = coef(t_xscale),
             d = coef(t_shift);
  cuda::BNApplyParams p{};
  p.x = in.x.const_data_ptr();
  p.xt = in.T ? in.xt.const_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.yt = T ? yt.mutable_data_ptr() : nullptr;
  p.center = m.const_data_ptr();
  p.scale = s.const_data_ptr();
  p.shift = h.const_data_ptr();
  p.t_xscale = b.const_data_ptr();
  p.t_shift = d.const_data_ptr();
  for (int64_t t = 0; t < T; ++t) p.x_slot[t] = static_cast<int32_t>(x_slot[t]);
  p.layout = layout_of(in);
  p.out_slots = T;
  p.relu = relu;
  p.dtype = dtype_of(in.x.scalar_type());
  p.tangent_dtype = dtype_of(T ? yt.scalar_type() : in.tangent_type);
  if (in.x.numel() == 0) return;
  FGK_CHECK_LAUNCH(cuda::launch_bn_apply(p, current_stream(in.x)), "dual_bn_apply");
}

std::tuple<at::Tensor, at::Tensor> dual_bn_apply_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in, at::IntArrayRef x_slot,
    const at::Tensor& center, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& t_xscale, const at::Tensor& t_shift, bool relu,
    std::optional<at::ScalarType> tangent_dtype) {
  c10::DeviceGuard guard(x_in.device());
  const DualInput in = prepare_input(x_in, xt_in);
  check_apply_args(in, x_slot, center, scale, shift, t_xscale, t_shift);
  auto [y, yt] = apply_outputs(in, static_cast<int64_t>(x_slot.size()),
                               output_tangent_type(in, tangent_dtype));
  launch_apply(in, x_slot, center, scale, shift, t_xscale, t_shift, relu, y, yt);
  return {y, yt};
}

void dual_bn_apply_inplace_cuda(at::Tensor& x, const std::optional<at::Tensor>& xt,
                                const at::Tensor& center, const at::Tensor& scale,
                                const at::Tensor& shift, const at::Tensor& t_xscale,
                                const at::Tensor& t_shift, bool relu) {
  c10::DeviceGuard guard(x.device());
  const DualInput in = prepare_inplace(x, xt);
  const std::vector<int64_t> identity = identity_slots(in.T);
  check_apply_args(in, identity, center, scale, shift, t_xscale, t_shift);
  at::Tensor yt = in.T ? in.xt : at::Tensor();
  launch_apply(in, identity, center, scale, shift, t_xscale, t_shift, relu, x, yt);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) {
  m.impl("dual_bn_stats", &dual_bn_stats_cuda);
  m.impl("dual_bn_apply", &dual_bn_apply_cuda);
  m.impl("dual_bn_apply_", &dual_bn_apply_inplace_cuda);
}

}  // namespace fgkernels
