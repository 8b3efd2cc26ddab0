// The per-channel steps of the dual batch norm: the shift of its sums, its statistics from
// partial sums, the coefficients of its apply and the running-statistics update. The same functions run on the
// CPU and in the CUDA kernels, so that both backends compute the same numbers. No torch header:
// nvcc compiles it alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FGK_HOST_DEVICE __host__ __device__
#else
#define FGK_HOST_DEVICE
#endif

namespace fgkernels {

// The statistics' sums run over x - k, k a channel's shift: the mean of kShiftSample of its
// values (or all, where it has fewer), spread evenly across the channel. The error of
// Σ(x-k)² - n·d1² grows with ((k - mean)/std)², so a shift near the mean keeps the variance as
// precise as the data allows. (The first values alone can be unlike the rest, image 0's top
// rows a zero border: a shift far from the mean in units of std.)
constexpr int64_t kShiftSample = 256;

// How many of a channel's `total` values its shift averages.
FGK_HOST_DEVICE inline int64_t shift_sample_size(int64_t total) {
  return total < kShiftSample ? total : kShiftSample;
}

// The index in x, laid out as [outer, C, inner] (NCHW: (N, C, H*W); channels_last:
// (N*H*W, C, 1)), of channel c's j-th sampled value of n: its position j·total/n in the
// channel's [outer, inner] order.
FGK_HOST_DEVICE inline int64_t shift_sample_index(int64_t j, int64_t n, int64_t total,
                                                  int64_t c, int64_t C, int64_t inner) {
  const int64_t position = j * total / n;
  return (position / inner * C + c) * inner + position % inner;
}

// A channel's shift from the sum of its n sampled values (in double): their mean, or 0 where
// that is not finite (an Inf among the sample: the shifted sums would give NaN where the plain
// ones give torch's Inf mean).
FGK_HOST_DEVICE inline double shift_from_sample_sum(double sum, int64_t n) {
  const double mean = sum / static_cast<double>(n);
  return std::isfinite(mean) ? mean : 0.0;
}

// Σ over the blocks of quantity q of channel c in partial (blocks, quantities, C), in double.
template <typename part_t>
FGK_HOST_DEVICE inline double sum_of_blocks(const part_t* partial, int64_t blocks,
                                            int64_t quantities, int64_t C, int64_t q,
                                            int64_t c) {
  double s = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    s += static_cast<double>(partial[(b * quantities + q) * C + c]);
  }
  return s;
}

// partial (blocks, 2 + 2T, C) holds per block the sums shifted by k (the channel's shift):
// Σ(x-k), Σ(x-k)², then for slot t Σẋ_t and Σ(x-k)·ẋ_t. Over n values, every sum in double:
//   mean = k + d1 with d1 = Σ(x-k)/n,   var = Σ(x-k)²/n - d1² (clamped at 0; a NaN stays),
//   tmean_t = Σẋ_t/n,                   tcov_t = mean((x - mean)·ẋ_t) = Σ(x-k)·ẋ_t/n - d1·tmean_t.
// A tangent mean that is not finite (an Inf or NaN among the slot's values) makes tcov NaN, as
// torch's forward mode has it: it takes mean((x - mean)·(ẋ - tmean)), NaN where ẋ is the Inf.
// Writes mean[c], var[c], tmean[t*C + c] and tcov[t*C + c], each rounded once to acc_t.
template <typename part_t, typename acc_t>
FGK_HOST_DEVICE inline void finalize_bn_stats_channel(const part_t* partial, int64_t blocks,
                                                      int64_t C, int64_t T, int64_t c, double n,
                                                      double k, acc_t* mean, acc_t* var,
                                                      acc_t* tmean, acc_t* tcov) {
  const int64_t quantities = 2 + 2 * T;
  const double d1 = sum_of_blocks(partial, blocks, quantities, C, 0, c) / n;
  const double spread = sum_of_blocks(partial, blocks, quantities, C, 1, c) / n - d1 * d1;
  mean[c] = static_cast<acc_t>(k + d1);
  var[c] = static_cast<acc_t>(spread < 0 ? 0.0 : spread);
  for (int64_t t = 0; t < T; ++t) {
    const double t_mean = sum_of_blocks(partial, blocks, quantities, C, 2 + 2 * t, c) / n;
    const double t_cov = sum_of_blocks(partial, blocks, quantities, C, 3 + 2 * t, c) / n;
    tmean[t * C + c] = static_cast<acc_t>(t_mean);
    // (t_mean - t_mean: NaN where t_mean is ±Inf or NaN)
    tcov[t * C + c] = static_cast<acc_t>(std::isfinite(t_mean) ? t_cov - d1 * t_mean
                                                               : t_mean - t_mean);
  }
}

