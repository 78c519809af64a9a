// A call's tensors as the kernels of every form take them: the merged walk over them, the
// bias, the output and the state tensor.
#pragma once

#include <array>
#include <optional>

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "layout.h"

namespace fused_dropout {

// The merged walk (layout.h), in logical order, of input, output, mask and `second`, the
// second operand of a two-operand rule (undefined for the others: it then walks as the input).
MergedLayout merged_layout(const at::Tensor& input, const at::Tensor& output, const MaskLayout& mask,
                           const at::Tensor& second);

// The strides merged_layout walks: input, output, mask and second operand.
std::array<const int64_t*, kOperands> operand_strides(const at::Tensor& input, const at::Tensor& output,
                                                      const MaskLayout& mask, const at::Tensor& second);

// An op's optional bias as the kernels read it (contiguous), or an undefined tensor.
at::Tensor contiguous_bias(const std::optional<at::Tensor>& bias);

// The output of an out-of-place call: same shape, device and memory format as the input, and
// the input's dtype unless `dtype` names another.
at::Tensor empty_output_like(const at::Tensor& input, std::optional<at::ScalarType> dtype = std::nullopt);

// An uninitialised rng_state (int64[2]) on the input's device: what a Meta kernel returns.
at::Tensor empty_state_like(const at::Tensor& input);

}  // namespace fused_dropout
