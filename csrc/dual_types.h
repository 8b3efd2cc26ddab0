// The element types of a dual op on the CPU: the primal's, and the tangents' (the primal's own
// or a floating type of fewer bits, see tangent_dtype_fits).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

#include <cstdint>
#include <type_traits>

namespace fgkernels {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<primal_t>{}, TypeTag<tangent_t>{}) with the C++ types of the two dtypes.
template <typename F>
void dispatch_dual_types(at::ScalarType primal, at::ScalarType tangent, const char* name, F&& f) {
  TORCH_CHECK(at::isFloatingType(primal) && at::elementSize(primal) >= 2, name,
              ": x must be float64, float32, bfloat16 or float16, got ", primal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, primal, "fgkernels dual op", [&] {
    using primal_t = scalar_t;
    if (tangent == primal) return f(TypeTag<primal_t>{}, TypeTag<primal_t>{});
    if constexpr (sizeof(primal_t) > 2) {
      if (tangent == at::kBFloat16) return f(TypeTag<primal_t>{}, TypeTag<at::BFloat16>{});
      if (tangent == at::kHalf) return f(TypeTag<primal_t>{}, TypeTag<at::Half>{});
    }
    if constexpr (sizeof(primal_t) > 4) {
      if (tangent == at::kFloat) return f(TypeTag<primal_t>{}, TypeTag<float>{});
    }
    TORCH_CHECK(false, name, ": tangents of dtype ", tangent, " cannot go with a ", primal,
                " primal");
  });
}

// The unsigned integer of a type's width, for code that moves or selects its values without
// arithmetic: a select of c10::BFloat16 or c10::Half (structs) compiles to a scalar loop, the
// same select of their uint16_t bits to vector blends.
template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 2, uint16_t,
                                  std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

// v rounded to T, bit for bit as static_cast<T>(v) rounds it, in a form a loop of stores
// vectorizes: c10::BFloat16's conversion from float branches on NaN, which keeps scalar every
// loop that stores a bfloat16. Here the same round to nearest even on the float's bits, and a
// select for NaN (0x7FC0, as c10's: rounding by the bits alone would carry a NaN whose low
// mantissa bits are set into the sign, 0x7FFFFFFF becoming -0). Other types convert as
// static_cast does.
template <typename T, typename acc_t>
inline T round_to(acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t u = c10::bit_cast<uint32_t>(v);
    const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return c10::BFloat16(v != v ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace fgkernels
