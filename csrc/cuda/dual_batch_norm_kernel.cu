// Dual batch norm on CUDA: a shift kernel, a statistics kernel writing per-split partial sums
// shifted by it, a finalize kernel reducing them to the statistics, per-channel kernels for the
// apply's coefficients and the running statistics, and an apply kernel writing the primal and
// every tangent slot in one pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../bn_per_channel.h"
#include "dispatch.cuh"

namespace fgkernels {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) {
  return static_cast<typename Acc<T>::type>(*p);
}
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <> __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }

template <typename T, typename A> __device__ __forceinline__ T store_as(A v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 store_as(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half store_as(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as(double v) {
  return __double2bfloat16(v);
}
template <> __device__ __forceinline__ __half store_as(double v) { return __double2half(v); }

constexpr int kThreads = 256;

// Sum of v over the block; every thread gets the result.
template <typename A> __device__ A block_sum(A v, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  return total;
}

// grid (C): each channel's shift of the sums, the mean of its sample (shift_sample_index), one
// sampled value per thread, summed in double as the CPU op sums them.
static_assert(kShiftSample <= kThreads, "a block's threads cover a channel's sample");

template <typename T>
__global__ void bn_shift_kernel(BNStatsParams p) {
  using A = typename Acc<T>::type;
  __shared__ double scratch[kThreads / 32];
  const int64_t c = blockIdx.x, C = p.layout.channels;
  const int64_t total = p.layout.outer * p.layout.inner, n = shift_sample_size(total);
  const int64_t j = threadIdx.x;
  const T* x = static_cast<const T*>(p.x);
  const double v =
      j < n ? static_cast<double>(load(x + shift_sample_index(j, n, total, c, C, p.layout.inner)))
            : 0.0;
  const double sum = block_sum(v, scratch);
  if (threadIdx.x == 0) {
    static_cast<A*>(p.shift)[c] = static_cast<A>(shift_from_sample_sum(sum, n));
  }
}

// One element's terms of the shifted sums, d = x[idx] - k: d and d² for the primal (t null),
// else the slot's value v and d·v.
template <typename T, typename TT, typename A>
__device__ __forceinline__ void add_shifted(const T* x, const TT* t, int64_t idx, A k, A& s1,
                                            A& s2) {
  const A d = load(x + idx) - k;
  if (t == nullptr) {
    s1 += d;
    s2 += d * d;
  } else {
    const A v = static_cast<A>(load(t + idx));
    s1 += v;
    s2 += d * v;
  }
}

// grid (C, splits, 1 + slots): z = 0 sums x, z = t + 1 sums slot t against x. Each block walks
// the (outer, inner) elements of its channel in its split, consecutive threads on consecutive
// elements of a row: coalesced where rows are long (NCHW, inner = H*W). T: the primal's element
// type, TT: the slots'; sums in T's accumulation type.
template <typename T, typename TT>
__global__ void bn_stats_kernel(BNStatsParams p) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kThreads / 32];
  const int64_t c = blockIdx.x, split = blockIdx.y, z = blockIdx.z;
  const int64_t C = p.layout.channels, inner = p.layout.inner;
  const int64_t count = p.layout.outer * inner;
  const int64_t per_split = (count + p.splits - 1) / p.splits;
  const int64_t e0 = split * per_split, e1 = min(count, e0 + per_split);
  const T* x = static_cast<const T*>(p.x);
  const TT* t = z ? static_cast<const TT*>(p.xt) + (z - 1) * p.layout.outer * C * inner : nullptr;
  const A k = static_cast<const A*>(p.shift)[c];
  A s1 = 0, s2 = 0;
  for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const int64_t o = e / inner, i = e % inner;
    const int64_t idx = (o * C + c) * inner + i;
    add_shifted(x, t, idx, k, s1, s2);
  }
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    A* out = static_cast<A*>(p.partial) + split * (2 + 2 * p.slots) * C;
    out[(2 * z) * C + c] = s1;
    out[(2 * z + 1) * C + c] = s2;
  }
}

// Channels innermost (channels_last, inner = 1): the [outer, C] rows of x. A block takes
// kChannelTile channels and the rows of its split: consecutive threads on consecutive channels
// of a row (coalesced), kThreads / kChannelTile rows at a time; the partial sums of a channel's
// threads then meet in shared memory. grid (ceil(C / kChannelTile), splits, 1 + slots); the
// same sums and shift as bn_stats_kernel.
constexpr int kChannelTile = 32;
constexpr int kRowsAtOnce = kThreads / kChannelTile;
static_assert(kStatsSplitRowsChannelsLast % kRowsAtOnce == 0 && kStatsSplitElements % kThreads == 0,
              "a split covers whole rounds of the block's threads");

