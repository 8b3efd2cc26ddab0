// Dual ReLU on CUDA: y = max(x, 0), yt = xt where x > 0 or x is NaN, else 0 (torch.relu's
// derivative).
#include <torch/library.h>

#include "select_op.cuh"

namespace fgkernels {
namespace {

// !(x <= 0) keeps a NaN in the primal, as torch.relu does, and its tangent, as torch.relu's
// derivative does.
template <typename T>
struct Relu {
  using scalar_t = T;
  __device__ bool keep(T x) const { return !(cuda::wide(x) <= 0); }
  __device__ T primal(T x) const { return keep(x) ? x : T{}; }
};

std::tuple<at::Tensor, at::Tensor> dual_relu_cuda(const at::Tensor& x, const at::Tensor& xt) {
  return dual_select_cuda<Relu>(x, xt, "dual_relu", [](auto p) { return Relu<decltype(p)>{}; });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) { m.impl("dual_relu", &dual_relu_cuda); }

}  // namespace fgkernels
