// dropout_add on CUDA: the shared launch (cuda/launch.cuh) with plain dropout's rule as a
// two-operand rule, residual + dropout(input + bias); for a 2-byte input beside a float32
// residual (a float32 residual stream), the same launch with the sum promoted to float32.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "ops/dropout_add/dropout_add.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> dropout_add_cuda(const at::Tensor& input, const at::Tensor& residual,
                                                    const std::optional<at::Tensor>& bias, double p,
                                                    std::optional<int64_t> seed, int64_t offset,
                                                    std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  const MaskLayout mask =
      check_dropout_add_call(kDropoutAddOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  const bool same_dtype = residual.scalar_type() == input.scalar_type();
  const bool float_residual_stream = residual.scalar_type() == at::kFloat &&
                                     (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf);
  // Other mixed dtypes: the composition, dropout then the promoting add.
  if (!same_dtype && !float_residual_stream) {
    return dropout_add_promoted(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input, sum_dtype(input, residual));
  at::Tensor rng_state = empty_state_like(input);
  const StateSource src = StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  if (same_dtype) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add", [&] {
      launch<scalar_t, true>(input, residual, bias_contiguous, output, mask, src, MaskedScale<scalar_t>::for_p(p));
    });
  } else {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "fused_dropout_add", [&] {
      launch<scalar_t, true, scalar_t, float, float>(input, residual, bias_contiguous, output, mask, src,
                                                     PromotedAdd<scalar_t, float>{MaskedScale<scalar_t>::for_p(p)});
    });
  }
  return {output, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) { m.impl("dropout_add", &fused_dropout::dropout_add_cuda); }
