// dropout_add: residual + dropout(input + bias) in one pass (bias broadcast over the last dim).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "checks.h"

namespace fused_dropout {

inline constexpr char kDropoutAddOp[] = "fused_dropout::dropout_add";

// All checks of dropout_add's arguments; the _call form also returns the mask layout.
void check_dropout_add_args(const char* op, const at::Tensor& input, const at::Tensor& residual,
                            const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                            int64_t offset, const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);
MaskLayout check_dropout_add_call(const char* op, const at::Tensor& input, const at::Tensor& residual,
                                  const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims);

// The output's dtype: torch's promotion of the input's and the residual's.
inline at::ScalarType sum_dtype(const at::Tensor& input, const at::Tensor& residual) {
  return c10::promoteTypes(input.scalar_type(), residual.scalar_type());
}

// dropout_add with a residual whose dtype differs from the input's: residual + dropout(input +
// bias), the dropout in the input's dtype and the sum in the promoted one (torch's promotion
// of the two dtypes), as torch computes the composition. Two passes through the dispatcher,
// on any device.
std::tuple<at::Tensor, at::Tensor> dropout_add_promoted(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims);

}  // namespace fused_dropout
