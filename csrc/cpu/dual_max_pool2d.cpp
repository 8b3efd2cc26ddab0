// Dual max pool on the CPU: y = the largest value of each window, yt[t] = xt[t] at that value's
// place (the argmax), every slot gathered right after its plane (NCHW) or row (channels_last)
// is pooled. The argmax is torch's (its CPU max-pool kernels): windows are read row by row, a
// value wins when it is larger than the best so far or NaN, so the first largest value or the
// last NaN; a window of -inf keeps its first place. torch's NCHW kernel takes several times as
// long as its channels_last one; this one vectorises both, NCHW across a row's windows.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/Pool.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../dual_types.h"
#include "isa.h"

namespace fgkernels {
namespace {

// The pooling geometry, and the input's and output's plane sizes.
struct PoolParams {
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t H, W, Ho, Wo;
};

// The first and one-past-last input row (or column) of output o's window, as torch's kernel
// clips it; empty when the window lies wholly in the padding.
inline void window(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d, int64_t size,
                   int64_t& first, int64_t& end) {
  first = o * s - p;
  end = std::min(first + (k - 1) * d + 1, size);
  while (first < 0) first += d;
}

// Where a window's argmax starts, torch's before any value beats -inf: its first place
// (ih0 * W + iw0), or -1 for a window wholly in the padding.
inline int64_t first_place(int64_t ih0, int64_t ih1, int64_t iw0, int64_t iw1, int64_t W) {
  return ih0 < ih1 && iw0 < iw1 ? ih0 * W + iw0 : -1;
}

// Whether v replaces the best value m: larger, or NaN.
template <typename opmath_t>
inline bool wins(opmath_t v, opmath_t m) {
  return v > m || v != v;
}

// One output row oh of an NCHW plane: y_row[ow] and the argmax arg_row[ow] (ih * W + iw; -1 for
// an empty window). For each window place (kh, kw) the row's windows are updated together, so
// the loop over ow vectorises (a strided load, a compare, two blends); the places are visited
// in each window's row-major order, as torch visits them.
template <typename scalar_t>
FGK_CPU_KERNEL void pool_row_nchw(const PoolParams g, const scalar_t* __restrict x, int64_t oh,
                                  scalar_t* __restrict y_row, int64_t* __restrict arg_row,
                                  at::opmath_type<scalar_t>* __restrict best) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t ih0, ih1;
  window(oh, g.kH, g.sH, g.pH, g.dH, g.H, ih0, ih1);
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    int64_t iw0, iw1;
    window(ow, g.kW, g.sW, g.pW, g.dW, g.W, iw0, iw1);
    best[ow] = -std::numeric_limits<opmath_t>::infinity();
    arg_row[ow] = first_place(ih0, ih1, iw0, iw1, g.W);
  }
  for (int64_t ih = ih0; ih < ih1; ih += g.dH) {
    const scalar_t* __restrict row = x + ih * g.W;
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      // iw = ow * sW - pW + kw * dW lies in [0, W) for ow in [lo, hi).
      const int64_t off = kw * g.dW - g.pW;
      int64_t lo = off >= 0 ? 0 : (-off + g.sW - 1) / g.sW;
      int64_t hi = off >= g.W ? 0 : (g.W - 1 - off) / g.sW + 1;
      hi = std::min(hi, g.Wo);
#pragma omp simd
      for (int64_t ow = lo; ow < hi; ++ow) {
        const int64_t iw = ow * g.sW + off;
        const opmath_t v = static_cast<opmath_t>(row[iw]);
        const bool w = wins(v, best[ow]);
        best[ow] = w ? v : best[ow];
        arg_row[ow] = w ? ih * g.W + iw : arg_row[ow];
      }
    }
  }
  for (int64_t ow = 0; ow < g.Wo; ++ow) y_row[ow] = static_cast<scalar_t>(best[ow]);
}

// One output row (n, oh) of a channels_last image: y_row[ow * C + c] and its argmax, channels
// innermost (the loop over c vectorises).
template <typename scalar_t>
FGK_CPU_KERNEL void pool_row_nhwc(const PoolParams g, int64_t C, const scalar_t* __restrict x,
                                  int64_t oh, scalar_t* __restrict y_row,
                                  int64_t* __restrict arg_row,
                                  at::opmath_type<scalar_t>* __restrict best) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t ih0, ih1;
  window(oh, g.kH, g.sH, g.pH, g.dH, g.H, ih0, ih1);
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    int64_t iw0, iw1;
    window(ow, g.kW, g.sW, g.pW, g.dW, g.W, iw0, iw1);
    int64_t* __restrict arg = arg_row + ow * C;
    const int64_t first = first_place(ih0, ih1, iw0, iw1, g.W);
    for (int64_t c = 0; c < C; ++c) {
      best[c] = -std::numeric_limits<opmath_t>::infinity();
      arg[c] = first;
    }
    for (int64_t ih = ih0; ih < ih1; ih += g.dH) {
      for (int64_t iw = iw0; iw < iw1; iw += g.dW) {
        const scalar_t* __restrict px = x + (ih * g.W + iw) * C;
        const int64_t place = ih * g.W + iw;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const opmath_t v = static_cast<opmath_t>(px[c]);
          const bool w = wins(v, best[c]);
          best[c] = w ? v : best[c];
          arg[c] = w ? place : arg[c];
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) y_row[ow * C + c] = static_cast<scalar_t>(best[c]);
  }
}

