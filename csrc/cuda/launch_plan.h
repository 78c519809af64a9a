// Which CUDA kernel a call runs and how its launch covers the work, chosen from the operands'
// layout alone. Free of ATen and of the CUDA runtime, so that the launches (launch.cuh) and
// the kernels' host test (tests/cuda_kernel_on_host.cpp) make the one same choice.
#pragma once

#include <array>
#include <cstdint>
#include <limits>

#include "layout.h"

namespace fused_dropout {

struct LaunchPlan {
  enum class Kernel { kRowMajor, kRowShared, kStrided };
  Kernel kernel = Kernel::kRowMajor;
  MergedLayout layout;     // the walk of kRowShared and kStrided
  int64_t row_size = 0;    // kRowShared: elements per mask value
  bool index32 = true;     // kStrided: the walk fits 32-bit index math
  int64_t work_items = 0;  // threads the launch needs: steps of `step` elements, or (kStrided) groups of four
};

// The plan for `numel` elements of `ndim` dims whose operands have `strides` (input, output,
// mask, second operand; as layout.h). `row_major`: every operand is row-major memory and the
// mask is full. `step`: the elements one thread of the row-major and row-shared kernels takes.
// `with_bias`: a bias runs along the last dim, so the walk must keep the logical order (its
// column is the logical index modulo the last dim); otherwise the walk follows the output's
// memory, so that a warp touches whole cache lines of a channels_last or permuted tensor.
// A mask shared along trailing dims whose rows are at least a step long goes to the row-shared
// kernel; anything else to the strided one. `mask_origin`: the mask index of the first element
// (MergedLayout).
inline LaunchPlan plan_launch(int64_t numel, int64_t step, bool row_major, bool with_bias, int64_t ndim,
                              const int64_t* sizes, const std::array<const int64_t*, kOperands>& strides,
                              int64_t mask_origin = 0) {
  LaunchPlan plan;
  const int64_t steps = (numel + step - 1) / step;
  if (row_major) {
    plan.work_items = steps;
    return plan;
  }
  plan.layout = with_bias ? merge_dims(ndim, sizes, strides) : merge_dims_in_memory_order(ndim, sizes, strides, kOut);
  plan.layout.mask_origin = mask_origin;
  if (const int64_t row_size = shared_row_size(plan.layout); row_size >= step) {
    plan.kernel = LaunchPlan::Kernel::kRowShared;
    plan.row_size = row_size;
    plan.work_items = steps;
    return plan;
  }
  plan.kernel = LaunchPlan::Kernel::kStrided;
  plan.index32 = numel <= std::numeric_limits<int32_t>::max();
  plan.work_items = (numel + 3) / 4;
  return plan;
}

}  // namespace fused_dropout
