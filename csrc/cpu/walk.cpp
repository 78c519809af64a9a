#include "cpu/walk.h"

#include <ATen/Dispatch.h>

namespace fused_dropout {

void dispatch_apply(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, const MaskLayout& layout,
                    RngState state, double p, const RuleSpec& spec) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout", [&] {
    visit_rule<scalar_t>(spec, p, [&](const auto& rule) {
      apply<scalar_t, false>(input, at::Tensor(), bias, output, layout, state, rule);
    });
  });
}

}  // namespace fused_dropout
