// Autograd for the ops, in C++ so that a training step pays no Python per call: the forward
// saves only rng_state (16 bytes), and backward replays the same mask from it with
// dropout_replay, whose own gradient is dropout_replay again (so double backward works).
// The in-place op is differentiated in Python (fused_dropout/_ops.py), where autograd can
// mark its input dirty.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fused_dropout {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using DropoutSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, std::optional<int64_t>,
                                                            int64_t, std::optional<at::Generator>, at::IntArrayRef);
using ReplaySignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, at::IntArrayRef);
using DropoutAddSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, double,
                                                               std::optional<int64_t>, int64_t,
                                                               std::optional<at::Generator>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// True when a call must record a graph node: otherwise the ops run below autograd directly,
// with no node, saved state or materialised zero gradients to pay for.
bool needs_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

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
                                                              std::optional<at::Generator> generator) {
  static const auto op = op_handle<DropoutAddSignature>("fused_dropout::dropout_add");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, residual, bias, p, seed, offset, std::move(generator));
}

// What every backward here keeps (16 bytes of tensor) and how it turns a gradient into the
// forward's masked, scaled gradient.
void save_mask(AutogradContext* ctx, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims) {
  ctx->save_for_backward({rng_state});
  ctx->saved_data["p"] = p;
  ctx->saved_data["shared_dims"] = shared_dims.vec();
}

at::Tensor replay_saved_mask(AutogradContext* ctx, const at::Tensor& grad) {
  return replay(grad, ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble(),
                ctx->saved_data["shared_dims"].toIntVector());
}

class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, double p, std::optional<int64_t> seed,
                               int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
    auto [output, rng_state] = dropout_below_autograd(input, p, seed, offset, std::move(generator), shared_dims);
    ctx->mark_non_differentiable({rng_state});
    ctx->set_materialize_grads(false);  // rng_state's gradient slot stays empty, not a zeros launch
    save_mask(ctx, rng_state, p, shared_dims);
    return {output, rng_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(6);  // only rng_state was used downstream
    return {replay_saved_mask(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ReplayFunction : public torch::autograd::Function<ReplayFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& rng_state, double p,
                               at::IntArrayRef shared_dims) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      output = replay(input, rng_state, p, shared_dims);
    }
    save_mask(ctx, rng_state, p, shared_dims);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {replay_saved_mask(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class DropoutAddFunction : public torch::autograd::Function<DropoutAddFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& residual,
                               const std::optional<at::Tensor>& bias, double p, std::optional<int64_t> seed,
                               int64_t offset, std::optional<at::Generator> generator) {
    auto [output, rng_state] =
        dropout_add_below_autograd(input, residual, bias, p, seed, offset, std::move(generator));
    ctx->mark_non_differentiable({rng_state});
    ctx->set_materialize_grads(false);
    save_mask(ctx, rng_state, p, {});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {output, rng_state};
  }

  // d/d residual = 1; d/d input = the forward's mask and scale; d/d bias = that, summed over
  // every dim but the last.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);
    const at::Tensor& grad_output = grads[0];
    const at::Tensor grad_input = replay_saved_mask(ctx, grad_output);
    const at::Tensor grad_bias = ctx->saved_data["has_bias"].toBool()
                                     ? grad_input.reshape({-1, grad_input.size(-1)}).sum(0)
                                     : at::Tensor();
    return {grad_input, grad_output, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  if (!needs_grad({&input})) return dropout_below_autograd(input, p, seed, offset, std::move(generator), shared_dims);
  auto outputs = DropoutFunction::apply(input, p, seed, offset, std::move(generator), shared_dims);
  return {outputs[0], outputs[1]};
}

at::Tensor replay_autograd(const at::Tensor& input, const at::Tensor& rng_state, double p,
                           at::IntArrayRef shared_dims) {
  if (!needs_grad({&input})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return replay(input, rng_state, p, shared_dims);
  }
  return ReplayFunction::apply(input, rng_state, p, shared_dims)[0];
}

std::tuple<at::Tensor, at::Tensor> dropout_add_autograd(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator) {
  if (!needs_grad({&input, &residual, bias.has_value() ? &*bias : nullptr})) {
    return dropout_add_below_autograd(input, residual, bias, p, seed, offset, std::move(generator));
  }
  auto outputs = DropoutAddFunction::apply(input, residual, bias, p, seed, offset, std::move(generator));
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", &fused_dropout::dropout_autograd);
  m.impl("dropout_replay", &fused_dropout::replay_autograd);
  m.impl("dropout_add", &fused_dropout::dropout_add_autograd);
}
