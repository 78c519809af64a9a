// The one schema block of the extension, and the argument checks both backends share.
#include <Python.h>

#include <cmath>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dropout.h"

namespace fused_dropout {
namespace {

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

// Which dtype a second tensor operand may have: exactly the input's (act_dropout_backward's
// grad), or any floating dtype the sum is then promoted with (dropout_add's residual).
enum class OperandDtype { kInputs, kAnyFloat };

// A second tensor operand must have the input's shape and device, and a dtype as `dtype` says.
// Sizes are compared as SymInts, so the Meta kernels run the same check under dynamic shapes.
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

}  // namespace

void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.sym_size(1) == 4,
              "fused_dropout::philox4x32_10: counter must be int64 of shape [N, 4], got ", counter.scalar_type(),
              " of shape ", counter.sym_sizes());
  TORCH_CHECK(key.scalar_type() == at::kLong && key.dim() == 2 && key.sym_size(1) == 2 &&
                  key.sym_size(0) == counter.sym_size(0),
              "fused_dropout::philox4x32_10: key must be int64 of shape [N, 2] with N = ", counter.sym_size(0),
              ", got ", key.scalar_type(), " of shape ", key.sym_sizes());
  TORCH_CHECK(key.device() == counter.device(), "fused_dropout::philox4x32_10: key must be on the counter's device ",
              counter.device(), ", got ", key.device());
}

namespace {

// Which dims of `input` are shared (negative dims count from the end); checks that each dim
// is in range and named once.
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

// The mask layout of `input` for the given shared dims.
MaskLayout mask_layout(const char* op, const at::Tensor& input, at::IntArrayRef shared_dims) {
  const int64_t ndim = input.dim();
  const std::array<bool, kMaxDims> is_shared = shared_dim_flags(op, input, shared_dims);
  MaskLayout layout;
  layout.numel = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    const int64_t size = is_shared[d] ? 1 : input.size(d);
    layout.strides[d] = is_shared[d] ? 0 : layout.numel;
    layout.numel *= size;
    layout.shared = layout.shared || (is_shared[d] && input.size(d) > 1);
  }
  if (input.numel() == 0) layout.numel = 0;
  return layout;
}

}  // namespace

void check_dropout_args(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                        int64_t offset, const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_input_and_p(op, input, p);
  check_randomness_args(op, seed, offset, generator);
  shared_dim_flags(op, input, shared_dims);
}

MaskLayout check_dropout_call(const char* op, const at::Tensor& input, double p, const std::optional<int64_t>& seed,
                              int64_t offset, const std::optional<at::Generator>& generator,
                              at::IntArrayRef shared_dims) {
  check_dropout_args(op, input, p, seed, offset, generator, shared_dims);
  return mask_layout(op, input, shared_dims);
}

void check_state_args(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                      const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_input(op, input);
  check_randomness_args(op, seed, offset, generator);
  check_inplace_target(op, input);
  shared_dim_flags(op, input, shared_dims);
}

MaskLayout check_state_call(const char* op, const at::Tensor& input, const std::optional<int64_t>& seed, int64_t offset,
                            const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims) {
  check_state_args(op, input, seed, offset, generator, shared_dims);
  return mask_layout(op, input, shared_dims);
}

void check_replay_args(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                       at::IntArrayRef shared_dims, bool inplace) {
  check_input_and_p(op, input, p);
  check_rng_state(op, input, rng_state);
  if (inplace) check_inplace_target(op, input);
  shared_dim_flags(op, input, shared_dims);
}

MaskLayout check_replay_call(const char* op, const at::Tensor& input, const at::Tensor& rng_state, double p,
                             at::IntArrayRef shared_dims, bool inplace) {
  check_replay_args(op, input, rng_state, p, shared_dims, inplace);
  return mask_layout(op, input, shared_dims);
}

