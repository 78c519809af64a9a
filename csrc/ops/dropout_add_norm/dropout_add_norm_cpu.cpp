// dropout_add_norm on the CPU: rows in parallel, each row in one pass over memory. Its input
// and residual are read once, a chunk at a time with that chunk's random words; h is written
// and summed; the row, now in cache, is read again for its variance and its output.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/state.h"
#include "cpu/words.h"
#include "ops/dropout_add_norm/dropout_add_norm.h"
#include "philox.h"

namespace fused_dropout {
namespace {

// count elements of the residual from `first` on, whatever its dtype, as sum_t (exact: the
// caller sends a float64 residual with a float32 sum to the composition).
template <typename sum_t>
void load_residual(const at::Tensor& residual, int64_t first, int64_t count, sum_t* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "dropout_add_norm_residual", [&] {
    const scalar_t* src = residual.const_data_ptr<scalar_t>() + first;
    for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<sum_t>(src[j]);
  });
}

template <typename sum_t>
struct RowStats {
  sum_t mean, rstd;
};

// One call's rows [begin, end): h = residual + dropout(x) in sum_t rounded to h_t, then the
// norm of the row. Operands are row-major; weight and bias are sum_t (or null).
template <typename scalar_t, typename h_t>
struct NormRows {
  using sum_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<h_t, double>, double, float>;
  const at::Tensor& input;
  const at::Tensor& residual;  // may be undefined
  const sum_t* weight;
  const sum_t* bias;
  scalar_t* out;
  h_t* h;
  sum_t* mean;
  sum_t* rstd;
  NormMaskRows mask;
  RngState state;
  MaskedScale<scalar_t> rule;
  sum_t eps;
  bool rms;

  // h of one row, written, and the row's sum.
  sum_t sum_row(int64_t row, int64_t width) const {
    alignas(64) uint32_t group_words[4 * (kBatchGroups + 1)];
    alignas(64) uint32_t words[kChunk];
    alignas(64) sum_t res[kChunk];
    const scalar_t* x = input.const_data_ptr<scalar_t>() + row * width;
    h_t* hr = h + row * width;
    const int64_t base = mask.base(row), step = mask.step;
    sum_t total = 0;
    for (int64_t start = 0; start < width; start += kChunk) {
      const int64_t count = std::min(kChunk, width - start);
      const uint32_t* w = draw_run_words(state, base + start * step, step, count, group_words, words);
      if (residual.defined()) {
        load_residual(residual, row * width + start, count, res);
        for (int64_t j = 0; j < count; ++j) {
          hr[start + j] = static_cast<h_t>(res[j] + static_cast<sum_t>(rule(x[start + j], w[j])));
        }
      } else {
        for (int64_t j = 0; j < count; ++j) hr[start + j] = static_cast<h_t>(rule(x[start + j], w[j]));
      }
      for (int64_t j = 0; j < count; ++j) total += static_cast<sum_t>(hr[start + j]);
    }
    return total;
  }

  void operator()(int64_t begin, int64_t end) const {
    const int64_t width = input.size(-1);
    for (int64_t row = begin; row < end; ++row) {
      const sum_t total = sum_row(row, width);
      const h_t* hr = h + row * width;
      const sum_t mu = rms ? sum_t(0) : total / static_cast<sum_t>(width);
      sum_t squares = 0;
      for (int64_t j = 0; j < width; ++j) {
        const sum_t centered = static_cast<sum_t>(hr[j]) - mu;
        squares += centered * centered;
      }
      const sum_t r = sum_t(1) / std::sqrt(squares / static_cast<sum_t>(width) + eps);
      scalar_t* y = out + row * width;
      for (int64_t j = 0; j < width; ++j) {
        sum_t v = (static_cast<sum_t>(hr[j]) - mu) * r;
        if (weight != nullptr) v = v * weight[j];
        if (bias != nullptr) v = v + bias[j];
        y[j] = static_cast<scalar_t>(v);
      }
      mean[row] = mu;
      rstd[row] = r;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms, std::optional<at::ScalarType> residual_dtype,
    std::optional<int64_t> seed, int64_t offset, std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const NormCall call = check_dropout_add_norm_call(kDropoutAddNormOp, input, residual, weight, bias, p, eps, rms,
                                                    residual_dtype, seed, offset, generator, shared_dims);
  const bool has_residual = residual.has_value() && residual->defined();
  // Empty rows, and a float64 residual summed in float32, take the composition.
  if (input.numel() == 0 ||
      (has_residual && residual->scalar_type() == at::kDouble && call.stats_dtype != at::kDouble)) {
    return dropout_add_norm_composite(input, residual, weight, bias, p, eps, rms, residual_dtype, seed, offset,
                                      std::move(generator), shared_dims);
  }
  const RngState state = draw_state(seed, offset, generator);
  NormOutputs outs = empty_norm_outputs(input, call);
  const at::Tensor x = input.contiguous();
  const at::Tensor r = has_residual ? residual->contiguous() : at::Tensor();
  const at::Tensor w = norm_affine_operand(weight, call), b = norm_affine_operand(bias, call);
  const int64_t width = input.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout_add_norm", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.residual_dtype, "dropout_add_norm_h", [&] {
      using Rows = NormRows<in_t, scalar_t>;
      using sum_t = typename Rows::sum_t;
      const Rows rows{x,
                      r,
                      w.defined() ? w.const_data_ptr<sum_t>() : nullptr,
                      b.defined() ? b.const_data_ptr<sum_t>() : nullptr,
                      outs.output.mutable_data_ptr<in_t>(),
                      outs.residual_out.mutable_data_ptr<scalar_t>(),
                      outs.mean.mutable_data_ptr<sum_t>(),
                      outs.rstd.mutable_data_ptr<sum_t>(),
                      norm_mask_rows(input, call.mask),
                      state,
                      MaskedScale<in_t>::for_p(p),
                      static_cast<sum_t>(eps),
                      rms};
      at::parallel_for(0, input.numel() / width, std::max<int64_t>(1, (int64_t{1} << 14) / width), rows);
    });
  });
  return {outs.output, outs.residual_out, outs.mean, outs.rstd, state_tensor(state)};
}

