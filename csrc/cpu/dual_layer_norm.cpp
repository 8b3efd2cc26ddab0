// Dual layer norm on the CPU: torch's kernel for y and the row statistics, then one pass per
// row for every tangent slot (the row, a few KiB, stays in cache across its passes), where a
// composition of torch's ops would walk the whole tangent about ten times.
//
// Over each row of D = prod(normalized_shape) values, with torch's mean μ and r = 1/√(σ² + eps):
//   x̂ = (x − μ)·r,   m1 = mean ẋ,   m2 = mean(x̂·(ẋ − m1)),   ẋ̂ = r·(ẋ − m1) − x̂·(r·m2)
//   x_part = γ·ẋ̂ (ẋ̂ without weight),   p_part = γ̇·x̂ + β̇
// (see fgkernels/rules/norms.py). Terms in x's opmath type, row sums in double, each slot
// rounded once to the tangents' dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../dual_types.h"
#include "isa.h"

namespace fgkernels {
namespace {

// Elements a parallel task should cover at least (smaller inputs run on one thread).
constexpr int64_t kGrainElements = 32768;

// A row's x̂ into xh (D values): (x − μ)·r; returns Σx̂ in double (0 but for μ's rounding).
template <typename scalar_t, typename acc_t>
FGK_CPU_KERNEL static double row_xhat(const scalar_t* __restrict x, acc_t mu, acc_t r,
                                      int64_t D, acc_t* __restrict xh) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < D; ++i) {
    xh[i] = (static_cast<acc_t>(x[i]) - mu) * r;
    sum += static_cast<double>(xh[i]);
  }
  return sum;
}

// Σẋ and Σx̂·ẋ over a row of one slot, in double (a float row's products exact).
template <typename tangent_t, typename acc_t>
FGK_CPU_KERNEL static void row_tangent_sums(const tangent_t* __restrict t,
                                            const acc_t* __restrict xh, int64_t D, double& s1,
                                            double& s2) {
  double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < D; ++i) {
    const acc_t v = static_cast<acc_t>(t[i]);
    a += static_cast<double>(v);
    b += static_cast<double>(xh[i]) * static_cast<double>(v);
  }
  s1 = a;
  s2 = b;
}

// The parameter term of one slot over a row: pt = γ̇·x̂ + β̇ (either may be absent: nullptr).
template <typename tangent_t, typename acc_t>
FGK_CPU_KERNEL static void row_param_term(const tangent_t* __restrict gt,
                                          const tangent_t* __restrict bt,
                                          const acc_t* __restrict xh, int64_t D,
                                          acc_t* __restrict pt) {
  if (gt != nullptr && bt != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      pt[i] = static_cast<acc_t>(gt[i]) * xh[i] + static_cast<acc_t>(bt[i]);
    }
  } else if (gt != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) pt[i] = static_cast<acc_t>(gt[i]) * xh[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) pt[i] = static_cast<acc_t>(bt[i]);
  }
}

// One slot's input term over a row, out = γ·(r·(ẋ − m1) − x̂·c2), plus pt when given (the summed
// parameter term). ẋ's mean m1 is taken out before the scale r, as torch's forward mode does: a
// row of no spread has r = 1/√eps, where r·ẋ − r·m1 would keep the rounding of r·ẋ.
template <typename tangent_t, typename acc_t>
FGK_CPU_KERNEL static void row_input_term(const tangent_t* __restrict t,
                                          const acc_t* __restrict g,
                                          const acc_t* __restrict xh, const acc_t* __restrict pt,
                                          acc_t r, acc_t m1, acc_t c2, int64_t D,
                                          tangent_t* __restrict out) {
  if (pt != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      const acc_t v = static_cast<acc_t>(t[i]);
      out[i] = round_to<tangent_t>(g[i] * (r * (v - m1) - xh[i] * c2) + pt[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      const acc_t v = static_cast<acc_t>(t[i]);
      out[i] = round_to<tangent_t>(g[i] * (r * (v - m1) - xh[i] * c2));
    }
  }
}

// One slot's parameter term over a row, stored alone: out = pt in the tangents' dtype.
template <typename tangent_t, typename acc_t>
FGK_CPU_KERNEL static void row_store(const acc_t* __restrict pt, int64_t D,
                                     tangent_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) out[i] = round_to<tangent_t>(pt[i]);
}

