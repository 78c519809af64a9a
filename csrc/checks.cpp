#include "checks.h"

#include <cmath>

#include <ATen/MemoryOverlap.h>
#include <c10/util/accumulate.h>

namespace fused_dropout {

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() <= kMaxDims, op, ": input may have at most ", kMaxDims, " dims, got ", input.dim());
  TORCH_CHECK(is_float_dtype(input.scalar_type()), op, ": input must be float32, float64, float16 or bfloat16, got ",
              input.scalar_type());
}

void check_input_and_p(const char* op, const at::Tensor& input, double p) {
  check_input(op, input);
  TORCH_CHECK_VALUE(!std::isnan(p) && p >= 0.0 && p <= 1.0, op,
                    ": dropout probability has to be between 0 and 1, but got ", p);
}

void check_randomness_args(const char* op, const std::optional<int64_t>& seed, int64_t offset,
                           const std::optional<at::Generator>& generator) {
  TORCH_CHECK_VALUE(!(seed.has_value() && generator.has_value() && generator->defined()), op,
                    ": pass either seed or generator, not both (got seed=", *seed, " and a generator)");
  TORCH_CHECK_VALUE(seed.has_value() || offset == 0, op,
                    ": offset is only used together with seed, but got offset=", offset, " and seed=None");
}

void check_rng_state(const char* op, const at::Tensor& input, const at::Tensor& rng_state) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 && rng_state.sym_numel() == 2, op,
              ": rng_state must be an int64 tensor of shape [2] (seed, base), got ", rng_state.scalar_type(),
              " of shape ", rng_state.sym_sizes());
  TORCH_CHECK(rng_state.device() == input.device(), op, ": rng_state must be on the input's device ", input.device(),
              ", got ", rng_state.device());
}

void check_inplace_target(const char* op, const at::Tensor& input) {
  // A tensor with symbolic strides (a fake one under dynamic shapes) is checked when it runs.
  if (input.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return;
  TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes, op,
              ": in-place dropout needs an input whose elements do not share memory "
              "(e.g. not an expand()ed tensor), got strides ",
              input.strides());
}

void check_like_input(const char* op, const char* name, const at::Tensor& input, const at::Tensor& other,
                      OperandDtype dtype) {
  TORCH_CHECK(other.sym_sizes() == input.sym_sizes(), op, ": ", name, " must have the input's shape ",
              input.sym_sizes(), ", got ", other.sym_sizes());
  if (dtype == OperandDtype::kInputs) {
    TORCH_CHECK(other.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
                input.scalar_type(), ", got ", other.scalar_type());
  } else {
    TORCH_CHECK(is_float_dtype(other.scalar_type()), op, ": ", name,
                " must be float32, float64, float16 or bfloat16, got ", other.scalar_type());
  }
  TORCH_CHECK(other.device() == input.device(), op, ": ", name, " must be on the input's device ", input.device(),
              ", got ", other.device());
}

void check_bias(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(input.dim() > 0 && bias->dim() == 1 && bias->sym_size(0) == input.sym_size(-1), op,
              ": bias must be 1-D with the size of the input's last dim (",
              input.dim() > 0 ? input.sym_size(-1) : c10::SymInt(0), "), got shape ", bias->sym_sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias must have the input's dtype ",
              input.scalar_type(), ", got ", bias->scalar_type());
  TORCH_CHECK(bias->device() == input.device(), op, ": bias must be on the input's device ", input.device(), ", got ",
              bias->device());
}

namespace {

// Which dims of `input` are shared; checks that each dim is in range and named once.
std::array<bool, kMaxDims> shared_dim_flags(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims) {
  const int64_t ndim = input.dim();
  std::array<bool, kMaxDims> is_shared{};
  for (const int64_t dim : shared_dims) {
    TORCH_CHECK_INDEX(ndim > 0 && dim >= -ndim && dim < ndim, op, ": shared_dims must name dims of the ", ndim,
                      "-D input, in [", -ndim, ", ", ndim, "), got ", dim);
    const int64_t d = dim < 0 ? dim + ndim : dim;
    TORCH_CHECK_VALUE(!is_shared[d], op, ": shared_dims names dim ", d, " twice, got ", shared_dims);
    is_shared[d] = true;
  }
  return is_shared;
}

}  // namespace

void check_shared_dims(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims) {
  shared_dim_flags(op, input, shared_dims);
}

namespace {

thread_local std::optional<MaskWindow> current_window;

// The window's sizes, after checking that it holds the input.
at::IntArrayRef window_sizes(const char* op, const at::Tensor& input, const MaskWindow& window) {
  const int64_t ndim = input.dim();
  bool holds = static_cast<int64_t>(window.sizes.size()) == ndim && static_cast<int64_t>(window.origin.size()) == ndim;
  for (int64_t d = 0; holds && d < ndim; ++d) {
    holds = window.origin[d] >= 0 && window.origin[d] + input.size(d) <= window.sizes[d];
  }
  TORCH_CHECK(holds, op, ": the shard's window in the whole DTensor (sizes ", at::IntArrayRef(window.sizes),
              ", origin ", at::IntArrayRef(window.origin), ") does not hold the local input of shape ", input.sizes());
  return window.sizes;
}

}  // namespace

void set_mask_window(std::optional<MaskWindow> window) { current_window = std::move(window); }

MaskLayout mask_layout(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims) {
  const int64_t ndim = input.dim();
  const std::array<bool, kMaxDims> is_shared = shared_dim_flags(op, input, shared_dims);
  const at::IntArrayRef sizes = current_window ? window_sizes(op, input, *current_window) : input.sizes();
  MaskLayout layout;
  layout.numel = 1;
  int64_t local_stride = 1;  // the row-major stride of dim d in the input
  for (int64_t d = ndim - 1; d >= 0; --d) {
    layout.strides[d] = is_shared[d] ? 0 : layout.numel;
    if (current_window) layout.origin += current_window->origin[d] * layout.strides[d];
    layout.numel *= is_shared[d] ? 1 : sizes[d];
    layout.row_major = layout.row_major && (input.size(d) == 1 || layout.strides[d] == local_stride);
    local_stride *= input.size(d);
  }
  layout.row_major = layout.row_major && layout.origin == 0;
  if (c10::multiply_integers(sizes) == 0) layout.numel = 0;
  return layout;
}

}  // namespace fused_dropout
