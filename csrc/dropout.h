// Pieces shared by the CPU and CUDA implementations: the output rule and the argument
// checks. The kernels themselves live in cpu/ and cuda/.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "philox.h"

namespace fused_dropout {

// Most dims a kernel walks; tensors beyond it get an error, never a wrong result.
constexpr int64_t kMaxDims = 25;

// The output rule: a kept element is cast(acc(x) * scale), a dropped one is exactly +0.0,
// also when x is NaN or inf. The select is done on the bits (AND with an all-ones or
// all-zeros mask) rather than with a branch, so the CPU loop vectorises.
template <typename scalar_t>
struct MaskedScale {
  using acc_t = at::opmath_type<scalar_t>;
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  KeepRule keep;
  acc_t scale;

  // scale = 1 / (1 - p), computed in double and held in the accumulation type.
  static MaskedScale for_p(double p_drop) {
    return MaskedScale{KeepRule::for_p(p_drop), static_cast<acc_t>(p_drop < 1.0 ? 1.0 / (1.0 - p_drop) : 0.0)};
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t operator()(scalar_t x, uint32_t word) const {
    const scalar_t scaled = static_cast<scalar_t>(static_cast<acc_t>(x) * scale);
    bits_t bits;
    std::memcpy(&bits, &scaled, sizeof(bits));
    bits &= static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(keep(word)));
    scalar_t out;
    std::memcpy(&out, &bits, sizeof(bits));
    return out;
  }
};

// Checks shared by every op that takes an input tensor and a drop probability.
// `op` names the operator in the message, e.g. "fused_dropout::dropout".
void check_input_and_p(const char* op, const at::Tensor& input, double p);

// Checks the (seed, offset, generator) combination of a random op.
void check_randomness_args(const char* op, const std::optional<int64_t>& seed, int64_t offset,
                           const std::optional<at::Generator>& generator);

// Checks a saved rng_state tensor against the input it is applied to.
void check_rng_state(const char* op, const at::Tensor& input, const at::Tensor& rng_state);

// Checks an in-place target: no two elements may share memory.
void check_inplace_target(const char* op, const at::Tensor& input);

// Checks the arguments of the raw generator op: counter int64[N, 4], key int64[N, 2], same device.
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

// The output of an out-of-place call: same shape, dtype, device and memory format as the input.
at::Tensor empty_output_like(const at::Tensor& input);

}  // namespace fused_dropout
