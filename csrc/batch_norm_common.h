// What the CPU and CUDA dual batch-norm ops share: argument checks, the inputs in the kernels'
// layout, and the statistics computed from the kernels' shifted sums.
#pragma once

#include <ATen/ATen.h>

#include <vector>

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

// Values per channel whose mean shifts the statistics' sums (stat_shifts).
constexpr int64_t kShiftSample = 256;

// How many of a channel's first values, in the [outer, C, inner] order, its shift averages:
// kShiftSample of its first row, or its first whole rows when a row holds fewer.
inline int64_t shift_sample(const DualInput& in) {
  return in.inner >= kShiftSample
             ? kShiftSample
             : std::min(in.outer, (kShiftSample + in.inner - 1) / in.inner) * in.inner;
}

// The shift k (C, in x's accumulation type) of each channel's sums: the mean of its first
// shift_sample values. The error of Σ(x-k)² - n·d1² grows with ((k - mean)/std)², so a shift
// near the mean keeps the variance as precise as the data allows (a single value as the shift
// costs the square of its distance from the mean, in units of std). One reduction over views of
// x, no copy.
inline at::Tensor stat_shifts(const DualInput& in) {
  const at::Tensor rows_view = in.fmt == at::MemoryFormat::ChannelsLast
      ? in.x.permute({0, 2, 3, 1}).reshape({in.outer, in.channels, 1})
      : in.x.reshape({in.outer, in.channels, in.inner});
  const int64_t n = shift_sample(in);
  const at::Tensor first = in.inner >= kShiftSample
                               ? rows_view.narrow(0, 0, 1).narrow(2, 0, n)
                               : rows_view.narrow(0, 0, n / in.inner);
  return first.mean(at::IntArrayRef{0, 2}, /*keepdim=*/false, acc_type(in.x));
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

}  // namespace fgkernels