// The norm's backward over rows [begin, end) of one chunk: grad_h of each row, and the chunk's
// partial sums of grad * xh and grad (weight's and bias's gradients) into its own row of
// `partials`, so that the chunks are added in a fixed order afterwards.
template <typename scalar_t, typename h_t>
struct NormBackwardRows {
  using sum_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<h_t, double>, double, float>;
  const scalar_t* grad;
  const h_t* h;
  const sum_t* weight;  // may be null
  const sum_t* mean;
  const sum_t* rstd;
  sum_t* grad_h;
  sum_t* partials;  // [chunks, 2, width]
  int64_t width, rows_per_chunk;
  bool rms;

  void operator()(int64_t chunk_begin, int64_t chunk_end, int64_t rows) const {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      sum_t* dw = partials + chunk * 2 * width;
      sum_t* db = dw + width;
      std::fill_n(dw, 2 * width, sum_t(0));
      const int64_t last = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < last; ++row) backward_row(row, dw, db);
    }
  }

  void backward_row(int64_t row, sum_t* dw, sum_t* db) const {
    const scalar_t* go = grad + row * width;
    const h_t* hr = h + row * width;
    const sum_t mu = mean[row], r = rstd[row];
    sum_t g_sum = 0, gx_sum = 0;
    for (int64_t j = 0; j < width; ++j) {
      const sum_t o = static_cast<sum_t>(go[j]), xh = (static_cast<sum_t>(hr[j]) - mu) * r;
      const sum_t g = weight != nullptr ? o * weight[j] : o;
      g_sum += g;
      gx_sum += g * xh;
      dw[j] += o * xh;
      db[j] += o;
    }
    const sum_t c1 = rms ? sum_t(0) : g_sum / static_cast<sum_t>(width);
    const sum_t c2 = gx_sum / static_cast<sum_t>(width);
    sum_t* out = grad_h + row * width;
    for (int64_t j = 0; j < width; ++j) {
      const sum_t o = static_cast<sum_t>(go[j]), xh = (static_cast<sum_t>(hr[j]) - mu) * r;
      const sum_t g = weight != nullptr ? o * weight[j] : o;
      out[j] = (g - c1 - xh * c2) * r;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(const at::Tensor& grad, const at::Tensor& residual_out,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 bool rms) {
  check_norm_backward_args(grad, residual_out, weight, mean, rstd);
  const at::ScalarType wide = rstd.scalar_type();
  const bool matches =
      wide ==
      ((grad.scalar_type() == at::kDouble || residual_out.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat);
  if (residual_out.numel() == 0 || !matches || mean.scalar_type() != wide) {
    return norm_backward_composite(grad, residual_out, weight, mean, rstd, rms);
  }
  const int64_t width = residual_out.size(-1), rows = residual_out.numel() / width;
  // Chunks of whole rows, a fixed number whatever the thread count, so the sums are the same.
  const int64_t rows_per_chunk = std::max<int64_t>(1, (int64_t{1} << 14) / width);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const at::Tensor go = grad.contiguous(), h = residual_out.contiguous();
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->to(wide).contiguous() : at::Tensor();
  at::Tensor grad_h = at::empty(residual_out.sizes(), residual_out.options().dtype(wide));
  at::Tensor partials = at::empty({chunks, 2, width}, residual_out.options().dtype(wide));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "norm_backward", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual_out.scalar_type(), "norm_backward_h", [&] {
      using Rows = NormBackwardRows<grad_t, scalar_t>;
      using sum_t = typename Rows::sum_t;
      const Rows body{go.const_data_ptr<grad_t>(),
                      h.const_data_ptr<scalar_t>(),
                      w.defined() ? w.const_data_ptr<sum_t>() : nullptr,
                      m.const_data_ptr<sum_t>(),
                      r.const_data_ptr<sum_t>(),
                      grad_h.mutable_data_ptr<sum_t>(),
                      partials.mutable_data_ptr<sum_t>(),
                      width,
                      rows_per_chunk,
                      rms};
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) { body(begin, end, rows); });
    });
  });
  // The chunks' partial sums added in chunk order: the same result on any thread count.
  return {grad_h, partials.select(1, 0).sum(0), partials.select(1, 1).sum(0)};
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout_add_norm", &fused_dropout::dropout_add_norm_cpu);
  m.impl("norm_backward", &fused_dropout::norm_backward_cpu);
}
