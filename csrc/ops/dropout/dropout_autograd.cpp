// Autograd of the dropout ops (autograd.h says how every form's autograd works), and how
// dropout_replay_, the one op that writes its input, meets torch's in-place machinery: the
// version counter (ADInplaceOrView) and functionalization (Functionalize), as torch's
// generated kernels do for its own in-place ops.
//
// In place under autograd, dropout_replay_ is recorded as the out-of-place replay copied into
// the input, so that torch's copy_ brings the in-place rules: the leaf and view checks before
// any write, views rebased onto their base, the version bump and the tangent carried over.
// Without autograd it runs in place, and ADInplaceOrView bumps the version.
#include <ATen/FunctionalTensorWrapper.h>
#include <torch/library.h>

#include "autograd.h"
#include "dispatch.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  auto [output, rng_state] = below_autograd(dropout_op(), input, p, seed, offset, std::move(generator), shared_dims);
  if (needs_grad({&input})) {
    record_replay(output, rng_state, p, shared_dims, std::nullopt, false, input.scalar_type(), input);
  }
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    set_tangent(output, replay(tangent, rng_state, p, shared_dims));
  }
  return {output, rng_state};
}

// With `dtype`, the replay is the conversion then the mask, so its gradient is the mask (in
// `dtype`) then the conversion back, and its tangent the conversion then the mask.
at::Tensor replay_autograd(const at::Tensor& input, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                           std::optional<double> scale, std::optional<at::ScalarType> dtype) {
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    output = replay(input, rng_state, p, shared_dims, scale, dtype);
  }
  if (needs_grad({&input})) {
    record_replay(output, rng_state, p, shared_dims, scale, false, output.scalar_type(), input);
  }
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    set_tangent(output, replay(tangent, rng_state, p, shared_dims, scale, output.scalar_type()));
  }
  return output;
}

at::Tensor& replay_inplace_autograd(at::Tensor& input, const at::Tensor& rng_state, double p,
                                    at::IntArrayRef shared_dims) {
  if (needs_grad({&input}) || has_tangent({&input})) {
    return input.copy_(replay_autograd(input, rng_state, p, shared_dims, std::nullopt, std::nullopt));
  }
  at::AutoDispatchBelowAutograd below_autograd;  // ADInplaceOrView, below, bumps the version
  return dropout_replay_inplace_op().call(input, rng_state, p, shared_dims);
}

// dropout_state's output is an integer tensor: nothing to differentiate.
at::Tensor state_autograd(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                          std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  return below_autograd(dropout_state_op(), input, seed, offset, generator, shared_dims);
}

// The version bump comes before the kernel writes, so that an inference tensor outside
// inference mode is refused with the input untouched.
at::Tensor& replay_inplace_bump_version(at::Tensor& input, const at::Tensor& rng_state, double p,
                                        at::IntArrayRef shared_dims) {
  torch::autograd::impl::bump_version(input);
  at::AutoDispatchBelowADInplaceOrView below;
  return dropout_replay_inplace_op().call(input, rng_state, p, shared_dims);
}

// Functionalization: the out-of-place replay of the input's current value becomes its new
// value, which torch then propagates to the input's base and views.
at::Tensor& replay_inplace_functionalize(at::Tensor& input, const at::Tensor& rng_state, double p,
                                         at::IntArrayRef shared_dims) {
  namespace impl = at::functionalization::impl;
  if (impl::isFunctionalTensor(rng_state)) impl::sync(rng_state);
  const at::Tensor state = impl::isFunctionalTensor(rng_state) ? impl::from_functional_tensor(rng_state) : rng_state;
  if (!impl::isFunctionalTensor(input)) {  // an input functionalization does not track
    at::AutoDispatchSkipFunctionalize skip;
    return dropout_replay_inplace_op().call(input, state, p, shared_dims);
  }
  impl::sync(input);
  const at::Tensor value = impl::from_functional_tensor(input);
  at::Tensor replayed;
  {
    at::AutoDispatchSkipFunctionalize skip;
    replayed = dropout_replay_op().call(value, state, p, shared_dims, std::nullopt, std::nullopt);
  }
  impl::replace_(input, replayed);
  impl::commit_update(input);
  impl::sync(input);
  return input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout", &fused_dropout::dropout_autograd);
  m.impl("dropout_state", &fused_dropout::state_autograd);
  m.impl("dropout_replay", &fused_dropout::replay_autograd);
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_autograd);
}

TORCH_LIBRARY_IMPL(fused_dropout, ADInplaceOrView, m) {
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_bump_version);
}

TORCH_LIBRARY_IMPL(fused_dropout, Functionalize, m) {
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_functionalize);
}
