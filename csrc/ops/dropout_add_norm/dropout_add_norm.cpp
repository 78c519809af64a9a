// dropout_add_norm's schema, checks, Meta kernel and composition.
#include "ops/dropout_add_norm/dropout_add_norm.h"

#include <cmath>

#include <ATen/TensorOperators.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "operands.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {

namespace {

// weight or bias: 1-D, the size of the input's last dim, a floating dtype, the input's device.
void check_affine(const char* op, const char* name, const at::Tensor& input, const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->sym_size(0) == input.sym_size(-1), op, ": ", name,
              " must be 1-D with the size of the input's last dim (", input.sym_size(-1), "), got shape ",
              t->sym_sizes());
  TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " must be on the input's device ", input.device(),
              ", got ", t->device());
}

}  // namespace

NormCall check_dropout_add_norm_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
                                     const std::optional<int64_t>& seed, int64_t offset,
                                     const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_input_and_p(op, input, p);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dim (the normalised one), got a 0-D tensor");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_like_input(op, "residual", input, *residual, OperandDtype::kAnyFloat);
  check_affine(op, "weight", input, weight);
  check_affine(op, "bias", input, bias);
  TORCH_CHECK_VALUE(!rms || !bias.has_value() || !bias->defined(), op, ": RMSNorm takes no bias");
  TORCH_CHECK_VALUE(!std::isnan(eps) && eps >= 0.0, op, ": eps must be a non-negative number, got ", eps);
  const at::ScalarType h_dtype = residual_dtype.has_value() ? *residual_dtype
                                 : has_residual ? c10::promoteTypes(input.scalar_type(), residual->scalar_type())
                                                : input.scalar_type();
  TORCH_CHECK(is_float_dtype(h_dtype), op, ": residual_dtype must be float32, float64, float16 or bfloat16, got ",
              h_dtype);
  check_randomness_args(op, seed, offset, generator);
  check_shared_dims(op, input, shared_dims);
  const bool wide = input.scalar_type() == at::kDouble || h_dtype == at::kDouble;
  return {MaskLayout{}, h_dtype, wide ? at::kDouble : at::kFloat};
}

NormCall check_dropout_add_norm_call(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
                                     const std::optional<int64_t>& seed, int64_t offset,
                                     const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  NormCall call = check_dropout_add_norm_args(op, input, residual, weight, bias, p, eps, rms, residual_dtype, seed,
                                              offset, generator, shared_dims);
  call.mask = mask_layout(op, input, shared_dims);
  return call;
}

NormMaskRows norm_mask_rows(const at::Tensor& input, const MaskLayout& mask) {
  NormMaskRows rows{input.dim() - 1, {}, {}, mask.origin, mask.strides[input.dim() - 1]};
  for (int64_t d = 0; d < rows.outer_dims; ++d) {
    rows.sizes[d] = input.size(d);
    rows.strides[d] = mask.strides[d];
  }
  return rows;
}

at::Tensor norm_affine_operand(const std::optional<at::Tensor>& t, const NormCall& call) {
  return t.has_value() && t->defined() ? t->to(call.stats_dtype).contiguous() : at::Tensor();
}

NormOutputs empty_norm_outputs(const at::Tensor& input, const NormCall& call) {
  const auto rows = input.sym_sizes().slice(0, input.dim() - 1);
  const auto options = input.options().memory_format(at::MemoryFormat::Contiguous);
  return {at::empty_symint(input.sym_sizes(), options),
          at::empty_symint(input.sym_sizes(), options.dtype(call.residual_dtype)),
          at::empty_symint(rows, input.options().dtype(call.stats_dtype)),
          at::empty_symint(rows, input.options().dtype(call.stats_dtype))};
}

