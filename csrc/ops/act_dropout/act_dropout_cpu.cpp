// act_dropout and its backward on the CPU. ReLU and squared ReLU run in the shared walk
// (cpu/walk.h) with their rules; gelu, gelu_tanh and silu run through ATen's vectorised
// activation kernels, a cache-sized block at a time, with the mask rule applied to each block
// while it is in cache.
#include <algorithm>
#include <numeric>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/walk.h"
#include "ops/act_dropout/act_dropout.h"

namespace fused_dropout {
namespace {

// Elements per block of the cache-blocked activation path below, before rounding to whole
// rows: small enough that a block's operands stay in L2, large enough that ATen's per-call
// cost is a few percent of the block's.
constexpr int64_t kActivationBlock = int64_t{1} << 16;

bool runs_activation_through_aten(Activation act) {
  return act == Activation::kGelu || act == Activation::kGeluTanh || act == Activation::kSiLU;
}

// erf, tanh and exp one element at a time cost several times a pass over memory on the CPU,
// so gelu, gelu_tanh and silu run through ATen's vectorised kernels. To keep one pass over
// memory, the work goes one block of whole rows (of the last dim, where the bias runs) at a
// time: ATen's bias add and activation (or its backward) on the block, then the mask rule on
// the block while it is still in cache. A block is a whole number of rows and of Philox
// groups. `block(first_row, rows, scratch)` does one block; with `with_scratch`, scratch is a
// block-sized buffer of the input's dtype for it to use (else undefined).
template <typename Block>
void for_each_activation_block(const at::Tensor& input, bool with_scratch, Block&& block) {
  const int64_t row_size = input.dim() > 0 ? input.size(-1) : 1, rows = input.numel() / row_size;
  const int64_t rows_per_group_step = 4 / std::gcd(row_size, int64_t{4});  // rows that fill whole groups
  const int64_t rows_per_block =
      std::max<int64_t>(1, kActivationBlock / row_size / rows_per_group_step) * rows_per_group_step;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    // The ATen calls below are this kernel's own steps, so they run below autograd, as the
    // calling thread does; a worker thread does not inherit that from it.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor scratch = with_scratch ? at::empty({rows_per_block, row_size},
                                                  input.options().memory_format(at::MemoryFormat::Contiguous))
                                      : at::Tensor();
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t first_row = b * rows_per_block;
      block(first_row, std::min(rows_per_block, rows - first_row), scratch);
    }
  });
}

// ATen's activation: out = act(in); `out` may be `in`.
void aten_activation(const at::Tensor& in, at::Tensor& out, Activation act) {
  if (act == Activation::kSiLU) {
    at::silu_out(out, in);
  } else {
    at::gelu_out(out, in, act == Activation::kGelu ? "none" : "tanh");
  }
}

// ATen's activation backward at `pre`: grad_in = act'(pre) * grad_in, in place.
void aten_activation_backward(at::Tensor& grad_in, const at::Tensor& pre, Activation act) {
  if (act == Activation::kSiLU) {
    at::silu_backward_out(grad_in, grad_in, pre);
  } else {
    at::gelu_backward_out(grad_in, grad_in, pre, act == Activation::kGelu ? "none" : "tanh");
  }
}

// The call's mask rule over a block of its row-major elements from `first` on (a whole
// Philox group), `in` into `out` (which may be `in`): the mask of a call whose state starts
// first / 4 groups later.
void mask_block(const at::Tensor& in, at::Tensor& out, RngState state, double p, int64_t first) {
  MaskLayout full;
  full.numel = in.numel();
  dispatch_apply(in, at::Tensor(), out, full, {state.seed, state.base + static_cast<uint64_t>(first / 4)}, p);
}

// act_dropout's forward through ATen's activation, block by block (row-major input, full mask).
void act_dropout_by_blocks(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, RngState state,
                           double p, Activation act) {
  const int64_t row_size = input.dim() > 0 ? input.size(-1) : 1;
  const at::Tensor rows_in = input.view({-1, row_size});
  at::Tensor rows_out = output.view({-1, row_size});
  for_each_activation_block(input, /*with_scratch=*/false, [&](int64_t first_row, int64_t count, at::Tensor&) {
    at::Tensor out_block = rows_out.narrow(0, first_row, count);
    const at::Tensor in_block = rows_in.narrow(0, first_row, count);
    if (bias.defined()) {
      at::add_out(out_block, in_block, bias);
      aten_activation(out_block, out_block, act);
    } else {
      aten_activation(in_block, out_block, act);
    }
    mask_block(out_block, out_block, state, p, first_row * row_size);
  });
}