// sqrt in acc_t (float or double), on the host and on the device.
template <typename acc_t>
FGK_HOST_DEVICE inline acc_t square_root(acc_t v) {
#if defined(__CUDA_ARCH__)
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// The coefficients of dual_bn_apply for channel c (the op's schema in csrc/fgkernels.cpp), in
// acc_t. `in` reads the per-channel arguments as acc_t, each where it is and in its own dtype:
// in.var(c), in.weight(c), in.bias(c), in.weight_t(p, c), in.bias_t(p, c), in.tmean(s, c),
// in.tcov(s, c), and says which are given (has_weight, has_bias, has_weight_t, has_bias_t,
// from_batch: training with input slots). With r = 1/sqrt(var + eps), a = weight·r (r without
// a weight):
//   scale = a, shift = bias (0 without);
//   t_xscale[x_pos[s]] = −a·r²·tcov[s],  t_shift[x_pos[s]] = −a·tmean[s]   (from_batch)
//   t_xscale[p_pos[p]] += weight_t[p]·r,  t_shift[p_pos[p]] += bias_t[p]
// Each of the count rows of t_xscale and t_shift (count, C) is written at c: 0 where no slot
// lands.
template <typename acc_t, typename Reader, typename pos_t>
FGK_HOST_DEVICE inline void bn_coefficients_channel(const Reader& in, int64_t c, int64_t C,
                                                    const pos_t* x_pos, int64_t X,
                                                    const pos_t* p_pos, int64_t P,
                                                    int64_t count, acc_t eps, acc_t* scale,
                                                    acc_t* shift, acc_t* t_xscale,
                                                    acc_t* t_shift) {
  const acc_t r = acc_t(1) / square_root(in.var(c) + eps);
  const acc_t a = in.has_weight ? in.weight(c) * r : r;
  scale[c] = a;
  shift[c] = in.has_bias ? in.bias(c) : acc_t(0);
  for (int64_t t = 0; t < count; ++t) {
    t_xscale[t * C + c] = acc_t(0);
    t_shift[t * C + c] = acc_t(0);
  }
  for (int64_t s = 0; in.from_batch && s < X; ++s) {  // γẋ̂ = a(ẋ − m1 − x̂·r·cov)
    t_xscale[x_pos[s] * C + c] += -a * r * r * in.tcov(s, c);
    t_shift[x_pos[s] * C + c] += -a * in.tmean(s, c);
  }
  for (int64_t p = 0; p < P; ++p) {  // γ̇x̂ + β̇
    if (in.has_weight_t) t_xscale[p_pos[p] * C + c] += in.weight_t(p, c) * r;
    if (in.has_bias_t) t_shift[p_pos[p] * C + c] += in.bias_t(p, c);
  }
}

// nn.BatchNorm2d's update of one channel's running statistics, in double: with momentum m,
//   running_mean ← m·mean + (1 − m)·running_mean,
//   running_var  ← m·var·unbias + (1 − m)·running_var   (unbias = n/(n − 1): the unbiased
//                                                          variance from the biased one).
// The caller rounds the results once to the buffers' dtype.
FGK_HOST_DEVICE inline void bn_running_stats_channel(double mean, double var, double unbias,
                                                     double momentum, double& running_mean,
                                                     double& running_var) {
  running_mean = momentum * mean + (1 - momentum) * running_mean;
  running_var = momentum * (var * unbias) + (1 - momentum) * running_var;
}

}  // namespace fgkernels
