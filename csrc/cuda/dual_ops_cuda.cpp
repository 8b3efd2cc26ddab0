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
  auto k = at::empty({in.channels}, options);
  cuda::BNStatsParams p{};
  p.x = in.x.const_data_ptr();
  p.xt = in.T ? in.xt.const_data_ptr() : nullptr;
  p.shift = k.mutable_data_ptr();
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

// A per-channel tensor as the kernels read it: where it is, with its strides, in its dtype.
cuda::ChannelValues channel_values(const at::Tensor& t) {
  const bool rows = t.dim() == 2;
  return {t.const_data_ptr(), rows ? t.stride(0) : 0, t.stride(rows ? 1 : 0),
          dtype_of(t.scalar_type())};
}

cuda::ChannelValues channel_values(const std::optional<at::Tensor>& t, bool used = true) {
  return used && present(t) ? channel_values(*t) : cuda::ChannelValues{};
}

// x_pos or p_pos into a kernel's slot array.
void copy_positions(at::IntArrayRef positions, const char* name, int32_t* out) {
  TORCH_CHECK(static_cast<int64_t>(positions.size()) <= cuda::kMaxSlots, "dual_bn_coefficients "
              "on CUDA: at most ", cuda::kMaxSlots, " slots in ", name, ", got ",
              positions.size());
  for (size_t i = 0; i < positions.size(); ++i) out[i] = static_cast<int32_t>(positions[i]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_bn_coefficients_cuda(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& tmean,
    const std::optional<at::Tensor>& tcov, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& weight_t, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_t, at::IntArrayRef x_pos, at::IntArrayRef p_pos,
    int64_t count, bool training, double eps) {
  const bool from_batch = check_coefficients_args(mean, var, tmean, tcov, weight, weight_t, bias,
                                                  bias_t, x_pos, p_pos, count, training);
  c10::DeviceGuard guard(mean.device());
  const int64_t C = mean.size(0);
  const auto options = mean.options();
  at::Tensor scale = at::empty({C}, options), shift = at::empty({C}, options);
  at::Tensor t_xscale = at::empty({count, C}, options), t_shift = at::empty({count, C}, options);
  cuda::BNCoefficientsParams p{};
  p.var = channel_values(var);
  p.weight = channel_values(weight);
  p.bias = channel_values(bias);
  p.weight_t = channel_values(weight_t);
  p.bias_t = channel_values(bias_t);
  p.tmean = channel_values(tmean, from_batch);
  p.tcov = channel_values(tcov, from_batch);
  p.scale = scale.mutable_data_ptr();
  p.shift = shift.mutable_data_ptr();
  p.t_xscale = t_xscale.mutable_data_ptr();
  p.t_shift = t_shift.mutable_data_ptr();
  copy_positions(x_pos, "x_pos", p.x_pos);
  copy_positions(p_pos, "p_pos", p.p_pos);
  p.channels = C;
  p.x_slots = static_cast<int64_t>(x_pos.size());
  p.p_slots = static_cast<int64_t>(p_pos.size());
  p.count = count;
  p.from_batch = from_batch;
  p.eps = eps;
  p.acc = dtype_of(mean.scalar_type());
  FGK_CHECK_LAUNCH(cuda::launch_bn_coefficients(p, current_stream(mean)),
                   "dual_bn_coefficients");
  return {scale, shift, t_xscale, t_shift};
}

void bn_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                                  const at::Tensor& mean, const at::Tensor& var, int64_t n,
                                  double momentum) {
  check_running_stats_args(running_mean, running_var, mean, var, n);
  c10::DeviceGuard guard(mean.device());
  cuda::BNRunningStatsParams p{};
  p.running_mean = running_mean.mutable_data_ptr();
  p.running_var = running_var.mutable_data_ptr();
  p.running_mean_stride = running_mean.stride(0);
  p.running_var_stride = running_var.stride(0);
  p.buffer_dtype = dtype_of(running_mean.scalar_type());
  p.mean = channel_values(mean);
  p.var = channel_values(var);
  p.channels = mean.size(0);
  p.momentum = momentum;
  p.unbias = static_cast<double>(n) / static_cast<double>(n - 1);
  FGK_CHECK_LAUNCH(cuda::launch_bn_running_stats(p, current_stream(mean)),
                   "bn_update_running_stats_");
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
  check_apply_coefficients_apart(x, xt, center, scale, shift, t_xscale, t_shift);
  at::Tensor yt = in.T ? in.xt : at::Tensor();
  launch_apply(in, identity, center, scale, shift, t_xscale, t_shift, relu, x, yt);
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) {
  m.impl("dual_bn_stats", &dual_bn_stats_cuda);
  m.impl("dual_bn_coefficients", &dual_bn_coefficients_cuda);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cuda);
  m.impl("dual_bn_apply", &dual_bn_apply_cuda);
  m.impl("dual_bn_apply_", &dual_bn_apply_inplace_cuda);
}

}  // namespace fgkernels
