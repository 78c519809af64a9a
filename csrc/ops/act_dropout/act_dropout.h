// act_dropout: dropout(activation(input + bias)) in one pass, and its backward in one pass.
#pragma once

#include <optional>
#include <utility>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "rules.h"

namespace fused_dropout {

inline constexpr char kActDropoutOp[] = "fused_dropout::act_dropout";
inline constexpr char kActDropoutBackwardOp[] = "fused_dropout::act_dropout_backward";

// The activation act_dropout's `activation` argument names; a clear error for any other name.
Activation parse_activation(const char* op, c10::string_view name);

// All checks of act_dropout's arguments; returns the activation (the _call form also the
// mask layout).
Activation check_act_dropout_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                  double p, c10::string_view activation, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims);
std::pair<MaskLayout, Activation> check_act_dropout_call(const char* op, const at::Tensor& input,
                                                         const std::optional<at::Tensor>& bias, double p,
                                                         c10::string_view activation,
                                                         const std::optional<int64_t>& seed, int64_t offset,
                                                         const std::optional<at::Generator>& generator,
                                                         at::IntArrayRef shared_dims);

// All checks of act_dropout_backward's arguments, likewise.
Activation check_act_dropout_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                           c10::string_view activation, at::IntArrayRef shared_dims);
std::pair<MaskLayout, Activation> check_act_dropout_backward_call(
    const char* op, const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& bias,
    const at::Tensor& rng_state, double p, c10::string_view activation, at::IntArrayRef shared_dims);

}  // namespace fused_dropout
