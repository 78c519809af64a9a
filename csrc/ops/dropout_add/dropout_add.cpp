// dropout_add's schema, checks, Meta kernel and autograd (autograd.h): the input's and the
// bias's gradient is the replayed mask, the residual's is grad_output itself.
#include "ops/dropout_add/dropout_add.h"

#include <ATen/ops/add.h>
#include <torch/library.h>

#include "autograd.h"
#include "dispatch.h"
#include "operands.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {

void check_dropout_add_args(const char* op, const at::Tensor& input, const at::Tensor& residual,
                            const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                            int64_t offset, const std::optional<at::Generator>& generator,
                            at::IntArrayRef shared_dims) {
  check_input_and_p(op, input, p);
  check_like_input(op, "residual", input, residual, OperandDtype::kAnyFloat);
  check_bias(op, input, bias);
  check_randomness_args(op, seed, offset, generator);
  check_shared_dims(op, input, shared_dims);
}

MaskLayout check_dropout_add_call(const char* op, const at::Tensor& input, const at::Tensor& residual,
                                  const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims) {
  check_dropout_add_args(op, input, residual, bias, p, seed, offset, generator, shared_dims);
  return mask_layout(op, input, shared_dims);
}

std::tuple<at::Tensor, at::Tensor> dropout_add_promoted(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  // input + bias rounded to the input's dtype, as the fused op and the unfused sum round it.
  const at::Tensor pre = bias.has_value() && bias->defined() ? at::add(input, *bias) : input;
  auto [dropped, rng_state] = dropout_op().call(pre, p, seed, offset, std::move(generator), shared_dims);
  at::Tensor output = empty_output_like(input, sum_dtype(input, residual));
  at::add_out(output, residual, dropped);
  return {output, rng_state};
}

namespace {

using DropoutAddSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, double,
                                                               std::optional<int64_t>, int64_t,
                                                               std::optional<at::Generator>, at::IntArrayRef);

std::tuple<at::Tensor, at::Tensor> dropout_add_meta(const at::Tensor& input, const at::Tensor& residual,
                                                    const std::optional<at::Tensor>& bias, double p,
                                                    std::optional<int64_t> seed, int64_t offset,
                                                    std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  check_dropout_add_args(kDropoutAddOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  return {empty_output_like(input, sum_dtype(input, residual)), empty_state_like(input)};
}

std::tuple<at::Tensor, at::Tensor> dropout_add_autograd(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  const c10::MaybeOwned<at::Tensor> bias_or_undefined = at::borrow_from_optional_tensor(bias);
  const at::Tensor& b = *bias_or_undefined;
  static const auto op = find_op<DropoutAddSignature>(kDropoutAddOp);
  auto [output, rng_state] = below_autograd(op, input, residual, bias, p, seed, offset, generator, shared_dims);
  if (needs_grad({&input, &residual, &b})) {
    record_replay(output, rng_state, p, shared_dims, std::nullopt, true, input.scalar_type(), input, residual, b);
  }
  // d output = d residual + mask * scale * (d input + d bias), in the output's dtype
  const at::Tensor dropped = sum_defined({tangent_of(&input), tangent_of(&b)}, input);
  const at::Tensor residual_tangent = tangent_of(&residual);
  if (dropped.defined() || residual_tangent.defined()) {
    const at::Tensor replayed = dropped.defined() ? replay(dropped, rng_state, p, shared_dims) : at::Tensor();
    set_tangent(output, sum_defined({replayed, residual_tangent}, input).to(output.scalar_type()));
  }
  return {output, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_FRAGMENT(fused_dropout, m) {
  m.def(
      "dropout_add(Tensor input, Tensor residual, Tensor? bias, float p, int? seed=None, int offset=0, "
      "Generator? generator=None, int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) { m.impl("dropout_add", &fused_dropout::dropout_add_meta); }

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) { m.impl("dropout_add", &fused_dropout::dropout_add_autograd); }
