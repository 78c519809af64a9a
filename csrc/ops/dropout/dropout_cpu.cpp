// The dropout ops on the CPU: the shared walk (cpu/walk.h) with plain dropout's rule, and a
// replay into another dtype.
#include <type_traits>

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/walk.h"
#include "ops/dropout/dropout.h"

namespace fused_dropout {
namespace {

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                               int64_t offset, std::optional<at::Generator> generator,
                                               at::IntArrayRef shared_dims) {
  const MaskLayout layout = check_dropout_call(kDropoutOp, input, p, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, state, p);
  return {output, state_tensor(state)};
}

at::Tensor dropout_state_cpu(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                             std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  check_state_call(kDropoutStateOp, input, seed, offset, generator, shared_dims);
  return state_tensor(draw_state(seed, offset, generator));
}

// y = rule(out_t(x)) over a row-major input and a full mask: the replay into another dtype in
// one pass, rounded as the conversion and then the replay round it. A float32 input replayed
// into a 2-byte output takes the AVX-512 loop where the CPU has it.
template <typename in_t, typename out_t>
void replay_converting(const at::Tensor& input, at::Tensor& output, RngState state, const MaskedScale<out_t>& rule) {
  const in_t* x = input.const_data_ptr<in_t>();
  out_t* y = output.mutable_data_ptr<out_t>();
  constexpr bool kFromFloat = std::is_same_v<in_t, float> && kTwoByteFloat<out_t>;
  const TwoByteLoops* loops = nullptr;
  if constexpr (kFromFloat) loops = two_byte_loops<out_t>();
  for_each_word_batch(input.numel(), state, [&](int64_t first, int64_t n, const uint32_t* words) {
    if constexpr (kFromFloat) {
      if (loops != nullptr) {
        return loops->dropout_from_float(
            {x + first, nullptr, nullptr, 0, 1, reinterpret_cast<uint16_t*>(y + first), words, n},
            MaskedScale<float, float>{rule.keep, rule.scale});
      }
    }
    for (int64_t j = 0; j < n; ++j) y[first + j] = rule(static_cast<out_t>(x[first + j]), words[j]);
  });
}

// A replay into another dtype: one pass where the input is row-major and the mask full, else
// the conversion and then the replay; a float16 output as one_pass_converts (cpu/walk.h) says.
at::Tensor replay_into_dtype(const at::Tensor& input, const MaskLayout& layout, RngState state, double p,
                             std::optional<double> scale, at::ScalarType dtype) {
  if (!layout.row_major || !input.is_contiguous() || !one_pass_converts(dtype, input.scalar_type())) {
    const at::Tensor converted = input.to(dtype);
    at::Tensor output = new_output(converted);
    dispatch_apply(converted, at::Tensor(), output, layout, state, p, RuleSpec{{}, {}, scale});
    return output;
  }
  at::Tensor output = new_output(input, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_replay", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_dropout_replay", [&] {
      MaskedScale<scalar_t> rule = MaskedScale<scalar_t>::for_p(p);
      if (scale.has_value()) rule.scale = static_cast<decltype(rule.scale)>(*scale);
      replay_converting<in_t, scalar_t>(input, output, state, rule);
    });
  });
  return output;
}

at::Tensor dropout_replay_cpu(const at::Tensor& input, const at::Tensor& rng_state, double p,
                              at::IntArrayRef shared_dims, std::optional<double> scale,
                              std::optional<at::ScalarType> dtype) {
  const MaskLayout layout =
      check_replay_call(kDropoutReplayOp, input, rng_state, p, shared_dims, /*inplace=*/false, dtype);
  if (replay_dtype(input, dtype) != input.scalar_type()) {
    return replay_into_dtype(input, layout, read_state(rng_state), p, scale, *dtype);
  }
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, read_state(rng_state), p, RuleSpec{{}, {}, scale});
  return output;
}

at::Tensor& dropout_replay_inplace_cpu(at::Tensor& input, const at::Tensor& rng_state, double p,
                                       at::IntArrayRef shared_dims) {
  const MaskLayout layout =
      check_replay_call(kDropoutReplayInplaceOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  dispatch_apply(input, at::Tensor(), input, layout, read_state(rng_state), p);
  return input;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", &fused_dropout::dropout_cpu);
  m.impl("dropout_state", &fused_dropout::dropout_state_cpu);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cpu);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_cpu);
}
