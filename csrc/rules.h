// The output rules beyond plain dropout's (philox.h, MaskedScale): a rule is the function of
// one element (and its random word) that a kernel applies; each form of the family (docs/
// design.md, "The family") is one or two rules. Alpha dropout and activation + dropout keep an
// element iff the mask rule of philox.h keeps it, and map it with their own affine or
// activation step. Free of ATen, like philox.h, so the CPU and CUDA kernels and the CUDA
// kernels' host test share them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "philox.h"

namespace fused_dropout {

// The accumulation type's math functions, on the host and the device.
namespace math {
C10_HOST_DEVICE C10_ALWAYS_INLINE float erf(float x) { return ::erff(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double erf(double x) { return ::erf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE float tanh(float x) { return ::tanhf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double tanh(double x) { return ::tanh(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE float exp(float x) { return ::expf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double exp(double x) { return ::exp(x); }
// x * y rounded on its own: nvcc would otherwise fuse it with a following add into one
// rounding, where the CPU rounds twice.
C10_HOST_DEVICE C10_ALWAYS_INLINE float mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}
C10_HOST_DEVICE C10_ALWAYS_INLINE double mul_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(x, y);
#else
  return x * y;
#endif
}
}  // namespace math

// Alpha dropout (torch's nn.AlphaDropout): kept elements are a * x + a * alpha * p, dropped
// ones a * alpha * (p - 1), with alpha = 1.7580993408473766 and
// a = 1 / sqrt((alpha^2 p + 1)(1 - p)), so SELU activations keep zero mean and unit variance.
// Its gradient is a on kept elements and 0 on dropped ones: a MaskedScale with scale a.
template <typename scalar_t, typename acc_t>
struct AlphaRule {
  KeepRule keep;
  acc_t a;
  acc_t kept_shift;  // a * alpha * p
  scalar_t dropped;  // a * alpha * (p - 1), rounded once

  static constexpr double kAlpha = 1.7580993408473766;
  static constexpr bool kDroppedReadsInput = false;  // dropped: a constant
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool keeps(uint32_t word) const { return keep(word); }
  static double a_for_p(double p_drop) { return 1.0 / std::sqrt((kAlpha * kAlpha * p_drop + 1.0) * (1.0 - p_drop)); }

  static AlphaRule for_p(double p_drop) {
    const double a = p_drop < 1.0 ? a_for_p(p_drop) : 0.0;
    return AlphaRule{KeepRule::for_p(p_drop), static_cast<acc_t>(a), static_cast<acc_t>(a * kAlpha * p_drop),
                     static_cast<scalar_t>(a * kAlpha * (p_drop - 1.0))};
  }

  // The multiply and the add each rounded to the accumulation type, on every device alike, so
  // the CPU and CUDA kernels give the same bits (and the CPU loop vectorises).
  C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t operator()(scalar_t x, uint32_t word) const {
    using bits_t = typename MaskedScale<scalar_t, acc_t>::bits_t;
    const scalar_t kept = static_cast<scalar_t>(math::mul_rn(static_cast<acc_t>(x), a) + kept_shift);
    // A select on the bits, as MaskedScale does, so that the CPU loop vectorises.
    bits_t kept_bits, dropped_bits;
    std::memcpy(&kept_bits, &kept, sizeof(bits_t));
    std::memcpy(&dropped_bits, &dropped, sizeof(bits_t));
    const bits_t take_kept = static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(keep(word)));
    const bits_t bits = static_cast<bits_t>((kept_bits & take_kept) | (dropped_bits & ~take_kept));
    scalar_t out;
    std::memcpy(&out, &bits, sizeof(bits_t));
    return out;
  }
};

// The activations of act_dropout, in the accumulation type, written as torch writes them
// (ATen's GeluKernel, Activation.cpp) so the fused form stays within an ulp or two of them.
enum class Activation : int { kReLU = 0, kGelu, kGeluTanh, kSiLU, kSquaredReLU };

// Calls f(std::integral_constant<Activation, act>{}): the activation as a template argument.
template <typename F>
void visit_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kReLU:
      return f(std::integral_constant<Activation, Activation::kReLU>{});
    case Activation::kGelu:
      return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSiLU:
      return f(std::integral_constant<Activation, Activation::kSiLU>{});
    case Activation::kSquaredReLU:
      return f(std::integral_constant<Activation, Activation::kSquaredReLU>{});
  }
}

template <Activation kAct, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t activate(acc_t x) {
  // The ReLU forms are written as one select of values computed up front: GCC vectorises
  // that, but not a select whose operand is itself a select (it branches instead). Only a
  // negative input becomes 0, as in torch's CPU relu: NaN stays NaN and -0.0 stays -0.0.
  if constexpr (kAct == Activation::kReLU) {
    return x < acc_t(0) ? acc_t(0) : x;
  } else if constexpr (kAct == Activation::kSquaredReLU) {
    const acc_t square = x * x;
    return x < acc_t(0) ? acc_t(0) : square;
  } else if constexpr (kAct == Activation::kGelu) {
    constexpr acc_t kSqrtHalf = acc_t(0.70710678118654752440);
    return x * acc_t(0.5) * (acc_t(1) + math::erf(x * kSqrtHalf));
  } else if constexpr (kAct == Activation::kGeluTanh) {
    constexpr acc_t kBeta = acc_t(0.79788456080286535588);  // sqrt(2 / pi)
    constexpr acc_t kKappa = acc_t(0.044715);
    const acc_t inner = kBeta * (x + kKappa * x * x * x);
    return acc_t(0.5) * x * (acc_t(1) + math::tanh(inner));
  } else {
    return x / (acc_t(1) + math::exp(-x));
  }
}

// dropout(act(x)): the activation rounded to the dtype, as the unfused act would return it,
// then the plain output rule. With kReLU the result equals dropout(relu(x)) bit for bit.
template <Activation kAct, typename scalar_t, typename acc_t>
struct ActRule {
  MaskedScale<scalar_t, acc_t> mask;

  static constexpr bool kDroppedReadsInput = false;  // dropped: +0.0
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool keeps(uint32_t word) const { return mask.keep(word); }

  C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t operator()(scalar_t x, uint32_t word) const {
    return mask(static_cast<scalar_t>(activate<kAct>(static_cast<acc_t>(x))), word);
  }
};

// act'(x) * dy in the accumulation type, written as torch's activation backward kernels write
// them (ATen's GeluKernel and Activation.cpp; squared ReLU as torch's autograd of relu(x)^2
// computes it: pow's backward dy * (2 * relu(x)), then relu's, which gives +0 where x <= 0).
template <Activation kAct, typename scalar_t, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t activation_backward(scalar_t grad, scalar_t input) {
  const acc_t dy = static_cast<acc_t>(grad), x = static_cast<acc_t>(input);
  if constexpr (kAct == Activation::kReLU) {
    // threshold_backward: x <= 0 gives 0, so NaN inputs pass the gradient.
    return x > acc_t(0) || x != x ? grad : scalar_t(0);
  } else if constexpr (kAct == Activation::kSquaredReLU) {
    // One select of a value computed up front, as in activate(); NaN passes (NaN <= 0 is false).
    const scalar_t product = static_cast<scalar_t>(dy * static_cast<acc_t>(static_cast<scalar_t>(x * acc_t(2))));
    return x <= acc_t(0) ? scalar_t(0) : product;
  } else if constexpr (kAct == Activation::kGelu) {
    constexpr acc_t kBeta = acc_t(0.39894228040143267794);   // 1 / sqrt(2 pi)
    constexpr acc_t kAlpha = acc_t(0.70710678118654752440);  // sqrt(1 / 2)
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + math::erf(x * kAlpha));
    const acc_t pdf = kBeta * math::exp(x * x * acc_t(-0.5));
    return static_cast<scalar_t>(dy * (cdf + x * pdf));
  } else if constexpr (kAct == Activation::kGeluTanh) {
    constexpr acc_t kBeta = acc_t(0.79788456080286535588);  // sqrt(2 / pi)
    constexpr acc_t kKappa = acc_t(0.044715);
    const acc_t x_sq = x * x;
    const acc_t x_cube = x_sq * x;
    const acc_t inner = kBeta * (x + kKappa * x_cube);
    const acc_t tanh_inner = math::tanh(inner);
    const acc_t left_derivative = acc_t(0.5) * (acc_t(1) + tanh_inner);
    const acc_t right_derivative = acc_t(1) - tanh_inner * tanh_inner;
    const acc_t inner_derivative = kBeta * (acc_t(1) + acc_t(3) * kKappa * x_sq);
    return static_cast<scalar_t>(dy * (left_derivative + acc_t(0.5) * x * right_derivative * inner_derivative));
  } else {
    const acc_t sigmoid = acc_t(1) / (acc_t(1) + math::exp(-x));
    return static_cast<scalar_t>(dy * sigmoid * (acc_t(1) + x * (acc_t(1) - sigmoid)));
  }
}

// act_dropout's backward in one pass: the gradient through the forward's mask and scale,
// rounded to the dtype as dropout_replay rounds it, then the activation's backward at the
// forward's input + bias. It is a two-operand rule: combine(grad, input + bias, word).
template <Activation kAct, typename scalar_t, typename acc_t>
struct ActGradRule {
  MaskedScale<scalar_t, acc_t> mask;

