// Pieces shared by the CPU and CUDA host code: the argument checks, the mask layout and the
// merged walk of a call's tensors. The kernels themselves live in cpu/ and cuda/.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <type_traits>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "forms.h"
#include "layout.h"
#include "philox.h"

namespace fused_dropout {

// Which mask element each input element uses. The mask shape is the input's shape with the
// shared dims set to 1 (one mask value for every index along them), and the mask rule's
// index i is the row-major index in the mask shape. strides[d] is the row-major stride of
// dim d in the mask shape, or 0 for a shared dim, so an element's mask index is
// sum(index[d] * strides[d]).
struct MaskLayout {
  int64_t numel = 0;    // elements in the mask shape
  bool shared = false;  // true when some dim of size > 1 is shared
  std::array<int64_t, kMaxDims> strides{};
};

// The argument checks of the ops. `op` names the operator in messages, e.g.
// "fused_dropout::dropout"; every message names the argument, the expectation and the value.
// Each check_*_args runs the checks alone, on metadata only (sizes compared as SymInts): the
// Meta kernels (meta.cpp) run them, so fake tensors and meta tensors are refused with eager's
// messages. Each check_*_call runs the same checks and returns the mask layout.

void check_dropout_args(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                        int64_t offset, const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);
void check_state_args(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                      const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);
void check_replay_args(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                       at::IntArrayRef shared_dims, bool inplace);
void check_dropout_add_args(const char* op, const at::Tensor& input, const at::Tensor& residual,
                            const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                            int64_t offset, const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);
Activation check_act_dropout_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                  double p, c10::string_view activation, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims);
Activation check_act_dropout_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                           c10::string_view activation, at::IntArrayRef shared_dims);

// All checks of dropout's and alpha_dropout's arguments (input, p, seed/offset/generator,
// shared dims); returns the mask layout.
MaskLayout check_dropout_call(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                              int64_t offset, const std::optional<at::Generator>& generator,
                              at::IntArrayRef shared_dims);

// All checks of dropout_state's arguments, which draws the state of an in-place call, so the
// input must be a valid in-place target; returns the mask layout.
MaskLayout check_state_call(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                            const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);

// All checks of dropout_replay's and dropout_replay_'s arguments; returns the mask layout.
MaskLayout check_replay_call(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                             at::IntArrayRef shared_dims, bool inplace);

// All checks of dropout_add's arguments; returns the mask layout.
MaskLayout check_dropout_add_call(const char* op, const at::Tensor& input, const at::Tensor& residual,
                                  const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims);

// All checks of act_dropout's arguments; returns the mask layout and the activation.
std::pair<MaskLayout, Activation> check_act_dropout_call(const char* op, const at::Tensor& input,
                                                         const std::optional<at::Tensor>& bias, double p,
                                                         c10::string_view activation,
                                                         const std::optional<int64_t>& seed, int64_t offset,
                                                         const std::optional<at::Generator>& generator,
                                                         at::IntArrayRef shared_dims);

// All checks of act_dropout_backward's arguments; returns the mask layout and the activation.
std::pair<MaskLayout, Activation> check_act_dropout_backward_call(
    const char* op, const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& bias,
    const at::Tensor& rng_state, double p, c10::string_view activation, at::IntArrayRef shared_dims);

// The activation act_dropout's `activation` argument names; a clear error for any other name.
Activation parse_activation(const char* op, c10::string_view name);

// Which member of the family a kernel computes beyond the mask (forms.h; docs/design.md, "The family").
struct RuleSpec {
  enum class Form { kDropout, kAlpha, kAct };
  Form form = Form::kDropout;
  Activation activation = Activation::kReLU;
  std::optional<double> scale;  // kDropout only: replaces 1 / (1 - p), as alpha dropout's backward needs
};

// Calls f(rule) with the output rule of `spec` for scalar_t and drop probability p.
template <typename scalar_t, typename F>
void visit_rule(const RuleSpec& spec, double p, F&& f) {
  using acc_t = acc_type<scalar_t>;
  auto mask = MaskedScale<scalar_t, acc_t>::for_p(p);
  switch (spec.form) {
    case RuleSpec::Form::kDropout:
      if (spec.scale.has_value()) mask.scale = static_cast<acc_t>(*spec.scale);
      return f(mask);
    case RuleSpec::Form::kAlpha:
      return f(AlphaRule<scalar_t, acc_t>::for_p(p));
    case RuleSpec::Form::kAct:
      return visit_activation(spec.activation, [&](auto act) { f(ActRule<act(), scalar_t, acc_t>{mask}); });
  }
}

// Calls f(rule) with act_dropout_backward's two-operand rule (forms.h, ActGradRule).
template <typename scalar_t, typename F>
void visit_act_grad_rule(Activation activation, double p, F&& f) {
  using acc_t = acc_type<scalar_t>;
  visit_activation(activation,
                   [&](auto act) { f(ActGradRule<act(), scalar_t, acc_t>{MaskedScale<scalar_t, acc_t>::for_p(p)}); });
}

// True for the rules that take a bias (added to the input, rounded, before the rule).
template <typename Rule>
constexpr bool kRuleTakesBias = false;
template <Activation kAct, typename scalar_t, typename acc_t>
constexpr bool kRuleTakesBias<ActRule<kAct, scalar_t, acc_t>> = true;

// Checks the arguments of the raw generator op: counter int64[N, 4], key int64[N, 2], same device.
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

// The order a strided walk visits elements in: the logical (row-major) order, or the output's
// memory order (layout.h, merge_dims_in_memory_order).
enum class WalkOrder { kLogical, kOutputMemory };

// The merged walk (layout.h) of input, output, mask and residual (residual may be undefined).
MergedLayout merged_layout(const at::Tensor& input, const at::Tensor& output, const MaskLayout& mask,
                           const at::Tensor& residual, WalkOrder order = WalkOrder::kLogical);

// The CPU inner loops this process runs: "avx512" or "portable".
const char* cpu_loops_name();

// An op's optional bias as the kernels read it (contiguous), or an undefined tensor.
at::Tensor contiguous_bias(const std::optional<at::Tensor>& bias);

// The output of an out-of-place call: same shape, dtype, device and memory format as the input.
at::Tensor empty_output_like(const at::Tensor& input);

// dropout_add's output dtype: torch's promotion of the input's and the residual's.
at::ScalarType dropout_add_dtype(const at::Tensor& input, const at::Tensor& residual);

// dropout_add with a residual whose dtype differs from the input's: residual + dropout(input +
// bias), the dropout in the input's dtype and the sum in the promoted one, as torch computes
// the composition. Two passes through the dispatcher, on any device.
std::tuple<at::Tensor, at::Tensor> dropout_add_promoted(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims);

}  // namespace fused_dropout
