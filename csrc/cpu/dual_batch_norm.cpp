// Dual batch norm on the CPU: a statistics pass and an apply pass, over x viewed as
// [outer, C, inner] (batch_norm_common.h) so that no layout copy is made.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../batch_norm_common.h"
#include "../bn_per_channel.h"
#include "../dual_types.h"
#include "isa.h"

namespace fgkernels {
namespace {

// Independent partial sums per accumulator: enough to fill the vector registers and to hide
// the latency of the dependent adds.
constexpr int64_t kLanes = 16;
// Elements a parallel task should cover at least (smaller inputs run on one thread).
constexpr int64_t kGrainElements = 32768;
// Values a lane adds in acc_t before its partial moves into a double sum: float32 partials of
// more values would lose precision with the number of values (a 1024×1024 plane).
constexpr int64_t kValuesPerFlush = 256;

// The sums' inner loops. Plain inline functions: they are inlined into the kernels below
// (FGK_CPU_KERNEL), whose instruction set they take, so that no span pays a dispatched call.

// Lane partials of Σ(a - k) and Σ(a - k)² over a span, added into p1, p2 (kLanes each). The
// partials stay apart from one span to the next, so no span pays a horizontal reduction.
template <typename scalar_t, typename acc_t>
inline void span_sums(const scalar_t* a, int64_t n, acc_t k, acc_t* __restrict p1,
                      acc_t* __restrict p2) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(a[i + l]) - k;
      p1[l] += d;
      p2[l] += d * d;
    }
  }
  for (int64_t l = 0; i < n; ++i, ++l) {
    const acc_t d = static_cast<acc_t>(a[i]) - k;
    p1[l] += d;
    p2[l] += d * d;
  }
}

// Lane partials of Σt and Σ(a - k)·t over a span, added into p1, p2 (kLanes each).
template <typename scalar_t, typename tangent_t, typename acc_t>
inline void span_tangent_sums(const scalar_t* a, const tangent_t* t, int64_t n, acc_t k,
                              acc_t* __restrict p1, acc_t* __restrict p2) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(t[i + l]);
      p1[l] += v;
      p2[l] += (static_cast<acc_t>(a[i + l]) - k) * v;
    }
  }
  for (int64_t l = 0; i < n; ++i, ++l) {
    const acc_t v = static_cast<acc_t>(t[i]);
    p1[l] += v;
    p2[l] += (static_cast<acc_t>(a[i]) - k) * v;
  }
}

// Σ(x - k) and Σ(x - k)² of a row of n values, one partial per position (k[j] its channel's
// shift), added into s1[j], s2[j].
template <typename scalar_t, typename acc_t>
inline void row_sums(const scalar_t* __restrict x, const acc_t* __restrict k, int64_t n,
                     acc_t* __restrict s1, acc_t* __restrict s2) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = static_cast<acc_t>(x[j]) - k[j];
    s1[j] += d;
    s2[j] += d * d;
  }
}

// Σt and Σ(x - k)·t of a row of n values, one partial per position, added into t1[j], t2[j].
template <typename scalar_t, typename tangent_t, typename acc_t>
inline void row_tangent_sums(const scalar_t* __restrict x, const tangent_t* __restrict t,
                             const acc_t* __restrict k, int64_t n, acc_t* __restrict t1,
                             acc_t* __restrict t2) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(t[j]);
    t1[j] += v;
    t2[j] += (static_cast<acc_t>(x[j]) - k[j]) * v;
  }
}

// Whether the kernels run x's [outer, C, inner] layout by rows (channels_last, and NCHW planes
// of fewer than kLanes values, where a span per plane would hold a few values) rather than by
// planes.
inline bool by_rows(int64_t inner) { return inner < kLanes; }

// Per-channel values, n of them, each repeated at its channel's `inner` positions of a row:
// (..., C) -> (..., C·inner).
template <typename acc_t>
std::vector<acc_t> spread_over_positions(const acc_t* per_channel, int64_t n, int64_t inner) {
  std::vector<acc_t> out(n * inner);
  for (int64_t j = 0; j < n; ++j) std::fill_n(out.begin() + j * inner, inner, per_channel[j]);
  return out;
}

