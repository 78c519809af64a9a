// act_dropout's autograd (autograd.h): the forward saves rng_state, the input and the bias;
// the backward is act_dropout_backward's one-pass kernel, or where that is itself
// differentiated, the composition of differentiable ops.
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include "autograd.h"
#include "dispatch.h"
#include "ops/act_dropout/act_dropout.h"

namespace fused_dropout {
namespace {

using ActDropoutSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                               double, c10::string_view, std::optional<int64_t>,
                                                               int64_t, std::optional<at::Generator>, at::IntArrayRef);

using ActDropoutBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, double, c10::string_view, at::IntArrayRef);

const c10::TypedOperatorHandle<ActDropoutBackwardSignature>& act_dropout_backward_op() {
  static const auto op = find_op<ActDropoutBackwardSignature>(kActDropoutBackwardOp);
  return op;
}

// The activation's backward at `pre` (= input + bias), torch's own ops: grad * act'(pre).
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& pre, Activation act) {
  switch (act) {
    case Activation::kReLU:
      return at::threshold_backward(grad, pre, 0);
    case Activation::kGelu:
      return at::gelu_backward(grad, pre, "none");
    case Activation::kGeluTanh:
      return at::gelu_backward(grad, pre, "tanh");
    case Activation::kSiLU: {
      // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x), from differentiable ops: torch's
      // silu_backward has no derivative of its own.
      const at::Tensor s = at::sigmoid(pre);
      return grad.mul(s.mul(pre.mul(s.neg().add(1)).add(1)));
    }
    case Activation::kSquaredReLU:
      // As torch's autograd of relu(x)^2: pow's backward, then relu's.
      return at::threshold_backward(grad.mul(at::relu(pre).mul(2)), pre, 0);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

// act_dropout's derivative applied to `grad` (a gradient, or a tangent: the op is linear in it
// at a fixed point): act'(input + bias) * dropout_replay(grad), through the dispatcher, whose
// autograd kernel below picks the one-pass kernel or the differentiable composition.
at::Tensor act_dropout_derivative(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& bias,
                                  const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                                  c10::string_view activation) {
  return act_dropout_backward_op().call(grad, input, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                                        rng_state, p, activation, shared_dims);
}

// The backward of act_dropout: act'(input + bias) * mask * scale * grad, and for the bias its
// sum over every dim but the last.
struct ActDropoutBackward : public Node {
  torch::autograd::SavedVariable rng_state, input, bias;
  double p = 0.0;
  std::vector<int64_t> shared_dims;
  std::string activation;

  std::string name() const override { return "ActDropoutBackward"; }
  void release_variables() override {
    rng_state.reset_data();
    input.reset_data();
    bias.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list grad_inputs(num_outputs());
    if (!grads[0].defined()) return grad_inputs;
    const at::Tensor grad_pre =
        act_dropout_derivative(grads[0], input.unpack(), bias.unpack(), rng_state.unpack(), p, shared_dims, activation);
    if (should_compute_output(0)) grad_inputs[0] = grad_pre;
    if (should_compute_output(1)) grad_inputs[1] = sum_to_last_dim(grad_pre);
    return grad_inputs;
  }
};

std::tuple<at::Tensor, at::Tensor> act_dropout_autograd(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                        double p, c10::string_view activation,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  const c10::MaybeOwned<at::Tensor> bias_or_undefined = at::borrow_from_optional_tensor(bias);
  const at::Tensor& b = *bias_or_undefined;
  static const auto op = find_op<ActDropoutSignature>(kActDropoutOp);
  auto [output, rng_state] = below_autograd(op, input, bias, p, activation, seed, offset, generator, shared_dims);
  if (needs_grad({&input, &b})) {
    auto node = new_node<ActDropoutBackward>(input, b);
    node->rng_state = torch::autograd::SavedVariable(rng_state, /*is_output=*/false);
    node->input = torch::autograd::SavedVariable(input, /*is_output=*/false);
    node->bias = torch::autograd::SavedVariable(b, /*is_output=*/false);
    node->p = p;
    node->shared_dims = shared_dims.vec();
    node->activation = std::string(activation);
    torch::autograd::set_history(output, NodePtr(node));
  }
  if (const at::Tensor tangent = sum_defined({tangent_of(&input), tangent_of(&b)}, input); tangent.defined()) {
    set_tangent(output,
                act_dropout_derivative(tangent, primal_of(input), primal_of(b), rng_state, p, shared_dims, activation));
  }
  return {output, rng_state};
}

// The one-pass kernel where nothing differentiates the result; otherwise (double backward, a
// tangent of a tangent) the composition of differentiable ops: the replayed gradient, then
// torch's activation backward at input + bias.
at::Tensor act_dropout_backward_autograd(const at::Tensor& grad, const at::Tensor& input,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                         c10::string_view activation, at::IntArrayRef shared_dims) {
  const c10::MaybeOwned<at::Tensor> bias_or_undefined = at::borrow_from_optional_tensor(bias);
  const at::Tensor& b = *bias_or_undefined;
  const bool differentiated = needs_grad({&grad, &input, &b}) || has_tangent({&grad, &input, &b});
  if (!differentiated) {
    return below_autograd(act_dropout_backward_op(), grad, input, bias, rng_state, p, activation, shared_dims);
  }
  const Activation act = parse_activation(kActDropoutBackwardOp, activation);
  return activation_backward(replay(grad, rng_state, p, shared_dims), b.defined() ? input.add(b) : input, act);
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("act_dropout", &fused_dropout::act_dropout_autograd);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_autograd);
}
