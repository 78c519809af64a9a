// dropout_add on the CPU: the shared walk (cpu/walk.h) with plain dropout's rule as a
// two-operand rule, residual + dropout(input + bias); and, for a residual of another dtype
// (a float32 residual stream beside a 2-byte branch), one pass of its own over row-major
// operands.
#include <algorithm>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/walk.h"
#include "ops/dropout_add/dropout_add.h"

namespace fused_dropout {
namespace {

// y = out_t(residual) + out_t(dropout(x + bias)) over row-major operands and a full mask: the
// dropout rounded to the input's dtype and the sum done in the output's, as torch's composition
// (dropout, then the promoting add) rounds them. The words come in the walk's row-major batches
// (for_each_word_batch). A 2-byte input beside a float32 residual takes the AVX-512 loop where
// the CPU has it; otherwise the bias is read in row segments so that its index is the loop
// index plus a constant.
template <typename in_t, typename res_t, typename out_t>
void dropout_add_widening(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias,
                          at::Tensor& output, RngState state, const PromotedAdd<in_t, out_t>& rule) {
  const in_t* x = input.const_data_ptr<in_t>();
  const res_t* r = residual.const_data_ptr<res_t>();
  const in_t* b = bias.defined() ? bias.const_data_ptr<in_t>() : nullptr;
  out_t* y = output.mutable_data_ptr<out_t>();
  const int64_t numel = input.numel();
  const int64_t last = input.dim() > 0 ? input.size(-1) : 1;
  constexpr bool kFloatResidual = kTwoByteFloat<in_t> && std::is_same_v<res_t, float> && std::is_same_v<out_t, float>;
  const TwoByteLoops* loops = nullptr;
  if constexpr (kFloatResidual) loops = two_byte_loops<in_t>();
  for_each_word_batch(numel, state, [&](int64_t first, int64_t n, const uint32_t* words) {
    if constexpr (kFloatResidual) {
      if (loops != nullptr) {
        const auto* x_bits = reinterpret_cast<const uint16_t*>(x);
        const auto* b_bits = reinterpret_cast<const uint16_t*>(b);
        return loops->dropout_add_float_residual(
            {x_bits + first, r + first, b_bits, first % last, last, y + first, words, n},
            MaskedScale<float, float>{rule.mask.keep, rule.mask.scale});
      }
    }
    if (b == nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        y[first + j] = rule.combine(r[first + j], x[first + j], words[j]);
      }
      return;
    }
    for (int64_t i = 0; i < n;) {
      const int64_t column = (first + i) % last;
      const int64_t m = std::min(n - i, last - column);
      const int64_t at = first + i;
      for (int64_t j = 0; j < m; ++j) {
        const in_t pre = plus_bias(x[at + j], b[column + j]);
        y[at + j] = rule.combine(r[at + j], pre, words[i + j]);
      }
      i += m;
    }
  });
}

// A residual of another dtype: one pass where the operands are row-major and the mask full,
// else the composition (dropout, then the promoting add); a float16 input as
// one_pass_converts (cpu/walk.h) says: the portable loop's one pass measured 2.8x slower
// than the AVX-512 dropout and ATen's add (docs/performance.md).
std::tuple<at::Tensor, at::Tensor> dropout_add_mixed_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                         const std::optional<at::Tensor>& bias, double p,
                                                         std::optional<int64_t> seed, int64_t offset,
                                                         std::optional<at::Generator> generator,
                                                         at::IntArrayRef shared_dims, const MaskLayout& layout) {
  if (!layout.row_major || !input.is_contiguous() || !residual.is_contiguous() ||
      !one_pass_converts(input.scalar_type(), residual.scalar_type())) {
    return dropout_add_promoted(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
  }
  // A contiguous input's output keeps its strides: contiguous too.
  const at::ScalarType out_dtype = sum_dtype(input, residual);
  at::Tensor output = new_output(input, out_dtype);
  const RngState state = draw_state(seed, offset, generator);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add_widening", [&] {
    using in_t = scalar_t;
    const MaskedScale<in_t> mask = MaskedScale<in_t>::for_p(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "fused_dropout_add_widening",
                                    [&] {
                                      using res_t = scalar_t;
                                      if (out_dtype == at::kDouble) {
                                        dropout_add_widening<in_t, res_t>(input, residual, bias_contiguous, output,
                                                                          state, PromotedAdd<in_t, double>{mask});
                                      } else {
                                        dropout_add_widening<in_t, res_t>(input, residual, bias_contiguous, output,
                                                                          state, PromotedAdd<in_t, float>{mask});
                                      }
                                    });
  });
  return {output, state_tensor(state)};
}

std::tuple<at::Tensor, at::Tensor> dropout_add_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                   const std::optional<at::Tensor>& bias, double p,
                                                   std::optional<int64_t> seed, int64_t offset,
                                                   std::optional<at::Generator> generator,
                                                   at::IntArrayRef shared_dims) {
  const MaskLayout layout =
      check_dropout_add_call(kDropoutAddOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  if (residual.scalar_type() != input.scalar_type()) {
    return dropout_add_mixed_cpu(input, residual, bias, p, seed, offset, std::move(generator), shared_dims, layout);
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
