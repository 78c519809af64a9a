// dropout_add_norm's autograd (autograd.h). The forward saves h (which a pre-norm block keeps
// anyway), the per-row mean and rstd and the 16-byte state, never a mask. The backward and the
// tangents are compositions of differentiable ops and the mask replay, so double backward works.
#include <ATen/TensorOperators.h>
#include <torch/library.h>

#include "autograd.h"
#include "dispatch.h"
#include "ops/dropout_add_norm/dropout_add_norm.h"

namespace fused_dropout {
namespace {

using DropoutAddNormSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, double, bool, std::optional<at::ScalarType>, std::optional<int64_t>,
    int64_t, std::optional<at::Generator>, at::IntArrayRef);

using NormBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             const std::optional<at::Tensor>&,
                                                                             const at::Tensor&, const at::Tensor&,
                                                                             bool);

const c10::TypedOperatorHandle<NormBackwardSignature>& norm_backward_op() {
  static const auto op = find_op<NormBackwardSignature>(kNormBackwardOp);
  return op;
}

// The normalised rows, (h - mean) * rstd, in the stats' dtype.
at::Tensor normalised(const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd) {
  return (h.to(rstd.scalar_type()) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1);
}

// d(normalised) for a change dh of h: rstd * (dh - mean(dh) - xh * mean(xh * (dh - mean(dh))));
// RMSNorm has no mean to subtract. The same map gives the backward, as it is self-adjoint.
at::Tensor normalised_derivative(const at::Tensor& dh, const at::Tensor& xh, const at::Tensor& rstd, bool rms) {
  const at::Tensor centered = rms ? dh : dh - dh.mean(-1, /*keepdim=*/true);
  return (centered - xh * (xh * centered).mean(-1, /*keepdim=*/true)) * rstd.unsqueeze(-1);
}

struct DropoutAddNormBackward : public Node {
  torch::autograd::SavedVariable h, weight, mean, rstd, rng_state;
  double p = 0.0, eps = 0.0;
  std::vector<int64_t> shared_dims;
  bool rms = false;
  at::ScalarType input_dtype = at::kFloat, residual_dtype = at::kFloat;
  at::ScalarType weight_dtype = at::kFloat, bias_dtype = at::kFloat;

  std::string name() const override { return "DropoutAddNormBackward"; }
  void release_variables() override {
    h.reset_data();
    weight.reset_data();
    mean.reset_data();
    rstd.reset_data();
    rng_state.reset_data();
  }

  // Next edges: input, residual, weight, bias. Incoming: output, residual_out.
  variable_list apply(variable_list&& grads) override {
    variable_list grad_inputs(num_outputs());
    // h is an output of this node: unpacking it needs the node. Under create_graph the
    // statistics are recomputed from h by differentiable ops, so that the backward itself
    // differentiates through them (double backward); otherwise the saved ones serve.
    const at::Tensor hv = h.unpack(getptr());
    at::Tensor mu = mean.unpack(), r = rstd.unpack();
    if (at::GradMode::is_enabled()) std::tie(mu, r) = row_stats(hv.to(r.scalar_type()), eps, rms);
    const at::Tensor w = weight.unpack();
    at::Tensor dh;
    if (grads[0].defined()) {
      // Where nothing differentiates this backward, the norm's part in one pass
      // (norm_backward); otherwise the same definition by ATen's ops, which autograd records.
      const std::optional<at::Tensor> w_or_none = w.defined() ? std::optional<at::Tensor>(w) : std::nullopt;
      auto [grad_h, grad_weight, grad_bias] = at::GradMode::is_enabled()
                                                  ? norm_backward_composite(grads[0], hv, w_or_none, mu, r, rms)
                                                  : norm_backward_op().call(grads[0], hv, w_or_none, mu, r, rms);
      dh = grad_h;
      if (should_compute_output(2)) grad_inputs[2] = grad_weight.to(weight_dtype);
      if (should_compute_output(3)) grad_inputs[3] = grad_bias.to(bias_dtype);
    }
    if (grads[1].defined()) dh = dh.defined() ? dh + grads[1].to(dh.scalar_type()) : grads[1];
    if (!dh.defined()) return grad_inputs;
    if (should_compute_output(0)) grad_inputs[0] = replay(dh.to(input_dtype), rng_state.unpack(), p, shared_dims);
    if (should_compute_output(1)) grad_inputs[1] = dh.to(residual_dtype);
    return grad_inputs;
  }
};

at::Tensor defined_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
    std::optional<int64_t> seed, int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  static const auto op = find_op<DropoutAddNormSignature>(kDropoutAddNormOp);
  const at::Tensor res = defined_or_undefined(residual), w = defined_or_undefined(weight),
                   b = defined_or_undefined(bias);
  auto [output, h, mean, rstd, rng_state] = below_autograd(op, input, residual, weight, bias, p, eps, rms,
                                                           residual_dtype, seed, offset, generator, shared_dims);
  if (needs_grad({&input, &res, &w, &b})) {
    auto node = new_node<DropoutAddNormBackward>(input, res, w, b);
    torch::autograd::set_history(output, NodePtr(node));
    torch::autograd::set_history(h, NodePtr(node));
    node->h = torch::autograd::SavedVariable(h, /*is_output=*/true);
    node->weight = torch::autograd::SavedVariable(w, /*is_output=*/false);
    node->mean = torch::autograd::SavedVariable(mean, /*is_output=*/false);
    node->rstd = torch::autograd::SavedVariable(rstd, /*is_output=*/false);
    node->rng_state = torch::autograd::SavedVariable(rng_state, /*is_output=*/false);
    node->p = p;
    node->eps = eps;
    node->shared_dims = shared_dims.vec();
    node->rms = rms;
    node->input_dtype = input.scalar_type();
    node->residual_dtype = res.defined() ? res.scalar_type() : h.scalar_type();
    node->weight_dtype = w.defined() ? w.scalar_type() : at::kFloat;
    node->bias_dtype = b.defined() ? b.scalar_type() : at::kFloat;
  }
  // Tangents: dh = d residual + replayed d input; d output = d(normalised) * weight +
  // normalised * d weight + d bias.
  if (has_tangent({&input, &res, &w, &b})) {
    const at::Tensor xh = normalised(h, mean, rstd);
    const at::ScalarType wide = rstd.scalar_type();
    const at::Tensor t_in = tangent_of(&input), t_res = tangent_of(&res), t_w = tangent_of(&w), t_b = tangent_of(&b);
    at::Tensor dh = sum_defined({t_in.defined() ? replay(t_in, rng_state, p, shared_dims).to(wide) : at::Tensor(),
                                 t_res.defined() ? t_res.to(wide) : at::Tensor()},
                                xh);
    at::Tensor d_out;
    if (dh.defined()) {
      d_out = normalised_derivative(dh, xh, rstd, rms);
      if (w.defined()) d_out = d_out * primal_of(w).to(wide);
    }
    d_out = sum_defined({d_out, t_w.defined() ? xh * t_w.to(wide) : at::Tensor(),
                         t_b.defined() ? t_b.to(wide).expand_as(xh) : at::Tensor()},
                        xh);
    if (d_out.defined()) set_tangent(output, d_out.to(output.scalar_type()));
    if (dh.defined()) set_tangent(h, dh.to(h.scalar_type()));
  }
  return {output, h, mean, rstd, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) {
  m.impl("dropout_add_norm", &fused_dropout::dropout_add_norm_autograd);
}
