// The dropout ops on CUDA: the shared launch (cuda/launch.cuh) with plain dropout's rule, and a
// replay into another dtype.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "ops/dropout/dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> dropout_cuda(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                int64_t offset, std::optional<at::Generator> generator,
                                                at::IntArrayRef shared_dims) {
  const MaskLayout mask = check_dropout_call(kDropoutOp, input, p, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input);
  at::Tensor rng_state = empty_state_like(input);
  dispatch_launch(input, at::Tensor(), output, mask,
                  StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state), p);
  return {output, rng_state};
}

// Writes a drawn state into rng_state on the device, where it is known under graph capture.
__global__ void record_state_kernel(StateSource src) {
  uint64_t seed, base;
  resolve_state(src, seed, base);
}

at::Tensor dropout_state_cuda(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                              std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const MaskLayout mask = check_state_call(kDropoutStateOp, input, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor rng_state = empty_state_like(input);
  record_state_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rng_state;
}

at::Tensor dropout_replay_cuda(const at::Tensor& input, const at::Tensor& rng_state, double p,
                               at::IntArrayRef shared_dims, std::optional<double> scale,
                               std::optional<at::ScalarType> dtype) {
  const MaskLayout mask =
      check_replay_call(kDropoutReplayOp, input, rng_state, p, shared_dims, /*inplace=*/false, dtype);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor state = rng_state.contiguous();
  const at::ScalarType out_dtype = replay_dtype(input, dtype);
  if (input.scalar_type() == at::kFloat && (out_dtype == at::kBFloat16 || out_dtype == at::kHalf)) {
    // A float32 gradient into a 2-byte one (dropout_add's backward from a float32 residual
    // stream): the conversion in the same pass.
    at::Tensor output = empty_output_like(input, out_dtype);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out_dtype, "fused_dropout_replay", [&] {
      MaskedScale<scalar_t> rule = MaskedScale<scalar_t>::for_p(p);
      if (scale.has_value()) rule.scale = static_cast<float>(*scale);
      launch<scalar_t, false, float>(input, at::Tensor(), at::Tensor(), output, mask, StateSource::saved_in(state),
                                     rule);
    });
    return output;
  }
  // Other conversions: the conversion, then the replay.
  const at::Tensor converted = input.to(out_dtype);
  at::Tensor output = empty_output_like(converted);
  dispatch_launch(converted, at::Tensor(), output, mask, StateSource::saved_in(state), p, RuleSpec{{}, {}, scale});
  return output;
}

at::Tensor& dropout_replay_inplace_cuda(at::Tensor& input, const at::Tensor& rng_state, double p,
                                        at::IntArrayRef shared_dims) {
  const MaskLayout mask =
      check_replay_call(kDropoutReplayInplaceOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor state = rng_state.contiguous();
  dispatch_launch(input, at::Tensor(), input, mask, StateSource::saved_in(state), p);
  return input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("dropout", &fused_dropout::dropout_cuda);
  m.impl("dropout_state", &fused_dropout::dropout_state_cuda);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cuda);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_cuda);
}