template <typename T, typename TT>
__global__ void bn_stats_channels_last_kernel(BNStatsParams p) {
  using A = typename Acc<T>::type;
  __shared__ A partial1[kRowsAtOnce][kChannelTile], partial2[kRowsAtOnce][kChannelTile];
  const int lane = threadIdx.x % kChannelTile, row = threadIdx.x / kChannelTile;
  const int64_t C = p.layout.channels, rows = p.layout.outer;
  const int64_t c = blockIdx.x * int64_t{kChannelTile} + lane, split = blockIdx.y, z = blockIdx.z;
  const int64_t per_split = (rows + p.splits - 1) / p.splits;
  const int64_t r0 = split * per_split, r1 = min(rows, r0 + per_split);
  const T* x = static_cast<const T*>(p.x);
  const TT* t = z ? static_cast<const TT*>(p.xt) + (z - 1) * rows * C : nullptr;
  A s1 = 0, s2 = 0;
  if (c < C) {
    const A k = static_cast<const A*>(p.shift)[c];
    for (int64_t r = r0 + row; r < r1; r += kRowsAtOnce) {
      const int64_t idx = r * C + c;
      add_shifted(x, t, idx, k, s1, s2);
    }
  }
  partial1[row][lane] = s1;
  partial2[row][lane] = s2;
  __syncthreads();
  if (row == 0 && c < C) {
    for (int r = 1; r < kRowsAtOnce; ++r) {
      s1 += partial1[r][lane];
      s2 += partial2[r][lane];
    }
    A* out = static_cast<A*>(p.partial) + split * (2 + 2 * p.slots) * C;
    out[(2 * z) * C + c] = s1;
    out[(2 * z + 1) * C + c] = s2;
  }
}

// One thread per element of x: the primal, then every output slot. x[idx] is read once before
// anything is written, so the apply may run in place (y = x, yt = xt, x_slot[t] = t). T: the
// primal's element type, TT: the slots'; every term in T's accumulation type, rounded once.
template <typename T, typename TT>
__global__ void bn_apply_kernel(BNApplyParams p) {
  using A = typename Acc<T>::type;
  const int64_t C = p.layout.channels, inner = p.layout.inner;
  const int64_t n = p.layout.outer * C * inner;
  const A* center = static_cast<const A*>(p.center);
  const A* scale = static_cast<const A*>(p.scale);
  const A* shift = static_cast<const A*>(p.shift);
  const A* bx = static_cast<const A*>(p.t_xscale);
  const A* bs = static_cast<const A*>(p.t_shift);
  const T* x = static_cast<const T*>(p.x);
  const TT* xt = static_cast<const TT*>(p.xt);
  T* y = static_cast<T*>(p.y);
  TT* yt = static_cast<TT*>(p.yt);
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = (idx / inner) % C;
    const A u = load(x + idx) - center[c];
    const A yv = scale[c] * u + shift[c];
    // A NaN y stays, with its tangent, as in torch.relu and its derivative.
    const bool keep = !(p.relu && yv <= A(0));
    y[idx] = store_as<T>(keep ? yv : A(0));
    for (int64_t t = 0; t < p.out_slots; ++t) {
      A tv = bx[t * C + c] * u + bs[t * C + c];
      if (p.x_slot[t] >= 0) tv += scale[c] * static_cast<A>(load(xt + p.x_slot[t] * n + idx));
      yt[t * n + idx] = store_as<TT>(keep ? tv : A(0));
    }
  }
}

// One thread per channel: its statistics from the splits' partial sums, in double.
template <typename A>
__global__ void bn_stats_finalize_kernel(BNStatsParams p) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= p.layout.channels) return;
  const double n = static_cast<double>(p.layout.outer * p.layout.inner);
  finalize_bn_stats_channel(static_cast<const A*>(p.partial), p.splits, p.layout.channels,
                            p.slots, c, n, static_cast<double>(static_cast<const A*>(p.shift)[c]),
                            static_cast<A*>(p.mean), static_cast<A*>(p.var),
                            static_cast<A*>(p.tmean), static_cast<A*>(p.tcov));
}

constexpr int kFinalizeThreads = 128;

// Element (row, c) of v as A (float or double), whichever dtype v holds.
template <typename A>
__device__ A read_as(const ChannelValues& v, int64_t row, int64_t c) {
  const int64_t i = row * v.row_stride + c * v.stride;
  switch (v.dtype) {
    case DType::kFloat: return static_cast<A>(static_cast<const float*>(v.data)[i]);
    case DType::kDouble: return static_cast<A>(static_cast<const double*>(v.data)[i]);
    case DType::kBFloat16:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(v.data)[i]));
    case DType::kHalf: return static_cast<A>(__half2float(static_cast<const __half*>(v.data)[i]));
  }
  return A(0);
}

// bn_coefficients_channel's view of the coefficients' arguments on the device.
template <typename A>
struct DeviceChannelArgs {
  const BNCoefficientsParams& p;
  bool has_weight, has_bias, has_weight_t, has_bias_t, from_batch;
  __device__ explicit DeviceChannelArgs(const BNCoefficientsParams& params)
      : p(params), has_weight(params.weight.data != nullptr),
        has_bias(params.bias.data != nullptr), has_weight_t(params.weight_t.data != nullptr),
        has_bias_t(params.bias_t.data != nullptr), from_batch(params.from_batch) {}
  __device__ A var(int64_t c) const { return read_as<A>(p.var, 0, c); }
  __device__ A weight(int64_t c) const { return read_as<A>(p.weight, 0, c); }
  __device__ A bias(int64_t c) const { return read_as<A>(p.bias, 0, c); }
  __device__ A weight_t(int64_t row, int64_t c) const { return read_as<A>(p.weight_t, row, c); }
  __device__ A bias_t(int64_t row, int64_t c) const { return read_as<A>(p.bias_t, row, c); }
  __device__ A tmean(int64_t row, int64_t c) const { return read_as<A>(p.tmean, row, c); }
  __device__ A tcov(int64_t row, int64_t c) const { return read_as<A>(p.tcov, row, c); }
};

