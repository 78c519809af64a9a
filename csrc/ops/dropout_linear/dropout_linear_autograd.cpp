// dropout_linear's autograd (autograd.h). The forward saves the input (which the layer before
// keeps anyway, or which a LoRA adapter's frozen base layer shares), the weight and the 16-byte
// state, never the dropped input or a mask. The backward redraws the dropped input for the
// weight's gradient and replays the mask on grad_output @ weight for the input's: compositions
// of differentiable ops, so double backward works.
#include <ATen/ops/matmul.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "autograd.h"
#include "dispatch.h"
#include "ops/dropout_linear/dropout_linear.h"

namespace fused_dropout {
namespace {

// t as rows of its last dim: (*, n) -> (prod(*), n), a vector as one row. Unlike reshape(-1, n)
// it also takes n = 0.
at::Tensor as_rows(const at::Tensor& t) {
  return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)});
}

struct DropoutLinearBackward : public Node {
  torch::autograd::SavedVariable input, weight, rng_state;
  double p = 0.0;
  std::vector<int64_t> shared_dims;

  std::string name() const override { return "DropoutLinearBackward"; }
  void release_variables() override {
    input.reset_data();
    weight.reset_data();
    rng_state.reset_data();
  }

  // Next edges: input, weight, bias. The products are the ones torch's own linear backward
  // computes (grad @ weight, grad^T @ dropped, flattened to rows), so on one device they round
  // the same way.
  variable_list apply(variable_list&& grads) override {
    variable_list grad_inputs(num_outputs());
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return grad_inputs;
    const at::Tensor state = rng_state.unpack();
    if (should_compute_output(0)) grad_inputs[0] = replay(grad.matmul(weight.unpack()), state, p, shared_dims);
    if (should_compute_output(1)) {
      const at::Tensor dropped = replay(input.unpack(), state, p, shared_dims);
      grad_inputs[1] = as_rows(grad).t().mm(as_rows(dropped));
    }
    if (should_compute_output(2)) grad_inputs[2] = sum_to_last_dim(grad);
    return grad_inputs;
  }
};

std::tuple<at::Tensor, at::Tensor> dropout_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, double p,
                                                           std::optional<int64_t> seed, int64_t offset,
                                                           std::optional<at::Generator> generator,
                                                           at::IntArrayRef shared_dims) {
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  auto [output, rng_state] =
      below_autograd(dropout_linear_op(), input, weight, bias, p, seed, offset, std::move(generator), shared_dims);
  if (needs_grad({&input, &weight, &b})) {
    auto node = new_node<DropoutLinearBackward>(input, weight, b);
    torch::autograd::set_history(output, NodePtr(node));
    // Each tensor is kept only where a gradient needs it, as torch's own linear keeps them.
    if (node->should_compute_output(1)) node->input = torch::autograd::SavedVariable(input, /*is_output=*/false);
    if (node->should_compute_output(0)) node->weight = torch::autograd::SavedVariable(weight, /*is_output=*/false);
    node->rng_state = torch::autograd::SavedVariable(rng_state, /*is_output=*/false);
    node->p = p;
    node->shared_dims = shared_dims.vec();
  }
  // Tangent: linear(replayed d input, weight) + linear(dropped input, d weight) + d bias.
  if (has_tangent({&input, &weight, &b})) {
    const at::Tensor t_in = tangent_of(&input), t_w = tangent_of(&weight), t_b = tangent_of(&b);
    const at::Tensor tangent = sum_defined(
        {t_in.defined() ? at::matmul(replay(t_in, rng_state, p, shared_dims), primal_of(weight).t()) : at::Tensor(),
         t_w.defined() ? at::matmul(replay(primal_of(input), rng_state, p, shared_dims), t_w.t()) : at::Tensor(), t_b},
        output);
    set_tangent(output, tangent);
  }
  return {output, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Autograd, m) { m.impl("dropout_linear", &fused_dropout::dropout_linear_autograd); }
