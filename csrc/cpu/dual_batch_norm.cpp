// Dual batch norm on the CPU: a statistics pass and an apply pass.
//
// The primal x is viewed as [outer, C, inner], contiguous: (N, C, H*W) for NCHW, (N*H*W, C, 1)
// for channels_last, so that no layout copy is made. Tangent slots follow each other, each laid
// out like x.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace fgkernels {
namespace {

constexpr int64_t kLanes = 8;  // independent partial sums, so the compiler can vectorise

struct Layout {
  int64_t outer, channels, inner;
};

Layout layout_of(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t C = x.size(1);
  if (fmt == at::MemoryFormat::ChannelsLast) return {x.numel() / C, C, 1};
  return {x.size(0), C, x.numel() / (x.size(0) * C)};
}

// Sum of (a[i] - k) and (a[i] - k)^2 over a span, and per tangent Σ t[i], Σ (a[i] - k) t[i]:
// lane-blocked partials, combined once at the end.
template <typename scalar_t, typename acc_t>
void span_sums(const scalar_t* a, int64_t n, acc_t k, acc_t& s1, acc_t& s2) {
  acc_t p1[kLanes] = {}, p2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(a[i + l]) - k;
      p1[l] += d;
      p2[l] += d * d;
    }
  }
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(a[i]) - k;
    p1[0] += d;
    p2[0] += d * d;
  }
  for (int64_t l = 0; l < kLanes; ++l) s1 += p1[l], s2 += p2[l];
}

template <typename scalar_t, typename acc_t>
void span_tangent_sums(const scalar_t* a, const scalar_t* t, int64_t n, acc_t k, acc_t& s1,
                       acc_t& s2) {
  acc_t p1[kLanes] = {}, p2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(t[i + l]);
      p1[l] += v;
      p2[l] += (static_cast<acc_t>(a[i + l]) - k) * v;
    }
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(t[i]);
    p1[0] += v;
    p2[0] += (static_cast<acc_t>(a[i]) - k) * v;
  }
  for (int64_t l = 0; l < kLanes; ++l) s1 += p1[l], s2 += p2[l];
}

// Shifted sums per channel, shift k_c = the channel's first value (keeps Σ(x-k)^2 free of the
// cancellation that Σx^2 - (Σx)^2/n suffers when |mean| >> std).
// sums layout: [S1, S2] per channel, then [St1, St2] per (slot, channel).
// Blocks of outer rows run in parallel, each walking its memory in order (a whole row of
// channels at a time) into its own partial sums, which are added in double at the end.
template <typename scalar_t>
void stats_kernel(const scalar_t* x, const scalar_t* xt, int64_t T, Layout L,
                  std::vector<double>& sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = L.channels, slot = L.outer * C * L.inner;
  const size_t width = static_cast<size_t>(2 * C * (1 + T));
  sums.assign(width, 0.0);
  const int64_t rows_per_block = std::max<int64_t>(1, 16384 / (C * L.inner));
  const int64_t blocks = (L.outer + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(blocks * width, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> k(C), acc(width);
    for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(x[c * L.inner]);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t r1 = std::min(L.outer, (b + 1) * rows_per_block);
      for (int64_t r = b * rows_per_block; r < r1; ++r) {
        const int64_t row = r * C * L.inner;
        if (L.inner > 1) {  // NCHW: C contiguous planes of `inner` values
          for (int64_t c = 0; c < C; ++c) {
            const int64_t base = row + c * L.inner;
            span_sums(x + base, L.inner, k[c], acc[2 * c], acc[2 * c + 1]);
            for (int64_t t = 0; t < T; ++t) {
              acc_t* at_ = &acc[2 * C * (1 + t) + 2 * c];
              span_tangent_sums(x + base, xt + t * slot + base, L.inner, k[c], at_[0], at_[1]);
            }
          }
        } else {  // channels_last: one value per channel
          const scalar_t* xr = x + row;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = static_cast<acc_t>(xr[c]) - k[c];
            acc[2 * c] += d;
            acc[2 * c + 1] += d * d;
          }
          for (int64_t t = 0; t < T; ++t) {
            const scalar_t* tr = xt + t * slot + row;
            acc_t* at_ = &acc[2 * C * (1 + t)];
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = static_cast<acc_t>(tr[c]);
              at_[2 * c] += v;
              at_[2 * c + 1] += (static_cast<acc_t>(xr[c]) - k[c]) * v;
            }
          }
        }
      }
      double* out = &partial[b * width];
      for (size_t j = 0; j < width; ++j) out[j] = acc[j];
    }
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (size_t j = 0; j < width; ++j) sums[j] += partial[b * width + j];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_bn_stats_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in) {
  TORCH_CHECK(x_in.dim() >= 2, "x must have a channel dimension (N, C, ...), got ", x_in.sizes());
  TORCH_CHECK(x_in.numel() > 0, "x must not be empty");
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = in_format(x_in, fmt);
  at::Tensor xt;
  int64_t T = 0;
  if (xt_in.has_value() && xt_in->defined()) {
    T = check_tangent(x_in, *xt_in, "xt");
    xt = slots_in_format(*xt_in, fmt);
  }
  const Layout L = layout_of(x, fmt);
  const int64_t C = L.channels;
  const double n = static_cast<double>(L.outer * L.inner);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_bn_stats", [&] {
    stats_kernel<scalar_t>(x.const_data_ptr<scalar_t>(),
                           T ? xt.const_data_ptr<scalar_t>() : nullptr, T, L, sums);
  });
  // mean = k + S1/n, var = S2/n - (S1/n)^2; tangent mean St1/n; cov = St2/n - (S1/n)(St1/n).
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mean = at::empty({C}, at::kDouble), var = at::empty({C}, at::kDouble);
  auto tmean = at::empty({T, C}, at::kDouble), tcov = at::empty({T, C}, at::kDouble);
  auto m = mean.data_ptr<double>(), v = var.data_ptr<double>();
  auto tm = tmean.data_ptr<double>(), tc = tcov.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_bn_shift", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double k = static_cast<double>(xp[c * L.inner]);
      const double d1 = sums[2 * c] / n;
      m[c] = k + d1;
      v[c] = std::max(sums[2 * c + 1] / n - d1 * d1, 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const double* st = &sums[2 * C * (1 + t) + 2 * c];
        tm[t * C + c] = st[0] / n;
        tc[t * C + c] = st[1] / n - d1 * st[0] / n;
      }
    }
  });
  auto opts = x.options().dtype(acc_type);
  return {mean.to(opts), var.to(opts), tmean.to(opts), tcov.to(opts)};
}