std::pair<at::Tensor, at::Tensor> row_stats(const at::Tensor& h, double eps, bool rms) {
  const at::Tensor mean = rms ? at::zeros(h.sizes().slice(0, h.dim() - 1), h.options()) : h.mean(-1);
  const at::Tensor centered = rms ? h : h - mean.unsqueeze(-1);
  return {mean, at::rsqrt(centered.mul(centered).mean(-1).add(eps))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
    std::optional<int64_t> seed, int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const NormCall call = check_dropout_add_norm_call(kDropoutAddNormOp, input, residual, weight, bias, p, eps, rms,
                                                    residual_dtype, seed, offset, generator, shared_dims);
  auto [dropped, rng_state] = dropout_op().call(input, p, seed, offset, std::move(generator), shared_dims);
  // h: the sum in float32 (float64 where any operand is), rounded once to h's dtype, as the
  // kernels compute it.
  at::Tensor h = dropped;
  if (residual.has_value() && residual->defined()) {
    const at::ScalarType sum_dtype =
        c10::promoteTypes(c10::promoteTypes(residual->scalar_type(), dropped.scalar_type()),
                          c10::promoteTypes(call.residual_dtype, at::kFloat));
    h = at::add(residual->to(sum_dtype), dropped.to(sum_dtype));
  }
  h = h.to(call.residual_dtype).contiguous();
  const at::Tensor wide = h.to(call.stats_dtype);
  const auto [mean, rstd] = row_stats(wide, eps, rms);
  at::Tensor y = (wide - mean.unsqueeze(-1)) * rstd.unsqueeze(-1);
  if (weight.has_value() && weight->defined()) y = y * weight->to(call.stats_dtype);
  if (bias.has_value() && bias->defined()) y = y + bias->to(call.stats_dtype);
  return {y.to(input.scalar_type()).contiguous(), h, mean, rstd, rng_state};
}

void check_norm_backward_args(const at::Tensor& grad, const at::Tensor& residual_out,
                              const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = kNormBackwardOp;
  check_input(op, residual_out);
  TORCH_CHECK(residual_out.dim() >= 1, op, ": residual_out must have at least 1 dim");
  check_like_input(op, "grad", residual_out, grad, OperandDtype::kAnyFloat);
  check_affine(op, "weight", residual_out, weight);
  const auto rows = residual_out.sym_sizes().slice(0, residual_out.dim() - 1);
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->sym_sizes() == rows &&
                    (stat->scalar_type() == at::kFloat || stat->scalar_type() == at::kDouble) &&
                    stat->device() == residual_out.device(),
                op, ": mean and rstd must be float32 or float64 of shape ", rows, " on ", residual_out.device(),
                ", got ", stat->scalar_type(), " of shape ", stat->sym_sizes(), " on ", stat->device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_composite(const at::Tensor& grad,
                                                                       const at::Tensor& residual_out,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                                       bool rms) {
  check_norm_backward_args(grad, residual_out, weight, mean, rstd);
  const at::ScalarType wide = rstd.scalar_type();
  const at::Tensor go = grad.to(wide), r = rstd.unsqueeze(-1);
  const at::Tensor xh = (residual_out.to(wide) - mean.unsqueeze(-1)) * r;
  const at::Tensor g = weight.has_value() && weight->defined() ? go * weight->to(wide) : go;
  const at::Tensor centered = rms ? g : g - g.mean(-1, /*keepdim=*/true);
  const at::Tensor grad_h = (centered - xh * (g * xh).mean(-1, /*keepdim=*/true)) * r;
  const at::Tensor rows = go.reshape({-1, go.size(-1)});
  return {grad_h, (rows * xh.reshape(rows.sizes())).sum(0), rows.sum(0)};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_meta(const at::Tensor& grad,
                                                                  const at::Tensor& residual_out,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  bool /*rms*/) {
  check_norm_backward_args(grad, residual_out, weight, mean, rstd);
  const auto options = residual_out.options().dtype(rstd.scalar_type());
  const auto last = residual_out.sym_sizes().slice(residual_out.dim() - 1);
  return {at::empty_symint(residual_out.sym_sizes(), options), at::empty_symint(last, options),
          at::empty_symint(last, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_meta(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
    std::optional<int64_t> seed, int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const NormCall call = check_dropout_add_norm_args(kDropoutAddNormOp, input, residual, weight, bias, p, eps, rms,
                                                    residual_dtype, seed, offset, generator, shared_dims);
  NormOutputs out = empty_norm_outputs(input, call);
  return {out.output, out.residual_out, out.mean, out.rstd, empty_state_like(input)};
}

}  // namespace
}  // namespace fused_dropout

// h = residual + dropout(input) (the mask of dropout with the same seed, offset and shared
// dims; no residual: h = dropout(input)), in residual_dtype (default: torch's promotion of the
// input's and the residual's); output = LayerNorm(h) * weight + bias over the last dim, or with
// rms RMSNorm(h) * weight, in the input's dtype. mean and rstd (input.shape[:-1], float32 or
// float64; mean is 0 for RMSNorm) and rng_state are what the backward needs, with h.
TORCH_LIBRARY_FRAGMENT(fused_dropout, m) {
  m.def(
      "dropout_add_norm(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float p, float eps, bool rms, "
      "ScalarType? residual_dtype=None, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> (Tensor output, Tensor residual_out, Tensor mean, Tensor rstd, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // The norm's part of dropout_add_norm's backward (no randomness): (grad_h, grad_weight,
  // grad_bias) in the stats' dtype for the output's gradient at h = residual_out. Not
  // differentiable itself: the autograd kernel calls it only where nothing differentiates the
  // backward, and composes differentiable ops otherwise.
  m.def(
      "norm_backward(Tensor grad, Tensor residual_out, Tensor? weight, Tensor mean, Tensor rstd, bool rms) "
      "-> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) {
  m.impl("dropout_add_norm", &fused_dropout::dropout_add_norm_meta);
  m.impl("norm_backward", &fused_dropout::norm_backward_meta);
}
