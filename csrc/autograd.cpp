// Autograd of the ops, in C++ so that a training step pays no Python per call.
//
// Reverse mode: the forward saves rng_state (16 bytes), and backward replays the same mask
// from it with dropout_replay, whose own gradient is dropout_replay again (so double
// backward works). act_dropout also saves its input, which the activation's derivative needs.
// Forward mode: every op is linear in its tensor inputs once the mask is fixed (act_dropout:
// once the point is), so an output's tangent is its backward applied to the input's tangent.
// It is set at level 0, as torch's generated kernels do; torch.func.jvp and forward_ad map
// their levels onto it.
// In place: under autograd, dropout_replay_ is recorded as the out-of-place replay copied
// into the input, so that torch's copy_ brings the in-place rules: the leaf and view checks
// before any write, views rebased onto their base, the version bump and the tangent carried
// over. Without autograd it runs in place (inplace.cpp bumps the version).
#include <numeric>
#include <type_traits>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "dropout.h"

namespace fused_dropout {
namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;
using NodePtr = decltype(torch::autograd::Edge::function);  // intrusive_ptr or shared_ptr, by torch release

using RandomSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, std::optional<int64_t>, int64_t,
                                                           std::optional<at::Generator>, at::IntArrayRef);
using StateSignature = at::Tensor(const at::Tensor&, std::optional<int64_t>, int64_t, std::optional<at::Generator>,
                                  at::IntArrayRef);
using ReplaySignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, at::IntArrayRef,
                                   std::optional<double>);
using ReplayInplaceSignature = at::Tensor&(at::Tensor&, const at::Tensor&, double, at::IntArrayRef);
using DropoutAddSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, double,
                                                               std::optional<int64_t>, int64_t,
                                                               std::optional<at::Generator>, at::IntArrayRef);
using ActDropoutSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                               double, c10::string_view, std::optional<int64_t>,
                                                               int64_t, std::optional<at::Generator>, at::IntArrayRef);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

constexpr uint64_t kTangentLevel = 0;

bool defined(const at::Tensor* t) { return t != nullptr && t->defined(); }

// True when a call must record a graph node: otherwise the ops run below autograd directly,
// with no node, saved state or materialised zero gradients to pay for.
bool needs_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (defined(t) && t->requires_grad()) return true;
  }
  return false;
}

// The forward-mode tangent of t, or an undefined tensor.
at::Tensor tangent_of(const at::Tensor* t) { return defined(t) ? t->_fw_grad(kTangentLevel) : at::Tensor(); }

// True when any of the defined tensors carries a forward-mode tangent.
bool has_tangent(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (tangent_of(t).defined()) return true;
  }
  return false;
}

// t without its tangent, where a tangent's own computation needs t's value.
at::Tensor primal_of(const at::Tensor& t) {
  return t.defined() && t._fw_grad(kTangentLevel).defined() ? t._fw_primal(kTangentLevel) : t;
}

void set_tangent(const at::Tensor& output, const at::Tensor& tangent) {
  if (tangent.defined()) output._set_fw_grad(tangent, kTangentLevel, /*is_inplace_op=*/false);
}

// The sum of the defined tensors among `parts` (a tangent's pieces), or undefined.
at::Tensor sum_defined(std::initializer_list<at::Tensor> parts, const at::Tensor& shape_of) {
  at::Tensor total;
  for (const at::Tensor& part : parts) {
    if (part.defined()) total = total.defined() ? total.add(part) : part.expand_as(shape_of);
  }
  return total;
}

// d/d bias of a bias broadcast over the last dim: the gradient summed over every other dim.
// An empty tensor gives zeros, as torch's own broadcast backward does.
at::Tensor sum_to_last_dim(const at::Tensor& grad) {
  if (grad.dim() <= 1) return grad;
  std::vector<int64_t> dims(grad.dim() - 1);
  std::iota(dims.begin(), dims.end(), 0);
  return grad.sum(dims);
}

// Through the dispatcher, so that the replay is itself differentiable under create_graph.
at::Tensor replay(const at::Tensor& grad, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                  std::optional<double> scale = std::nullopt) {
  static const auto op = op_handle<ReplaySignature>("fused_dropout::dropout_replay");
  return op.call(grad, rng_state, p, shared_dims, scale);
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

// Calls `op` below the autograd key: the kernels themselves.
template <typename Signature, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

using ActDropoutBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, double, c10::string_view, at::IntArrayRef);

