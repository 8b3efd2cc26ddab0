// Plain interface of the batch-norm CUDA kernels: params structs and launchers, no torch types,
// so that their .cu file compiles with nvcc alone (the elementwise ops, select_op.cuh, are one
// file each: kernel and registration). Launchers return the CUDA error code of the launch (0: ok).
#pragma once

#include <cstdint>

namespace fgkernels {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };
// Every params struct names the primal's dtype and the tangent slots' (the primal's own, or a
// floating dtype of fewer bits: bfloat16/float16 slots of float32 primals, float32 of float64).

constexpr int kMaxSlots = 64;

// How many values one split of dual_bn_stats covers, so that each thread adds about 16 values
// serially: an NCHW block is 256 threads on one channel, a channels_last block 8 rows at a time
// of 32 channels. (NCHW splits stop at 1024: past 4M values per channel a thread adds
// count / 262144 values, sums shifted near the mean.)
constexpr int64_t kStatsSplitElements = 256 * 16;
constexpr int64_t kStatsSplitRowsChannelsLast = 8 * 16;

// The primal viewed as [outer, C, inner], contiguous (NCHW: (N, C, H*W); channels_last:
// (N*H*W, C, 1)); tangent slots follow each other, each laid out like x.
struct Layout {
  int64_t outer, channels, inner;
};

// The batch-norm statistics in three kernels: each channel's shift k, per-split partial sums
// shifted by k,
//   partial[s][0][c] = Σ(x-k), partial[s][1][c] = Σ(x-k)², and for slot t
//   partial[s][2+2t][c] = Σ xt_t, partial[s][3+2t][c] = Σ (x-k) xt_t,
// then, per channel, the statistics from them (finalize_bn_stats_channel). Accumulation type
// (partial, shift and the four outputs): double for double inputs, float otherwise.
struct BNStatsParams {
  const void* x;
  const void* xt;     // nullptr when slots == 0
  void* shift;        // [C]: the sums' shift k (kShiftSample), written by the launch first
  void* partial;      // [splits, 2 + 2 * slots, C]: workspace
  void* mean;         // [C]
  void* var;          // [C]: biased
  void* tmean;        // [slots, C]: mean(xt_t)
  void* tcov;         // [slots, C]: mean((x - mean) xt_t)
  Layout layout;
  int64_t slots, splits;
  DType dtype, tangent_dtype;
};

// With u = x - center[c]: y = scale[c] u + shift[c] (ReLU optional); for output slot t:
//   yt[t] = scale[c] xt[x_slot[t]] (if x_slot[t] >= 0) + t_xscale[t][c] u + t_shift[t][c];
// with ReLU, y and yt are 0 where y <= 0. Coefficients in the accumulation type.
struct BNApplyParams {
  const void* x;
  const void* xt;
  void* y;
  void* yt;
  const void* center;
  const void* scale;
  const void* shift;
  const void* t_xscale;
  const void* t_shift;
  int32_t x_slot[kMaxSlots];
  Layout layout;
  int64_t out_slots;
  bool relu;
  DType dtype, tangent_dtype;
};

// A per-channel tensor of shape (rows, C) or (C), read where it is, in its own dtype: element
// (row, c) at data + row * row_stride + c * stride (in elements). data is nullptr when absent.
struct ChannelValues {
  const void* data;
  int64_t row_stride, stride;
  DType dtype;
};

// dual_bn_coefficients (bn_coefficients_channel, one thread per channel): scale, shift (C) and
// t_xscale, t_shift (count, C), contiguous, in the accumulation type acc (float or double).
struct BNCoefficientsParams {
  ChannelValues var, weight, bias, weight_t, bias_t, tmean, tcov;
  void* scale;
  void* shift;
  void* t_xscale;
  void* t_shift;
  int32_t x_pos[kMaxSlots];
  int32_t p_pos[kMaxSlots];
  int64_t channels, x_slots, p_slots, count;
  bool from_batch;
  double eps;
  DType acc;
};

// bn_update_running_stats_ (bn_running_stats_channel, one thread per channel): the buffers
// updated in place, in their dtype (buffer_dtype) with their strides; mean and var read as
// double; unbias = n / (n - 1).
struct BNRunningStatsParams {
  void* running_mean;
  void* running_var;
  int64_t running_mean_stride, running_var_stride;
  DType buffer_dtype;
  ChannelValues mean, var;
  int64_t channels;
  double momentum, unbias;
};

int launch_bn_stats(const BNStatsParams& p, void* stream);
int launch_bn_coefficients(const BNCoefficientsParams& p, void* stream);
int launch_bn_running_stats(const BNRunningStatsParams& p, void* stream);
int launch_bn_apply(const BNApplyParams& p, void* stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace fgkernels
