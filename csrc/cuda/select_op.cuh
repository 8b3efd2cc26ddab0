// A dual select op on CUDA (see csrc/cpu/select_op.h): y = op.primal(x), and for every slot
// yt[t] = op.keep(x) ? xt[t] : 0, one thread per element of x writing the primal and every
// slot. An op file registers dual_select_cuda<Op> of its rule (csrc/select_ops.h) as its CUDA
// kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <tuple>

#include "../checks.h"
#include "dispatch.cuh"
#include "launch.h"

namespace fgkernels {
namespace cuda {

// An op's argument in its primal's element type, rounded as torch's Scalar::to<T> rounds it
// (through float for the 16-bit types).
template <typename T>
T narrow(double v) { return static_cast<T>(v); }
template <>
inline __nv_bfloat16 narrow<__nv_bfloat16>(double v) {
  return __float2bfloat16(static_cast<float>(v));
}
template <>
inline __half narrow<__half>(double v) { return __float2half(static_cast<float>(v)); }

// Slot t of xt and yt at offset t * numel. TT{} is a zero of every element type.
template <typename Op, typename TT>
__global__ void select_kernel(const Op op, const typename Op::scalar_t* __restrict__ x,
                              const TT* __restrict__ xt, typename Op::scalar_t* __restrict__ y,
                              TT* __restrict__ yt, int64_t numel, int64_t slots) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    const auto v = x[i];
    y[i] = op.primal(v);
    const bool keep = op.keep(v);
    for (int64_t t = 0; t < slots; ++t) yt[t * numel + i] = keep ? xt[t * numel + i] : TT{};
  }
}

}  // namespace cuda

// The op on (x, xt): y in x's kernel format, yt stacked in it, of xt's dtype. `make_op(p)`
// builds the Op of the primal element type of `p` (a value of that type) from the op's
// arguments.
template <template <typename> class Op, typename MakeOp>
std::tuple<at::Tensor, at::Tensor> dual_select_cuda(const at::Tensor& x_in,
                                                    const at::Tensor& xt_in, const char* name,
                                                    MakeOp&& make_op) {
  const int64_t T = check_tangent(x_in, xt_in, "xt");
  c10::DeviceGuard guard(x_in.device());
  const auto fmt = kernel_format(x_in);
  const auto x = in_format(x_in, fmt);
  const auto xt = slots_in_format(xt_in, fmt);
  auto y = at::empty_like(x);
  auto yt = empty_slots(T, x, fmt, xt.scalar_type());
  const int64_t n = x.numel();
  if (n == 0) return {y, yt};
  const auto stream = static_cast<cudaStream_t>(current_stream(x));
  const int err = cuda::dispatch_dual(
      dtype_of(x.scalar_type()), dtype_of(xt.scalar_type()), [&](auto p, auto t) {
        using P = decltype(p);
        using TT = decltype(t);
        constexpr int threads = 256;
        const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535 * 8);
        cuda::select_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
            Op<P>(make_op(p)), static_cast<const P*>(x.const_data_ptr()),
            static_cast<const TT*>(xt.const_data_ptr()), static_cast<P*>(y.mutable_data_ptr()),
            static_cast<TT*>(yt.mutable_data_ptr()), n, T);
        return static_cast<int>(cudaGetLastError());
      });
  FGK_CHECK_LAUNCH(err, name);
  return {y, yt};
}

}  // namespace fgkernels