// act_dropout's derivative applied to `grad` (a gradient, or a tangent: the op is linear in it
// at a fixed point): act'(input + bias) * dropout_replay(grad), through the dispatcher, whose
// autograd kernel below picks the one-pass kernel or the differentiable composition.
at::Tensor act_dropout_derivative(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& bias,
                                  const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                                  c10::string_view activation) {
  static const auto op = op_handle<ActDropoutBackwardSignature>("fused_dropout::act_dropout_backward");
  return op.call(grad, input, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, rng_state, p, activation,
                 shared_dims);
}

// The backward of dropout, alpha dropout and dropout_add, as a graph node of the kind torch's
// own generated kernels create (a C++ torch::autograd::Function would be refused under
// torch.func transforms). It keeps 16 bytes of tensor and turns grad_output into each
// input's gradient: input (and bias) get the forward's mask and scale, residual gets
// grad_output itself.
struct ReplayMaskBackward : public Node {
  torch::autograd::SavedVariable rng_state;
  double p = 0.0;
  std::vector<int64_t> shared_dims;
  std::optional<double> scale;  // alpha dropout: its a, in place of 1 / (1 - p)
  bool with_residual = false;   // dropout_add: next edges are (input, residual, bias)
  // The input's dtype. dropout_add's output may be wider (a residual of another dtype): the
  // gradient is then rounded to the input's dtype before the mask, as the unfused
  // composition's backward rounds it.
  at::ScalarType input_dtype = at::kFloat;

  std::string name() const override { return with_residual ? "DropoutAddBackward" : "DropoutBackward"; }
  void release_variables() override { rng_state.reset_data(); }

  variable_list apply(variable_list&& grads) override {
    variable_list grad_inputs(num_outputs());
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return grad_inputs;
    const bool want_bias = with_residual && should_compute_output(2);
    if (should_compute_output(0) || want_bias) {
      const at::Tensor grad_dropped =
          grad_output.scalar_type() == input_dtype ? grad_output : grad_output.to(input_dtype);
      const at::Tensor grad_input = replay(grad_dropped, rng_state.unpack(), p, shared_dims, scale);
      if (should_compute_output(0)) grad_inputs[0] = grad_input;
      if (want_bias) grad_inputs[2] = sum_to_last_dim(grad_input);
    }
    if (with_residual && should_compute_output(1)) grad_inputs[1] = grad_output;
    return grad_inputs;
  }
};

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

// A node with edges to `inputs` (undefined ones get none), made the way this torch release
// owns nodes.
template <typename NodeT, typename... Inputs>
auto new_node(const Inputs&... inputs) {
  auto make = [](auto* tag) {
    using Ptr = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<Ptr, std::shared_ptr<Node>>) {
      return std::make_shared<NodeT>();
    } else {
      return c10::make_intrusive<NodeT>();
    }
  };
  auto node = make(static_cast<NodePtr*>(nullptr));
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Records `output` as made from `inputs` by a replay of rng_state's mask.
template <typename... Inputs>
void record_replay(const at::Tensor& output, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                   std::optional<double> scale, bool with_residual, const at::Tensor& input, const Inputs&... others) {
  auto node = new_node<ReplayMaskBackward>(input, others...);
  node->input_dtype = input.scalar_type();
  node->rng_state = torch::autograd::SavedVariable(rng_state, /*is_output=*/false);
  node->p = p;
  node->shared_dims = shared_dims.vec();
  node->scale = scale;
  node->with_residual = with_residual;
  torch::autograd::set_history(output, NodePtr(node));
}

// A random op with dropout's signature whose backward is the mask replayed with `scale`
// (none: 1 / (1 - p)).
std::tuple<at::Tensor, at::Tensor> random_op_autograd(const c10::TypedOperatorHandle<RandomSignature>& op,
                                                      std::optional<double> scale, const at::Tensor& input, double p,
                                                      std::optional<int64_t> seed, int64_t offset,
                                                      std::optional<at::Generator> generator,
                                                      at::IntArrayRef shared_dims) {
  auto [output, rng_state] = below_autograd(op, input, p, seed, offset, generator, shared_dims);
  if (needs_grad({&input})) record_replay(output, rng_state, p, shared_dims, scale, false, input);
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    set_tangent(output, replay(tangent, rng_state, p, shared_dims, scale));
  }
  return {output, rng_state};
}

std::tuple<at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  static const auto op = op_handle<RandomSignature>("fused_dropout::dropout");
  return random_op_autograd(op, std::nullopt, input, p, seed, offset, std::move(generator), shared_dims);
}

