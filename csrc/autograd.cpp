// Autograd of the ops, in C++ so that a training step pays no Python per call.
//
// Reverse mode: the forward saves only rng_state (16 bytes), and backward replays the same
// mask from it with dropout_replay, whose own gradient is dropout_replay again (so double
// backward works).
// Forward mode: every op here is linear in its tensor inputs once the mask is fixed, so an
// output's tangent is the same replay applied to the input's tangent. It is set at level 0,
// as torch's generated kernels do; torch.func.jvp and forward_ad map their levels onto it.
// In place: under autograd, dropout_replay_ is recorded as the out-of-place replay copied
// into the input, so that torch's copy_ brings the in-place rules: the leaf and view checks
// before any write, views rebased onto their base, the version bump and the tangent carried
// over. Without autograd it runs in place (inplace.cpp bumps the version).
#include <type_traits>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace fused_dropout {
namespace {

using torch::autograd::variable_list;

using DropoutSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, std::optional<int64_t>, int64_t,
                                                            std::optional<at::Generator>, at::IntArrayRef);
using StateSignature = at::Tensor(const at::Tensor&, std::optional<int64_t>, int64_t, std::optional<at::Generator>,
                                  at::IntArrayRef);
using ReplaySignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, at::IntArrayRef);
using ReplayInplaceSignature = at::Tensor&(at::Tensor&, const at::Tensor&, double, at::IntArrayRef);
using DropoutAddSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, double,
                                                               std::optional<int64_t>, int64_t,
                                                               std::optional<at::Generator>, at::IntArrayRef);

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

// Through the dispatcher, so that the replay is itself differentiable under create_graph.
at::Tensor replay(const at::Tensor& grad, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims) {
  static const auto op = op_handle<ReplaySignature>("fused_dropout::dropout_replay");
  return op.call(grad, rng_state, p, shared_dims);
}

// The forward ops below the autograd key: the kernels themselves.
std::tuple<at::Tensor, at::Tensor> dropout_below_autograd(const at::Tensor& input, double p,
                                                          std::optional<int64_t> seed, int64_t offset,
                                                          std::optional<at::Generator> generator,
                                                          at::IntArrayRef shared_dims) {
  static const auto op = op_handle<DropoutSignature>("fused_dropout::dropout");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, p, seed, offset, std::move(generator), shared_dims);
}

std::tuple<at::Tensor, at::Tensor> dropout_add_below_autograd(const at::Tensor& input, const at::Tensor& residual,
                                                              const std::optional<at::Tensor>& bias, double p,
                                                              std::optional<int64_t> seed, int64_t offset,
                                                              std::optional<at::Generator> generator,
                                                              at::IntArrayRef shared_dims) {
  static const auto op = op_handle<DropoutAddSignature>("fused_dropout::dropout_add");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
}

using torch::autograd::Node;
using NodePtr = decltype(torch::autograd::Edge::function);  // intrusive_ptr or shared_ptr, by torch release

// The backward of every op here, as a graph node of the kind torch's own generated kernels
// create (a C++ torch::autograd::Function would be refused under torch.func transforms).
// It keeps 16 bytes of tensor and turns grad_output into each input's gradient:
// input (and bias) get the forward's mask and scale, residual gets grad_output itself.
struct ReplayMaskBackward : public Node {
  torch::autograd::SavedVariable rng_state;
  double p = 0.0;
  std::vector<int64_t> shared_dims;
  bool with_residual = false;  // dropout_add: next edges are (input, residual, bias)

  std::string name() const override { return with_residual ? "DropoutAddBackward" : "DropoutBackward"; }
  void release_variables() override { rng_state.reset_data(); }

  variable_list apply(variable_list&& grads) override {
    variable_list grad_inputs(num_outputs());
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return grad_inputs;
    const bool want_bias = with_residual && should_compute_output(2);
    if (should_compute_output(0) || want_bias) {
      const at::Tensor grad_input = replay(grad_output, rng_state.unpack(), p, shared_dims);
      if (should_compute_output(0)) grad_inputs[0] = grad_input;
      // d/d bias: the input's gradient summed over every dim but the last.
      if (want_bias) grad_inputs[2] = grad_input.reshape({-1, grad_input.size(-1)}).sum(0);
    }
    if (with_residual && should_compute_output(1)) grad_inputs[1] = grad_output;
    return grad_inputs;
  }
};