  // A dropped element's gradient is 0 * act'(input), which is NaN where act'(input) is.
  static constexpr bool kDroppedReadsInput = true;
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool keeps(uint32_t word) const { return mask.keep(word); }

  C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t combine(scalar_t grad, scalar_t pre, uint32_t word) const {
    return activation_backward<kAct, scalar_t, acc_t>(mask(grad, word), pre);
  }
};

// dropout_add with a residual of another dtype: residual + dropout(x), the dropout rounded to
// x's dtype and the sum done in out_t (torch's promotion of the two dtypes), as the
// composition, dropout then the promoting add, rounds them.
template <typename scalar_t, typename out_t>
struct PromotedAdd {
  MaskedScale<scalar_t> mask;

  static constexpr bool kDroppedReadsInput = false;
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool keeps(uint32_t word) const { return mask.keeps(word); }

  template <typename res_t>
  C10_HOST_DEVICE C10_ALWAYS_INLINE out_t combine(res_t residual, scalar_t x, uint32_t word) const {
    return static_cast<out_t>(residual) + static_cast<out_t>(mask(x, word));
  }
};

// Which one-operand rule a kernel applies: plain dropout's, alpha dropout's, or activation +
// dropout's (the run-time choice the kernels' launch turns into a rule type).
struct RuleSpec {
  enum class Kind { kDropout, kAlpha, kAct };
  Kind kind = Kind::kDropout;
  Activation activation = Activation::kReLU;
  std::optional<double> scale;  // kDropout only: replaces 1 / (1 - p), as alpha dropout's backward needs
};

// Calls f(rule) with the output rule of `spec` for scalar_t and drop probability p.
template <typename scalar_t, typename F>
void visit_rule(const RuleSpec& spec, double p, F&& f) {
  using acc_t = acc_type<scalar_t>;
  auto mask = MaskedScale<scalar_t>::for_p(p);
  switch (spec.kind) {
    case RuleSpec::Kind::kDropout:
      if (spec.scale.has_value()) mask.scale = static_cast<acc_t>(*spec.scale);
      return f(mask);
    case RuleSpec::Kind::kAlpha:
      return f(AlphaRule<scalar_t, acc_t>::for_p(p));
    case RuleSpec::Kind::kAct:
      return visit_activation(spec.activation, [&](auto act) { f(ActRule<act(), scalar_t, acc_t>{mask}); });
  }
}

// Calls f(rule) with act_dropout_backward's two-operand rule (rules.h, ActGradRule).
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

}  // namespace fused_dropout
