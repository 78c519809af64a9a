// How dropout_replay_, the one op that writes its input, meets torch's in-place machinery:
// the version counter (ADInplaceOrView) and functionalization (Functionalize), as torch's
// generated kernels do for its own in-place ops. Autograd is in autograd.cpp.
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fused_dropout {
namespace {

using ReplaySignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, at::IntArrayRef,
                                   std::optional<double>);
using ReplayInplaceSignature = at::Tensor&(at::Tensor&, const at::Tensor&, double, at::IntArrayRef);

const c10::TypedOperatorHandle<ReplayInplaceSignature>& replay_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_dropout::dropout_replay_", "")
                             .typed<ReplayInplaceSignature>();
  return op;
}

// The version bump comes before the kernel writes, so that an inference tensor outside
// inference mode is refused with the input untouched.
at::Tensor& replay_inplace_bump_version(at::Tensor& input, const at::Tensor& rng_state, double p,
                                        at::IntArrayRef shared_dims) {
  torch::autograd::impl::bump_version(input);
  at::AutoDispatchBelowADInplaceOrView below;
  return replay_inplace_op().call(input, rng_state, p, shared_dims);
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
    return replay_inplace_op().call(input, state, p, shared_dims);
  }
  impl::sync(input);
  const at::Tensor value = impl::from_functional_tensor(input);
  static const auto replay =
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_dropout::dropout_replay", "").typed<ReplaySignature>();
  at::Tensor replayed;
  {
    at::AutoDispatchSkipFunctionalize skip;
    replayed = replay.call(value, state, p, shared_dims, std::nullopt);
  }
  impl::replace_(input, replayed);
  impl::commit_update(input);
  impl::sync(input);
  return input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, ADInplaceOrView, m) {
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_bump_version);
}

TORCH_LIBRARY_IMPL(fused_dropout, Functionalize, m) {
  m.impl("dropout_replay_", &fused_dropout::replay_inplace_functionalize);
}
