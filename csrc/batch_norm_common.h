// What the CPU and CUDA dual batch-norm ops share on the host: argument checks, the inputs in
// the kernels' layout, and the shifts of the statistics' sums.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "bn_per_channel.h"
#include "checks.h"

namespace fgkernels {

// x (and its stacked tangents) checked and laid out for the kernels: [outer, C, inner]
// contiguous, that is (N, C, H*W) for NCHW or (N*H*W, C, 1) for channels_last.
struct DualInput {
  at::Tensor x, xt;  // xt undefined when there is no tangent
  int64_t T = 0;
  at::ScalarType tangent_type;  // xt's dtype, x's without xt
  at::MemoryFormat fmt;
  int64_t outer, channels, inner;
};

inline DualInput prepare_input(const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in) {
  TORCH_CHECK(x_in.dim() >= 2, "x must have a channel dimension (N, C, ...), got ", x_in.sizes());
  TORCH_CHECK(x_in.size(1) > 0, "x must have at least one channel, got ", x_in.sizes());
  DualInput in;
  in.fmt = kernel_format(x_in);
  in.x = in_format(x_in, in.fmt);
  in.tangent_type = x_in.scalar_type();
  if (xt_in.has_value() && xt_in->defined()) {
    in.T = check_tangent(x_in, *xt_in, "xt");
    in.xt = slots_in_format(*xt_in, in.fmt);
    in.tangent_type = xt_in->scalar_type();
  }
  // Products, not quotients of numel: any dimension may be 0.
  const int64_t spatial = c10::multiply_integers(x_in.sizes().slice(2));
  in.channels = x_in.size(1);
  in.inner = in.fmt == at::MemoryFormat::ChannelsLast ? 1 : spatial;
  in.outer = in.fmt == at::MemoryFormat::ChannelsLast ? x_in.size(0) * spatial : x_in.size(0);
  return in;
}

// For an in-place apply: x and its slots must already be in the kernels' layout, writable and
// apart.
inline DualInput prepare_inplace(const at::Tensor& x, const std::optional<at::Tensor>& xt) {
  DualInput in = prepare_input(x, xt);
  TORCH_CHECK(in.x.is_same(x), "x must be contiguous or channels_last to be updated in place");
  TORCH_CHECK(!in.T || in.xt.data_ptr() == xt->data_ptr(),
              "xt must hold its slots one after the other, each laid out like x, to be updated "
              "in place");
  if (in.T) {
    check_writable(x, "x", *xt, "xt");
    check_writable(*xt, "xt", x, "x");
  } else {
    TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad() && x.is_leaf()),
                "x is a leaf tensor that requires grad and cannot be updated in place; call the "
                "op under torch.no_grad()");
  }
  return in;
}

inline std::vector<int64_t> identity_slots(int64_t T) {
  std::vector<int64_t> slots(T);
  for (int64_t t = 0; t < T; ++t) slots[t] = t;
  return slots;
}

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_apply_args(const DualInput& in, at::IntArrayRef x_slot,
                             const at::Tensor& center, const at::Tensor& scale,
                             const at::Tensor& shift, const at::Tensor& t_xscale,
                             const at::Tensor& t_shift) {
  const int64_t C = in.channels, T = static_cast<int64_t>(x_slot.size());
  FGK_CHECK_SHAPE(center, "center", C);
  FGK_CHECK_SHAPE(scale, "scale", C);
  FGK_CHECK_SHAPE(shift, "shift", C);
  FGK_CHECK_SHAPE(t_xscale, "t_xscale", T, C);
  FGK_CHECK_SHAPE(t_shift, "t_shift", T, C);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"center", center},
                                {"scale", scale}, {"shift", shift}, {"t_xscale", t_xscale},
                                {"t_shift", t_shift}}) {
    TORCH_CHECK(t.device() == in.x.device(), name, " must be on x's device ", in.x.device(),
                ", got ", t.device());
  }
  for (int64_t s : x_slot)
    TORCH_CHECK(s >= -1 && s < in.T, "x_slot entries must be -1 (no input slot) or < T of xt (",
                in.T, "), got ", s);
}

// An in-place apply's coefficients must not share memory with the x and slots it writes (the
// kernels read them while writing).
inline void check_apply_coefficients_apart(const at::Tensor& x, const std::optional<at::Tensor>& xt,
                                           const at::Tensor& center, const at::Tensor& scale,
                                           const at::Tensor& shift, const at::Tensor& t_xscale,
                                           const at::Tensor& t_shift) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"center", center},
                                {"scale", scale}, {"shift", shift}, {"t_xscale", t_xscale},
                                {"t_shift", t_shift}}) {
    TORCH_CHECK(!share_an_element(x, t), name, " and x share memory; they must be separate "
                "tensors");
    TORCH_CHECK(!present(xt) || !share_an_element(*xt, t), name, " and xt share memory; they "
                "must be separate tensors");
  }
}

// The dtype of the apply's output slots: tangent_dtype when given (it must then be xt's, if
// any), else xt's, else x's.
inline at::ScalarType output_tangent_type(const DualInput& in,
                                          std::optional<at::ScalarType> tangent_dtype) {
  if (!tangent_dtype.has_value()) return in.tangent_type;
  check_tangent_dtype(in.x.scalar_type(), *tangent_dtype, "tangent_dtype");
  TORCH_CHECK(!in.T || *tangent_dtype == in.tangent_type, "tangent_dtype must be xt's dtype ",
              in.tangent_type, ", got ", *tangent_dtype);
  return *tangent_dtype;
}

