// Which mask index each element of a row of dropout_add_norm takes, for its CPU and CUDA
// kernels alike. Free of ATen, so that the CUDA kernel's host test includes it.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "layout.h"

namespace fused_dropout {

// Where each row's mask starts: origin + the outer dims' indices times the mask strides
// (MaskLayout), and the mask stride along the row (0: the row shares one value). Plain data,
// so the CPU kernel and the CUDA kernel (a launch parameter) walk rows alike.
struct NormMaskRows {
  int64_t outer_dims;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
  int64_t origin;
  int64_t step;

  C10_HOST_DEVICE int64_t base(int64_t row) const {
    int64_t index = origin;
    for (int64_t d = outer_dims - 1; d >= 0; --d) {
      index += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return index;
  }
};

}  // namespace fused_dropout
