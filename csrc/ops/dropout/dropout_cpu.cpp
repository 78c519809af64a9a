// The dropout ops on the CPU: the shared walk (cpu/walk.h) with plain dropout's rule.
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/walk.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                               int64_t offset, std::optional<at::Generator> generator,
                                               at::IntArrayRef shared_dims) {
  const MaskLayout layout = check_dropout_call(kDropoutOp, input, p, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, state, p);
  return {output, state_tensor(state)};
}

at::Tensor dropout_state_cpu(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                             std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  check_state_call(kDropoutStateOp, input, seed, offset, generator, shared_dims);
  return state_tensor(draw_state(seed, offset, generator));
}

at::Tensor dropout_replay_cpu(const at::Tensor& input, const at::Tensor& rng_state, double p,
                              at::IntArrayRef shared_dims, std::optional<double> scale) {
  const MaskLayout layout = check_replay_call(kDropoutReplayOp, input, rng_state, p, shared_dims, /*inplace=*/false);
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, read_state(rng_state), p, RuleSpec{{}, {}, scale});
  return output;
}

at::Tensor& dropout_replay_inplace_cpu(at::Tensor& input, const at::Tensor& rng_state, double p,
                                       at::IntArrayRef shared_dims) {
  const MaskLayout layout =
      check_replay_call(kDropoutReplayInplaceOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  dispatch_apply(input, at::Tensor(), input, layout, read_state(rng_state), p);
  return input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", &fused_dropout::dropout_cpu);
  m.impl("dropout_state", &fused_dropout::dropout_state_cpu);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cpu);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_cpu);
}
