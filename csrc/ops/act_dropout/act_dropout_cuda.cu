// act_dropout and its backward on CUDA: the shared launch (cuda/launch.cuh) with ActRule and,
// for the backward, the two-operand ActGradRule.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "ops/act_dropout/act_dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> act_dropout_cuda(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                    double p, c10::string_view activation, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  const auto [mask, act] =
      check_act_dropout_call(kActDropoutOp, input, bias, p, activation, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input);
  at::Tensor rng_state = empty_state_like(input);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  dispatch_launch(input, bias_contiguous, output, mask,
                  StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state), p,
                  RuleSpec{RuleSpec::Kind::kAct, act});
  return {output, rng_state};
}

at::Tensor act_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                     c10::string_view activation, at::IntArrayRef shared_dims) {
  const auto [mask, act] =
      check_act_dropout_backward_call(kActDropoutBackwardOp, grad, input, bias, rng_state, p, activation, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor state = rng_state.contiguous();
  at::Tensor grad_input = empty_output_like(input);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "act_dropout_backward", [&] {
    visit_act_grad_rule<scalar_t>(act, p, [&](const auto& rule) {
      launch<scalar_t, true>(input, grad, bias_contiguous, grad_input, mask, StateSource::saved_in(state), rule);
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("act_dropout", &fused_dropout::act_dropout_cuda);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_cuda);
}
