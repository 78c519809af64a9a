// dropout_linear's schema, checks, kernel and autocast rule. The kernel is a composition, on
// every device: the fused dropout kernel, then ATen's linear. What it saves for backward is the
// autograd kernel's business (dropout_linear_autograd.cpp): the dropped input dies here.
#include "ops/dropout_linear/dropout_linear.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "checks.h"
#include "dispatch.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {

const c10::TypedOperatorHandle<DropoutLinearSignature>& dropout_linear_op() {
  static const auto op = find_op<DropoutLinearSignature>(kDropoutLinearOp);
  return op;
}

void check_dropout_linear_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               double p, const std::optional<int64_t>& seed, int64_t offset,
                               const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  const char* op = kDropoutLinearOp;
  check_dropout_args(op, input, p, seed, offset, generator, shared_dims);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dim (in_features), got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.sym_size(1) == input.sym_size(-1), op,
              ": weight must be 2-D (out_features, in_features) with in_features the input's last dim (",
              input.sym_size(-1), "), got shape ", weight.sym_sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(), op,
              ": weight must have the input's dtype and device (", input.scalar_type(), " on ", input.device(),
              "), got ", weight.scalar_type(), " on ", weight.device());
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0), op, ": bias must be 1-D with out_features (",
              weight.sym_size(0), ") elements, got shape ", bias->sym_sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(), op,
              ": bias must have the input's dtype and device (", input.scalar_type(), " on ", input.device(), "), got ",
              bias->scalar_type(), " on ", bias->device());
}

namespace {

std::tuple<at::Tensor, at::Tensor> dropout_linear_composite(const at::Tensor& input, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias, double p,
                                                            std::optional<int64_t> seed, int64_t offset,
                                                            std::optional<at::Generator> generator,
                                                            at::IntArrayRef shared_dims) {
  check_dropout_linear_args(input, weight, bias, p, seed, offset, generator, shared_dims);
  auto [dropped, rng_state] = dropout_op().call(input, p, seed, offset, std::move(generator), shared_dims);
  return {at::linear(dropped, weight, bias), rng_state};
}

// Autocast: F.linear's rule. Input, weight and bias are cast to the autocast dtype first, so the
// mask scales the cast input, and the output has the dtype F.linear gives under autocast.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> dropout_linear_autocast(const at::Tensor& input, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, double p,
                                                           std::optional<int64_t> seed, int64_t offset,
                                                           std::optional<at::Generator> generator,
                                                           at::IntArrayRef shared_dims) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return dropout_linear_op().call(
      at::autocast::cached_cast(dtype, input, kDevice), at::autocast::cached_cast(dtype, weight, kDevice),
      at::autocast::cached_cast(dtype, bias, kDevice), p, seed, offset, std::move(generator), shared_dims);
}

}  // namespace
}  // namespace fused_dropout

// output = F.linear(dropout(input), weight, bias), the mask that of dropout with the same seed,
// offset and shared dims; rng_state is what the backward replays it from.
TORCH_LIBRARY_FRAGMENT(fused_dropout, m) {
  m.def(
      "dropout_linear(Tensor input, Tensor weight, Tensor? bias, float p, int? seed=None, int offset=0, "
      "Generator? generator=None, int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
}

// One kernel for every backend, Meta included: each op it calls has its own.
TORCH_LIBRARY_IMPL(fused_dropout, CompositeExplicitAutograd, m) {
  m.impl("dropout_linear", &fused_dropout::dropout_linear_composite);
}

TORCH_LIBRARY_IMPL(fused_dropout, AutocastCPU, m) {
  m.impl("dropout_linear", &fused_dropout::dropout_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fused_dropout, AutocastCUDA, m) {
  m.impl("dropout_linear", &fused_dropout::dropout_linear_autocast<c10::DeviceType::CUDA>);
}
