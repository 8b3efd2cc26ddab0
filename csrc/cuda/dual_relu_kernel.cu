// Dual ReLU on CUDA: one thread per element of x, writing the primal and every tangent slot.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dispatch.cuh"

namespace fgkernels {
namespace cuda {
namespace {

// !(v <= 0): true for a positive v and for a NaN.
template <typename T> __device__ __forceinline__ bool not_le_zero(T v) { return !(v <= T(0)); }
template <> __device__ __forceinline__ bool not_le_zero(__nv_bfloat16 v) {
  return !(__bfloat162float(v) <= 0.f);
}
template <> __device__ __forceinline__ bool not_le_zero(__half v) {
  return !(__half2float(v) <= 0.f);
}

// T: the primal's element type, TT: the slots'.
template <typename T, typename TT>
__global__ void relu_kernel(ReluParams p) {
  const T* x = static_cast<const T*>(p.x);
  const TT* xt = static_cast<const TT*>(p.xt);
  T* y = static_cast<T*>(p.y);
  TT* yt = static_cast<TT*>(p.yt);
  const T zero = T(0);
  const TT tzero = TT(0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    // A NaN stays in the primal and keeps its tangent, as in torch.relu and its derivative.
    const bool keep = not_le_zero(x[i]);
    y[i] = keep ? x[i] : zero;
    for (int64_t t = 0; t < p.slots; ++t) yt[t * p.numel + i] = keep ? xt[t * p.numel + i] : tzero;
  }
}

template <typename T, typename TT>
int relu(const ReluParams& p, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = (p.numel + threads - 1) / threads;
  relu_kernel<T, TT><<<(unsigned)(blocks < 65535 * 8 ? blocks : 65535 * 8), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int launch_relu(const ReluParams& p, void* stream) {
  return dispatch_dual(p.dtype, p.tangent_dtype, [&](auto primal, auto tangent) {
    return relu<decltype(primal), decltype(tangent)>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace fgkernels
