// How every elementwise form launches the CUDA kernels (kernels.cuh): where a call's random
// state comes from, and the launch the plan (launch_plan.h) picks for the operands' layout.
// Each element is read once and written once; nothing else touches global memory except the
// 16-byte rng_state. Random words come from the shared Philox in registers, one Philox call
// per four elements.
#pragma once

#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include "checks.h"
#include "cuda/kernels.cuh"
#include "cuda/launch_plan.h"
#include "cuda/static_switch.h"
#include "operands.h"
#include "rules.h"

namespace fused_dropout {

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

// The random state of a new call: an explicit seed, or counters reserved from the generator.
inline at::PhiloxCudaState reserve_state(const at::Tensor& input, const MaskLayout& mask,
                                         const std::optional<int64_t>& seed, int64_t offset,
                                         const std::optional<at::Generator>& generator) {
  if (seed.has_value()) return at::PhiloxCudaState(static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(input.device().index()));
  // Reserving under the mutex gives concurrent callers disjoint counter ranges.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(counters_for(mask.numel));
}

// Blocks for one work item per thread, rather than a grid of resident blocks that loops over
// the work (benchmarks/studies/ compares the launch shapes). The mask does not depend on the
// grid, only on the logical index. The kernels rely on the grid covering all of their work
// (they do not loop); the largest grid covers 2^31 - 1 blocks of 256 work items, far beyond
// any GPU's memory.
inline int grid_for(int64_t work_items) {
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  TORCH_CHECK(needed <= kMaxBlocks, "fused_dropout: ", work_items,
              " work items need more than the 2^31 - 1 blocks of one CUDA launch");
  return static_cast<int>(std::max<int64_t>(1, needed));
}

// Launches the kernel the plan picks; `second` is the second operand of the two-operand rules
// (dropout_add's residual, act_dropout_backward's gradient) and undefined for the others,
// `bias` where the op has none. Launched even for an empty tensor, so the kernel still records
// rng_state. The rule runs in scalar_t; the input, second operand and output may be stored in
// other types (Operands).
template <typename scalar_t, bool kTwoOperands, typename in_t = scalar_t, typename res_t = scalar_t,
          typename out_t = scalar_t, typename Rule>
void launch(const at::Tensor& input, const at::Tensor& second, const at::Tensor& bias, at::Tensor& output,
            const MaskLayout& mask, const StateSource& src, const Rule& rule) {
  constexpr bool kTakesBias = kTwoOperands || kRuleTakesBias<Rule>;
  const Operands<scalar_t, in_t, res_t, out_t> ops{input.const_data_ptr<in_t>(),
                                                   kTwoOperands ? second.const_data_ptr<res_t>() : nullptr,
                                                   bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                                   output.mutable_data_ptr<out_t>(),
                                                   input.numel(),
                                                   input.dim() > 0 ? std::max<int64_t>(input.size(-1), 1) : 1};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The row-major and row-shared kernels take one step of kStep elements per thread, with
  // 16-byte loads and stores (two, for an operand of a wider type) where every operand is
  // aligned to its step.
  constexpr int kStep = step_elems<scalar_t>();
  const auto aligned = [&](const auto* ptr) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(ptr)>>;
    return reinterpret_cast<uintptr_t>(ptr) % sizeof(Vec<T, kStep>) == 0;
  };
  const bool all_aligned = aligned(ops.in) && aligned(ops.out) && (!kTwoOperands || aligned(ops.res));
  const bool with_bias = kTakesBias && ops.bias != nullptr;
  const bool row_major =
      mask.row_major && input.is_contiguous() && output.is_contiguous() && (!kTwoOperands || second.is_contiguous());
  const LaunchPlan plan = plan_launch(ops.numel, kStep, row_major, ops.bias != nullptr, input.dim(),
                                      input.sizes().data(), operand_strides(input, output, mask, second), mask.origin);
  const int grid = grid_for(plan.work_items);
  switch (plan.kernel) {
    case LaunchPlan::Kernel::kRowMajor:
      BOOL_SWITCH(all_aligned, kAligned, [&] {
        BOOL_SWITCH(with_bias, kBias, [&] {
          contiguous_kernel<scalar_t, kAligned, kTwoOperands, kTakesBias && kBias>
              <<<grid, kThreads, 0, stream>>>(ops, src, rule);
        });
      });
      break;
    case LaunchPlan::Kernel::kRowShared:
      BOOL_SWITCH(all_aligned, kAligned, [&] {
        BOOL_SWITCH(with_bias, kBias, [&] {
          row_shared_kernel<scalar_t, kAligned, kTwoOperands, kTakesBias && kBias>
              <<<grid, kThreads, 0, stream>>>(ops, plan.row_size, src, rule);
        });
      });
      break;
    case LaunchPlan::Kernel::kStrided:
      BOOL_SWITCH(plan.index32, kIndex32, [&] {
        using index_t = std::conditional_t<kIndex32, uint32_t, uint64_t>;
        strided_kernel<scalar_t, kTwoOperands, index_t><<<grid, kThreads, 0, stream>>>(ops, plan.layout, src, rule);
      });
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// output = rule(input + bias) for the rule `spec` names (bias may be undefined); every
// one-operand rule of every dtype, compiled once (launch.cu).
void dispatch_launch(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, const MaskLayout& mask,
                     const StateSource& src, double p, const RuleSpec& spec = {});

}  // namespace fused_dropout
