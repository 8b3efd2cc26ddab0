// What every CUDA op's host side needs around a launch: the kernels' dtype of a tensor, the
// current stream of its device, and a check of the launch's result. Device-generic c10 headers
// only (DeviceGuard, Stream), so that it also compiles against a CPU build of torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "dual_kernels.h"

namespace fgkernels {

inline cuda::DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kHalf;
    default: TORCH_CHECK(false, "x and xt must be float32, float64, bfloat16 or float16, got ",
                         type);
  }
}

inline void* current_stream(const at::Tensor& x) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device())
      .native_handle();
}

}  // namespace fgkernels

// call returns a CUDA error code (0: the launch succeeded); name, the op's, heads the message.
#define FGK_CHECK_LAUNCH(call, name) \
  do {                                                                                   \
    const int err_ = (call);                                                             \
    TORCH_CHECK(err_ == 0, name, " kernel launch failed: ", cuda::error_string(err_)); \
  } while (0)
