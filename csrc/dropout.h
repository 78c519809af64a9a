// Pieces shared by the CPU and CUDA implementations: the output rule in ATen's types and
// the argument checks. The kernels themselves live in cpu/ and cuda/.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "philox.h"

namespace fused_dropout {

// Most dims a kernel walks; tensors beyond it get an error, never a wrong result.
constexpr int64_t kMaxDims = 25;

// The output rule of philox.h with ATen's accumulation type: float for float16, bfloat16
// and float32, double for float64.
template <typename scalar_t>
using OutputRule = MaskedScale<scalar_t, at::opmath_type<scalar_t>>;

// Checks shared by every op that takes an input tensor and a drop probability.
// `op` names the operator in the message, e.g. "fused_dropout::dropout".
void check_input_and_p(const char* op, const at::Tensor& input, double p);

// Checks the (seed, offset, generator) combination of a random op.
void check_randomness_args(const char* op, const std::optional<int64_t>& seed, int64_t offset,
                           const std::optional<at::Generator>& generator);

// Checks a saved rng_state tensor against the input it is applied to.
void check_rng_state(const char* op, const at::Tensor& input, const at::Tensor& rng_state);

// Checks an in-place target: no two elements may share memory.
void check_inplace_target(const char* op, const at::Tensor& input);

// Checks the arguments of the raw generator op: counter int64[N, 4], key int64[N, 2], same device.
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

// The output of an out-of-place call: same shape, dtype, device and memory format as the input.
at::Tensor empty_output_like(const at::Tensor& input);

}  // namespace fused_dropout
