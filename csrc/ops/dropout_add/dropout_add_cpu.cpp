// dropout_add on the CPU: the shared walk (cpu/walk.h) with plain dropout's rule as a
// two-operand rule, residual + dropout(input + bias).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/walk.h"
#include "ops/dropout_add/dropout_add.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> dropout_add_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                   const std::optional<at::Tensor>& bias, double p,
                                                   std::optional<int64_t> seed, int64_t offset,
                                                   std::optional<at::Generator> generator,
                                                   at::IntArrayRef shared_dims) {
  const MaskLayout layout =
      check_dropout_add_call(kDropoutAddOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  if (residual.scalar_type() != input.scalar_type()) {
    return dropout_add_promoted(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
  }
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add", [&] {
    apply<scalar_t, true>(input, residual, bias_contiguous, output, layout, state, MaskedScale<scalar_t>::for_p(p));
  });
  return {output, state_tensor(state)};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) { m.impl("dropout_add", &fused_dropout::dropout_add_cpu); }
