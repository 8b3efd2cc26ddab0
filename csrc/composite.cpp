// Dual ops built from ATen's own kernels (oneDNN convolutions and GEMMs on the CPU, cuDNN and
// cuBLAS on CUDA), with the fewest convolution FLOPs: besides the primal (skipped when the caller
// already has it), one call computes every parameter term Wt_p * x (the P weight tangents stacked
// along the output channels) and one every input term W * xt_t (the T slots batched along N).
// Tangent terms are computed in the tangents' dtype (a bfloat16 tangent of a float32 layer
// meets the weight or input cast to bfloat16 once; the library accumulates in float32).
// Registered for every device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <optional>
#include <string>

#include "checks.h"

namespace fgkernels {
namespace {

// Max pool from torch's kernel and a gather, for the devices without a kernel of their own (the
// CPU has csrc/cpu/dual_max_pool2d.cpp).
std::tuple<at::Tensor, at::Tensor> dual_max_pool2d(const at::Tensor& x, const at::Tensor& xt,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  const int64_t T = check_tangent(x, xt, "xt");
  auto [y, idx] = at::max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode);
  // idx indexes each (n, c) plane flattened: gather every tangent slot at it, in x's layout
  // (channels_last: over the (T, N, H*W, C) view, so that each slot comes out channels_last).
  const int64_t N = y.size(0), C = y.size(1), Ho = y.size(2), Wo = y.size(3);
  if (kernel_format(x) == at::MemoryFormat::ChannelsLast) {
    const auto planes = slots_in_format(xt, at::MemoryFormat::ChannelsLast)
                            .permute({0, 1, 3, 4, 2})
                            .reshape({T, N, -1, C});
    const auto at_max = idx.permute({0, 2, 3, 1}).reshape({1, N, Ho * Wo, C}).expand(
        {T, -1, -1, -1});
    return {y, planes.gather(2, at_max).view({T, N, Ho, Wo, C}).permute({0, 1, 4, 2, 3})};
  }
  auto flat_idx = idx.flatten(2).unsqueeze(0).expand({T, -1, -1, -1});
  return {y, xt.flatten(3).gather(3, flat_idx).view({T, N, C, Ho, Wo})};
}

// [Wt_1; ...; Wt_P] along the output channels, grouped so that each convolution group keeps its
// own input channels: (groups, P, C_out / groups, ...) flattened.
at::Tensor stack_weight_tangents(const at::Tensor& wt, int64_t groups) {
  const int64_t P = wt.size(0), cog = wt.size(1) / groups;
  std::vector<int64_t> shape{P, groups, cog};
  shape.insert(shape.end(), wt.sizes().begin() + 2, wt.sizes().end());
  return wt.reshape(shape).transpose(0, 1).flatten(0, 2);
}

void check_conv_args(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  TORCH_CHECK(groups > 0, "groups must be positive, got ", groups);
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  check_differentiable(x, "x");
  TORCH_CHECK(x.size(1) % groups == 0, "x has ", x.size(1), " channels, not divisible by groups=",
              groups);
  TORCH_CHECK(w.dim() == 4 && x.size(1) == w.size(1) * groups && w.size(0) % groups == 0,
              "weight must have shape (C_out, ", x.size(1) / groups,
              ", kH, kW) with C_out divisible by groups=", groups, ", got ", w.sizes());
}

// The output's (H, W) of a convolution of x by w, as at::conv2d computes it (its geometry
// checked first: a zero stride would divide by zero).
std::pair<int64_t, int64_t> conv_output_size(const at::Tensor& x, const at::Tensor& w,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0,
              "stride must be two positive ints, got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
              "dilation must be two positive ints, got ", dilation);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "padding must be two non-negative ints, got ", padding);
  auto size = [&](int d) {
    // Floor division, as the op's fake (F.conv2d's shape): a kernel wider than the padded
    // input gives a size <= 0, which the GEMM paths leave to at::conv2d's refusal (C++'s
    // division would round -1/2 up to 0, a 1-pixel map read past the input).
    const int64_t span =
        x.size(d + 2) + 2 * padding[d] - dilation[d] * (w.size(d + 2) - 1) - 1;
    return (span >= 0 ? span / stride[d] : -((-span + stride[d] - 1) / stride[d])) + 1;
  };
  return {size(0), size(1)};
}

