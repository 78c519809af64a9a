// How the kernels walk a tensor that is not one row-major run (permuted, channels_last,
// sliced, or with a mask shared over some dims). Free of ATen, like philox.h, so that the CUDA
// kernels (cuda/kernels.cuh) and their host test include it alone.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>

#include <c10/macros/Macros.h>

namespace fused_dropout {

// Most dims a kernel walks: torch's own limit on a tensor's rank.
constexpr int64_t kMaxDims = 64;

// The operands a walk tracks: input, output, the mask index, and dropout_add's residual.
constexpr int kIn = 0, kOut = 1, kMask = 2, kRes = 3, kOperands = 4;

// A tensor's logical (row-major) index space with dims of size 1 dropped and adjacent dims
// merged wherever every operand steps through them as through one dim (outer stride = inner
// stride * inner size). The logical order is unchanged: element r * inner + i of the merged
// view is the element of logical index r * inner + i. Fewer dims mean fewer divisions per
// element on CUDA and longer inner runs on the CPU; a channel-wise mask over a contiguous
// (N, C, H, W) input becomes (N*C, H*W) with one mask value per run.
struct MergedLayout {
  int64_t ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kOperands][kMaxDims] = {};
  int64_t mask_origin = 0;  // the mask index of the first element (a DTensor shard's; else 0)

  C10_HOST_DEVICE int64_t inner() const { return ndim > 0 ? sizes[ndim - 1] : 1; }
  C10_HOST_DEVICE int64_t inner_stride(int operand) const { return ndim > 0 ? strides[operand][ndim - 1] : 0; }
};

// `strides[k]` holds operand k's stride for each of the ndim dims of `sizes`.
inline MergedLayout merge_dims(int64_t ndim, const int64_t* sizes,
                               const std::array<const int64_t*, kOperands>& strides) {
  MergedLayout merged;
  for (int64_t d = 0; d < ndim; ++d) {
    if (sizes[d] == 1) continue;
    const int64_t last = merged.ndim - 1;
    bool joins = last >= 0;
    for (int k = 0; joins && k < kOperands; ++k) joins = merged.strides[k][last] == strides[k][d] * sizes[d];
    const int64_t target = joins ? last : merged.ndim++;
    merged.sizes[target] = joins ? merged.sizes[target] * sizes[d] : sizes[d];
    for (int k = 0; k < kOperands; ++k) merged.strides[k][target] = strides[k][d];
  }
  return merged;
}

// The same walk with the dims first put in the memory order of operand `order_by` (largest
// stride first), so that consecutive walk indices are neighbours in its memory: a GPU warp
// then reads and writes whole cache lines of a channels_last or permuted tensor. The walk's
// index is then no longer the logical index, so the caller must not need it (the mask index
// comes from the mask operand's strides, which travel with their dims).
inline MergedLayout merge_dims_in_memory_order(int64_t ndim, const int64_t* sizes,
                                               const std::array<const int64_t*, kOperands>& strides, int order_by) {
  std::array<int64_t, kMaxDims> order{};
  std::iota(order.begin(), order.begin() + ndim, int64_t{0});
  std::stable_sort(order.begin(), order.begin() + ndim,
                   [&](int64_t a, int64_t b) { return strides[order_by][a] > strides[order_by][b]; });
  int64_t permuted_sizes[kMaxDims];
  int64_t permuted_strides[kOperands][kMaxDims];
  for (int64_t d = 0; d < ndim; ++d) {
    permuted_sizes[d] = sizes[order[d]];
    for (int k = 0; k < kOperands; ++k) permuted_strides[k][d] = strides[k][order[d]];
  }
  return merge_dims(ndim, permuted_sizes,
                    {permuted_strides[0], permuted_strides[1], permuted_strides[2], permuted_strides[3]});
}

// The row size when the merged walk is row-major memory for every data operand (input,
// output, residual) and the mask index is walk index / row size: a mask shared along the
// trailing dims of a dense tensor (stochastic depth per sample, dropout2d of NCHW). Else 0.
inline int64_t shared_row_size(const MergedLayout& layout) {
  if (layout.mask_origin != 0) return 0;
  const auto dense = [&](int k) {
    return layout.ndim == 1 ? layout.strides[k][0] == 1
                            : layout.strides[k][1] == 1 && layout.strides[k][0] == layout.sizes[1];
  };
  if (layout.ndim == 1 && layout.strides[kMask][0] == 0 && dense(kIn) && dense(kOut) && dense(kRes)) {
    return layout.sizes[0];
  }
  if (layout.ndim == 2 && layout.strides[kMask][0] == 1 && layout.strides[kMask][1] == 0 && dense(kIn) && dense(kOut) &&
      dense(kRes)) {
    return layout.sizes[1];
  }
  return 0;
}

}  // namespace fused_dropout