// The statistics from the block partials ``part`` (blocks, 2 + 2T, C) of sums shifted by k:
// mean, var (C,) and tmean, tcov (T, C) in acc_t (finalize_bn_stats_channel).
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_from_partials(
    const DualInput& in, const std::vector<acc_t>& k, const double* part, int64_t blocks) {
  const int64_t C = in.channels, T = in.T;
  const at::TensorOptions options =
      in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  at::Tensor tmean = at::empty({T, C}, options), tcov = at::empty({T, C}, options);
  acc_t *m = mean.data_ptr<acc_t>(), *v = var.data_ptr<acc_t>();
  acc_t *tm = tmean.data_ptr<acc_t>(), *tc = tcov.data_ptr<acc_t>();
  const double n = static_cast<double>(in.outer * in.inner);
  for (int64_t c = 0; c < C; ++c) {
    finalize_bn_stats_channel(part, blocks, C, T, c, n, static_cast<double>(k[c]), m, v, tm, tc);
  }
  return {mean, var, tmean, tcov};
}

// Each channel's shift of its sums (kShiftSample, bn_per_channel.h), in a loop: an ATen
// reduction would cost a small input more than its sums do. The sampled positions are the same
// in every channel, one index apart per channel (`inner`), so each position's index is computed
// once and the channels are read across it (along memory where channels_last); each channel's
// sum still runs in its sample's order. Computing every index apart, three 64-bit divisions a
// value, cost more than the statistics' sums themselves on small maps with many channels.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> shifts(const DualInput& in, const scalar_t* x) {
  const int64_t C = in.channels, inner = in.inner;
  const int64_t total = in.outer * inner, n = shift_sample_size(total);
  std::vector<double> sums(C, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* sample = x + shift_sample_index(j, n, total, 0, C, inner);  // channel 0's
    for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<double>(sample[c * inner]);
  }
  std::vector<acc_t> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(shift_from_sample_sum(sums[c], n));
  return k;
}

// The block partials of the shifted sums (see stats_kernel) of blocks [b0, b1), each block's
// sums laid out (2 + 2T, C) in part. One task's work in one dispatched call: the loops over rows,
// channels and spans are compiled for each instruction set with the sums inlined.
// By planes, every (quantity, channel) keeps kLanes partials; by rows (by_rows), every
// (quantity, position c·inner + i of a row) keeps one, the inner loops running over a whole
// row's contiguous values.
// A partial moves into a double sum before it has taken more than kValuesPerFlush values
// (after each chunk of a large NCHW plane, every rows_per_flush rows of smaller planes, every
// kValuesPerFlush rows by rows, and at the block's end).
template <typename scalar_t, typename tangent_t, typename acc_t>
struct BlockSums {
  const scalar_t* x;
  const tangent_t* xt;
  int64_t outer, C, inner, T, slot, rows_per_block;
  bool rows;
  const acc_t* k;  // the shifts: one per channel by planes, one per position by rows
  double* part;