// at::conv2d, but a 1x1 convolution of stride 1 without padding, dilation or groups on NCHW CPU
// tensors is computed as the product over the channels it is, one batched GEMM, for speed (the
// real-model benchmarks, benchmarks/test_real_models.py, time the passes of networks full of
// them against forward_ad); channels_last tensors keep the convolution. The GEMM is taken
// where it wins whatever the CPU: a small weight (C_in·C_out ≤ kSmallPointwiseWeight), a large
// map (H·W ≥ kLargePointwiseMap) or a single pixel. A large weight on a small map is left to
// the convolution: each image's GEMM would read the whole weight for a few columns (by hand,
// N = 16, an AMD EPYC: 192 -> 1152 channels on a 2x2 map 6x slower as a batched GEMM, on 8x8
// 2x; 24 -> 144 channels 0.3-0.9x on every map). The sums run in another order than the
// convolution's: the result differs from conv2d's by rounding.
// at::conv2d keeps the cases where the GEMM would differ beyond that: empty inputs or weights
// and a bias of another dtype (at::conv2d's errors), and a bfloat16 bias on a spatial map (the
// GEMM's output would be rounded to bfloat16 before the bias is added: twice).
constexpr int64_t kSmallPointwiseWeight = 4096;
constexpr int64_t kLargePointwiseMap = 1024;

// A convolution onto a map of at most kTinyMap pixels with a large weight (C_in·C_out ≥
// kLargeTinyMapWeight, the weight tangents' slots stacked along C_out counted) is computed as
// the GEMM it is, the unfolded input (N·Ho·Wo, C_in·kH·kW) times the weight, where oneDNN's
// convolution runs such maps far below its GEMM's speed; the sums run in another order than the
// convolution's (float32 sums for bfloat16 too, as the convolution's). Two such places, by hand
// on an Intel Xeon with AMX (N = 16; 512 -> 512 channels, 3x3, onto 2x2; 256 -> 512 onto 2x2,
// 3x3 or 1x1 with stride 2):
//  - channels_last input and weight, float32 or bfloat16 (the last stage of a ResNet converted
//    to channels_last, on small images): the weight's (C_out, kH, kW, C_in) order is its memory
//    order, and the input's windows gather whole runs of C_in, so the GEMM takes 0.3-0.6x the
//    convolution's time, with AMX or held to AVX512-BF16 for bfloat16 and to AVX2 for float32
//    (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). A larger map (4x4, 256 -> 256) mixed, left
//    to the convolution.
//  - otherwise (an NCHW input or weight: an NCHW model, or the weight tangents' NCHW slots
//    beside a channels_last input) bfloat16 on a CPU with AMX that oneDNN may use: the input
//    unfolded by im2col, the GEMM in 0.2-0.5x oneDNN's AMX convolution's time for NCHW
//    operands (256 -> 256 onto 2x2 mixed, 0.6-1.8x, left out). Without AMX oneDNN's
//    AVX512-BF16 convolution is the faster (the same Xeon held to it: the GEMM 1.4-3.2x its
//    time at N = 16 and 64), and so is float32's: kept. Reordering an NCHW weight for the
//    channels_last GEMM costs more than it saves.
// The output is laid out as at::conv2d lays it out (channels_last when the input's or the
// weight's strides suggest it).
constexpr int64_t kTinyMap = 4;
constexpr int64_t kLargeTinyMapWeight = 512 * 256;

// Whether oneDNN computes bfloat16 convolutions and GEMMs with AMX's tiles here: the CPU has
// them and ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) does not hold oneDNN below
// them. False where the compiler cannot ask the CPU: the convolution is kept.
bool onednn_uses_amx() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  static const bool amx = [] {
    if (!__builtin_cpu_supports("amx-bf16")) return false;
    for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
      const char* isa = std::getenv(name);
      if (isa != nullptr && *isa != '\0') {
        std::string upper(isa);
        std::transform(upper.begin(), upper.end(), upper.begin(),
                       [](unsigned char c) { return std::toupper(c); });
        return upper == "ALL" || upper.find("AMX") != std::string::npos;
      }
    }
    return true;
  }();
  return amx;
#else
  return false;
#endif
}