// Alpha dropout's gradient is its a on kept elements, 0 on dropped ones.
std::tuple<at::Tensor, at::Tensor> alpha_dropout_autograd(const at::Tensor& input, double p,
                                                          std::optional<int64_t> seed, int64_t offset,
                                                          std::optional<at::Generator> generator,
                                                          at::IntArrayRef shared_dims) {
  static const auto op = op_handle<RandomSignature>("fused_dropout::alpha_dropout");
  const double a = p < 1.0 ? AlphaRule<float, double>::a_for_p(p) : 0.0;
  return random_op_autograd(op, a, input, p, seed, offset, std::move(generator), shared_dims);
}

at::Tensor replay_autograd(const at::Tensor& input, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                           std::optional<double> scale) {
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    output = replay(input, rng_state, p, shared_dims, scale);
  }
  if (needs_grad({&input})) record_replay(output, rng_state, p, shared_dims, scale, false, input);
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    set_tangent(output, replay(tangent, rng_state, p, shared_dims, scale));
  }
  return output;
}

at::Tensor& replay_inplace_autograd(at::Tensor& input, const at::Tensor& rng_state, double p,
                                    at::IntArrayRef shared_dims) {
  if (needs_grad({&input}) || has_tangent({&input})) {
    return input.copy_(replay_autograd(input, rng_state, p, shared_dims, std::nullopt));
  }
  static const auto op = op_handle<ReplayInplaceSignature>("fused_dropout::dropout_replay_");
  at::AutoDispatchBelowAutograd below_autograd;  // ADInplaceOrView, below, bumps the version
  return op.call(input, rng_state, p, shared_dims);
}

// dropout_state's output is an integer tensor: nothing to differentiate.
at::Tensor state_autograd(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                          std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  static const auto op = op_handle<StateSignature>("fused_dropout::dropout_state");
  return below_autograd(op, input, seed, offset, generator, shared_dims);
}

std::tuple<at::Tensor, at::Tensor> dropout_add_autograd(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  const c10::MaybeOwned<at::Tensor> bias_or_undefined = at::borrow_from_optional_tensor(bias);
  const at::Tensor& b = *bias_or_undefined;
  static const auto op = op_handle<DropoutAddSignature>("fused_dropout::dropout_add");
  auto [output, rng_state] = below_autograd(op, input, residual, bias, p, seed, offset, generator, shared_dims);
  if (needs_grad({&input, &residual, &b})) {
    record_replay(output, rng_state, p, shared_dims, std::nullopt, true, input, residual, b);
  }
  // d output = d residual + mask * scale * (d input + d bias), in the output's dtype
  const at::Tensor dropped = sum_defined({tangent_of(&input), tangent_of(&b)}, input);
  const at::Tensor residual_tangent = tangent_of(&residual);
  if (dropped.defined() || residual_tangent.defined()) {
    const at::Tensor replayed = dropped.defined() ? replay(dropped, rng_state, p, shared_dims) : at::Tensor();
    set_tangent(output, sum_defined({replayed, residual_tangent}, input).to(output.scalar_type()));
  }
  return {output, rng_state};
}

std::tuple<at::Tensor, at::Tensor> act_dropout_autograd(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                        double p, c10::string_view activation,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  const c10::MaybeOwned<at::Tensor> bias_or_undefined = at::borrow_from_optional_tensor(bias);
  const at::Tensor& b = *bias_or_undefined;
  static const auto op = op_handle<ActDropoutSignature>("fused_dropout::act_dropout");
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
    static const auto op = op_handle<ActDropoutBackwardSignature>("fused_dropout::act_dropout_backward");
    return below_autograd(op, grad, input, bias, rng_state, p, activation, shared_dims);
  }
  const Activation act = parse_activation("fused_dropout::act_dropout_backward", activation);
  return activation_backward(replay(grad, rng_state, p, shared_dims), b.defined() ? input.add(b) : input, act);
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", &fused_dropout::dropout_autograd);
  m.impl("dropout_state", &fused_dropout::state_autograd);
  m.impl("dropout_replay", &fused_dropout::replay_autograd);
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_autograd);
  m.impl("dropout_add", &fused_dropout::dropout_add_autograd);
  m.impl("alpha_dropout", &fused_dropout::alpha_dropout_autograd);
  m.impl("act_dropout", &fused_dropout::act_dropout_autograd);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_autograd);
}