// A node with edges to `inputs` (undefined ones get none), made the way this torch release
// owns nodes.
template <typename... Inputs>
auto new_backward_node(const Inputs&... inputs) {
  auto make = [](auto* tag) {
    using Ptr = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<Ptr, std::shared_ptr<Node>>) {
      return std::make_shared<ReplayMaskBackward>();
    } else {
      return c10::make_intrusive<ReplayMaskBackward>();
    }
  };
  auto node = make(static_cast<NodePtr*>(nullptr));
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Records `output` as produced by a replay of rng_state's mask from `inputs`.
template <typename... Inputs>
void record_backward(const at::Tensor& output, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                     bool with_residual, const Inputs&... inputs) {
  auto node = new_backward_node(inputs...);
  node->rng_state = torch::autograd::SavedVariable(rng_state, /*is_output=*/false);
  node->p = p;
  node->shared_dims = shared_dims.vec();
  node->with_residual = with_residual;
  torch::autograd::set_history(output, NodePtr(node));
}

std::tuple<at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  auto [output, rng_state] = dropout_below_autograd(input, p, seed, offset, std::move(generator), shared_dims);
  if (needs_grad({&input})) record_backward(output, rng_state, p, shared_dims, /*with_residual=*/false, input);
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    output._set_fw_grad(replay(tangent, rng_state, p, shared_dims), kTangentLevel, /*is_inplace_op=*/false);
  }
  return {output, rng_state};
}

at::Tensor replay_autograd(const at::Tensor& input, const at::Tensor& rng_state, double p,
                           at::IntArrayRef shared_dims) {
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = replay(input, rng_state, p, shared_dims);
  }
  if (needs_grad({&input})) record_backward(output, rng_state, p, shared_dims, /*with_residual=*/false, input);
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    output._set_fw_grad(replay(tangent, rng_state, p, shared_dims), kTangentLevel, /*is_inplace_op=*/false);
  }
  return output;
}

at::Tensor& replay_inplace_autograd(at::Tensor& input, const at::Tensor& rng_state, double p,
                                    at::IntArrayRef shared_dims) {
  if (needs_grad({&input}) || tangent_of(&input).defined()) {
    return input.copy_(replay_autograd(input, rng_state, p, shared_dims));
  }
  static const auto op = op_handle<ReplayInplaceSignature>("fused_dropout::dropout_replay_");
  at::AutoDispatchBelowAutograd below_autograd;  // ADInplaceOrView, below, bumps the version
  return op.call(input, rng_state, p, shared_dims);
}

// dropout_state's output is an integer tensor: nothing to differentiate.
at::Tensor state_autograd(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                          std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  static const auto op = op_handle<StateSignature>("fused_dropout::dropout_state");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, seed, offset, std::move(generator), shared_dims);
}

std::tuple<at::Tensor, at::Tensor> dropout_add_autograd(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  const at::Tensor* bias_ptr = bias.has_value() ? &*bias : nullptr;
  const at::Tensor input_tangent = tangent_of(&input), residual_tangent = tangent_of(&residual);
  const at::Tensor bias_tangent = tangent_of(bias_ptr);
  const bool has_tangent = input_tangent.defined() || residual_tangent.defined() || bias_tangent.defined();
  const bool grad = needs_grad({&input, &residual, bias_ptr});
  auto [output, rng_state] =
      dropout_add_below_autograd(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
  if (grad) {
    const at::Tensor no_bias;
    record_backward(output, rng_state, p, shared_dims, /*with_residual=*/true, input, residual,
                    bias_ptr != nullptr ? *bias_ptr : no_bias);
  }
  if (has_tangent) {
    // d output = d residual + mask * scale * (d input + d bias)
    at::Tensor dropped = input_tangent.defined() ? input_tangent : at::Tensor();
    if (bias_tangent.defined()) dropped = dropped.defined() ? dropped.add(bias_tangent) : bias_tangent.expand_as(input);
    at::Tensor output_tangent = dropped.defined() ? replay(dropped, rng_state, p, shared_dims) : at::Tensor();
    if (residual_tangent.defined()) {
      output_tangent = output_tangent.defined() ? output_tangent.add(residual_tangent) : residual_tangent.clone();
    }
    output._set_fw_grad(output_tangent, kTangentLevel, false);
  }
  return {output, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", &fused_dropout::dropout_autograd);
  m.impl("dropout_state", &fused_dropout::state_autograd);
  m.impl("dropout_replay", &fused_dropout::replay_autograd);
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_autograd);
  m.impl("dropout_add", &fused_dropout::dropout_add_autograd);
}
