// Dual ops built from ATen's own kernels (oneDNN convolutions and GEMMs on the CPU, cuDNN and
// cuBLAS on CUDA), arranged to make the fewest calls. Registered for every device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace fgkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_max_pool2d(const at::Tensor& x, const at::Tensor& xt,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  const int64_t T = check_tangent(x, xt, "xt");
  auto [y, idx] = at::max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode);
  // idx indexes each (n, c) plane flattened: gather every tangent slot at it.
  auto flat_idx = idx.flatten(2).unsqueeze(0).expand({T, -1, -1, -1});
  auto yt = xt.flatten(3).gather(3, flat_idx).view({T, y.size(0), y.size(1), y.size(2),
                                                    y.size(3)});
  return {y, yt};
}

// [W; Wt_1; ...; Wt_P] along the output channels, grouped so that each convolution group keeps
// its own input channels: (groups, 1 + P, C_out / groups, ...) flattened.
at::Tensor stack_weights(const at::Tensor& w, const at::Tensor& wt, int64_t groups) {
  const int64_t P = wt.size(0), cog = w.size(0) / groups;
  auto rest = w.sizes().slice(1).vec();
  std::vector<int64_t> wshape{groups, 1, cog}, tshape{P, groups, cog};
  wshape.insert(wshape.end(), rest.begin(), rest.end());
  tshape.insert(tshape.end(), rest.begin(), rest.end());
  return at::cat({w.reshape(wshape), wt.reshape(tshape).transpose(0, 1)}, 1)
      .flatten(0, 2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_conv2d(
    const at::Tensor& x, const std::optional<at::Tensor>& xt, const at::Tensor& w,
    const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& bt, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(w.dim() == 4 && x.size(1) == w.size(1) * groups,
              "weight must have shape (C_out, ", x.size(1) / groups, ", kH, kW), got ",
              w.sizes());
  const int64_t cout = w.size(0);
  at::Tensor y, x_part, p_part;
  const bool has_wt = wt.has_value() && wt->defined();
  const bool has_bt = bt.has_value() && bt->defined();
  if (has_wt) {
    check_tangent(w, *wt, "weight_t");
    const int64_t P = wt->size(0);
    // One convolution gives y and every Wt_p * x: (N, groups, 1 + P, C_out / groups, H, W).
    auto all = at::conv2d(x, stack_weights(w, *wt, groups), {}, stride, padding, dilation, groups);
    auto split = all.unflatten(1, {groups, 1 + P, cout / groups});
    y = split.select(2, 0).flatten(1, 2);
    p_part = split.narrow(2, 1, P).permute({2, 0, 1, 3, 4, 5}).flatten(2, 3);
  } else {
    y = at::conv2d(x, w, {}, stride, padding, dilation, groups);
  }
  if (b.has_value() && b->defined()) {
    FGK_CHECK_SHAPE(*b, cout);
    y = y + b->view({1, cout, 1, 1});
  }
  if (has_bt) {
    TORCH_CHECK(bt->dim() == 2 && bt->size(1) == cout, "bias_t must have shape (P, ", cout,
                "), got ", bt->sizes());
    auto bias = bt->view({bt->size(0), 1, cout, 1, 1});
    p_part = p_part.defined() ? p_part + bias
                              : bias.expand({bt->size(0), y.size(0), cout, y.size(2), y.size(3)});
  }
  if (xt.has_value() && xt->defined()) {
    const int64_t T = check_tangent(x, *xt, "xt");
    // All T slots in one convolution, batched along N.
    x_part = at::conv2d(xt->flatten(0, 1), w, {}, stride, padding, dilation, groups)
                 .unflatten(0, {T, x.size(0)});
  }
  return {y, x_part.defined() ? x_part : at::empty({0}, x.options()),
          p_part.defined() ? p_part : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_linear(
    const at::Tensor& x, const std::optional<at::Tensor>& xt, const at::Tensor& w,
    const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& bt) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "weight must have shape (out, ",
              x.size(-1), "), got ", w.sizes());
  const int64_t out = w.size(0);
  at::Tensor y, x_part, p_part;
  if (wt.has_value() && wt->defined()) {
    check_tangent(w, *wt, "weight_t");
    const int64_t P = wt->size(0);
    // One GEMM: x [W; Wt_1; ...; Wt_P]^T = [y | Wt_1 x | ... ], split along the last dim.
    auto all = at::linear(x, at::cat({w.unsqueeze(0), *wt}, 0).flatten(0, 1));
    auto split = all.unflatten(-1, {1 + P, out});
    y = split.select(-2, 0);
    p_part = split.narrow(-2, 1, P).movedim(-2, 0);
  } else {
    y = at::linear(x, w);
  }
  if (b.has_value() && b->defined()) {
    FGK_CHECK_SHAPE(*b, out);
    y = y + *b;
  }
  if (bt.has_value() && bt->defined()) {
    TORCH_CHECK(bt->dim() == 2 && bt->size(1) == out, "bias_t must have shape (P, ", out,
                "), got ", bt->sizes());
    std::vector<int64_t> shape(x.dim() + 1, 1);
    shape.front() = bt->size(0);
    shape.back() = out;
    auto bias = bt->view(shape);
    if (p_part.defined()) {
      p_part = p_part + bias;
    } else {
      std::vector<int64_t> full{bt->size(0)};
      full.insert(full.end(), y.sizes().begin(), y.sizes().end());
      p_part = bias.expand(full);
    }
  }
  if (xt.has_value() && xt->defined()) {
    check_tangent(x, *xt, "xt");
    x_part = at::linear(*xt, w);
  }
  return {y, x_part.defined() ? x_part : at::empty({0}, x.options()),
          p_part.defined() ? p_part : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CompositeExplicitAutograd, m) {
  m.impl("dual_max_pool2d", &dual_max_pool2d);
  m.impl("dual_conv2d", &dual_conv2d);
  m.impl("dual_linear", &dual_linear);
}

}  // namespace fgkernels
