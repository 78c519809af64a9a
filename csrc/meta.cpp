// Meta kernels: what torch.compile, torch.export, FakeTensorMode and meta tensors run. Each
// runs the op's argument checks (ops.cpp), on metadata only, then returns empty outputs of the
// right shape, dtype and strides. So a compiled program is refused at trace time with eager's
// message, and a meta tensor beside a CPU or CUDA tensor is refused (the Meta key outranks
// the other backends in dispatch) instead of returning uninitialised memory.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dropout.h"

namespace fused_dropout {
namespace {

at::Tensor meta_state(const at::Tensor& input) { return at::empty({2}, input.options().dtype(at::kLong)); }

std::tuple<at::Tensor, at::Tensor> dropout_meta(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                int64_t offset, std::optional<at::Generator> generator,
                                                at::IntArrayRef shared_dims) {
  check_dropout_args("fused_dropout::dropout", input, p, seed, offset, generator, shared_dims);
  return {empty_output_like(input), meta_state(input)};
}

std::tuple<at::Tensor, at::Tensor> alpha_dropout_meta(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                      int64_t offset, std::optional<at::Generator> generator,
                                                      at::IntArrayRef shared_dims) {
  check_dropout_args("fused_dropout::alpha_dropout", input, p, seed, offset, generator, shared_dims);
  return {empty_output_like(input), meta_state(input)};
}

at::Tensor dropout_state_meta(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                              std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  check_state_args("fused_dropout::dropout_state", input, seed, offset, generator, shared_dims);
  return meta_state(input);
}

at::Tensor dropout_replay_meta(const at::Tensor& input, const at::Tensor& rng_state, double p,
                               at::IntArrayRef shared_dims, std::optional<double> /*scale*/) {
  check_replay_args("fused_dropout::dropout_replay", input, rng_state, p, shared_dims, /*inplace=*/false);
  return empty_output_like(input);
}

at::Tensor& dropout_replay_inplace_meta(at::Tensor& input, const at::Tensor& rng_state, double p,
                                        at::IntArrayRef shared_dims) {
  check_replay_args("fused_dropout::dropout_replay_", input, rng_state, p, shared_dims, /*inplace=*/true);
  return input;
}

std::tuple<at::Tensor, at::Tensor> dropout_add_meta(const at::Tensor& input, const at::Tensor& residual,
                                                    const std::optional<at::Tensor>& bias, double p,
                                                    std::optional<int64_t> seed, int64_t offset,
                                                    std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  check_dropout_add_args("fused_dropout::dropout_add", input, residual, bias, p, seed, offset, generator, shared_dims);
  at::Tensor output =
      at::empty_like(input, input.options().dtype(dropout_add_dtype(input, residual)), at::MemoryFormat::Preserve);
  return {output, meta_state(input)};
}

std::tuple<at::Tensor, at::Tensor> act_dropout_meta(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                    double p, c10::string_view activation, std::optional<int64_t> seed,
                                                    int64_t offset, std::optional<at::Generator> generator,
                                                    at::IntArrayRef shared_dims) {
  check_act_dropout_args("fused_dropout::act_dropout", input, bias, p, activation, seed, offset, generator,
                         shared_dims);
  return {empty_output_like(input), meta_state(input)};
}

at::Tensor act_dropout_backward_meta(const at::Tensor& grad, const at::Tensor& input,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                     c10::string_view activation, at::IntArrayRef shared_dims) {
  check_act_dropout_backward_args("fused_dropout::act_dropout_backward", grad, input, bias, rng_state, p, activation,
                                  shared_dims);
  return empty_output_like(input);
}

at::Tensor philox4x32_10_meta(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  return at::empty_like(counter, at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) {
  m.impl("dropout", &fused_dropout::dropout_meta);
  m.impl("dropout_state", &fused_dropout::dropout_state_meta);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_meta);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_meta);
  m.impl("dropout_add", &fused_dropout::dropout_add_meta);
  m.impl("alpha_dropout", &fused_dropout::alpha_dropout_meta);
  m.impl("act_dropout", &fused_dropout::act_dropout_meta);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_meta);
  m.impl("philox4x32_10", &fused_dropout::philox4x32_10_meta);
}