void check_dropout_add_args(const char* op, const at::Tensor& input, const at::Tensor& residual,
                            const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                            int64_t offset, const std::optional<at::Generator>& generator,
                            at::IntArrayRef shared_dims) {
  check_input_and_p(op, input, p);
  check_like_input(op, "residual", input, residual, OperandDtype::kAnyFloat);
  check_bias(op, input, bias);
  check_randomness_args(op, seed, offset, generator);
  shared_dim_flags(op, input, shared_dims);
}

MaskLayout check_dropout_add_call(const char* op, const at::Tensor& input, const at::Tensor& residual,
                                  const std::optional<at::Tensor>& bias, double p, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims) {
  check_dropout_add_args(op, input, residual, bias, p, seed, offset, generator, shared_dims);
  return mask_layout(op, input, shared_dims);
}

Activation parse_activation(const char* op, c10::string_view name) {
  static const std::pair<const char*, Activation> kNames[] = {{"relu", Activation::kReLU},
                                                              {"gelu", Activation::kGelu},
                                                              {"gelu_tanh", Activation::kGeluTanh},
                                                              {"silu", Activation::kSiLU},
                                                              {"squared_relu", Activation::kSquaredReLU}};
  for (const auto& [known, value] : kNames) {
    if (name == known) return value;
  }
  TORCH_CHECK_VALUE(false, op, ": activation must be one of 'relu', 'gelu', 'gelu_tanh', 'silu', 'squared_relu', got '",
                    std::string(name), "'");
}

Activation check_act_dropout_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                  double p, c10::string_view activation, const std::optional<int64_t>& seed,
                                  int64_t offset, const std::optional<at::Generator>& generator,
                                  at::IntArrayRef shared_dims) {
  const Activation act = parse_activation(op, activation);
  check_input_and_p(op, input, p);
  check_bias(op, input, bias);
  check_randomness_args(op, seed, offset, generator);
  shared_dim_flags(op, input, shared_dims);
  return act;
}

std::pair<MaskLayout, Activation> check_act_dropout_call(const char* op, const at::Tensor& input,
                                                         const std::optional<at::Tensor>& bias, double p,
                                                         c10::string_view activation,
                                                         const std::optional<int64_t>& seed, int64_t offset,
                                                         const std::optional<at::Generator>& generator,
                                                         at::IntArrayRef shared_dims) {
  const Activation act = check_act_dropout_args(op, input, bias, p, activation, seed, offset, generator, shared_dims);
  return {mask_layout(op, input, shared_dims), act};
}

Activation check_act_dropout_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                           c10::string_view activation, at::IntArrayRef shared_dims) {
  const Activation act = parse_activation(op, activation);
  check_input_and_p(op, input, p);
  check_like_input(op, "grad", input, grad, OperandDtype::kInputs);
  check_bias(op, input, bias);
  check_rng_state(op, input, rng_state);
  shared_dim_flags(op, input, shared_dims);
  return act;
}

std::pair<MaskLayout, Activation> check_act_dropout_backward_call(
    const char* op, const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& bias,
    const at::Tensor& rng_state, double p, c10::string_view activation, at::IntArrayRef shared_dims) {
  const Activation act = check_act_dropout_backward_args(op, grad, input, bias, rng_state, p, activation, shared_dims);
  return {mask_layout(op, input, shared_dims), act};
}

MergedLayout merged_layout(const at::Tensor& input, const at::Tensor& output, const MaskLayout& mask,
                           const at::Tensor& residual, WalkOrder order) {
  const int64_t* residual_strides = residual.defined() ? residual.strides().data() : input.strides().data();
  const std::array<const int64_t*, kOperands> strides = {input.strides().data(), output.strides().data(),
                                                         mask.strides.data(), residual_strides};
  if (order == WalkOrder::kOutputMemory)
    return merge_dims_in_memory_order(input.dim(), input.sizes().data(), strides, kOut);
  return merge_dims(input.dim(), input.sizes().data(), strides);
}

at::Tensor contiguous_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
}

at::Tensor empty_output_like(const at::Tensor& input) { return at::empty_like(input, at::MemoryFormat::Preserve); }