// The channels_last input's windows, (N·Ho·Wo, kH·kW·C_in) in the weight's memory order, times
// the channels_last weight viewed as (C_out, kH·kW·C_in): (N, Ho, Wo, C_out), channels_last.
at::Tensor channels_last_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t h_out, int64_t w_out) {
  const int64_t N = x.size(0), C = x.size(1), K = w.size(0), kh = w.size(2), kw = w.size(3);
  auto xh = x.permute({0, 2, 3, 1});  // (N, H, W, C)
  if (padding[0] > 0 || padding[1] > 0) {
    xh = at::constant_pad_nd(xh, {0, 0, padding[1], padding[1], padding[0], padding[0]});
  }
  // window (n, oh, ow) at tap (i, j): xh[n, oh·sh + i·dh, ow·sw + j·dw, :]
  const auto windows = xh.as_strided(
      {N, h_out, w_out, kh, kw, C},
      {xh.stride(0), xh.stride(1) * stride[0], xh.stride(2) * stride[1],
       xh.stride(1) * dilation[0], xh.stride(2) * dilation[1], xh.stride(3)},
      xh.storage_offset());
  const auto cols = windows.reshape({N * h_out * w_out, kh * kw * C});
  const auto w2 = w.permute({0, 2, 3, 1}).reshape({K, -1});
  const auto y = b.defined() ? at::addmm(b, cols, w2.t()) : at::mm(cols, w2.t());
  return y.view({N, h_out, w_out, K}).permute({0, 3, 1, 2});
}

// im2col gives (N, C_in·kH·kW, Ho·Wo) whatever the input's layout, its rows in the weight's
// (C_in, kH, kW) order.
at::Tensor unfolded_gemm(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t h_out,
                         int64_t w_out) {
  const int64_t N = x.size(0), K = w.size(0), L = h_out * w_out;
  const auto cols = at::im2col(x, {w.size(2), w.size(3)}, dilation, padding, stride);
  // (N·L, C_in·kH·kW) x (C_in·kH·kW, C_out): rows are output pixels, so the result is
  // (N, Ho, Wo, C_out), a channels_last view.
  return at::mm(cols.transpose(1, 2).reshape({N * L, -1}), w.reshape({K, -1}).t())
      .view({N, h_out, w_out, K})
      .permute({0, 3, 1, 2});
}

std::optional<at::Tensor> tiny_map_gemm(const at::Tensor& x, const at::Tensor& w,
                                        const at::Tensor& b, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups) {
  const auto type = x.scalar_type();
  if (!(x.is_cpu() && (type == at::kFloat || type == at::kBFloat16) &&
        w.scalar_type() == type && groups == 1 && x.numel() > 0 && w.numel() > 0 &&
        w.size(0) * w.size(1) >= kLargeTinyMapWeight)) {
    return std::nullopt;
  }
  const auto [h_out, w_out] = conv_output_size(x, w, stride, padding, dilation);
  if (h_out < 1 || w_out < 1 || h_out * w_out > kTinyMap) return std::nullopt;
  const bool x_cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const bool w_cl = w.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  // A bias joins a float32 GEMM (addmm adds it to the float32 sums, as the convolution does);
  // a bfloat16 convolution with a bias, not timed as a GEMM, stays a convolution.
  const bool bias_fits = !b.defined() || (type == at::kFloat && b.scalar_type() == type);
  at::Tensor y;
  if (x_cl && w_cl && bias_fits) {
    y = channels_last_gemm(x, w, b, stride, padding, dilation, h_out, w_out);
  } else if (type == at::kBFloat16 && !b.defined() && onednn_uses_amx()) {
    y = unfolded_gemm(x, w, stride, padding, dilation, h_out, w_out);
  } else {
    return std::nullopt;
  }
  return y.contiguous(x_cl || w_cl ? at::MemoryFormat::ChannelsLast
                                   : at::MemoryFormat::Contiguous);
}

