// Calling the ops through the dispatcher: how one form's code calls another's op (a backward
// calls dropout_replay; autograd calls the kernels below it).
#pragma once

#include <utility>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace fused_dropout {

// The typed handle of op `name` ("fused_dropout::..."); each form's header declares an
// accessor that keeps one in a function-local static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Calls `op` below the autograd keys: the kernels themselves.
template <typename Signature, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace fused_dropout
