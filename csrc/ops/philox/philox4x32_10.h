// philox4x32_10: known-answer access to the raw generator of the mask rule (philox.h), which
// the tests compare with the published Philox4x32-10 vectors and the NumPy reference.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_dropout {

inline constexpr char kPhiloxOp[] = "fused_dropout::philox4x32_10";

// Checks the arguments: counter int64[N, 4], key int64[N, 2], same device.
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

}  // namespace fused_dropout
