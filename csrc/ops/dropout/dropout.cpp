// Plain dropout's schema, argument checks and Meta kernels. The Meta kernels are what
// torch.compile, torch.export, FakeTensorMode and meta tensors run: each runs the op's checks
// on metadata, then returns empty outputs of the right shape, dtype and strides. So a compiled
// program is refused at trace time with eager's message, and a meta tensor beside a CPU or
// CUDA tensor is refused (the Meta key outranks the other backends in dispatch) instead of
// returning uninitialised memory.
#include "ops/dropout/dropout.h"

#include <torch/library.h>

#include "dispatch.h"
#include "operands.h"

namespace fused_dropout {

const c10::TypedOperatorHandle<DropoutSignature>& dropout_op() {
  static const auto op = find_op<DropoutSignature>(kDropoutOp);
  return op;
}
const c10::TypedOperatorHandle<DropoutStateSignature>& dropout_state_op() {
  static const auto op = find_op<DropoutStateSignature>(kDropoutStateOp);
  return op;
}
const c10::TypedOperatorHandle<DropoutReplaySignature>& dropout_replay_op() {
  static const auto op = find_op<DropoutReplaySignature>(kDropoutReplayOp);
  return op;
}
const c10::TypedOperatorHandle<DropoutReplayInplaceSignature>& dropout_replay_inplace_op() {
  static const auto op = find_op<DropoutReplayInplaceSignature>(kDropoutReplayInplaceOp);
  return op;
}

void check_dropout_args(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                        int64_t offset, const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_input_and_p(op, input, p);
  check_randomness_args(op, seed, offset, generator);
  check_shared_dims(op, input, shared_dims);
}

MaskLayout check_dropout_call(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                              int64_t offset, const std::optional<at::Generator>& generator,
                              at::IntArrayRef shared_dims) {
  check_dropout_args(op, input, p, seed, offset, generator, shared_dims);
  return mask_layout(op, input, shared_dims);
}

void check_state_args(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                      const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_input(op, input);
  check_randomness_args(op, seed, offset, generator);
  check_inplace_target(op, input);
  check_shared_dims(op, input, shared_dims);
}

MaskLayout check_state_call(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                            const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_state_args(op, input, seed, offset, generator, shared_dims);
  return mask_layout(op, input, shared_dims);
}

void check_replay_args(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                       at::IntArrayRef shared_dims, bool inplace, std::optional<at::ScalarType> dtype) {
  check_input_and_p(op, input, p);
  TORCH_CHECK(!dtype.has_value() || is_float_dtype(*dtype), op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", *dtype);
  check_rng_state(op, input, rng_state);
  if (inplace) check_inplace_target(op, input);
  check_shared_dims(op, input, shared_dims);
}

MaskLayout check_replay_call(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                             at::IntArrayRef shared_dims, bool inplace, std::optional<at::ScalarType> dtype) {
  check_replay_args(op, input, rng_state, p, shared_dims, inplace, dtype);
  return mask_layout(op, input, shared_dims);
}

at::ScalarType replay_dtype(const at::Tensor& input, std::optional<at::ScalarType> dtype) {
  return dtype.value_or(input.scalar_type());
}

namespace {

std::tuple<at::Tensor, at::Tensor> dropout_meta(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                int64_t offset, std::optional<at::Generator> generator,
                                                at::IntArrayRef shared_dims) {
  check_dropout_args(kDropoutOp, input, p, seed, offset, generator, shared_dims);
  return {empty_output_like(input), empty_state_like(input)};
}

at::Tensor dropout_state_meta(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                              std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  check_state_args(kDropoutStateOp, input, seed, offset, generator, shared_dims);
  return empty_state_like(input);
}

at::Tensor dropout_replay_meta(const at::Tensor& input, const at::Tensor& rng_state, double p,
                               at::IntArrayRef shared_dims, std::optional<double> /*scale*/,
                               std::optional<at::ScalarType> dtype) {
  check_replay_args(kDropoutReplayOp, input, rng_state, p, shared_dims, /*inplace=*/false, dtype);
  return empty_output_like(input, replay_dtype(input, dtype));
}

at::Tensor& dropout_replay_inplace_meta(at::Tensor& input, const at::Tensor& rng_state, double p,
                                        at::IntArrayRef shared_dims) {
  check_replay_args(kDropoutReplayInplaceOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  return input;
}

}  // namespace
}  // namespace fused_dropout

// rng_state is int64[2] = (seed, base) of the mask rule: all a backward needs to regenerate
// the mask. shared_dims are dims along which one mask value is shared (channel-wise and
// "locked" dropout); the rule then indexes the smaller mask shape. The random ops of every
// form are nondeterministic_seeded so that graph passes (CSE, dead-code merging) never fold
// two calls into one.
TORCH_LIBRARY_FRAGMENT(fused_dropout, m) {
  m.def(
      "dropout(Tensor input, float p, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // input times the mask and scale that rng_state stands for: the backward of dropout, alpha
  // dropout and dropout_add, and a piece of act_dropout's. With `scale`, kept elements are
  // scaled by it instead of 1 / (1 - p) (alpha dropout's backward). With `dtype`, the input is
  // first converted to it and the output has it, in the same pass: dropout_add's backward
  // from a float32 residual stream to a 2-byte branch reads the float32 gradient once.
  m.def(
      "dropout_replay(Tensor input, Tensor rng_state, float p, int[] shared_dims=[], float? scale=None, "
      "ScalarType? dtype=None) -> Tensor");
  // In-place dropout is two steps: draw the state (the only random step), then apply its
  // mask in place. The in-place op returns its input, the schema torch's in-place fallbacks
  // (negative and conjugate views, functionalization) expect.
  m.def(
      "dropout_state(Tensor input, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def("dropout_replay_(Tensor(a!) input, Tensor rng_state, float p, int[] shared_dims=[]) -> Tensor(a!)",
        {at::Tag::inplace});
}

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) {
  m.impl("dropout", &fused_dropout::dropout_meta);
  m.impl("dropout_state", &fused_dropout::dropout_state_meta);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_meta);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_meta);
}