// yt[o] = xt[arg[o]] over n outputs of one plane; 0 where the window was empty.
template <typename bits>
void gather_plane(const bits* __restrict xt, const int64_t* __restrict arg, bits* __restrict yt,
                  int64_t n) {
  for (int64_t o = 0; o < n; ++o) yt[o] = arg[o] < 0 ? bits(0) : xt[arg[o]];
}

// yt[ow, c] = xt[arg[ow, c], c] over a channels_last row of Wo outputs of C channels.
template <typename bits>
void gather_row(const bits* __restrict xt, const int64_t* __restrict arg, bits* __restrict yt,
                int64_t Wo, int64_t C) {
  for (int64_t ow = 0; ow < Wo; ++ow) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t a = arg[ow * C + c];
      yt[ow * C + c] = a < 0 ? bits(0) : xt[a * C + c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> dual_max_pool2d_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& xt_in,
                                                       at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride_in,
                                                       at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(x_in.dim() == 4, "x must be 4-D (N, C, H, W), got ", x_in.sizes());
  // As torch's max_pool2d: an empty stride is the kernel size.
  const at::IntArrayRef stride = stride_in.empty() ? kernel_size : stride_in;
  for (const auto& [name, v] : {std::pair{"kernel_size", kernel_size}, {"stride", stride},
                                {"padding", padding}, {"dilation", dilation}}) {
    TORCH_CHECK(v.size() == 2, name, " must hold two ints, got ", v);
  }
  const int64_t T = check_tangent(x_in, xt_in, "xt");
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = in_format(x_in, fmt);
  const at::Tensor xt = slots_in_format(xt_in, fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = at::native::pooling_output_shape<int64_t>(
      H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode);
  const int64_t Wo = at::native::pooling_output_shape<int64_t>(
      W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode);
  // torch's own checks of the geometry (positive sizes, padding, an output of at least 1x1).
  at::native::pool2d_shape_check(x, kernel_size[0], kernel_size[1], stride[0], stride[1],
                                 padding[0], padding[1], dilation[0], dilation[1], C, H, W, Ho,
                                 Wo, fmt);
  const PoolParams g{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                     padding[1],     dilation[0],    dilation[1], H,       W,
                     Ho,             Wo};
  auto y = at::empty({N, C, Ho, Wo}, x.options().memory_format(fmt));
  auto yt = empty_slots(T, y, fmt, xt.scalar_type());
  const int64_t x_slot = x.numel(), y_slot = y.numel();
  dispatch_dual_types(x.scalar_type(), xt.scalar_type(), "dual_max_pool2d", [&](auto p, auto t) {
    using scalar_t = typename decltype(p)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    using tangent_bits = bits_t<typename decltype(t)::type>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const auto* tp = static_cast<const tangent_bits*>(xt.const_data_ptr());
    auto* ytp = static_cast<tangent_bits*>(yt.mutable_data_ptr());
    if (fmt == at::MemoryFormat::ChannelsLast) {
      // Rows (n, oh): each pooled, then gathered from every slot of its image.
      at::parallel_for(0, N * Ho, 1, [&](int64_t r0, int64_t r1) {
        std::vector<int64_t> arg(Wo * C);
        std::vector<opmath_t> best(C);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / Ho, oh = r % Ho, image = n * H * W * C, out = r * Wo * C;
          pool_row_nhwc(g, C, xp + image, oh, yp + out, arg.data(), best.data());
          for (int64_t s = 0; s < T; ++s) {
            gather_row(tp + s * x_slot + image, arg.data(), ytp + s * y_slot + out, Wo, C);
          }
        }
      });
    } else {
      // Planes (n, c): each pooled row by row, then gathered from every slot of its plane.
      at::parallel_for(0, N * C, 1, [&](int64_t q0, int64_t q1) {
        std::vector<int64_t> arg(Ho * Wo);
        std::vector<opmath_t> best(Wo);
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t in = q * H * W, out = q * Ho * Wo;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            pool_row_nchw(g, xp + in, oh, yp + out + oh * Wo, arg.data() + oh * Wo,
                          best.data());
          }
          for (int64_t s = 0; s < T; ++s) {
            gather_plane(tp + s * x_slot + in, arg.data(), ytp + s * y_slot + out, Ho * Wo);
          }
        }
      });
    }
  });
  return {y, yt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_max_pool2d", &dual_max_pool2d_cpu); }

}  // namespace fgkernels
