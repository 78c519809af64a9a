// Pieces shared by the CPU and CUDA implementations: the output rule in ATen's types and
// the argument checks. The kernels themselves live in cpu/ and cuda/.
#pragma once

#include <array>
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

// Which mask element each input element uses. The mask shape is the input's shape with the
// shared dims set to 1 (one mask value for every index along them), and the mask rule's
// index i is the row-major index in the mask shape. strides[d] is the row-major stride of
// dim d in the mask shape, or 0 for a shared dim, so an element's mask index is
// sum(index[d] * strides[d]).
struct MaskLayout {
  int64_t numel = 0;     // elements in the mask shape
  bool shared = false;   // true when some dim of size > 1 is shared
  std::array<int64_t, kMaxDims> strides{};
};

// The mask layout of `input` for the given shared dims (negative dims count from the end);
// checks that each dim is in range and named once.
MaskLayout mask_layout(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims);

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

// Checks dropout_add's tensors: residual of the input's shape, dtype and device; bias, when
// given, 1-D over the input's last dim.
void check_dropout_add_args(const char* op, const at::Tensor& input, const at::Tensor& residual,
                            const std::optional<at::Tensor>& bias);

// Checks the arguments of the raw generator op: counter int64[N, 4], key int64[N, 2], same device.
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

// The output of an out-of-place call: same shape, dtype, device and memory format as the input.
at::Tensor empty_output_like(const at::Tensor& input);

}  // namespace fused_dropout
