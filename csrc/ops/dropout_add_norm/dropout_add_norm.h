// dropout_add_norm: h = residual + dropout(input), then LayerNorm or RMSNorm of h over the
// last dim, in one pass over each row. A row-reduction form: an output element depends on
// its whole row, so its kernels walk rows rather than the elementwise walk, with the mask of
// dropout at the same seed (docs/design.md, "Adding a form").
#pragma once

#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "ops/dropout_add_norm/norm_mask_rows.h"

namespace fused_dropout {

inline constexpr char kDropoutAddNormOp[] = "fused_dropout::dropout_add_norm";
inline constexpr char kNormBackwardOp[] = "fused_dropout::norm_backward";

// The arguments of one call, after the checks.
struct NormCall {
  MaskLayout mask;
  at::ScalarType residual_dtype;  // h's dtype
  at::ScalarType stats_dtype;     // mean and rstd: float32, or float64 for a float64 input
};

// All checks of dropout_add_norm's arguments (metadata only); returns h's dtype and the stats'.
NormCall check_dropout_add_norm_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
                                     const std::optional<int64_t>& seed, int64_t offset,
                                     const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);

// The same checks, and the mask layout.
NormCall check_dropout_add_norm_call(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
                                     const std::optional<int64_t>& seed, int64_t offset,
                                     const std::optional<at::Generator>& generator, at::IntArrayRef shared_dims);

// The rows of `input` (its last dim normalised) under the mask layout `mask`.
NormMaskRows norm_mask_rows(const at::Tensor& input, const MaskLayout& mask);

// A weight or bias as the kernels read it: in the stats' dtype, contiguous; or undefined.
at::Tensor norm_affine_operand(const std::optional<at::Tensor>& t, const NormCall& call);

// The outputs of a call, uninitialised: output (the input's dtype), h (the residual dtype),
// both contiguous, and mean and rstd of shape input.shape[:-1].
struct NormOutputs {
  at::Tensor output, residual_out, mean, rstd;
};
NormOutputs empty_norm_outputs(const at::Tensor& input, const NormCall& call);

// mean and rstd of the rows of h (already in the stats' dtype) by differentiable ATen ops;
// mean is 0 for RMSNorm. The composition below and the differentiated backward share it.
std::pair<at::Tensor, at::Tensor> row_stats(const at::Tensor& h, double eps, bool rms);

// The op as a composition of dropout and ATen ops, on any device: the definition the
// one-pass kernels agree with, and what they fall back to for the dtypes they do not take.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
    std::optional<int64_t> seed, int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims);

// The norm's part of the backward, with no randomness in it: (grad_h, grad_weight, grad_bias)
// for the output's gradient `grad` at h = residual_out, in the stats' dtype. The mask's part is
// dropout_replay of grad_h. Any device, by ATen's ops (CUDA's kernel); the CPU has a one-pass
// kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_composite(const at::Tensor& grad,
                                                                       const at::Tensor& residual_out,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                                       bool rms);

// Checks norm_backward's arguments (metadata only).
void check_norm_backward_args(const at::Tensor& grad, const at::Tensor& residual_out,
                              const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace fused_dropout