// The parameter tangents' slot count P (0 without any), checked against their parameters.
int64_t check_layer_norm_params(const std::optional<at::Tensor>& w,
                                const std::optional<at::Tensor>& wt,
                                const std::optional<at::Tensor>& b,
                                const std::optional<at::Tensor>& bt) {
  TORCH_CHECK(!present(wt) || present(w), "weight_t was given without weight");
  TORCH_CHECK(!present(bt) || present(b), "bias_t was given without bias");
  const int64_t Pw = present(wt) ? check_tangent(*w, *wt, "weight_t") : 0;
  const int64_t Pb = present(bt) ? check_tangent(*b, *bt, "bias_t") : 0;
  TORCH_CHECK(Pw == 0 || Pb == 0 || Pw == Pb, "weight_t and bias_t must carry the same number "
              "of slots, got ", Pw, " and ", Pb);
  return std::max(Pw, Pb);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_layer_norm_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& wt,
    const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& bt,
    at::IntArrayRef normalized_shape, double eps, bool sum_terms) {
  const int64_t T = present(xt) ? check_tangent(x_in, *xt, "xt") : 0;
  const int64_t P = check_layer_norm_params(w, wt, b, bt);
  TORCH_CHECK(!sum_terms || (T > 0 && T == P), "sum_terms needs the input's and the "
              "parameters' tangents with one slot count, got ", T, " input and ", P,
              " parameter slots");
  const auto type = tangent_type(x_in, {&xt, &wt, &bt});
  // torch's kernel: y, and the statistics of each row in x's opmath type (it checks the shapes
  // and the parameters' dtypes).
  const at::Tensor x = x_in.contiguous();
  auto [y, mean, rstd] = at::native_layer_norm(x, normalized_shape, w.value_or(at::Tensor()),
                                               b.value_or(at::Tensor()), eps);
  const int64_t D = c10::multiply_integers(normalized_shape);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const auto empty = [&] { return at::empty({0}, x.options().dtype(type)); };
  const auto slots = [&](int64_t n) {
    std::vector<int64_t> shape{n};
    shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
    return at::empty(shape, x.options().dtype(type));
  };
  at::Tensor x_part = T ? slots(T) : empty();
  at::Tensor p_part = P && !sum_terms ? slots(P) : empty();
  if (rows == 0 || (T == 0 && P == 0)) return {y, x_part, p_part};
  dispatch_dual_types(x.scalar_type(), type, "dual_layer_norm", [&](auto p, auto t) {
    using scalar_t = typename decltype(p)::type;
    using tangent_t = typename decltype(t)::type;
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(!present(w) || w->scalar_type() == x.scalar_type(), "dual_layer_norm: weight "
                "must have x's dtype ", x.scalar_type(), ", got ", w->scalar_type());
    // γ in acc_t (1 without weight); the parameter tangents as (P, D) rows.
    std::vector<acc_t> gamma(D, acc_t(1));
    if (present(w)) {
      const at::Tensor wc = w->contiguous();
      const scalar_t* wp = wc.const_data_ptr<scalar_t>();
      for (const auto i : c10::irange(D)) gamma[i] = static_cast<acc_t>(wp[i]);
    }
    const at::Tensor wtc = present(wt) ? wt->contiguous() : at::Tensor();
    const at::Tensor btc = present(bt) ? bt->contiguous() : at::Tensor();
    const at::Tensor xtc = T ? xt->contiguous() : at::Tensor();
    const at::Tensor mean_acc = mean.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor rstd_acc = rstd.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const tangent_t* xtp = T ? xtc.const_data_ptr<tangent_t>() : nullptr;
    const tangent_t* wtp = wtc.defined() ? wtc.const_data_ptr<tangent_t>() : nullptr;
    const tangent_t* btp = btc.defined() ? btc.const_data_ptr<tangent_t>() : nullptr;
    const acc_t* mu = mean_acc.const_data_ptr<acc_t>();
    const acc_t* rs = rstd_acc.const_data_ptr<acc_t>();
    tangent_t* xo = T ? x_part.mutable_data_ptr<tangent_t>() : nullptr;
    tangent_t* po = p_part.numel() ? p_part.mutable_data_ptr<tangent_t>() : nullptr;
    const int64_t slot = x.numel();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (D * (1 + std::max(T, P))));
    const double inv_d = 1.0 / static_cast<double>(D);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> xh(D), pt(P ? D : 0);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t base = row * D;
        const acc_t r = rs[row];
        const double xh_sum = row_xhat(xp + base, mu[row], r, D, xh.data());
        for (int64_t s = 0; s < std::max(T, P); ++s) {
          if (s < P) {
            row_param_term(wtp ? wtp + s * D : nullptr, btp ? btp + s * D : nullptr, xh.data(),
                           D, pt.data());
            if (!sum_terms) row_store(pt.data(), D, po + s * slot + base);
          }
          if (s < T) {
            const tangent_t* ts = xtp + s * slot + base;
            double s1, s2;
            row_tangent_sums(ts, xh.data(), D, s1, s2);
            // Σx̂·(ẋ − m1) = Σx̂·ẋ − m1·Σx̂: the rounded x̂'s mean, far from 0 where x has a
            // large mean, times a large m1 would otherwise enter m2 (torch centres ẋ first).
            // A row whose m1 is not finite (an Inf among its ẋ) has m2 NaN, as torch's
            // mean(x̂·(ẋ − m1)) is (NaN where ẋ is the Inf): m1 − m1 is that NaN.
            const acc_t m1 = static_cast<acc_t>(s1 * inv_d);
            const acc_t c2 = std::isfinite(m1)
                                 ? r * static_cast<acc_t>((s2 - s1 * inv_d * xh_sum) * inv_d)
                                 : m1 - m1;
            row_input_term(ts, gamma.data(), xh.data(), sum_terms ? pt.data() : nullptr, r, m1,
                           c2, D, xo + s * slot + base);
          }
        }
      }
    });
  });
  return {y, x_part, p_part};
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) { m.impl("dual_layer_norm", &dual_layer_norm_cpu); }

}  // namespace fgkernels