  FGK_CPU_KERNEL void run(int64_t b0, int64_t b1) const {
    const int64_t quantities = 2 + 2 * T, row_width = C * inner;
    const int64_t per_channel = rows ? inner : kLanes;  // partials per (quantity, channel)
    std::vector<acc_t> acc(quantities * C * per_channel);
    auto partials = [&](int64_t q, int64_t c) { return acc.data() + (q * C + c) * per_channel; };
    // Moves the partials of every quantity of channels [c0, c1) into the block's double sums
    // (one loop that also clears them: a fill per channel would be a call per channel).
    auto flush = [&](double* sums, int64_t c0, int64_t c1) {
      for (int64_t q = 0; q < quantities; ++q) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t* p = partials(q, c);
          double sum = 0;
          for (int64_t l = 0; l < per_channel; ++l) {
            sum += p[l];
            p[l] = acc_t(0);
          }
          sums[q * C + c] += sum;
        }
      }
    };
    // By planes, a plane larger than a chunk flushes after each chunk of it; planes no larger
    // (a lane takes at most ceil(inner / kLanes) values of each plane) are summed over
    // rows_per_flush rows between flushes: flushing after every plane would cost a small map
    // more than its sums.
    const int64_t chunk = kValuesPerFlush * kLanes;
    const int64_t rows_per_flush =
        rows ? kValuesPerFlush
                : std::max<int64_t>(1, kValuesPerFlush / ((inner + kLanes - 1) / kLanes));
    for (int64_t b = b0; b < b1; ++b) {
      double* sums = part + b * quantities * C;
      std::fill(sums, sums + quantities * C, 0.0);
      const int64_t r0 = b * rows_per_block, r1 = std::min(outer, (b + 1) * rows_per_block);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = r * row_width;
        if (rows) {
          row_sums(x + row, k, row_width, partials(0, 0), partials(1, 0));
          for (int64_t t = 0; t < T; ++t) {
            row_tangent_sums(x + row, xt + t * slot + row, k, row_width, partials(2 + 2 * t, 0),
                             partials(3 + 2 * t, 0));
          }
        } else {  // C contiguous planes of `inner` values
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t i0 = 0; i0 < inner; i0 += chunk) {
              const int64_t base = row + c * inner + i0, n = std::min(chunk, inner - i0);
              span_sums(x + base, n, k[c], partials(0, c), partials(1, c));
              for (int64_t t = 0; t < T; ++t) {
                span_tangent_sums(x + base, xt + t * slot + base, n, k[c], partials(2 + 2 * t, c),
                                  partials(3 + 2 * t, c));
              }
              if (inner > chunk) flush(sums, c, c + 1);
            }
          }
        }
        if (inner <= chunk && ((r - r0 + 1) % rows_per_flush == 0 || r + 1 == r1)) {
          flush(sums, 0, C);
        }
      }
    }
  }
};

// Shifted sums per channel (see finalize_bn_stats_channel; the shift k from shifts()): keeps
// Σ(x-k)² free of the cancellation that Σx² - (Σx)²/n suffers when |mean| >> std.
// Blocks of outer rows run in parallel (BlockSums), each walking its memory in order (a whole
// row of channels at a time); the blocks' sums are added in double, and the statistics made of
// them in one loop over the channels (a few ATen ops would cost a small input more than its
// sums do). The slots may have a narrower type than x (tangent_t); partials are in x's opmath
// type.
template <typename scalar_t, typename tangent_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_kernel(const DualInput& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = in.channels, inner = in.inner, T = in.T;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const bool rows = by_rows(inner);
  // A block covers at least 16384 values, and at least 16 values per partial, so that moving
  // its partials into double costs little beside summing them.
  const int64_t min_rows = rows ? 16 : (16 * kLanes + inner - 1) / inner;
  const int64_t rows_per_block = std::max<int64_t>({int64_t(1), 16384 / (C * inner), min_rows});
  const int64_t blocks = (in.outer + rows_per_block - 1) / rows_per_block;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (rows_per_block * C * inner));
  auto partial = at::empty({blocks, 2 + 2 * T, C}, at::kDouble);
  const std::vector<acc_t> k = shifts<scalar_t, acc_t>(in, x);
  // By rows of NCHW's small planes: each channel's shift at each of its positions.
  const bool spread = rows && inner > 1;
  const std::vector<acc_t> k_by_position =
      spread ? spread_over_positions(k.data(), C, inner) : std::vector<acc_t>();
  const BlockSums<scalar_t, tangent_t, acc_t> sums{
      x, T ? in.xt.const_data_ptr<tangent_t>() : nullptr, in.outer, C, inner, T, in.x.numel(),
      rows_per_block, rows, spread ? k_by_position.data() : k.data(),
      partial.data_ptr<double>()};
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { sums.run(b0, b1); });
  return stats_from_partials<acc_t>(in, k, partial.data_ptr<double>(), blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_bn_stats_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in) {
  TORCH_CHECK(x_in.numel() > 0, "dual_bn_stats: x must not be empty, got shape ", x_in.sizes());
  const DualInput in = prepare_input(x_in, xt_in);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats;
  dispatch_dual_types(in.x.scalar_type(), in.tangent_type, "dual_bn_stats", [&](auto p, auto t) {
    stats = stats_kernel<typename decltype(p)::type, typename decltype(t)::type>(in);
  });
  return stats;
}