at::Tensor convolve(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups) {
  const auto type = x.scalar_type();
  const auto all_equal = [](at::IntArrayRef v, int64_t value) {
    return std::all_of(v.begin(), v.end(), [&](int64_t e) { return e == value; });
  };
  const int64_t map = x.size(2) * x.size(3);
  const bool spatial = map > 1;
  const bool gemm_shaped = !spatial || map >= kLargePointwiseMap ||
                           w.size(0) * w.size(1) <= kSmallPointwiseWeight;
  const bool pointwise =
      x.is_cpu() && gemm_shaped && groups == 1 && w.size(2) == 1 && w.size(3) == 1 &&
      all_equal(stride, 1) &&
      all_equal(padding, 0) && all_equal(dilation, 1) && x.numel() > 0 && w.numel() > 0 &&
      x.is_contiguous() && x.suggest_memory_format() == at::MemoryFormat::Contiguous &&
      w.suggest_memory_format() == at::MemoryFormat::Contiguous && w.scalar_type() == type &&
      (type == at::kFloat || type == at::kDouble || type == at::kBFloat16) &&
      (!b.defined() || (b.scalar_type() == type && !(type == at::kBFloat16 && spatial)));
  if (!pointwise) {
    if (auto y = tiny_map_gemm(x, w, b, stride, padding, dilation, groups)) return *y;
    return at::conv2d(x, w, b, stride, padding, dilation, groups);
  }
  const int64_t N = x.size(0), C = x.size(1), K = w.size(0), H = x.size(2), W = x.size(3);
  const auto w2 = w.reshape({K, C});
  if (H * W == 1) return at::linear(x.view({N, C}), w2, b).view({N, K, 1, 1});
  // y[n] = W · x[n] over the (C, H·W) planes: one batched GEMM, the weight broadcast over the
  // batch. (Not at::matmul: for a weight that requires grad, as a compiled pass's parameters
  // do, it folds the batch into one GEMM over x's transpose and copies x and the output.)
  auto y = at::bmm(w2.unsqueeze(0).expand({N, K, C}), x.view({N, C, H * W}));
  if (b.defined()) y.add_(b.view({1, K, 1}));
  return y.view({N, K, H, W});
}

// Parameter tangents of one layer carry the same P slots: weight_t (P, *w.shape), bias_t (P, C).
void check_param_tangents(const at::Tensor& w, const std::optional<at::Tensor>& wt,
                          const std::optional<at::Tensor>& bt) {
  const int64_t out = w.size(0);
  if (present(wt)) check_tangent(w, *wt, "weight_t");
  if (present(bt)) {
    TORCH_CHECK(bt->dim() == 2 && bt->size(1) == out && bt->size(0) >= 1,
                "bias_t must have shape (P, ", out, "), got ", bt->sizes());
    check_tangent_dtype(w.scalar_type(), bt->scalar_type(), "bias_t");
    TORCH_CHECK(bt->device() == w.device(), "bias_t must be on ", w.device(), ", got ",
                bt->device());
  }
  if (present(wt) && present(bt)) {
    TORCH_CHECK(wt->size(0) == bt->size(0), "weight_t and bias_t must carry the same number of "
                "slots P, got ", wt->size(0), " and ", bt->size(0));
  }
}

