// Plain dropout: dropout, and the ops every form's backward and in-place call are made of:
// dropout_state (draw a state), dropout_replay (apply a state's mask), dropout_replay_ (in place).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"

namespace fused_dropout {

// The ops' names, as their messages and handles spell them.
inline constexpr char kDropoutOp[] = "fused_dropout::dropout";
inline constexpr char kDropoutStateOp[] = "fused_dropout::dropout_state";
inline constexpr char kDropoutReplayOp[] = "fused_dropout::dropout_replay";
inline constexpr char kDropoutReplayInplaceOp[] = "fused_dropout::dropout_replay_";

using DropoutSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, std::optional<int64_t>, int64_t,
                                                            std::optional<at::Generator>, at::IntArrayRef);
using DropoutStateSignature = at::Tensor(const at::Tensor&, std::optional<int64_t>, int64_t,
                                         std::optional<at::Generator>, at::IntArrayRef);
using DropoutReplaySignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, at::IntArrayRef,
                                          std::optional<double>, std::optional<at::ScalarType>);
using DropoutReplayInplaceSignature = at::Tensor&(at::Tensor&, const at::Tensor&, double, at::IntArrayRef);

const c10::TypedOperatorHandle<DropoutSignature>& dropout_op();
const c10::TypedOperatorHandle<DropoutStateSignature>& dropout_state_op();
const c10::TypedOperatorHandle<DropoutReplaySignature>& dropout_replay_op();
const c10::TypedOperatorHandle<DropoutReplayInplaceSignature>& dropout_replay_inplace_op();

// The checks of dropout's arguments (input, p, seed/offset/generator, shared dims), which
// alpha_dropout shares; the _call form also returns the mask layout.
void check_dropout_args(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                        int64_t offset, const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);
MaskLayout check_dropout_call(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                              int64_t offset, const std::optional<at::Generator>& generator,
                              at::IntArrayRef shared_dims);

// dropout_state draws the state of an in-place call, so its input must be a valid in-place target.
void check_state_args(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                      const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);
MaskLayout check_state_call(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                            const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);

// dropout_replay's and dropout_replay_'s arguments (`dtype`: dropout_replay's output dtype).
void check_replay_args(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                       at::IntArrayRef shared_dims, bool inplace, std::optional<at::ScalarType> dtype = std::nullopt);
MaskLayout check_replay_call(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                             at::IntArrayRef shared_dims, bool inplace,
                             std::optional<at::ScalarType> dtype = std::nullopt);

// The dtype a replay of `input` writes: `dtype` where given, else the input's.
at::ScalarType replay_dtype(const at::Tensor& input, std::optional<at::ScalarType> dtype);

}  // namespace fused_dropout
