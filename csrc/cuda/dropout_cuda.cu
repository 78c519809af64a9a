// CUDA kernels: each element is read once and written once; nothing else touches global
// memory except the 16-byte rng_state. Random words come from the shared Philox in
// registers, one Philox call per four elements.
#include <limits>
#include <mutex>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include "../dropout.h"
#include "kernels.cuh"
#include "static_switch.h"

namespace fused_dropout {
namespace {

// Where a call's (seed, base) comes from: a saved rng_state on the device (replay), or the
// generator's PhiloxCudaState, which under CUDA-graph capture points at device memory that
// each replay advances. Either way it is read on the device, so capture works.
struct StateSource {
  at::PhiloxCudaState philox;
  const int64_t* saved;  // non-null: replay of a saved rng_state
  int64_t* record;       // non-null: where the forward writes the (seed, base) it used

  // A new call's state, recorded into rng_state for backward.
  static StateSource drawn(at::PhiloxCudaState philox, at::Tensor& rng_state) {
    return {philox, nullptr, rng_state.mutable_data_ptr<int64_t>()};
  }
  // The state of an earlier call, read back from its rng_state.
  static StateSource saved_in(const at::Tensor& rng_state) {
    return {at::PhiloxCudaState(0, 0), rng_state.const_data_ptr<int64_t>(), nullptr};
  }
};

__device__ __forceinline__ void resolve_state(const StateSource& src, uint64_t& seed, uint64_t& base) {
  if (src.saved != nullptr) {
    seed = static_cast<uint64_t>(src.saved[0]);
    base = static_cast<uint64_t>(src.saved[1]);
  } else {
    const auto unpacked = at::cuda::philox::unpack(src.philox);
    seed = std::get<0>(unpacked);
    base = std::get<1>(unpacked);
  }
  // One thread records the state for backward: the values are only known on the device
  // when the launch was captured into a CUDA graph.
  if (src.record != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    src.record[0] = static_cast<int64_t>(seed);
    src.record[1] = static_cast<int64_t>(base);
  }
}

// Blocks for one work item per thread, rather than a grid of resident blocks that loops over
// the work (benchmarks/studies/ compares the launch shapes). The mask does not depend on the
// grid, only on the logical index. The kernels rely on the grid covering all of their work
// (they do not loop); the largest grid covers 2^31 - 1 blocks of 256 work items, far beyond
// any GPU's memory.
int grid_for(int64_t work_items) {
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  TORCH_CHECK(needed <= kMaxBlocks, "fused_dropout: ", work_items,
              " work items need more than the 2^31 - 1 blocks of one CUDA launch");
  return static_cast<int>(std::max<int64_t>(1, needed));
}

// Launches the kernel for the operands' layout; `residual` is the second operand of the
// two-operand rules (dropout_add's residual, act_dropout_backward's gradient) and undefined for
// the others, `bias` where the op has none. Launched even for an empty tensor, so the kernel still
// records rng_state.
template <typename scalar_t, bool kPair, typename Rule>
void launch(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
            const MaskLayout& mask, const StateSource& src, const Rule& rule) {
  constexpr bool kTakesBias = kPair || kRuleTakesBias<Rule>;
  const Operands<scalar_t> ops{input.const_data_ptr<scalar_t>(),
                               kPair ? residual.const_data_ptr<scalar_t>() : nullptr,
                               bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                               output.mutable_data_ptr<scalar_t>(),
                               input.numel(),
                               input.dim() > 0 ? std::max<int64_t>(input.size(-1), 1) : 1};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The row-major and row-shared kernels take one step of kStep elements per thread, with
  // 16-byte loads and stores where every operand is aligned to them.
  constexpr int kStep = step_elems<scalar_t>();
  constexpr size_t kAlign = sizeof(Vec<scalar_t, kStep>);
  const auto aligned = [&](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kAlign == 0; };
  const bool all_aligned = aligned(ops.in) && aligned(ops.out) && (!kPair || aligned(ops.res));
  const bool with_bias = kTakesBias && ops.bias != nullptr;
  const bool row_major =
      !mask.shared && input.is_contiguous() && output.is_contiguous() && (!kPair || residual.is_contiguous());
  if (row_major) {
    BOOL_SWITCH(all_aligned, kAligned, [&] {
      BOOL_SWITCH(with_bias, kBias, [&] {
        contiguous_kernel<scalar_t, kAligned, kPair, kTakesBias && kBias>
            <<<grid_for((ops.numel + kStep - 1) / kStep), kThreads, 0, stream>>>(ops, src, rule);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // A bias needs each element's logical index, so only a walk without one follows memory.
  const WalkOrder order = ops.bias == nullptr ? WalkOrder::kOutputMemory : WalkOrder::kLogical;
  const MergedLayout layout = merged_layout(input, output, mask, residual, order);
  if (const int64_t row_size = shared_row_size(layout); row_size >= kStep) {
    BOOL_SWITCH(all_aligned, kAligned, [&] {
      BOOL_SWITCH(with_bias, kBias, [&] {
        row_shared_kernel<scalar_t, kAligned, kPair, kTakesBias && kBias>
            <<<grid_for((ops.numel + kStep - 1) / kStep), kThreads, 0, stream>>>(ops, row_size, src, rule);
      });
    });
  } else {
    BOOL_SWITCH(ops.numel <= std::numeric_limits<int32_t>::max(), kIndex32, [&] {
      using index_t = std::conditional_t<kIndex32, uint32_t, uint64_t>;
      strided_kernel<scalar_t, kPair, index_t>
          <<<grid_for((ops.numel + 3) / 4), kThreads, 0, stream>>>(ops, layout, src, rule);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// output = rule(input + bias) for the rule `spec` names (bias may be undefined).
void dispatch_launch(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, const MaskLayout& mask,
                     const StateSource& src, double p, const RuleSpec& spec = {}) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout", [&] {
    visit_rule<scalar_t>(spec, p, [&](const auto& rule) {
      launch<scalar_t, false>(input, at::Tensor(), bias, output, mask, src, rule);
    });
  });
}

// The random state of a new call: an explicit seed, or counters reserved from the generator.
at::PhiloxCudaState reserve_state(const at::Tensor& input, const MaskLayout& mask, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator) {
  if (seed.has_value()) return at::PhiloxCudaState(static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(input.device().index()));
  // Reserving under the mutex gives concurrent callers disjoint counter ranges.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(counters_for(mask.numel));
}

at::Tensor new_state_tensor(const at::Tensor& input) { return at::empty({2}, input.options().dtype(at::kLong)); }

// A random op with dropout's signature: dropout, or alpha dropout (the rule `spec` names).
std::tuple<at::Tensor, at::Tensor> random_op_cuda(const char* op, const RuleSpec& spec, const at::Tensor& input,
                                                  double p, std::optional<int64_t> seed, int64_t offset,
                                                  std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const MaskLayout mask = check_dropout_call(op, input, p, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input);
  at::Tensor rng_state = new_state_tensor(input);
  dispatch_launch(input, at::Tensor(), output, mask,
                  StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state), p, spec);
  return {output, rng_state};
}

std::tuple<at::Tensor, at::Tensor> dropout_cuda(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                int64_t offset, std::optional<at::Generator> generator,
                                                at::IntArrayRef shared_dims) {
  return random_op_cuda("fused_dropout::dropout", {}, input, p, seed, offset, std::move(generator), shared_dims);
}

// Writes a drawn state into rng_state on the device, where it is known under graph capture.
__global__ void record_state_kernel(StateSource src) {
  uint64_t seed, base;
  resolve_state(src, seed, base);
}

at::Tensor dropout_state_cuda(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                              std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const MaskLayout mask = check_state_call("fused_dropout::dropout_state", input, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor rng_state = new_state_tensor(input);
  record_state_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rng_state;
}

at::Tensor dropout_replay_cuda(const at::Tensor& input, const at::Tensor& rng_state, double p,
                               at::IntArrayRef shared_dims, std::optional<double> scale) {
  constexpr const char* kOp = "fused_dropout::dropout_replay";
  const MaskLayout mask = check_replay_call(kOp, input, rng_state, p, shared_dims, /*inplace=*/false);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor state = rng_state.contiguous();
  at::Tensor output = empty_output_like(input);
  dispatch_launch(input, at::Tensor(), output, mask, StateSource::saved_in(state), p, RuleSpec{{}, {}, scale});
  return output;
}

at::Tensor& dropout_replay_inplace_cuda(at::Tensor& input, const at::Tensor& rng_state, double p,
                                        at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_replay_";
  const MaskLayout mask = check_replay_call(kOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor state = rng_state.contiguous();
  dispatch_launch(input, at::Tensor(), input, mask, StateSource::saved_in(state), p);
  return input;
}

std::tuple<at::Tensor, at::Tensor> alpha_dropout_cuda(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                      int64_t offset, std::optional<at::Generator> generator,
                                                      at::IntArrayRef shared_dims) {
  return random_op_cuda("fused_dropout::alpha_dropout", RuleSpec{RuleSpec::Form::kAlpha}, input, p, seed, offset,
                        std::move(generator), shared_dims);
}

std::tuple<at::Tensor, at::Tensor> act_dropout_cuda(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                    double p, c10::string_view activation, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::act_dropout";
  const auto [mask, act] =
      check_act_dropout_call(kOp, input, bias, p, activation, seed, offset, generator, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input);
  at::Tensor rng_state = new_state_tensor(input);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  dispatch_launch(input, bias_contiguous, output, mask,
                  StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state), p,
                  RuleSpec{RuleSpec::Form::kAct, act});
  return {output, rng_state};
}

at::Tensor act_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                     c10::string_view activation, at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::act_dropout_backward";
  const auto [mask, act] =
      check_act_dropout_backward_call(kOp, grad, input, bias, rng_state, p, activation, shared_dims);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor state = rng_state.contiguous();
  at::Tensor grad_input = empty_output_like(input);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "act_dropout_backward", [&] {
    visit_act_grad_rule<scalar_t>(act, p, [&](const auto& rule) {
      launch<scalar_t, true>(input, grad, bias_contiguous, grad_input, mask, StateSource::saved_in(state), rule);
    });
  });
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> dropout_add_cuda(const at::Tensor& input, const at::Tensor& residual,
                                                    const std::optional<at::Tensor>& bias, double p,
                                                    std::optional<int64_t> seed, int64_t offset,
                                                    std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_add";
  const MaskLayout mask = check_dropout_add_call(kOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  if (residual.scalar_type() != input.scalar_type()) {
    return dropout_add_promoted(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = empty_output_like(input);
  at::Tensor rng_state = new_state_tensor(input);
  const StateSource src = StateSource::drawn(reserve_state(input, mask, seed, offset, generator), rng_state);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add", [&] {
    launch<scalar_t, true>(input, residual, bias_contiguous, output, mask, src, OutputRule<scalar_t>::for_p(p));
  });
  return {output, rng_state};
}

__global__ void philox_kernel(const int64_t* counter, const int64_t* key, int64_t* out, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const PhiloxWords w =
      philox4x32_10(static_cast<uint32_t>(counter[4 * row]), static_cast<uint32_t>(counter[4 * row + 1]),
                    static_cast<uint32_t>(counter[4 * row + 2]), static_cast<uint32_t>(counter[4 * row + 3]),
                    static_cast<uint32_t>(key[2 * row]), static_cast<uint32_t>(key[2 * row + 1]));
#pragma unroll
  for (int j = 0; j < 4; ++j) out[4 * row + j] = static_cast<int64_t>(w.w[j]);
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c, at::MemoryFormat::Contiguous);
  const int64_t rows = c.size(0);
  if (rows == 0) return out;
  const int blocks = static_cast<int>((rows + kThreads - 1) / kThreads);
  philox_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("dropout", &fused_dropout::dropout_cuda);
  m.impl("dropout_state", &fused_dropout::dropout_state_cuda);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cuda);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_cuda);
  m.impl("dropout_add", &fused_dropout::dropout_add_cuda);
  m.impl("alpha_dropout", &fused_dropout::alpha_dropout_cuda);
  m.impl("act_dropout", &fused_dropout::act_dropout_cuda);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_cuda);
  m.impl("philox4x32_10", &fused_dropout::philox4x32_10_cuda);
}
