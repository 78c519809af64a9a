#include "autograd.h"

#include <numeric>

#include "ops/dropout/dropout.h"

namespace fused_dropout {

namespace {
bool defined(const at::Tensor* t) { return t != nullptr && t->defined(); }
}  // namespace

bool needs_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (defined(t) && t->requires_grad()) return true;
  }
  return false;
}

at::Tensor tangent_of(const at::Tensor* t) { return defined(t) ? t->_fw_grad(kTangentLevel) : at::Tensor(); }

bool has_tangent(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (tangent_of(t).defined()) return true;
  }
  return false;
}

at::Tensor primal_of(const at::Tensor& t) {
  return t.defined() && t._fw_grad(kTangentLevel).defined() ? t._fw_primal(kTangentLevel) : t;
}

void set_tangent(const at::Tensor& output, const at::Tensor& tangent) {
  if (tangent.defined()) output._set_fw_grad(tangent, kTangentLevel, /*is_inplace_op=*/false);
}

at::Tensor sum_defined(std::initializer_list<at::Tensor> parts, const at::Tensor& shape_of) {
  at::Tensor total;
  for (const at::Tensor& part : parts) {
    if (part.defined()) total = total.defined() ? total.add(part) : part.expand_as(shape_of);
  }
  return total;
}

at::Tensor sum_to_last_dim(const at::Tensor& grad) {
  if (grad.dim() <= 1) return grad;
  std::vector<int64_t> dims(grad.dim() - 1);
  std::iota(dims.begin(), dims.end(), 0);
  return grad.sum(dims);
}

at::Tensor replay(const at::Tensor& grad, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                  std::optional<double> scale, std::optional<at::ScalarType> dtype) {
  if (dtype == grad.scalar_type()) dtype = std::nullopt;
  return dropout_replay_op().call(grad, rng_state, p, shared_dims, scale, dtype);
}

variable_list ReplayMaskBackward::apply(variable_list&& grads) {
  variable_list grad_inputs(num_outputs());
  const at::Tensor& grad_output = grads[0];
  if (!grad_output.defined()) return grad_inputs;
  const bool want_bias = with_residual && should_compute_output(2);
  if (should_compute_output(0) || want_bias) {
    at::Tensor grad_input = replay(grad_output, rng_state.unpack(), p, shared_dims, scale, mask_dtype);
    if (grad_input.scalar_type() != input_dtype) grad_input = grad_input.to(input_dtype);
    if (should_compute_output(0)) grad_inputs[0] = grad_input;
    if (want_bias) grad_inputs[2] = sum_to_last_dim(grad_input);
  }
  if (with_residual && should_compute_output(1)) grad_inputs[1] = grad_output;
  return grad_inputs;
}

}  // namespace fused_dropout
