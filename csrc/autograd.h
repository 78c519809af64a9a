// What the autograd kernels of every form share. Each form registers its own Autograd kernel
// in its own file, with these pieces:
//
// Reverse mode: the forward saves rng_state (16 bytes), and backward replays the same mask
// from it with dropout_replay, whose own gradient is dropout_replay again (so double
// backward works). A form whose derivative needs more (act_dropout: its input) saves that too.
// Forward mode: every op is linear in its tensor inputs once the mask is fixed (act_dropout:
// once the point is), so an output's tangent is its backward applied to the input's tangent.
// It is set at level 0, as torch's generated kernels do; torch.func.jvp and forward_ad map
// their levels onto it.
// The backward is a graph node of the kind torch's own generated kernels create (a C++
// torch::autograd::Function would be refused under torch.func transforms).
#pragma once

#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

namespace fused_dropout {

using torch::autograd::Node;
using torch::autograd::variable_list;
using NodePtr = decltype(torch::autograd::Edge::function);  // intrusive_ptr or shared_ptr, by torch release

constexpr uint64_t kTangentLevel = 0;

// True when a call must record a graph node: otherwise the ops run below autograd directly,
// with no node, saved state or materialised zero gradients to pay for.
bool needs_grad(std::initializer_list<const at::Tensor*> tensors);

// The forward-mode tangent of t (null or undefined: none), or an undefined tensor.
at::Tensor tangent_of(const at::Tensor* t);

// True when any of the defined tensors carries a forward-mode tangent.
bool has_tangent(std::initializer_list<const at::Tensor*> tensors);

// t without its tangent, where a tangent's own computation needs t's value.
at::Tensor primal_of(const at::Tensor& t);

void set_tangent(const at::Tensor& output, const at::Tensor& tangent);

// The sum of the defined tensors among `parts` (a tangent's pieces), or undefined.
at::Tensor sum_defined(std::initializer_list<at::Tensor> parts, const at::Tensor& shape_of);

// d/d bias of a bias broadcast over the last dim: the gradient summed over every other dim.
// An empty tensor gives zeros, as torch's own broadcast backward does.
at::Tensor sum_to_last_dim(const at::Tensor& grad);

// input times the mask and scale that rng_state stands for (none: 1 / (1 - p)), through the
// dispatcher, so that the replay is itself differentiable under create_graph.
// With `dtype`, grad is converted to it first, in the same pass.
at::Tensor replay(const at::Tensor& grad, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                  std::optional<double> scale = std::nullopt, std::optional<at::ScalarType> dtype = std::nullopt);

// A node with edges to `inputs` (undefined ones get none), made the way this torch release
// owns nodes.
template <typename NodeT, typename... Inputs>
auto new_node(const Inputs&... inputs) {
  auto make = [](auto* tag) {
    using Ptr = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<Ptr, std::shared_ptr<Node>>) {
      return std::make_shared<NodeT>();
    } else {
      return c10::make_intrusive<NodeT>();
    }
  };
  auto node = make(static_cast<NodePtr*>(nullptr));
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// The backward of dropout, alpha dropout and dropout_add. It keeps 16 bytes of tensor and
// turns grad_output into each input's gradient: input (and bias) get the forward's mask and
// scale, residual gets grad_output itself.
struct ReplayMaskBackward : public Node {
  torch::autograd::SavedVariable rng_state;
  double p = 0.0;
  std::vector<int64_t> shared_dims;
  std::optional<double> scale;  // alpha dropout: its a, in place of 1 / (1 - p)
  bool with_residual = false;   // dropout_add: next edges are (input, residual, bias)
  // The dtype the forward applied the mask in, and the input's. The gradient is converted to
  // the mask's dtype before the mask and to the input's after it, as the unfused
  // composition's backward rounds it: dropout_add's output may be wider than its input (a
  // residual of another dtype), and dropout_replay's output of another dtype than its input.
  at::ScalarType mask_dtype = at::kFloat;
  at::ScalarType input_dtype = at::kFloat;

  std::string name() const override { return with_residual ? "DropoutAddBackward" : "DropoutBackward"; }
  void release_variables() override { rng_state.reset_data(); }
  variable_list apply(variable_list&& grads) override;
};

// Records `output` as made from `inputs` by a replay of rng_state's mask.
// The mask is applied in `mask_dtype`: the input's, or dropout_replay's `dtype`.
template <typename... Inputs>
void record_replay(const at::Tensor& output, const at::Tensor& rng_state, double p, at::IntArrayRef shared_dims,
                   std::optional<double> scale, bool with_residual, at::ScalarType mask_dtype, const at::Tensor& input,
                   const Inputs&... others) {
  auto node = new_node<ReplayMaskBackward>(input, others...);
  node->mask_dtype = mask_dtype;
  node->input_dtype = input.scalar_type();
  node->rng_state = torch::autograd::SavedVariable(rng_state, /*is_output=*/false);
  node->p = p;
  node->shared_dims = shared_dims.vec();
  node->scale = scale;
  node->with_residual = with_residual;
  torch::autograd::set_history(output, NodePtr(node));
}

}  // namespace fused_dropout