// One thread per channel.
template <typename A>
__global__ void bn_coefficients_kernel(BNCoefficientsParams p) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  bn_coefficients_channel(DeviceChannelArgs<A>(p), c, p.channels, p.x_pos, p.x_slots, p.p_pos,
                          p.p_slots, p.count, static_cast<A>(p.eps), static_cast<A*>(p.scale),
                          static_cast<A*>(p.shift), static_cast<A*>(p.t_xscale),
                          static_cast<A*>(p.t_shift));
}

// A double in B as torch casts a float64 tensor to B: a narrower dtype through float32, each
// step to nearest, ties to even (as the CPU op's c10 conversions).
template <typename B> __device__ __forceinline__ B rounded_as_torch(double v) {
  return static_cast<B>(v);
}
template <> __device__ __forceinline__ float rounded_as_torch(double v) {
  return __double2float_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 rounded_as_torch(double v) {
  return __float2bfloat16_rn(__double2float_rn(v));
}
template <> __device__ __forceinline__ __half rounded_as_torch(double v) {
  return __float2half_rn(__double2float_rn(v));
}

// One thread per channel; B is the buffers' element type.
template <typename B>
__global__ void bn_running_stats_kernel(BNRunningStatsParams p) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  B* rm = static_cast<B*>(p.running_mean) + c * p.running_mean_stride;
  B* rv = static_cast<B*>(p.running_var) + c * p.running_var_stride;
  double new_mean = static_cast<double>(load(rm)), new_var = static_cast<double>(load(rv));
  bn_running_stats_channel(read_as<double>(p.mean, 0, c), read_as<double>(p.var, 0, c),
                           p.unbias, p.momentum, new_mean, new_var);
  *rm = rounded_as_torch<B>(new_mean);
  *rv = rounded_as_torch<B>(new_var);
}

// Blocks of kFinalizeThreads threads for one thread per channel.
inline unsigned channel_blocks(int64_t channels) {
  return static_cast<unsigned>((channels + kFinalizeThreads - 1) / kFinalizeThreads);
}

template <typename T, typename TT>
int stats(const BNStatsParams& p, cudaStream_t stream) {
  bn_shift_kernel<T><<<static_cast<unsigned>(p.layout.channels), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.layout.inner == 1) {
    const int64_t tiles = (p.layout.channels + kChannelTile - 1) / kChannelTile;
    dim3 grid(static_cast<unsigned>(tiles), p.splits, 1 + p.slots);
    bn_stats_channels_last_kernel<T, TT><<<grid, kThreads, 0, stream>>>(p);
  } else {
    dim3 grid(p.layout.channels, p.splits, 1 + p.slots);
    bn_stats_kernel<T, TT><<<grid, kThreads, 0, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bn_stats_finalize_kernel<typename Acc<T>::type>
      <<<channel_blocks(p.layout.channels), kFinalizeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename TT>
int apply(const BNApplyParams& p, cudaStream_t stream) {
  const int64_t n = p.layout.outer * p.layout.channels * p.layout.inner;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  bn_apply_kernel<T, TT><<<(unsigned)(blocks < 65535 * 8 ? blocks : 65535 * 8), kThreads, 0,
                       stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int launch_bn_stats(const BNStatsParams& p, void* stream) {
  return dispatch_dual(p.dtype, p.tangent_dtype, [&](auto primal, auto tangent) {
    return stats<decltype(primal), decltype(tangent)>(p, static_cast<cudaStream_t>(stream));
  });
}

int launch_bn_coefficients(const BNCoefficientsParams& p, void* stream) {
  if (p.channels == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.acc == DType::kDouble) {
    bn_coefficients_kernel<double><<<channel_blocks(p.channels), kFinalizeThreads, 0, s>>>(p);
  } else if (p.acc == DType::kFloat) {
    bn_coefficients_kernel<float><<<channel_blocks(p.channels), kFinalizeThreads, 0, s>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int launch_bn_running_stats(const BNRunningStatsParams& p, void* stream) {
  if (p.channels == 0) return 0;
  return dispatch_dtype(p.buffer_dtype, [&](auto buffer) {
    bn_running_stats_kernel<decltype(buffer)>
        <<<channel_blocks(p.channels), kFinalizeThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_bn_apply(const BNApplyParams& p, void* stream) {
  return dispatch_dual(p.dtype, p.tangent_dtype, [&](auto primal, auto tangent) {
    return apply<decltype(primal), decltype(tangent)>(p, static_cast<cudaStream_t>(stream));
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace fgkernels
