// Argument checks shared by the op implementations: each message names the argument and what
// was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/StringUtil.h>

#include <initializer_list>
#include <optional>
#include <unordered_set>

// t, the argument called name, must have the shape given by the remaining (int) arguments.
#define FGK_CHECK_SHAPE(t, name, ...)                                                 \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), name " must have shape ", \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

namespace fgkernels {

// An optional tensor argument that was given (and is not an undefined tensor).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A tangent's dtype is its primal's, or one of fewer bits of the same kind (bfloat16 or float16
// tangents of a float32 primal, complex64 of complex128; dual/dtypes.py): tangent terms are
// computed in it, accumulations in the primal's accumulation type.
inline bool tangent_dtype_fits(at::ScalarType primal, at::ScalarType tangent) {
  if (tangent == primal) return true;
  const bool same_kind = at::isComplexType(primal)
                             ? at::isComplexType(tangent)
                             : at::isFloatingType(primal) && at::isFloatingType(tangent);
  return same_kind && at::elementSize(tangent) < at::elementSize(primal);
}

inline void check_tangent_dtype(at::ScalarType primal, at::ScalarType tangent, const char* name) {
  TORCH_CHECK(tangent_dtype_fits(primal, tangent), name, " must have dtype ", primal,
              " or one of fewer bits of the same kind, got ", tangent);
}

// A layer's primal must be floating or complex: forward mode has no tangent of integers (the
// composite ops would otherwise run torch's integer kernels and return integer "tangents").
inline void check_differentiable(const at::Tensor& x, const char* name) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) || at::isComplexType(x.scalar_type()), name,
              " must be a floating or complex tensor, got ", x.scalar_type());
}

// xt must stack tangents of x: shape (T, *x.shape), T >= 1, a dtype that fits x's
// (tangent_dtype_fits), x's device.
inline int64_t check_tangent(const at::Tensor& x, const at::Tensor& xt, const char* name) {
  TORCH_CHECK(xt.dim() == x.dim() + 1 && xt.sizes().slice(1) == x.sizes(), name,
              " must have shape (T, ", c10::Join(", ", x.sizes()), "), got ", xt.sizes());
  TORCH_CHECK(xt.size(0) >= 1, name, ": a stack of T tangents needs T >= 1, got T = 0");
  check_tangent_dtype(x.scalar_type(), xt.scalar_type(), name);
  TORCH_CHECK(xt.device() == x.device(), name, " must be on ", x.device(), ", got ",
              xt.device());
  return xt.size(0);
}

// The tangents of one call (any of them absent) share one dtype, which fits the primal's: that
// dtype, or x's when there is none.
inline at::ScalarType tangent_type(
    const at::Tensor& x, std::initializer_list<const std::optional<at::Tensor>*> tangents) {
  std::optional<at::ScalarType> type;
  for (const auto* t : tangents) {
    if (!present(*t)) continue;
    TORCH_CHECK(!type || *type == (*t)->scalar_type(), "the tangents of one call must share "
                "one dtype, got ", *type, " and ", (*t)->scalar_type());
    type = (*t)->scalar_type();
  }
  return type.value_or(x.scalar_type());
}

// Whether a and b share an element. at::get_overlap_status cannot tell for a tensor that is not
// dense (TooHard); two strided 1-d tensors of one dtype over one storage (running statistics
// held as columns of one buffer) are compared element by element.
inline bool share_an_element(const at::Tensor& a, const at::Tensor& b) {
  const auto overlap = at::get_overlap_status(a, b);
  if (overlap != at::MemOverlapStatus::TooHard) return overlap != at::MemOverlapStatus::No;
  if (!a.is_alias_of(b)) return false;
  if (a.dim() != 1 || b.dim() != 1 || a.scalar_type() != b.scalar_type()) return true;
  std::unordered_set<int64_t> offsets;
  for (int64_t i = 0; i < a.size(0); ++i) offsets.insert(a.storage_offset() + i * a.stride(0));
  for (int64_t i = 0; i < b.size(0); ++i) {
    if (offsets.count(b.storage_offset() + i * b.stride(0))) return true;
  }
  return false;
}

// An op that writes `out` in place: out must not share an element with `other` (its own input),
// and, while autograd records, must not be a leaf that requires grad (as torch's in-place ops).
inline void check_writable(const at::Tensor& out, const char* name, const at::Tensor& other,
                           const char* other_name) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && out.requires_grad() && out.is_leaf()), name,
              " is a leaf tensor that requires grad and cannot be updated in place; call the op "
              "under torch.no_grad()");
  TORCH_CHECK(!share_an_element(out, other), name, " and ", other_name,
              " share memory; they must be separate tensors");
}

// The memory format the kernels use for x: channels_last when x is laid out so, else contiguous.
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// x in the kernels' format (a copy only when it is in neither).
inline at::Tensor in_format(const at::Tensor& x, at::MemoryFormat fmt) {
  return x.contiguous(fmt);
}

// Stacked tangents with every slot in format fmt: (T, N, C, H, W) whose slots are contiguous in
// fmt and follow each other. For channels_last that is a permuted view of (T, N, H, W, C).
inline at::Tensor slots_in_format(const at::Tensor& xt, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::ChannelsLast) {
    return xt.permute({0, 1, 3, 4, 2}).contiguous().permute({0, 1, 4, 2, 3});
  }
  return xt.contiguous();
}

// An uninitialised stack of T slots of dtype `dtype` shaped like x, each slot in format fmt.
inline at::Tensor empty_slots(int64_t T, const at::Tensor& x, at::MemoryFormat fmt,
                              at::ScalarType dtype) {
  const auto options = x.options().dtype(dtype);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    return at::empty({T, x.size(0), x.size(2), x.size(3), x.size(1)}, options)
        .permute({0, 1, 4, 2, 3});
  }
  std::vector<int64_t> shape{T};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  return at::empty(shape, options);
}

}  // namespace fgkernels
