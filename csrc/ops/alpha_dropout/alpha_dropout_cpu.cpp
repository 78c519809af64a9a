// Alpha dropout on the CPU: the shared walk (cpu/walk.h) with AlphaRule.
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/walk.h"
#include "ops/alpha_dropout/alpha_dropout.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> alpha_dropout_cpu(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                     int64_t offset, std::optional<at::Generator> generator,
                                                     at::IntArrayRef shared_dims) {
  const MaskLayout layout = check_dropout_call(kAlphaDropoutOp, input, p, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, state, p, RuleSpec{RuleSpec::Kind::kAlpha});
  return {output, state_tensor(state)};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) { m.impl("alpha_dropout", &fused_dropout::alpha_dropout_cpu); }
