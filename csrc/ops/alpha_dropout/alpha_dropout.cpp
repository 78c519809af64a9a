// Alpha dropout (torch's nn.AlphaDropout, rules.h AlphaRule): schema, Meta kernel and
// autograd. Its arguments are dropout's, checked by dropout's checks; its gradient is its a
// on kept elements and 0 on dropped ones, a replay of the mask with scale a.
#include <torch/library.h>

#include "autograd.h"
#include "dispatch.h"
#include "operands.h"
#include "ops/alpha_dropout/alpha_dropout.h"
#include "ops/dropout/dropout.h"
#include "rules.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> alpha_dropout_meta(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                      int64_t offset, std::optional<at::Generator> generator,
                                                      at::IntArrayRef shared_dims) {
  check_dropout_args(kAlphaDropoutOp, input, p, seed, offset, generator, shared_dims);
  return {empty_output_like(input), empty_state_like(input)};
}

std::tuple<at::Tensor, at::Tensor> alpha_dropout_autograd(const at::Tensor& input, double p,
                                                          std::optional<int64_t> seed, int64_t offset,
                                                          std::optional<at::Generator> generator,
                                                          at::IntArrayRef shared_dims) {
  static const auto op = find_op<DropoutSignature>(kAlphaDropoutOp);
  const double a = p < 1.0 ? AlphaRule<float, double>::a_for_p(p) : 0.0;
  auto [output, rng_state] = below_autograd(op, input, p, seed, offset, std::move(generator), shared_dims);
  if (needs_grad({&input})) record_replay(output, rng_state, p, shared_dims, a, false, input.scalar_type(), input);
  if (const at::Tensor tangent = tangent_of(&input); tangent.defined()) {
    set_tangent(output, replay(tangent, rng_state, p, shared_dims, a));
  }
  return {output, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_FRAGMENT(fused_dropout, m) {
  m.def(
      "alpha_dropout(Tensor input, float p, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) { m.impl("alpha_dropout", &fused_dropout::alpha_dropout_meta); }

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) { m.impl("alpha_dropout", &fused_dropout::alpha_dropout_autograd); }