// With u = x - m (m: the per-channel center), y = s u + h (ReLU optional) and
// yt[t] = s xt[slot[t]] + b[t] u + d[t]; with ReLU, y = 0 and yt = 0 where y <= 0 (a NaN y keeps
// its tangent, as torch.relu's derivative does). Centering first keeps y exact when |m| >> std.
// Coefficients are in the accumulation type (x's opmath type); the slots may have a narrower
// type than x (tangent_t), their terms are computed in acc_t and rounded once. One span at a
// time, every slot first and the primal last, so that every inner loop is a branch-free pass over
// contiguous memory and the apply may run in place (y = x, yt = xt, slot[t] = t): each element
// is read before it is written.
template <typename scalar_t, typename tangent_t, typename acc_t>
struct ApplySpan {
  const scalar_t* x;
  const tangent_t* xt;
  const int64_t* x_slot;  // nullptr: slot t continues input slot t
  int64_t T, slot, C;
  const acc_t *center, *scale, *shift, *t_xscale, *t_shift;
  bool relu;
  scalar_t* y;
  tangent_t* yt;

  int64_t source(int64_t t) const { return x_slot ? x_slot[t] : t; }

  scalar_t primal(acc_t v) const {
    return static_cast<scalar_t>(relu && v <= acc_t(0) ? acc_t(0) : v);
  }
  tangent_t tangent(acc_t pre, acc_t v) const {
    return static_cast<tangent_t>(relu && pre <= acc_t(0) ? acc_t(0) : v);
  }

