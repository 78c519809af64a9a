// dropout_add_norm on CUDA: the one-pass kernel (norm_kernel.cuh) over row-major rows, one
// block per row. The norm's backward is the composition of ATen's ops (norm_backward_composite).
#include <limits>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "ops/dropout_add_norm/dropout_add_norm.h"
#include "ops/dropout_add_norm/norm_kernel.cuh"

namespace fused_dropout {
namespace {

// Launches the kernel with steps of kVec elements: 16 bytes of the input where the width and
// every operand's alignment allow, else one element.
template <typename in_t, typename res_t, typename h_t, typename sum_t>
void launch_norm(const NormOperands<in_t, res_t, h_t, sum_t>& ops, const NormMaskRows& mask, const StateSource& src,
                 double p) {
  constexpr int kVec = 16 / sizeof(in_t);
  const auto aligned = [&](const auto* ptr) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(ptr)>>;
    return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % sizeof(Vec<T, kVec>) == 0;
  };
  const bool vectorised =
      ops.width % kVec == 0 && aligned(ops.in) && aligned(ops.res) && aligned(ops.out) && aligned(ops.h);
  const int64_t steps = vectorised ? ops.width / kVec : ops.width;
  const int threads = norm_threads(steps);
  const int grid = static_cast<int>(std::min<int64_t>(ops.rows, std::numeric_limits<int32_t>::max()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto rule = MaskedScale<in_t>::for_p(p);
  if (vectorised) {
    norm_forward_kernel<kVec><<<grid, threads, 0, stream>>>(ops, mask, src, rule);
  } else {
    norm_forward_kernel<1><<<grid, threads, 0, stream>>>(ops, mask, src, rule);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
    std::optional<int64_t> seed, int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const NormCall call = check_dropout_add_norm_call(kDropoutAddNormOp, input, residual, weight, bias, p, eps, rms,
                                                    residual_dtype, seed, offset, generator, shared_dims);
  const bool has_residual = residual.has_value() && residual->defined();
  const at::ScalarType in_dtype = input.scalar_type(), h_dtype = call.residual_dtype;
  const at::ScalarType res_dtype = has_residual ? residual->scalar_type() : in_dtype;
  // The kernel's types: h in the input's dtype or float32, a residual in the input's dtype or
  // h's. Other combinations, and empty rows, take the composition.
  const bool kernel_types =
      (h_dtype == in_dtype || h_dtype == at::kFloat) && (res_dtype == in_dtype || res_dtype == h_dtype);
  if (input.numel() == 0 || !kernel_types) {
    return dropout_add_norm_composite(input, residual, weight, bias, p, eps, rms, residual_dtype, seed, offset,
                                      std::move(generator), shared_dims);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  NormOutputs outs = empty_norm_outputs(input, call);
  at::Tensor rng_state = empty_state_like(input);
  const StateSource src = StateSource::drawn(reserve_state(input, call.mask, seed, offset, generator), rng_state);
  const at::Tensor x = input.contiguous();
  const at::Tensor r = has_residual ? residual->contiguous() : at::Tensor();
  const at::Tensor w = norm_affine_operand(weight, call), b = norm_affine_operand(bias, call);
  const NormMaskRows mask = norm_mask_rows(input, call.mask);
  const int64_t width = input.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "dropout_add_norm_cuda", [&] {
    using in_t = scalar_t;
    const auto with_h = [&](auto h_tag) {
      using h_t = decltype(h_tag);
      using sum_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<h_t, double>, double, float>;
      const auto with_residual = [&](auto res_tag) {
        using res_t = decltype(res_tag);
        const NormOperands<in_t, res_t, h_t, sum_t> ops{x.const_data_ptr<in_t>(),
                                                        r.defined() ? r.const_data_ptr<res_t>() : nullptr,
                                                        w.defined() ? w.const_data_ptr<sum_t>() : nullptr,
                                                        b.defined() ? b.const_data_ptr<sum_t>() : nullptr,
                                                        outs.output.mutable_data_ptr<in_t>(),
                                                        outs.residual_out.mutable_data_ptr<h_t>(),
                                                        outs.mean.mutable_data_ptr<sum_t>(),
                                                        outs.rstd.mutable_data_ptr<sum_t>(),
                                                        input.numel() / width,
                                                        width,
                                                        static_cast<sum_t>(eps),
                                                        rms};
        launch_norm(ops, mask, src, p);
      };
      if (res_dtype == in_dtype) {
        with_residual(in_t{});
      } else {
        with_residual(h_t{});
      }
    };
    if (h_dtype == in_dtype) {
      with_h(in_t{});
    } else {
      with_h(float{});
    }
  });
  return {outs.output, outs.residual_out, outs.mean, outs.rstd, rng_state};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) {
  m.impl("dropout_add_norm", &fused_dropout::dropout_add_norm_cuda);
  m.impl("norm_backward", &fused_dropout::norm_backward_composite);
}
