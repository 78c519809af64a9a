// The CPU walk every elementwise form shares: one pass over memory, parallel over chunks of
// whole Philox groups, random words generated in small batches that stay in L1 (never a
// materialised mask), and the output rule (rules.h) applied to contiguous runs the compiler
// or the AVX-512 loops vectorise.
#pragma once

#include <algorithm>
#include <array>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "cpu/words.h"
#include "operands.h"
#include "rules.h"

namespace fused_dropout {

// Row-major walk over the outer dims of a merged layout (all but the inner run), tracking
// each operand's offset.
struct RowWalk {
  const MergedLayout& layout;
  std::array<int64_t, kMaxDims> index{};
  std::array<int64_t, kOperands> offset{};

  void seek(int64_t row) {
    offset.fill(0);
    offset[kMask] = layout.mask_origin;
    for (int64_t d = layout.ndim - 2; d >= 0; --d) {
      index[d] = row % layout.sizes[d];
      row /= layout.sizes[d];
      for (int k = 0; k < kOperands; ++k) offset[k] += index[d] * layout.strides[k][d];
    }
  }
  void next() {
    for (int64_t d = layout.ndim - 2; d >= 0; --d) {
      for (int k = 0; k < kOperands; ++k) offset[k] += layout.strides[k][d];
      if (++index[d] < layout.sizes[d]) return;
      for (int k = 0; k < kOperands; ++k) offset[k] -= index[d] * layout.strides[k][d];
      index[d] = 0;
    }
  }
};

// A run of a 2-byte type as the raw bits the AVX-512 loops take.
template <typename scalar_t>
Run<uint16_t> as_bits(const Run<scalar_t>& run) {
  return {reinterpret_cast<const uint16_t*>(run.x),
          reinterpret_cast<const uint16_t*>(run.residual),
          reinterpret_cast<const uint16_t*>(run.bias),
          run.column,
          run.last_size,
          reinterpret_cast<uint16_t*>(run.y),
          run.words,
          run.count};
}

template <typename scalar_t>
constexpr bool kTwoByteFloat = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// The AVX-512 loops of a 2-byte type where the CPU has them, else null.
template <typename scalar_t>
const TwoByteLoops* two_byte_loops() {
  static_assert(kTwoByteFloat<scalar_t>);
  const Avx512Loops* simd = simd_loops();
  if (simd == nullptr) return nullptr;
  return std::is_same_v<scalar_t, c10::Half> ? &simd->half : &simd->bfloat16;
}

// Whether a mixed-dtype call whose 2-byte side is `narrow` and whose other side is `wide`
// takes one pass: float16 only where the AVX-512 loops convert it beside float32, since the
// portable loop's one pass, converting float16 an element at a time, is slower than two.
inline bool one_pass_converts(at::ScalarType narrow, at::ScalarType wide) {
  return narrow != at::kHalf || (wide == at::kFloat && simd_loops() != nullptr);
}

// One contiguous run (simd.h): the AVX-512 loops where the CPU has them (plain dropout and
// dropout_add), else a loop the compiler vectorises.
template <typename scalar_t, bool kTwoOperands, typename Rule>
void apply_run(const Run<scalar_t>& run, const Rule& rule) {
  if constexpr (std::is_same_v<Rule, MaskedScale<scalar_t>>) {
    if constexpr (std::is_same_v<scalar_t, float> && !kTwoOperands) {
      if (const Avx512Loops* simd = simd_loops()) return simd->dropout_float(run, rule);
    }
    if constexpr (kTwoByteFloat<scalar_t>) {
      if (const TwoByteLoops* loops = two_byte_loops<scalar_t>()) {
        return (kTwoOperands ? loops->dropout_add : loops->dropout)(as_bits(run),
                                                                    MaskedScale<float, float>{rule.keep, rule.scale});
      }
    }
  }
  // One row segment at a time, so the bias index is the loop index plus a constant and the
  // loop vectorises.
  const int64_t row_size = run.bias != nullptr ? run.last_size : run.count;
  for (int64_t i = 0, column = run.bias != nullptr ? run.column : 0; i < run.count; column = 0) {
    const int64_t n = std::min(run.count - i, row_size - column);
    const scalar_t* x = run.x + i;
    scalar_t* y = run.y + i;
    const uint32_t* words = run.words + i;
    if (run.bias == nullptr) {
      if constexpr (kTwoOperands) {
        for (int64_t j = 0; j < n; ++j) y[j] = rule.combine(run.residual[i + j], x[j], words[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) y[j] = rule(x[j], words[j]);
      }
    } else {
      const scalar_t* bias = run.bias + column;
      if constexpr (kTwoOperands) {
        for (int64_t j = 0; j < n; ++j) y[j] = rule.combine(run.residual[i + j], plus_bias(x[j], bias[j]), words[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) y[j] = rule(plus_bias(x[j], bias[j]), words[j]);
      }
    }
    i += n;
  }
}

// The operands of one call: plain dropout reads `in`; the two-operand rules also `res`
// (dropout_add's residual, act_dropout_backward's gradient), and `bias` where given.
template <typename scalar_t>
struct CpuOperands {
  const scalar_t* in;
  const scalar_t* res;
  const scalar_t* bias;
  scalar_t* out;
  int64_t last_size;

  CpuOperands(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias_tensor, at::Tensor& output)
      : in(input.const_data_ptr<scalar_t>()),
        res(residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr),
        bias(bias_tensor.defined() ? bias_tensor.const_data_ptr<scalar_t>() : nullptr),
        out(output.mutable_data_ptr<scalar_t>()),
        last_size(input.dim() > 0 ? input.size(-1) : 1) {}
};

// The row-major elements [0, numel) of a full mask in batches of whole Philox groups:
// f(first, n, words) for each batch, first a multiple of 4 and words its n random words. The
// batches are split over threads in ranges of whole groups.
template <typename F>
void for_each_word_batch(int64_t numel, RngState state, const F& f) {
  const int64_t groups = static_cast<int64_t>(counters_for(numel));
  at::parallel_for(0, groups, kGrainGroups, [&](int64_t group_begin, int64_t group_end) {
    alignas(64) uint32_t words[4 * kBatchGroups];
    const int64_t end = std::min(group_end * 4, numel);
    for (int64_t first = group_begin * 4; first < end; first += 4 * kBatchGroups) {
      const int64_t n = std::min(4 * kBatchGroups, end - first);
      fill_words(state.seed, state.base, static_cast<uint64_t>(first / 4), (n + 3) / 4, words);
      f(first, n, static_cast<const uint32_t*>(words));
    }
  });
}

// Row-major operands and a full mask: the mask index is the memory index, so each batch of
// words is one contiguous run.
template <typename scalar_t, bool kTwoOperands, typename Rule>
void apply_row_major(const CpuOperands<scalar_t>& ops, int64_t numel, RngState state, const Rule& rule) {
  for_each_word_batch(numel, state, [&](int64_t at, int64_t n, const uint32_t* words) {
    apply_run<scalar_t, kTwoOperands>({ops.in + at, kTwoOperands ? ops.res + at : nullptr, ops.bias, at % ops.last_size,
                                       ops.last_size, ops.out + at, words, n},
                                      rule);
  });
}

// Any other layout (permuted, channels_last, sliced) or a mask shared over some dims. The
// steps: the dims are merged (layout.h); the work is split into chunks of up to kChunk
// elements of the inner runs; each chunk's words are drawn; the output rule runs on the
// chunk in place where it is contiguous, or on a gathered copy that is then scattered back,
// so that strided runs take the vector loops too.
template <typename scalar_t, bool kTwoOperands, typename Rule>
void apply_by_runs(const CpuOperands<scalar_t>& ops, const MergedLayout& layout, int64_t numel, RngState state,
                   const Rule& rule) {
  const int64_t inner = layout.inner();
  const int64_t chunks_per_row = (inner + kChunk - 1) / kChunk;
  const int64_t in_step = layout.inner_stride(kIn), out_step = layout.inner_stride(kOut);
  const int64_t mask_step = layout.inner_stride(kMask), res_step = layout.inner_stride(kRes);
  const int64_t grain = std::max<int64_t>(1, kGrainGroups * 4 / std::min(inner, kChunk));
  at::parallel_for(0, numel / inner * chunks_per_row, grain, [&](int64_t unit_begin, int64_t unit_end) {
    alignas(64) uint32_t group_words[4 * (kBatchGroups + 1)];
    alignas(64) uint32_t words[kChunk];
    alignas(64) scalar_t x_run[kChunk], res_run[kTwoOperands ? kChunk : 1], y_run[kChunk];
    RowWalk walk{layout};
    int64_t row = unit_begin / chunks_per_row;
    walk.seek(row);
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      if (unit / chunks_per_row != row) {
        row = unit / chunks_per_row;
        walk.next();
      }
      const int64_t start = (unit % chunks_per_row) * kChunk;
      const int64_t count = std::min(kChunk, inner - start);
      const uint32_t* run_words =
          draw_run_words(state, walk.offset[kMask] + start * mask_step, mask_step, count, group_words, words);
      const scalar_t* x = ops.in + walk.offset[kIn] + start * in_step;
      int64_t x_step = in_step;
      if (!Rule::kDroppedReadsInput && mask_step == 0 && !rule.keeps(run_words[0])) {
        // The run shares one dropped mask value and the rule's dropped value does not depend
        // on the input: read zeros instead (a dropped sample costs no read of its branch).
        std::fill_n(x_run, count, scalar_t(0));
        x = x_run;
        x_step = 1;
      }
      const scalar_t* r = kTwoOperands ? ops.res + walk.offset[kRes] + start * res_step : nullptr;
      scalar_t* y = ops.out + walk.offset[kOut] + start * out_step;
      const int64_t column = (row * inner + start) % ops.last_size;  // the logical index's place in the last dim
      if (x_step == 1 && out_step == 1 && (!kTwoOperands || res_step == 1)) {
        apply_run<scalar_t, kTwoOperands>({x, r, ops.bias, column, ops.last_size, y, run_words, count}, rule);
        continue;
      }
      if (x != x_run) {
        for (int64_t i = 0; i < count; ++i) x_run[i] = x[i * x_step];
      }
      if constexpr (kTwoOperands) {
        for (int64_t i = 0; i < count; ++i) res_run[i] = r[i * res_step];
      }
      apply_run<scalar_t, kTwoOperands>({x_run, res_run, ops.bias, column, ops.last_size, y_run, run_words, count},
                                        rule);
      for (int64_t i = 0; i < count; ++i) y[i * out_step] = y_run[i];
    }
  });
}

// The walk for every op: batches over the memory where every operand is row-major and the
// mask is full, else the merged runs. `residual` is the second operand of the two-operand
// rules (dropout_add's residual, act_dropout_backward's gradient) and undefined for the others,
// `bias` where the op has none.
template <typename scalar_t, bool kTwoOperands, typename Rule>
void apply(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
           const MaskLayout& mask, RngState state, const Rule& rule) {
  if (input.numel() == 0) return;
  const CpuOperands<scalar_t> ops(input, residual, bias, output);
  if (mask.row_major && input.is_contiguous() && output.is_contiguous() &&
      (!kTwoOperands || residual.is_contiguous())) {
    apply_row_major<scalar_t, kTwoOperands>(ops, input.numel(), state, rule);
  } else {
    apply_by_runs<scalar_t, kTwoOperands>(ops, merged_layout(input, output, mask, residual), input.numel(), state,
                                          rule);
  }
}

// output = rule(input + bias) for the rule `spec` names (bias may be undefined); every
// one-operand rule of every dtype, compiled once (walk.cpp).
void dispatch_apply(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, const MaskLayout& layout,
                    RngState state, double p, const RuleSpec& spec = {});

}  // namespace fused_dropout
