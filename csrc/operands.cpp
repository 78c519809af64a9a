#include "operands.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace fused_dropout {

std::array<const int64_t*, kOperands> operand_strides(const at::Tensor& input, const at::Tensor& output,
                                                      const MaskLayout& mask, const at::Tensor& second) {
  const int64_t* second_strides = second.defined() ? second.strides().data() : input.strides().data();
  return {input.strides().data(), output.strides().data(), mask.strides.data(), second_strides};
}

MergedLayout merged_layout(const at::Tensor& input, const at::Tensor& output, const MaskLayout& mask,
                           const at::Tensor& second) {
  MergedLayout layout = merge_dims(input.dim(), input.sizes().data(), operand_strides(input, output, mask, second));
  layout.mask_origin = mask.origin;
  return layout;
}

at::Tensor contiguous_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
}

at::Tensor empty_output_like(const at::Tensor& input, std::optional<at::ScalarType> dtype) {
  return at::empty_like(input, input.options().dtype(dtype.value_or(input.scalar_type())), at::MemoryFormat::Preserve);
}

at::Tensor empty_state_like(const at::Tensor& input) { return at::empty({2}, input.options().dtype(at::kLong)); }

}  // namespace fused_dropout
