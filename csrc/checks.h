// The argument checks every form shares, and the mask layout they return. `op` names the
// operator in messages, e.g. "fused_dropout::dropout"; every message names the argument, the
// expectation and the value. The checks read metadata only (sizes compared as SymInts), so the
// Meta kernels run them too and fake and meta tensors are refused with eager's messages. Each
// form composes its own check_<form>_args from these, in its own file.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "layout.h"

namespace fused_dropout {

// Which mask element each input element uses. The mask shape is the input's shape with the
// shared dims set to 1 (one mask value for every index along them), and the mask rule's
// index i is the row-major index in the mask shape. strides[d] is the row-major stride of
// dim d in the mask shape, or 0 for a shared dim, so an element's mask index is
// origin + sum(index[d] * strides[d]). For a shard of a DTensor (MaskWindow below) the mask
// shape is the whole tensor's and origin the index of the shard's first element in it;
// otherwise origin is 0.
struct MaskLayout {
  int64_t numel = 0;      // elements in the mask shape
  bool row_major = true;  // every element's mask index is its row-major index in the input
  int64_t origin = 0;
  std::array<int64_t, kMaxDims> strides{};
};

// Where a shard of a DTensor sits in the whole tensor: the whole tensor's sizes and the
// shard's first index along each dim. While a window is set on the calling thread, mask_layout
// indexes the whole tensor's mask shape, so that each shard draws its slice of the mask the
// whole tensor would draw (docs/design.md, "Distributed"). The DTensor handlers of
// fused_dropout/distributed.py set it around each call on a shard.
struct MaskWindow {
  std::vector<int64_t> sizes;
  std::vector<int64_t> origin;
};

// Sets (or, with nullopt, clears) the calling thread's window.
void set_mask_window(std::optional<MaskWindow> window);

bool is_float_dtype(at::ScalarType dtype);

// The input: at most kMaxDims dims, a floating dtype.
void check_input(const char* op, const at::Tensor& input);

// The input, and a drop probability p in [0, 1].
void check_input_and_p(const char* op, const at::Tensor& input, double p);

// seed or generator (not both); offset only with seed.
void check_randomness_args(const char* op, const std::optional<int64_t>& seed, int64_t offset,
                           const std::optional<at::Generator>& generator);

// A saved state: int64[2] on the input's device.
void check_rng_state(const char* op, const at::Tensor& input, const at::Tensor& rng_state);

// An in-place target: no two elements share memory.
void check_inplace_target(const char* op, const at::Tensor& input);

// Which dtype a second tensor operand may have: exactly the input's (act_dropout_backward's
// grad), or any floating dtype the sum is then promoted with (dropout_add's residual).
enum class OperandDtype { kInputs, kAnyFloat };

// A second tensor operand: the input's shape and device, and a dtype as `dtype` says.
void check_like_input(const char* op, const char* name, const at::Tensor& input, const at::Tensor& other,
                      OperandDtype dtype);

// An optional bias: 1-D, the size of the input's last dim, the input's dtype and device.
void check_bias(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias);

// shared_dims: dims of the input (negative ones count from the end), each named once.
void check_shared_dims(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims);

// The mask layout of `input` for the given (checked) shared dims, in the window where one is
// set.
MaskLayout mask_layout(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims);

}  // namespace fused_dropout
