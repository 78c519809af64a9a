// dropout_linear: F.linear(dropout(input), weight, bias), with the mask of dropout at the same
// seed. A form that multiplies (docs/design.md, "Dropout before a Linear"): the dropped input is
// never kept; backward saves the input itself and 16 bytes of state, and redraws the dropped
// input where the weight's gradient needs it.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace fused_dropout {

inline constexpr char kDropoutLinearOp[] = "fused_dropout::dropout_linear";

using DropoutLinearSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&, double,
                                                                  std::optional<int64_t>, int64_t,
                                                                  std::optional<at::Generator>, at::IntArrayRef);

const c10::TypedOperatorHandle<DropoutLinearSignature>& dropout_linear_op();

// All checks of dropout_linear's arguments (metadata only).
void check_dropout_linear_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               double p, const std::optional<int64_t>& seed, int64_t offset,
                               const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);

}  // namespace fused_dropout