// y = s x + h (ReLU optional); yt[t] = s xt[slot[t]] + b[t] x + d[t], masked by y > 0 with ReLU.
// Coefficients are in the accumulation type. One span at a time, the primal first, then each
// slot, so that every inner loop is a branch-free pass over contiguous memory.
template <typename scalar_t, typename acc_t>
struct ApplySpan {
  const scalar_t* x;
  const scalar_t* xt;
  const int64_t* x_slot;
  int64_t T, slot, C;
  const acc_t *scale, *shift, *t_xscale, *t_shift;
  bool relu;
  scalar_t* y;
  scalar_t* yt;

  static scalar_t masked(bool relu, acc_t pre, acc_t v) {
    return static_cast<scalar_t>(relu && !(pre > acc_t(0)) ? acc_t(0) : v);
  }

  // NCHW: the n plane [base, base + n) of channel c; the coefficients are scalars.
  void plane(int64_t base, int64_t n, int64_t c) const {
    const scalar_t* xs = x + base;
    const acc_t s = scale[c], h = shift[c];
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = s * static_cast<acc_t>(xs[i]) + h;
      y[base + i] = masked(relu, v, v);
    }
    for (int64_t t = 0; t < T; ++t) {
      const acc_t b = t_xscale[t * C + c], d = t_shift[t * C + c];
      scalar_t* out = yt + t * slot + base;
      if (x_slot[t] >= 0) {
        const scalar_t* ts = xt + x_slot[t] * slot + base;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xv = static_cast<acc_t>(xs[i]);
          out[i] = masked(relu, s * xv + h, s * static_cast<acc_t>(ts[i]) + b * xv + d);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xv = static_cast<acc_t>(xs[i]);
          out[i] = masked(relu, s * xv + h, b * xv + d);
        }
      }
    }
  }

  // channels_last: the row of C values at base, one per channel; the coefficients are arrays.
  void row(int64_t base) const {
    const scalar_t* xs = x + base;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = scale[c] * static_cast<acc_t>(xs[c]) + shift[c];
      y[base + c] = masked(relu, v, v);
    }
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* b = t_xscale + t * C;
      const acc_t* d = t_shift + t * C;
      scalar_t* out = yt + t * slot + base;
      const scalar_t* ts = x_slot[t] >= 0 ? xt + x_slot[t] * slot + base : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xv = static_cast<acc_t>(xs[c]);
        const acc_t from_x = ts ? scale[c] * static_cast<acc_t>(ts[c]) : acc_t(0);
        out[c] = masked(relu, scale[c] * xv + shift[c], from_x + b[c] * xv + d[c]);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> dual_bn_apply_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in, at::IntArrayRef x_slot,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& t_xscale,
    const at::Tensor& t_shift, bool relu) {
  TORCH_CHECK(x_in.dim() >= 2, "x must have a channel dimension (N, C, ...), got ", x_in.sizes());
  const int64_t C = x_in.size(1), T = static_cast<int64_t>(x_slot.size());
  FGK_CHECK_SHAPE(scale, C);
  FGK_CHECK_SHAPE(shift, C);
  FGK_CHECK_SHAPE(t_xscale, T, C);
  FGK_CHECK_SHAPE(t_shift, T, C);
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = in_format(x_in, fmt);
  at::Tensor xt;
  int64_t Tx = 0;
  if (xt_in.has_value() && xt_in->defined()) {
    Tx = check_tangent(x_in, *xt_in, "xt");
    xt = slots_in_format(*xt_in, fmt);
  }
  for (int64_t s : x_slot)
    TORCH_CHECK(s < Tx, "x_slot entries must be < T of xt (", Tx, "), got ", s);
  const Layout L = layout_of(x, fmt);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_bn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto coef = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
    const auto s = coef(scale), h = coef(shift), b = coef(t_xscale), d = coef(t_shift);
    const ApplySpan<scalar_t, acc_t> span{
        x.const_data_ptr<scalar_t>(), Tx ? xt.const_data_ptr<scalar_t>() : nullptr,
        x_slot.data(), T, x.numel(), C, s.const_data_ptr<acc_t>(), h.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), d.const_data_ptr<acc_t>(), relu,
        y.mutable_data_ptr<scalar_t>(), yt.mutable_data_ptr<scalar_t>()};
    if (L.inner > 1) {
      at::parallel_for(0, L.outer * C, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) span.plane(p * L.inner, L.inner, p % C);
      });
    } else {
      at::parallel_for(0, L.outer, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) span.row(r * C);
      });
    }
  });
  return {y, yt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) {
  m.impl("dual_bn_stats", &dual_bn_stats_cpu);
  m.impl("dual_bn_apply", &dual_bn_apply_cpu);
}

}  // namespace fgkernels