// Output tensors of the apply: y like x, T slots of dtype tangent_type each laid out like x.
inline std::pair<at::Tensor, at::Tensor> apply_outputs(const DualInput& in, int64_t T,
                                                       at::ScalarType tangent_type) {
  return {at::empty_like(in.x), empty_slots(T, in.x, in.fmt, tangent_type)};
}

// A per-channel argument of dual_bn_coefficients: floating point, of shape (rows, C) ((C) when
// rows < 0), on `device`.
inline void check_channel_arg(const at::Tensor& t, const char* name, int64_t rows, int64_t C,
                              at::Device device) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
              t.scalar_type());
  const auto shape = rows < 0 ? std::vector<int64_t>{C} : std::vector<int64_t>{rows, C};
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.device() == device, name, " must be on mean's device ", device, ", got ",
              t.device());
}

// x_pos or p_pos: distinct output slots (each input or parameter slot lands in one of its own).
inline void check_positions(at::IntArrayRef positions, const char* name, int64_t count) {
  std::vector<bool> seen(std::max<int64_t>(count, 0), false);
  for (const int64_t t : positions) {
    TORCH_CHECK(t >= 0 && t < count && !seen[t], name, " must hold distinct output slots in [0, ",
                count, "), got ", positions);
    seen[t] = true;
  }
}

// dual_bn_coefficients' arguments, as every backend checks them. Returns whether the
// coefficients take the batch's tangent statistics (training with input slots).
inline bool check_coefficients_args(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& tmean,
    const std::optional<at::Tensor>& tcov, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& weight_t, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_t, at::IntArrayRef x_pos, at::IntArrayRef p_pos,
    int64_t count, bool training) {
  TORCH_CHECK(mean.dim() == 1, "mean must have shape (C), got ", mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "mean must be float32 or float64 (the accumulation dtype), got ",
              mean.scalar_type());
  const int64_t C = mean.size(0), X = static_cast<int64_t>(x_pos.size()),
                P = static_cast<int64_t>(p_pos.size());
  TORCH_CHECK(count >= 0, "count must be >= 0, got ", count);
  check_positions(x_pos, "x_pos", count);
  check_positions(p_pos, "p_pos", count);
  const bool from_batch = training && X > 0;
  TORCH_CHECK(!from_batch || (present(tmean) && present(tcov)), "training with input slots "
              "needs tmean and tcov");
  check_channel_arg(var, "var", -1, C, mean.device());
  auto check_given = [&](const std::optional<at::Tensor>& t, const char* name, int64_t rows) {
    if (present(t)) check_channel_arg(*t, name, rows, C, mean.device());
  };
  TORCH_CHECK(!present(weight_t) || present(weight), "weight_t was given without weight");
  TORCH_CHECK(!present(bias_t) || present(bias), "bias_t was given without bias");
  check_given(weight, "weight", -1);
  check_given(bias, "bias", -1);
  check_given(weight_t, "weight_t", P);
  check_given(bias_t, "bias_t", P);
  if (from_batch) {
    check_channel_arg(*tmean, "tmean", X, C, mean.device());
    check_channel_arg(*tcov, "tcov", X, C, mean.device());
  }
  return from_batch;
}

// bn_update_running_stats_'s arguments, as every backend checks them.
inline void check_running_stats_args(const at::Tensor& running_mean,
                                     const at::Tensor& running_var, const at::Tensor& mean,
                                     const at::Tensor& var, int64_t n) {
  TORCH_CHECK(mean.dim() == 1, "mean must have shape (C), got ", mean.sizes());
  const int64_t C = mean.size(0);
  FGK_CHECK_SHAPE(var, "var", C);
  FGK_CHECK_SHAPE(running_mean, "running_mean", C);
  FGK_CHECK_SHAPE(running_var, "running_var", C);
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(), "running_mean and "
              "running_var must share a dtype, got ", running_mean.scalar_type(), " and ",
              running_var.scalar_type());
  TORCH_CHECK(at::isFloatingType(running_mean.scalar_type()), "running_mean and running_var "
              "must be floating, got ", running_mean.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{var, "var"},
                                {running_mean, "running_mean"}, {running_var, "running_var"}}) {
    TORCH_CHECK(t.device() == mean.device(), name, " must be on mean's device ", mean.device(),
                ", got ", t.device());
  }
  TORCH_CHECK(n > 1, "bn_update_running_stats_: n (values per channel) must be more than 1 for "
              "the unbiased variance n / (n - 1), got ", n);
  check_writable(running_mean, "running_mean", running_var, "running_var");
  check_writable(running_var, "running_var", running_mean, "running_mean");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{running_mean,
                                                                          "running_mean"},
                                {running_var, "running_var"}}) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name, " has elements that "
                "share memory (an expanded tensor); it must be a buffer of its own");
    check_writable(t, name, mean, "mean");
    check_writable(t, name, var, "var");
  }
}

}  // namespace fgkernels
