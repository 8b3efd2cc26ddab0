// The batch-norm statistics of one channel from partial sums of values shifted by k: the last
// step of dual_bn_stats, the same function on the CPU and in the CUDA finalize kernel, so that
// both backends compute the same numbers from their sums. No torch header: nvcc compiles it
// alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FGK_HOST_DEVICE __host__ __device__
#else
#define FGK_HOST_DEVICE
#endif

namespace fgkernels {

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
    tcov[t * C + c] = static_cast<acc_t>(t_cov - d1 * t_mean);
  }
}

}  // namespace fgkernels