// act_dropout's backward through ATen's activation backward, block by block (row-major
// operands, full mask): the gradient through the mask into the block, then act' at
// input + bias (made in the scratch block where there is a bias).
void act_dropout_backward_by_blocks(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& bias,
                                    at::Tensor& grad_input, RngState state, double p, Activation act) {
  const int64_t row_size = input.dim() > 0 ? input.size(-1) : 1;
  const at::Tensor rows_in = input.view({-1, row_size});
  const at::Tensor rows_grad = grad.view({-1, row_size});
  at::Tensor rows_grad_in = grad_input.view({-1, row_size});
  for_each_activation_block(input, bias.defined(), [&](int64_t first_row, int64_t count, at::Tensor& scratch) {
    at::Tensor grad_in_block = rows_grad_in.narrow(0, first_row, count);
    mask_block(rows_grad.narrow(0, first_row, count), grad_in_block, state, p, first_row * row_size);
    at::Tensor pre = rows_in.narrow(0, first_row, count);
    if (bias.defined()) {
      at::Tensor sum = scratch.narrow(0, 0, count);
      at::add_out(sum, pre, bias);
      pre = sum;
    }
    aten_activation_backward(grad_in_block, pre, act);
  });
}

std::tuple<at::Tensor, at::Tensor> act_dropout_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                   double p, c10::string_view activation, std::optional<int64_t> seed,
                                                   int64_t offset, std::optional<at::Generator> generator,
                                                   at::IntArrayRef shared_dims) {
  const auto [layout, act] =
      check_act_dropout_call(kActDropoutOp, input, bias, p, activation, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  if (runs_activation_through_aten(act)) {
    if (layout.row_major && input.is_contiguous()) {
      at::Tensor output = new_output(input);
      if (input.numel() > 0) act_dropout_by_blocks(input, bias_contiguous, output, state, p, act);
      return {output, state_tensor(state)};
    }
    // Any other layout: ATen's activation into the output, then the mask rule over it in place.
    const at::Tensor pre = bias_contiguous.defined() ? at::add(input, bias_contiguous) : input;
    at::Tensor output = empty_output_like(input);
    aten_activation(pre, output, act);
    dispatch_apply(output, at::Tensor(), output, layout, state, p);
    return {output, state_tensor(state)};
  }
  at::Tensor output = new_output(input);
  dispatch_apply(input, bias_contiguous, output, layout, state, p, RuleSpec{RuleSpec::Kind::kAct, act});
  return {output, state_tensor(state)};
}

at::Tensor act_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                    c10::string_view activation, at::IntArrayRef shared_dims) {
  const auto [layout, act] =
      check_act_dropout_backward_call(kActDropoutBackwardOp, grad, input, bias, rng_state, p, activation, shared_dims);
  const RngState state = read_state(rng_state);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  at::Tensor grad_input = new_output(input);
  if (input.numel() == 0) return grad_input;
  if (runs_activation_through_aten(act)) {
    if (layout.row_major && input.is_contiguous() && grad.is_contiguous()) {
      act_dropout_backward_by_blocks(grad, input, bias_contiguous, grad_input, state, p, act);
    } else {
      // Any other layout: the replayed gradient, then ATen's activation backward over it.
      dispatch_apply(grad, at::Tensor(), grad_input, layout, state, p);
      aten_activation_backward(grad_input, bias_contiguous.defined() ? at::add(input, bias_contiguous) : input, act);
    }
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "act_dropout_backward", [&] {
    visit_act_grad_rule<scalar_t>(act, p, [&](const auto& rule) {
      apply<scalar_t, true>(input, grad, bias_contiguous, grad_input, layout, state, rule);
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("act_dropout", &fused_dropout::act_dropout_cpu);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_cpu);
}
