// The op schemas of fgkernels (one TORCH_LIBRARY block) and the Python module fgkernels._C.
//
// Tangents are stacked: a tangent tensor has shape (T, *x.shape), T >= 1, each slot laid out in
// the primal's memory format, of the primal's dtype or a floating dtype of fewer bits (bfloat16
// tangents of a float32 primal: their terms are computed in that dtype, sums and statistics in
// the primal's accumulation dtype). The tangents of one call share one dtype. Ops return empty
// tensors for outputs that have no terms.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

// The torch release the extension was built against (setup.py defines it), as
// fgkernels._C.TORCH_VERSION: fgkernels loads the ops only beside that release.
#define FGK_STRING(x) #x
#define FGK_STRING_OF(x) FGK_STRING(x)

extern "C" {
// Importing fgkernels._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "TORCH_VERSION", FGK_STRING_OF(FGK_TORCH_VERSION)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fgkernels, m) {
  // y = relu(x); yt = xt where x > 0 or x is NaN, else 0 (torch.relu's derivative).
  m.def("dual_relu(Tensor x, Tensor xt) -> (Tensor, Tensor)");
  // y = clamp(x, min_val, max_val); yt = xt where min_val < x < max_val or x is NaN, else 0
  // (torch's hardtanh derivative), the bounds in x's dtype.
  m.def("dual_hardtanh(Tensor x, Tensor xt, float min_val, float max_val) -> (Tensor, Tensor)");
  // Max-pool of x; yt gathered from xt at x's argmax.
  m.def("dual_max_pool2d(Tensor x, Tensor xt, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  // Batch-norm statistics over (N, H, W) per channel, in the accumulation dtype (float32 for
  // float32/bfloat16/float16 inputs, float64 for float64):
  //   mean (C), biased var (C), tangent mean mean(xt_t) (T, C), tangent covariance
  //   mean((x - mean) * xt_t) (T, C).
  m.def("dual_bn_stats(Tensor x, Tensor? xt) -> (Tensor, Tensor, Tensor, Tensor)");
  // The per-channel coefficients of dual_bn_apply from a batch norm's statistics (mean, var:
  // (C) in the accumulation dtype; tmean, tcov: (len(x_pos), C), training with input slots only)
  // and parameters (weight, bias: (C); weight_t, bias_t: (len(p_pos), C)), with
  // r = 1/sqrt(var + eps), a = weight r (r without weight):
  //   scale = a, shift = bias (0 without),
  //   t_xscale[x_pos[s]] = -a r^2 tcov[s], t_shift[x_pos[s]] = -a tmean[s]   (training)
  //   t_xscale[p_pos[p]] += weight_t[p] r,  t_shift[p_pos[p]] += bias_t[p]
  //   (a slot in neither x_pos nor p_pos gets zeros; dual_bn_apply's center is mean itself)
  //   returns scale, shift, t_xscale (count, C), t_shift (count, C) in mean's dtype.
  m.def("dual_bn_coefficients(Tensor mean, Tensor var, Tensor? tmean, Tensor? tcov, "
        "Tensor? weight, Tensor? weight_t, Tensor? bias, Tensor? bias_t, int[] x_pos, "
        "int[] p_pos, int count, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // nn.BatchNorm2d's running-statistics update from a batch of n values per channel, in float64
  // and rounded once to the buffers' dtype: r <- momentum stat + (1 - momentum) r, with the
  // unbiased variance var n / (n - 1) (n > 1).
  m.def("bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
        "Tensor var, SymInt n, float momentum) -> ()");
  // Batch-norm apply as a per-channel affine map of (x - center, xt), ReLU optional:
  //   u = x - center[c]
  //   y = scale[c] u + shift[c]
  //   yt[t] = scale[c] xt[x_slot[t]] (skipped where x_slot[t] < 0) + t_xscale[t, c] u + t_shift[t, c]
  //   with relu: y = 0 and yt[t] = 0 where y <= 0 (a NaN y keeps its tangent, as torch.relu's
  //   derivative does). yt has dtype tangent_dtype (default: xt's, or x's without xt).
  m.def("dual_bn_apply(Tensor x, Tensor? xt, int[] x_slot, Tensor center, Tensor scale, "
        "Tensor shift, Tensor t_xscale, Tensor t_shift, bool relu, ScalarType? tangent_dtype=None) "
        "-> (Tensor, Tensor)");
  // The same, in place: x becomes y and slot t of xt becomes yt[t] (x_slot[t] = t). For a
  // freshly computed input (a convolution's output) that nothing else holds.
  m.def("dual_bn_apply_(Tensor(a!) x, Tensor(b!)? xt, Tensor center, Tensor scale, Tensor shift, "
        "Tensor t_xscale, Tensor t_shift, bool relu) -> ()");
  // Dual convolution in three convolution calls whatever T and P: y; the parameter part
  // Wt*x + bt with [Wt_1, ..., Wt_P] stacked along the output channels; the input part W*xt
  // with the T slots batched along N.
  //   returns y, x_part (T, N, C_out, H_out, W_out) or empty, p_part (P, ...) or empty.
  m.def("dual_conv2d(Tensor x, Tensor? xt, Tensor weight, Tensor? weight_t, Tensor? bias, "
        "Tensor? bias_t, int[2] stride, int[2] padding, int[2] dilation, int groups) "
        "-> (Tensor, Tensor, Tensor)");
  // The tangent parts of dual_conv2d alone, for a caller that already has the primal output y
  // (y sets their shape and memory format): returns x_part, p_part as dual_conv2d does.
  m.def("dual_conv2d_tangents(Tensor x, Tensor y, Tensor? xt, Tensor weight, Tensor? weight_t, "
        "Tensor? bias_t, int[2] stride, int[2] padding, int[2] dilation, int groups) "
        "-> (Tensor, Tensor)");
  // Dual linear in three GEMMs, arranged as dual_conv2d. With sum_terms (the input's and the
  // parameters' terms fill the same output slots: T == P) x_part is their sum, the parameter
  // GEMM accumulating into the input GEMM's output, and p_part is empty.
  m.def("dual_linear(Tensor x, Tensor? xt, Tensor weight, Tensor? weight_t, Tensor? bias, "
        "Tensor? bias_t, bool sum_terms) -> (Tensor, Tensor, Tensor)");
  // Layer norm over the last len(normalized_shape) dims of x, arranged as dual_linear: y
  // (torch's), x_part = weight * d(x_hat)/dx . xt_t (T, *x.shape) and p_part = weight_t_p x_hat
  // + bias_t_p (P, *x.shape), each empty when absent; with sum_terms (T == P) x_part is their
  // sum and p_part empty. Over each row, x_hat = (x - mean) r, r = 1/sqrt(var + eps) and
  //   d(x_hat)_t = r xt_t - r mean(xt_t) - x_hat r mean(x_hat xt_t).
  m.def("dual_layer_norm(Tensor x, Tensor? xt, Tensor? weight, Tensor? weight_t, Tensor? bias, "
        "Tensor? bias_t, int[] normalized_shape, float eps, bool sum_terms) "
        "-> (Tensor, Tensor, Tensor)");
}

namespace {

// The in-place ops bump the version counters of the tensors their schema writes (Tensor(a!)),
// as torch's in-place ops do: autograd then refuses a backward through a graph that saved one
// of them. (torch's boxed fallback for this key bumps only the outputs that alias an input,
// and these ops return nothing.)
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  std::vector<at::Tensor> written;
  const auto values = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite() && values[i].isTensor()) {
      written.push_back(values[i].toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : written) {
    if (t.defined()) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, ADInplaceOrView, m) {
  m.impl("dual_bn_apply_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("bn_update_running_stats_",
         torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}
