// Alpha dropout on CUDA: the shared launch (cuda/launch.cuh) with AlphaRule.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "ops/alpha_dropout/alpha_dropout.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> alpha_dropout_cuda(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                      int64_t offset, std::optional<at::Generator> generator,
                                                      at::IntArrayRef shared_dims) {
  const MaskLayout mask = check_dropout_call(kAlphaDropoutOp, input, p, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input);
  at::Tensor rng_state = empty_state_like(input);
  dispatch_launch(input, at::Tensor(), output, mask,
                  StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state), p,
                  RuleSpec{RuleSpec::Kind::kAlpha});
  return {output, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) { m.impl("alpha_dropout", &fused_dropout::alpha_dropout_cuda); }
