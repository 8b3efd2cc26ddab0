// Registers the CUDA kernels of csrc/cuda/*.cu as the CUDA implementations of the ops. Uses only
// device-generic c10 headers (DeviceGuard, Stream), so it also compiles against a CPU build of
// torch; the kernels are reached through the plain launchers of dual_kernels.h.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../checks.h"
#include "dual_kernels.h"

namespace fgkernels {
namespace {

cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kHalf;
    default: TORCH_CHECK(false, "x must be float32, float64, bfloat16 or float16, got ",
                         x.scalar_type());
  }
}

void* current_stream(const at::Tensor& x) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device())
      .native_handle();
}

#define FGK_CHECK_LAUNCH(call, name) \
  do {                                                                                 \
    const int err_ = (call);                                                           \
    TORCH_CHECK(err_ == 0, name " kernel launch failed: ", cuda::error_string(err_)); \
  } while (0)

cuda::Layout layout_of(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t C = x.size(1);
  if (fmt == at::MemoryFormat::ChannelsLast) return {x.numel() / C, C, 1};
  return {x.size(0), C, x.numel() / (x.size(0) * C)};
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> dual_relu_cuda(const at::Tensor& x_in, const at::Tensor& xt_in) {
  const int64_t T = check_tangent(x_in, xt_in, "xt");
  c10::DeviceGuard guard(x_in.device());
  const auto fmt = kernel_format(x_in);
  const auto x = in_format(x_in, fmt);
  const auto xt = slots_in_format(xt_in, fmt);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt);
  if (x.numel() == 0) return {y, yt};
  cuda::ReluParams p{x.const_data_ptr(), xt.const_data_ptr(), y.mutable_data_ptr(),
                     yt.mutable_data_ptr(), x.numel(), T, dtype_of(x)};
  FGK_CHECK_LAUNCH(cuda::launch_relu(p, current_stream(x)), "dual_relu");
  return {y, yt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_bn_stats_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in) {
  TORCH_CHECK(x_in.dim() >= 2, "x must have a channel dimension (N, C, ...), got ", x_in.sizes());
  TORCH_CHECK(x_in.numel() > 0, "x must not be empty");
  c10::DeviceGuard guard(x_in.device());
  const auto fmt = kernel_format(x_in);
  const auto x = in_format(x_in, fmt);
  at::Tensor xt;
  int64_t T = 0;
  if (xt_in.has_value() && xt_in->defined()) {
    T = check_tangent(x_in, *xt_in, "xt");
    xt = slots_in_format(*xt_in, fmt);
  }
  const auto L = layout_of(x, fmt);
  const int64_t count = L.outer * L.inner;
  const int64_t splits = std::min<int64_t>(1024, std::max<int64_t>(1, count / (256 * 16)));
  auto partial = at::empty({splits, 2 + 2 * T, L.channels}, x.options().dtype(acc_type(x)));
  cuda::BNStatsParams p{x.const_data_ptr(), T ? xt.const_data_ptr() : nullptr,
                        partial.mutable_data_ptr(), L, T, splits, dtype_of(x)};
  FGK_CHECK_LAUNCH(cuda::launch_bn_stats(p, current_stream(x)), "dual_bn_stats");
  // Combine the splits in double: mean = k + S1/n, var = S2/n - (S1/n)^2,
  // tangent mean = St1/n, covariance = St2/n - (S1/n)(St1/n).
  const auto sums = partial.sum(0, /*keepdim=*/false, at::kDouble) / static_cast<double>(count);
  const auto k = x.view({L.outer, L.channels, L.inner}).select(0, 0).select(1, 0).to(at::kDouble);
  const auto d1 = sums[0];
  const auto mean = k + d1;
  const auto var = (sums[1] - d1 * d1).clamp_min(0);
  const auto tsums = sums.narrow(0, 2, 2 * T).view({T, 2, L.channels});
  const auto tmean = tsums.select(1, 0);
  const auto tcov = tsums.select(1, 1) - d1 * tmean;
  const auto acc = acc_type(x);
  return {mean.to(acc), var.to(acc), tmean.to(acc), tcov.to(acc)};
}

std::tuple<at::Tensor, at::Tensor> dual_bn_apply_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in, at::IntArrayRef x_slot,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& t_xscale,
    const at::Tensor& t_shift, bool relu) {
  TORCH_CHECK(x_in.dim() >= 2, "x must have a channel dimension (N, C, ...), got ", x_in.sizes());
  const int64_t C = x_in.size(1), T = static_cast<int64_t>(x_slot.size());
  FGK_CHECK_SHAPE(scale, C);
  FGK_CHECK_SHAPE(shift, C);
  FGK_CHECK_SHAPE(t_xscale, T, C);
  FGK_CHECK_SHAPE(t_shift, T, C);
  TORCH_CHECK(T <= cuda::kMaxSlots, "at most ", cuda::kMaxSlots, " tangent slots, got ", T);
  c10::DeviceGuard guard(x_in.device());
  const auto fmt = kernel_format(x_in);
  const auto x = in_format(x_in, fmt);
  at::Tensor xt;
  int64_t Tx = 0;
  if (xt_in.has_value() && xt_in->defined()) {
    Tx = check_tangent(x_in, *xt_in, "xt");
    xt = slots_in_format(*xt_in, fmt);
  }
  const auto opts = x.options().dtype(acc_type(x));
  auto coef = [&](const at::Tensor& t) { return t.to(opts).contiguous(); };
  const auto s = coef(scale), h = coef(shift), b = coef(t_xscale), d = coef(t_shift);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt);
  cuda::BNApplyParams p{};
  p.x = x.const_data_ptr();
  p.xt = Tx ? xt.const_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.yt = yt.mutable_data_ptr();
  p.scale = s.const_data_ptr();
  p.shift = h.const_data_ptr();
  p.t_xscale = b.const_data_ptr();
  p.t_shift = d.const_data_ptr();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(x_slot[t] < Tx, "x_slot entries must be < T of xt (", Tx, "), got ", x_slot[t]);
    p.x_slot[t] = static_cast<int32_t>(x_slot[t]);
  }
  p.layout = layout_of(x, fmt);
  p.out_slots = T;
  p.relu = relu;
  p.dtype = dtype_of(x);
  if (x.numel() == 0) return {y, yt};
  FGK_CHECK_LAUNCH(cuda::launch_bn_apply(p, current_stream(x)), "dual_bn_apply");
  return {y, yt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) {
  m.impl("dual_relu", &dual_relu_cuda);
  m.impl("dual_bn_stats", &dual_bn_stats_cuda);
  m.impl("dual_bn_apply", &dual_bn_apply_cuda);
}

}  // namespace fgkernels
