// act_dropout's schema, checks and Meta kernels. Its autograd is in act_dropout_autograd.cpp.
#include "ops/act_dropout/act_dropout.h"

#include <string>

#include <torch/library.h>

#include "operands.h"

namespace fused_dropout {

Activation parse_activation(const char* op, c10::string_view name) {
  static const std::pair<const char*, Activation> kNames[] = {{"relu", Activation::kReLU},
                                                              {"gelu", Activation::kGelu},
                                                              {"gelu_tanh", Activation::kGeluTanh},
                                                              {"silu", Activation::kSiLU},
                                                              {"squared_relu", Activation::kSquaredReLU}};
  for (const auto& [known, value] : kNames) {
    if (name == known) return value;
  }
  TORCH_CHECK_VALUE(false, op, ": activation must be one of 'relu', 'gelu', 'gelu_tanh', 'silu', 'squared_relu', got '",
                    std::string(name), "'");
}

Activation check_act_dropout_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                  double p, c10::string_view activation, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims) {
  const Activation act = parse_activation(op, activation);
  check_input_and_p(op, input, p);
  check_bias(op, input, bias);
  check_randomness_args(op, seed, offset, generator);
  check_shared_dims(op, input, shared_dims);
  return act;
}

std::pair<MaskLayout, Activation> check_act_dropout_call(const char* op, const at::Tensor& input,
                                                         const std::optional<at::Tensor>& bias, double p,
                                                         c10::string_view activation,
                                                         const std::optional<int64_t>& seed, int64_t offset,
                                                         const std::optional<at::Generator>& generator,
                                                         at::IntArrayRef shared_dims) {
  const Activation act = check_act_dropout_args(op, input, bias, p, activation, seed, offset, generator, shared_dims);
  return {mask_layout(op, input, shared_dims), act};
}

Activation check_act_dropout_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                           c10::string_view activation, at::IntArrayRef shared_dims) {
  const Activation act = parse_activation(op, activation);
  check_input_and_p(op, input, p);
  check_like_input(op, "grad", input, grad, OperandDtype::kInputs);
  check_bias(op, input, bias);
  check_rng_state(op, input, rng_state);
  check_shared_dims(op, input, shared_dims);
  return act;
}

std::pair<MaskLayout, Activation> check_act_dropout_backward_call(
    const char* op, const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& bias,
    const at::Tensor& rng_state, double p, c10::string_view activation, at::IntArrayRef shared_dims) {
  const Activation act = check_act_dropout_backward_args(op, grad, input, bias, rng_state, p, activation, shared_dims);
  return {mask_layout(op, input, shared_dims), act};
}

namespace {

std::tuple<at::Tensor, at::Tensor> act_dropout_meta(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                    double p, c10::string_view activation, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  check_act_dropout_args(kActDropoutOp, input, bias, p, activation, seed, offset, generator, shared_dims);
  return {empty_output_like(input), empty_state_like(input)};
}

at::Tensor act_dropout_backward_meta(const at::Tensor& grad, const at::Tensor& input,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                     c10::string_view activation, at::IntArrayRef shared_dims) {
  check_act_dropout_backward_args(kActDropoutBackwardOp, grad, input, bias, rng_state, p, activation, shared_dims);
  return empty_output_like(input);
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_FRAGMENT(fused_dropout, m) {
  m.def(
      "act_dropout(Tensor input, Tensor? bias, float p, str activation, int? seed=None, int offset=0, "
      "Generator? generator=None, int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // act_dropout's backward in one pass: act'(input + bias) * dropout_replay(grad). Its own
  // autograd (double backward, forward AD) goes through the differentiable composition.
  m.def(
      "act_dropout_backward(Tensor grad, Tensor input, Tensor? bias, Tensor rng_state, float p, str activation, "
      "int[] shared_dims=[]) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) {
  m.impl("act_dropout", &fused_dropout::act_dropout_meta);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_meta);
}