  // NCHW: the n plane [base, base + n) of channel c; the coefficients are scalars.
  void plane(int64_t base, int64_t n, int64_t c) const {
    const scalar_t* xs = x + base;
    const acc_t m = center[c], s = scale[c], h = shift[c];
    for (int64_t t = 0; t < T; ++t) {
      const acc_t b = t_xscale[t * C + c], d = t_shift[t * C + c];
      tangent_t* out = yt + t * slot + base;
      if (source(t) >= 0) {
        const tangent_t* ts = xt + source(t) * slot + base;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t u = static_cast<acc_t>(xs[i]) - m;
          out[i] = tangent(s * u + h, s * static_cast<acc_t>(ts[i]) + b * u + d);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const acc_t u = static_cast<acc_t>(xs[i]) - m;
          out[i] = tangent(s * u + h, b * u + d);
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) y[base + i] = primal(s * (static_cast<acc_t>(xs[i]) - m) + h);
  }

  // By rows: the row of C values at base, each with coefficients of its own (C: the channels
  // of a channels_last input, or the positions of an NCHW row of small planes).
  void row(int64_t base) const {
    const scalar_t* xs = x + base;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* b = t_xscale + t * C;
      const acc_t* d = t_shift + t * C;
      tangent_t* out = yt + t * slot + base;
      const tangent_t* ts = source(t) >= 0 ? xt + source(t) * slot + base : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t u = static_cast<acc_t>(xs[c]) - center[c];
        const acc_t from_x = ts ? scale[c] * static_cast<acc_t>(ts[c]) : acc_t(0);
        out[c] = tangent(scale[c] * u + shift[c], from_x + b[c] * u + d[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c)
      y[base + c] = primal(scale[c] * (static_cast<acc_t>(xs[c]) - center[c]) + shift[c]);
  }

  // One task's planes [p0, p1) of `inner` values (plane p: channel p % C) or rows [p0, p1), in
  // one dispatched call: the loops are compiled for each instruction set with the spans inlined.
  FGK_CPU_KERNEL void planes(int64_t p0, int64_t p1, int64_t inner) const {
    for (int64_t p = p0; p < p1; ++p) plane(p * inner, inner, p % C);
  }
  FGK_CPU_KERNEL void rows(int64_t r0, int64_t r1) const {
    for (int64_t r = r0; r < r1; ++r) row(r * C);
  }
};

// The coefficients of the apply, in the accumulation type.
struct ApplyCoefficients {
  const at::Tensor &center, &scale, &shift, &t_xscale, &t_shift;
};

// Runs the spans over x's layout, in parallel, by planes or by rows (by_rows; for NCHW's small
// planes the coefficients are spread over each row's positions c·inner + i).
template <typename scalar_t, typename tangent_t>
void run_apply(const DualInput& in, const int64_t* x_slot, int64_t T,
               const ApplyCoefficients& coef, bool relu, at::Tensor& y, at::Tensor& yt) {
  using acc_t = at::opmath_type<scalar_t>;
  if (in.x.numel() == 0) return;
  const auto acc = in.x.options().dtype(acc_type(in.x));
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor m = as_acc(coef.center), s = as_acc(coef.scale), h = as_acc(coef.shift),
                   b = as_acc(coef.t_xscale), d = as_acc(coef.t_shift);
  const int64_t C = in.channels, inner = in.inner;
  const bool rows = by_rows(inner);
  // By rows of NCHW's small planes, each coefficient at each of its channel's positions.
  std::vector<acc_t> spread[5];
  auto by_position = [&](const at::Tensor& t, std::vector<acc_t>& out) {
    if (!rows || inner == 1) return t.const_data_ptr<acc_t>();
    out = spread_over_positions(t.const_data_ptr<acc_t>(), t.numel(), inner);
    return static_cast<const acc_t*>(out.data());
  };
  const int64_t width = C * inner;
  const ApplySpan<scalar_t, tangent_t, acc_t> span{
      in.x.const_data_ptr<scalar_t>(), in.T ? in.xt.const_data_ptr<tangent_t>() : nullptr,
      x_slot, T, in.x.numel(), rows ? width : C, by_position(m, spread[0]),
      by_position(s, spread[1]), by_position(h, spread[2]), by_position(b, spread[3]),
      by_position(d, spread[4]), relu, y.mutable_data_ptr<scalar_t>(),
      T ? yt.mutable_data_ptr<tangent_t>() : nullptr};
  if (rows) {
    at::parallel_for(0, in.outer, std::max<int64_t>(1, kGrainElements / width),
                     [&](int64_t r0, int64_t r1) { span.rows(r0, r1); });
  } else {
    at::parallel_for(0, in.outer * C, std::max<int64_t>(1, kGrainElements / inner),
                     [&](int64_t p0, int64_t p1) { span.planes(p0, p1, inner); });
  }
}

std::tuple<at::Tensor, at::Tensor> dual_bn_apply_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xt_in, at::IntArrayRef x_slot,
    const at::Tensor& center, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& t_xscale, const at::Tensor& t_shift, bool relu,
    std::optional<at::ScalarType> tangent_dtype) {
  const DualInput in = prepare_input(x_in, xt_in);
  check_apply_args(in, x_slot, center, scale, shift, t_xscale, t_shift);
  const int64_t T = static_cast<int64_t>(x_slot.size());
  const at::ScalarType out_type = output_tangent_type(in, tangent_dtype);
  auto [y, yt] = apply_outputs(in, T, out_type);
  dispatch_dual_types(in.x.scalar_type(), out_type, "dual_bn_apply", [&](auto p, auto t) {
    run_apply<typename decltype(p)::type, typename decltype(t)::type>(
        in, x_slot.data(), T, {center, scale, shift, t_xscale, t_shift}, relu, y, yt);
  });
  return {y, yt};
}

void dual_bn_apply_inplace_cpu(at::Tensor& x, const std::optional<at::Tensor>& xt,
                               const at::Tensor& center, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& t_xscale,
                               const at::Tensor& t_shift, bool relu) {
  const DualInput in = prepare_inplace(x, xt);
  const std::vector<int64_t> identity = identity_slots(in.T);
  check_apply_args(in, identity, center, scale, shift, t_xscale, t_shift);
  check_apply_coefficients_apart(x, xt, center, scale, shift, t_xscale, t_shift);
  at::Tensor yt = in.T ? in.xt : at::Tensor();
  dispatch_dual_types(x.scalar_type(), in.tangent_type, "dual_bn_apply_", [&](auto p, auto t) {
    run_apply<typename decltype(p)::type, typename decltype(t)::type>(
        in, nullptr, in.T, {center, scale, shift, t_xscale, t_shift}, relu, x, yt);
  });
}

// Reads dual_bn_coefficients' per-channel arguments for bn_coefficients_channel, each converted
// to the accumulation type and made contiguous first (undefined: not given).
template <typename acc_t>
struct ContiguousChannelArgs {
  const acc_t *v, *w, *b, *wt, *bt, *tm, *tc;
  int64_t C;
  bool has_weight, has_bias, has_weight_t, has_bias_t, from_batch;
  acc_t var(int64_t c) const { return v[c]; }
  acc_t weight(int64_t c) const { return w[c]; }
  acc_t bias(int64_t c) const { return b[c]; }
  acc_t weight_t(int64_t p, int64_t c) const { return wt[p * C + c]; }
  acc_t bias_t(int64_t p, int64_t c) const { return bt[p * C + c]; }
  acc_t tmean(int64_t s, int64_t c) const { return tm[s * C + c]; }
  acc_t tcov(int64_t s, int64_t c) const { return tc[s * C + c]; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_bn_coefficients_cpu(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& tmean,
    const std::optional<at::Tensor>& tcov, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& weight_t, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_t, at::IntArrayRef x_pos, at::IntArrayRef p_pos,
    int64_t count, bool training, double eps) {
  const bool from_batch = check_coefficients_args(mean, var, tmean, tcov, weight, weight_t, bias,
                                                  bias_t, x_pos, p_pos, count, training);
  const at::ScalarType acc = mean.scalar_type();
  const int64_t C = mean.size(0);
  auto as_acc = [&](const std::optional<at::Tensor>& t, bool used = true) {
    return used && present(t) ? t->to(acc).contiguous() : at::Tensor();
  };
  const at::Tensor v = var.to(acc).contiguous(), w = as_acc(weight), b = as_acc(bias),
                   wt = as_acc(weight_t), bt = as_acc(bias_t), tm = as_acc(tmean, from_batch),
                   tc = as_acc(tcov, from_batch);
  const auto options = mean.options().dtype(acc);
  at::Tensor scale = at::empty({C}, options), shift = at::empty({C}, options);
  at::Tensor t_xscale = at::empty({count, C}, options), t_shift = at::empty({count, C}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "dual_bn_coefficients", [&] {
    using acc_t = scalar_t;
    auto data = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    };
    const ContiguousChannelArgs<acc_t> in{
        data(v), data(w), data(b), data(wt), data(bt), data(tm), data(tc), C, w.defined(),
        b.defined(), wt.defined(), bt.defined(), from_batch};
    for (int64_t c = 0; c < C; ++c) {
      bn_coefficients_channel(in, c, C, x_pos.data(), static_cast<int64_t>(x_pos.size()),
                              p_pos.data(), static_cast<int64_t>(p_pos.size()), count,
                              static_cast<acc_t>(eps), scale.mutable_data_ptr<acc_t>(),
                              shift.mutable_data_ptr<acc_t>(), t_xscale.mutable_data_ptr<acc_t>(),
                              t_shift.mutable_data_ptr<acc_t>());
    }
  });
  return {scale, shift, t_xscale, t_shift};
}

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t n,
                                 double momentum) {
  check_running_stats_args(running_mean, running_var, mean, var, n);
  const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  const double* pm = m.const_data_ptr<double>();
  const double* pv = v.const_data_ptr<double>();
  const double unbias = static_cast<double>(n) / static_cast<double>(n - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(),
                                  "bn_update_running_stats_", [&] {
    // Strided access: the buffers are updated where they are. A narrower dtype is reached
    // through float32 (c10's conversions), as torch casts a float64 tensor.
    auto rm = running_mean.accessor<scalar_t, 1>();
    auto rv = running_var.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < mean.size(0); ++c) {
      double new_mean = static_cast<double>(rm[c]), new_var = static_cast<double>(rv[c]);
      bn_running_stats_channel(pm[c], pv[c], unbias, momentum, new_mean, new_var);
      rm[c] = static_cast<scalar_t>(new_mean);
      rv[c] = static_cast<scalar_t>(new_var);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CPU, m) {
  m.impl("dual_bn_stats", &dual_bn_stats_cpu);
  m.impl("dual_bn_coefficients", &dual_bn_coefficients_cpu);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_cpu);
  m.impl("dual_bn_apply", &dual_bn_apply_cpu);
  m.impl("dual_bn_apply_", &dual_bn_apply_inplace_cpu);
}

}  // namespace fgkernels
