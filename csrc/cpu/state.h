// The random state of a CPU call, and its outputs.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace fused_dropout {

// (seed, base) of the mask rule (philox.h); rng_state holds it as int64[2].
struct RngState {
  uint64_t seed;
  uint64_t base;
};

// A new call's state: (seed, offset), or a fresh 64-bit key from the generator (the default
// CPU generator where none is given) with base 0.
RngState draw_state(const std::optional<int64_t>& seed, int64_t offset, const std::optional<at::Generator>& generator);

// The state a saved rng_state holds.
RngState read_state(const at::Tensor& rng_state);

// The state as a new rng_state tensor.
at::Tensor state_tensor(RngState state);

// The output of an out-of-place CPU call (empty_output_like), with the huge-page hint below.
at::Tensor new_output(const at::Tensor& input, std::optional<at::ScalarType> dtype = std::nullopt);

}  // namespace fused_dropout