at::ScalarType dropout_add_dtype(const at::Tensor& input, const at::Tensor& residual) {
  return c10::promoteTypes(input.scalar_type(), residual.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> dropout_add_promoted(const at::Tensor& input, const at::Tensor& residual,
                                                        const std::optional<at::Tensor>& bias, double p,
                                                        std::optional<int64_t> seed, int64_t offset,
                                                        std::optional<at::Generator> generator,
                                                        at::IntArrayRef shared_dims) {
  using DropoutSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, std::optional<int64_t>,
                                                              int64_t, std::optional<at::Generator>, at::IntArrayRef);
  static const auto dropout =
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_dropout::dropout", "").typed<DropoutSignature>();
  // input + bias rounded to the input's dtype, as the fused op and the unfused sum round it.
  const at::Tensor pre = bias.has_value() && bias->defined() ? at::add(input, *bias) : input;
  auto [dropped, rng_state] = dropout.call(pre, p, seed, offset, std::move(generator), shared_dims);
  at::Tensor output =
      at::empty_like(input, input.options().dtype(dropout_add_dtype(input, residual)), at::MemoryFormat::Preserve);
  at::add_out(output, residual, dropped);
  return {output, rng_state};
}

}  // namespace fused_dropout

// rng_state is int64[2] = (seed, base) of the mask rule: all a backward needs to
// regenerate the mask. shared_dims are dims along which one mask value is shared
// (channel-wise and "locked" dropout); the rule then indexes the smaller mask shape. The
// random ops are nondeterministic_seeded so that graph passes (CSE, dead-code merging)
// never fold two calls into one.
TORCH_LIBRARY(fused_dropout, m) {
  m.def(
      "dropout(Tensor input, float p, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // The backward of every form: input times the mask and scale that rng_state stands for.
  // With `scale`, kept elements are scaled by it instead of 1 / (1 - p) (alpha dropout's backward).
  m.def("dropout_replay(Tensor input, Tensor rng_state, float p, int[] shared_dims=[], float? scale=None) -> Tensor");
  // In-place dropout is two steps: draw the state (the only random step), then apply its
  // mask in place. The in-place op returns its input, the schema torch's in-place fallbacks
  // (negative and conjugate views, functionalization) expect.
  m.def(
      "dropout_state(Tensor input, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def("dropout_replay_(Tensor(a!) input, Tensor rng_state, float p, int[] shared_dims=[]) -> Tensor(a!)",
        {at::Tag::inplace});
  // residual + dropout(input + bias) in one pass (bias broadcast over the last dim).
  m.def(
      "dropout_add(Tensor input, Tensor residual, Tensor? bias, float p, int? seed=None, int offset=0, "
      "Generator? generator=None, int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // The rest of the family (forms.h): alpha dropout, and dropout(activation(input + bias)).
  m.def(
      "alpha_dropout(Tensor input, float p, int? seed=None, int offset=0, Generator? generator=None, "
      "int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "act_dropout(Tensor input, Tensor? bias, float p, str activation, int? seed=None, int offset=0, "
      "Generator? generator=None, int[] shared_dims=[]) -> (Tensor output, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // act_dropout's backward in one pass: act'(input + bias) * dropout_replay(grad). Its own
  // autograd (double backward, forward AD) goes through the differentiable composition.
  m.def(
      "act_dropout_backward(Tensor grad, Tensor input, Tensor? bias, Tensor rng_state, float p, str activation, "
      "int[] shared_dims=[]) -> Tensor");
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
}

// The shared library is imported once from Python for the registrations above; the module
// itself only says whether the CUDA kernels were compiled in and which CPU loops run.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fused_dropout operator registrations", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef FUSED_DROPOUT_WITH_CUDA
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  if (module != nullptr && (PyModule_AddIntConstant(module, "with_cuda", kWithCuda) != 0 ||
                            PyModule_AddStringConstant(module, "cpu_loops", fused_dropout::cpu_loops_name()) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