// The tangent parts of a convolution whose primal output y is known (y gives their shape and
// memory format): p_part = [Wt_p * x + bt_p]_p and x_part = [W * xt_t]_t, each empty when absent.
std::tuple<at::Tensor, at::Tensor> dual_conv2d_tangents(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& xt,
    const at::Tensor& w, const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& bt,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_args(x, w, groups);
  const int64_t cout = w.size(0);
  const auto [h_out, w_out] = conv_output_size(x, w, stride, padding, dilation);
  TORCH_CHECK(y.dim() == 4 && y.size(0) == x.size(0) && y.size(1) == cout && y.size(2) == h_out &&
                  y.size(3) == w_out,
              "y must have the convolution's output shape (", x.size(0), ", ", cout, ", ", h_out,
              ", ", w_out, "), got ", y.sizes());
  check_param_tangents(w, wt, bt);
  if (present(xt)) check_tangent(x, *xt, "xt");
  const auto type = tangent_type(x, {&xt, &wt, &bt});
  const auto fmt = kernel_format(y);
  at::Tensor x_part, p_part;
  if (present(wt)) {
    const int64_t P = wt->size(0);
    // Every Wt_p * x in one convolution: (N, groups, P, C_out / groups, H, W) -> (P, N, C_out, ..).
    auto all = convolve(x.to(type), stack_weight_tangents(*wt, groups), {}, stride, padding,
                        dilation, groups);
    p_part = slots_in_format(
        all.unflatten(1, {groups, P, cout / groups}).permute({2, 0, 1, 3, 4, 5}).flatten(2, 3),
        fmt);
  }
  if (present(bt)) {
    auto bias = bt->view({bt->size(0), 1, cout, 1, 1});
    if (p_part.defined()) {
      p_part.add_(bias);
    } else {
      p_part = empty_slots(bt->size(0), y, fmt, type).copy_(bias);
    }
  }
  if (present(xt)) {
    // All T slots in one convolution, batched along N; each slot laid out as y, as the fake
    // says (a copy only where the convolution chose otherwise: with one image, whose layout
    // is ambiguous, at::conv2d may return a channels_last input's result contiguous).
    x_part = slots_in_format(
        convolve(slots_in_format(*xt, kernel_format(x)).flatten(0, 1), w.to(type), {}, stride,
                 padding, dilation, groups)
            .unflatten(0, {xt->size(0), x.size(0)}),
        fmt);
  }
  // An absent part is empty, of the tangents' dtype as a present one would be.
  return {x_part.defined() ? x_part : at::empty({0}, x.options().dtype(type)),
          p_part.defined() ? p_part : at::empty({0}, x.options().dtype(type))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_conv2d(
    const at::Tensor& x, const std::optional<at::Tensor>& xt, const at::Tensor& w,
    const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& bt, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  check_conv_args(x, w, groups);
  const int64_t cout = w.size(0);
  if (b.has_value() && b->defined()) FGK_CHECK_SHAPE(*b, "bias", cout);
  const auto y = convolve(x, w, b.has_value() ? *b : at::Tensor(), stride, padding, dilation,
                          groups);
  auto [x_part, p_part] =
      dual_conv2d_tangents(x, y, xt, w, wt, bt, stride, padding, dilation, groups);
  return {y, x_part, p_part};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_linear(
    const at::Tensor& x, const std::optional<at::Tensor>& xt, const at::Tensor& w,
    const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& bt, bool sum_terms) {
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (..., in_features), got a 0-d "
              "tensor");
  check_differentiable(x, "x");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "weight must have shape (out, ",
              x.size(-1), "), got ", w.sizes());
  const int64_t out = w.size(0), in = w.size(1);
  if (b.has_value() && b->defined()) FGK_CHECK_SHAPE(*b, "bias", out);
  check_param_tangents(w, wt, bt);
  if (present(xt)) check_tangent(x, *xt, "xt");
  if (sum_terms) {
    const int64_t P = present(wt) ? wt->size(0) : present(bt) ? bt->size(0) : -1;
    TORCH_CHECK(present(xt) && P == xt->size(0), "sum_terms needs the input's and the "
                "parameters' tangents with one slot count, got ", present(xt) ? xt->size(0) : 0,
                " input and ", std::max<int64_t>(P, 0), " parameter slots");
  }
  const auto type = tangent_type(x, {&xt, &wt, &bt});
  const auto xc = x.contiguous();
  const auto y = at::linear(xc, w, b.has_value() ? *b : at::Tensor());
  // An absent part is empty, each its own tensor: the outputs of an op never alias.
  const auto empty = [&] { return at::empty({0}, x.options().dtype(type)); };
  at::Tensor x_part, p_part;
  if (present(xt)) {
    x_part = at::linear(xt->contiguous(), w.to(type));
  }
  // The bias tangent's slots, shaped to broadcast over (P, ..., out).
  std::vector<int64_t> bias_shape(x.dim() + 1, 1);
  if (present(bt)) {
    bias_shape.front() = bt->size(0);
    bias_shape.back() = out;
  }
  if (sum_terms) {
    // ẏ_t = ẋ_t Wᵀ + x Ẇ_tᵀ + ḃ_t: each x Ẇ_tᵀ accumulates into the input term's output
    // (beta = 1), so the parameter term never exists apart (no buffer, no extra pass).
    if (present(wt)) {
      const int64_t T = wt->size(0);
      const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
      x_part.view({T, rows, out})
          .baddbmm_(xc.to(type).view({1, rows, in}).expand({T, rows, in}),
                    wt->to(type).transpose(1, 2));
    }
    if (present(bt)) x_part.add_(bt->view(bias_shape));
    return {y, x_part, empty()};
  }
  if (present(wt)) {
    // Every x Wt_p^T in one GEMM, split along the last dim and moved to the front.
    p_part = at::linear(xc.to(type), wt->to(type).flatten(0, 1))
                 .unflatten(-1, {wt->size(0), out})
                 .movedim(-2, 0)
                 .contiguous();
  }
  if (present(bt)) {
    std::vector<int64_t> full{bt->size(0)};
    full.insert(full.end(), y.sizes().begin(), y.sizes().end());
    if (p_part.defined()) {
      p_part.add_(bt->view(bias_shape));
    } else {
      p_part = at::empty(full, y.options().dtype(type)).copy_(bt->view(bias_shape));
    }
  }
  return {y, x_part.defined() ? x_part : empty(), p_part.defined() ? p_part : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CompositeExplicitAutograd, m) {
  m.impl("dual_max_pool2d", &dual_max_pool2d);
  m.impl("dual_conv2d", &dual_conv2d);
  m.impl("dual_conv2d_tangents", &dual_conv2d_tangents);
  m.impl("dual_linear", &dual_linear);
}

}  // namespace fgkernels
