// The CUDA kernels of the dropout family: row-major operands, row-major operands with a mask
// shared along the trailing dims, and any other layout. Each is
// templated on the output rule (philox.h, rules.h): plain dropout, alpha dropout or
// activation + dropout, and with kTwoOperands a second input operand, combined by the rule:
// dropout_add's residual + rule(x + bias), act_dropout_backward's act'(x + bias) * dropout(grad). They
// are plain C++ apart from the CUDA keywords and the launch indices, so that
// tests/cuda_kernel_on_host.cpp can run this very source on the CPU, one (block, thread) at a
// time, where no GPU is present. `resolve_state(src, seed, base)` is found by argument-
// dependent lookup on the state source type: dropout_cuda.cu reads the generator's state on
// the device, the host test passes a plain pair.
#pragma once

#include <cstdint>
#include <type_traits>

#include "layout.h"
#include "philox.h"
#include "rules.h"

namespace fused_dropout {

constexpr int kThreads = 256;

// Elements one thread handles per step: a multiple of 4 (whole Philox groups) that is also
// at least 16 bytes, so an aligned step is one or two 16-byte loads and stores.
template <typename scalar_t>
constexpr int step_elems() {
  return sizeof(scalar_t) >= 4 ? 4 : 16 / static_cast<int>(sizeof(scalar_t));
}

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Vec {
  scalar_t v[N];
};

// The operands of one call: out = rule(in + bias), or with kTwoOperands rule.combine(res, in + bias);
// the bias (optional) runs along the last dim. The rule runs in scalar_t. The input may be
// stored in another type (in_t, converted to scalar_t first: a replay into another dtype),
// and the residual and output in others (a residual of another dtype, the sum promoted).
template <typename scalar_t, typename in_t = scalar_t, typename res_t = scalar_t, typename out_t = scalar_t>
struct Operands {
  using input_type = in_t;
  using residual_type = res_t;
  using output_type = out_t;

  const in_t* in;
  const res_t* res;      // kTwoOperands only: dropout_add's residual, act_dropout_backward's gradient
  const scalar_t* bias;  // may be null
  out_t* out;
  int64_t numel;
  int64_t last_size;  // size of the last dim, where the bias runs
};

// v converted element by element (a copy where the types are the same).
template <typename to_t, typename from_t, int N>
__device__ __forceinline__ Vec<to_t, N> convert(const Vec<from_t, N>& v) {
  if constexpr (std::is_same_v<to_t, from_t>) {
    return v;
  } else {
    Vec<to_t, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = static_cast<to_t>(v.v[j]);
    return out;
  }
}

// x[j] = x[j] + bias[column of element first + j], rounded as torch's add: one division per
// step, not per element.
template <typename scalar_t, int N, typename Ops>
__device__ __forceinline__ void add_bias(Vec<scalar_t, N>& x, const Ops& ops, int64_t first) {
  int64_t column = first % ops.last_size;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    x.v[j] = plus_bias(x.v[j], ops.bias[column]);
    column = column + 1 == ops.last_size ? 0 : column + 1;
  }
}

// The rule over one step: y[j] = rule(x[j], word_of(j)), or with kTwoOperands rule.combine(r[j], x[j], word_of(j)).
template <bool kTwoOperands, typename out_t, typename scalar_t, typename res_t, int N, typename Rule, typename WordOf>
__device__ __forceinline__ Vec<out_t, N> apply_rule(const Vec<scalar_t, N>& x, const Vec<res_t, N>& r, const Rule& rule,
                                                    WordOf word_of) {
  Vec<out_t, N> y;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if constexpr (kTwoOperands) {
      y.v[j] = rule.combine(r.v[j], x.v[j], word_of(j));
    } else {
      y.v[j] = rule(x.v[j], word_of(j));
    }
  }
  return y;
}

// One step of the row-major kernel: the kStep elements from `first` on, where the logical
// index is the memory index. kFull: all of them are in the tensor, so an aligned step is one
// or two 16-byte loads and stores per operand; otherwise it is the tensor's last, partial step.
// kBias is a template argument rather than a test of ops.bias: a branch between the loads and
// their use made the compiler unpack the loaded registers at once, before the Philox rounds.
template <typename scalar_t, bool kAligned, bool kTwoOperands, bool kBias, bool kFull, typename Ops, typename Rule>
__device__ __forceinline__ void contiguous_step(const Ops& ops, uint64_t seed, uint64_t base, const Rule& rule,
                                                int64_t first) {
  using in_t = typename Ops::input_type;
  using res_t = typename Ops::residual_type;
  using out_t = typename Ops::output_type;
  constexpr int kStep = step_elems<scalar_t>();
  const int64_t numel = ops.numel;
  Vec<in_t, kStep> loaded;
  Vec<res_t, kStep> r;
  if constexpr (kAligned && kFull) {
    loaded = *reinterpret_cast<const Vec<in_t, kStep>*>(ops.in + first);
    if (kTwoOperands) r = *reinterpret_cast<const Vec<res_t, kStep>*>(ops.res + first);
  } else {
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      loaded.v[j] = kFull || first + j < numel ? ops.in[first + j] : in_t(0);
      if (kTwoOperands) r.v[j] = kFull || first + j < numel ? ops.res[first + j] : res_t(0);
    }
  }
  PhiloxWords w[kStep / 4];
#pragma unroll
  for (int g = 0; g < kStep / 4; ++g) w[g] = mask_words(seed, base, static_cast<uint64_t>(first / 4 + g));
  // The loaded values are first touched here, after the Philox rounds, which run while the
  // loads are in flight.
  Vec<scalar_t, kStep> x = convert<scalar_t>(loaded);
  if constexpr (kBias) add_bias(x, ops, first);
  const Vec<out_t, kStep> y = apply_rule<kTwoOperands, out_t>(x, r, rule, [&](int k) { return w[k / 4].w[k % 4]; });
  if constexpr (kAligned && kFull) {
    *reinterpret_cast<Vec<out_t, kStep>*>(ops.out + first) = y;
  } else {
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      if (kFull || first + j < numel) ops.out[first + j] = y.v[j];
    }
  }
}

// Row-major operands: one step per thread, as straight-line code; the launch covers every
// step. Straight-line code lets ptxas issue a 2-byte type's 16-byte load before the Philox
// rounds, which then run while the load is in flight (benchmarks/NOTES.md has the SASS
// reading that motivated it).
template <typename scalar_t, bool kAligned, bool kTwoOperands, bool kBias, typename Rule, typename StateSource,
          typename... Types>
__global__ void __launch_bounds__(kThreads)
    contiguous_kernel(Operands<scalar_t, Types...> ops, StateSource src, Rule rule) {
  constexpr int kStep = step_elems<scalar_t>();
  uint64_t seed, base;
  resolve_state(src, seed, base);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kStep;
  if (first + kStep <= ops.numel) {
    contiguous_step<scalar_t, kAligned, kTwoOperands, kBias, /*kFull=*/true>(ops, seed, base, rule, first);
  } else if (first < ops.numel) {
    contiguous_step<scalar_t, kAligned, kTwoOperands, kBias, /*kFull=*/false>(ops, seed, base, rule, first);
  }
}

// Row-major operands with the mask shared along the trailing dims: one mask value per row of
// row_size elements (a stochastic-depth sample, a dropout2d channel), so mask index = memory
// index / row_size. One step per thread as in contiguous_kernel; rows are at least a step
// long (the caller checks), so a step meets at most two rows and needs at most two Philox
// calls. Where every element of the step is dropped and the rule's dropped value does not
// depend on the input, the input is not read: a dropped sample costs no read of its branch.
template <typename scalar_t, bool kAligned, bool kTwoOperands, bool kBias, typename Rule, typename StateSource,
          typename... Types>
__global__ void __launch_bounds__(kThreads)
    row_shared_kernel(Operands<scalar_t, Types...> ops, int64_t row_size, StateSource src, Rule rule) {
  using Ops = Operands<scalar_t, Types...>;
  using in_t = typename Ops::input_type;
  using res_t = typename Ops::residual_type;
  using out_t = typename Ops::output_type;
  constexpr int kStep = step_elems<scalar_t>();
  uint64_t seed, base;
  resolve_state(src, seed, base);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kStep;
  if (first >= ops.numel) return;
  const int64_t count = ops.numel - first < kStep ? ops.numel - first : kStep;
  const int64_t row = first / row_size;
  const int64_t next_row_at = (row + 1) * row_size - first;  // the step's first element of the next row
  CachedGroup cache;
  const uint32_t word0 = cache.word(seed, base, row);
  const uint32_t word1 = next_row_at < count ? cache.word(seed, base, row + 1) : word0;
  const bool reads_input = Rule::kDroppedReadsInput || rule.keeps(word0) || rule.keeps(word1);
  Vec<in_t, kStep> loaded;
  Vec<res_t, kStep> r;
  if (kAligned && count == kStep) {
    loaded = reads_input ? *reinterpret_cast<const Vec<in_t, kStep>*>(ops.in + first) : Vec<in_t, kStep>{};
    if (kTwoOperands) r = *reinterpret_cast<const Vec<res_t, kStep>*>(ops.res + first);
  } else {
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      loaded.v[j] = reads_input && j < count ? ops.in[first + j] : in_t(0);
      if (kTwoOperands) r.v[j] = j < count ? ops.res[first + j] : res_t(0);
    }
  }
  Vec<scalar_t, kStep> x = convert<scalar_t>(loaded);
  if constexpr (kBias) add_bias(x, ops, first);
  const Vec<out_t, kStep> y =
      apply_rule<kTwoOperands, out_t>(x, r, rule, [&](int j) { return j < next_row_at ? word0 : word1; });
  if (kAligned && count == kStep) {
    *reinterpret_cast<Vec<out_t, kStep>*>(ops.out + first) = y;
  } else {
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      if (j < count) ops.out[first + j] = y.v[j];
    }
  }
}

// The operands' offsets of walk index `linear` of the merged layout, one division per dim, in
// index_t (32-bit division where the walk fits it: far cheaper than 64-bit on a GPU).
// Returns the index along the innermost dim.
template <typename index_t, bool kTwoOperands>
__device__ __forceinline__ int64_t locate(const MergedLayout& layout, int64_t linear, int64_t (&offset)[kOperands]) {
  index_t rest = static_cast<index_t>(linear);
  int64_t inner_index = 0;
#pragma unroll
  for (int k = 0; k < kOperands; ++k) offset[k] = k == kMask ? layout.mask_origin : 0;
  for (int64_t d = layout.ndim - 1; d >= 0; --d) {
    const index_t size = static_cast<index_t>(layout.sizes[d]);
    const index_t index = rest % size;
    rest /= size;
    if (d == layout.ndim - 1) inner_index = static_cast<int64_t>(index);
#pragma unroll
    for (int k = 0; k < kOperands; ++k) {
      if (kTwoOperands || k != kRes) offset[k] += static_cast<int64_t>(index) * layout.strides[k][d];
    }
  }
  return inner_index;
}

// Any other layout (permuted, channels_last, sliced) or a mask shared over some dims, walked
// in the merged layout (layout.h): each thread takes four consecutive walk indices, locates
// the first with divisions and steps to the next along the innermost dim, and keeps the
// Philox group it computed last (a shared mask value, or the next words). The walk is in the
// output's memory order where the caller needs no logical index (no bias), else in logical
// order, where the bias column is the logical index modulo the last dim's size.
template <typename scalar_t, bool kTwoOperands, typename index_t, typename Rule, typename StateSource,
          typename... Types>
__global__ void __launch_bounds__(kThreads)
    strided_kernel(Operands<scalar_t, Types...> ops, MergedLayout layout, StateSource src, Rule rule) {
  uint64_t seed, base;
  resolve_state(src, seed, base);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 4;
  if (first >= ops.numel) return;
  int64_t offset[kOperands];
  int64_t inner_index = locate<index_t, kTwoOperands>(layout, first, offset);
  CachedGroup cache;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t linear = first + j;
    if (linear >= ops.numel) break;
    if (j > 0) {
      if (++inner_index == layout.inner()) {
        inner_index = locate<index_t, kTwoOperands>(layout, linear, offset);
      } else {
#pragma unroll
        for (int k = 0; k < kOperands; ++k) offset[k] += layout.inner_stride(k);
      }
    }
    const uint32_t word = cache.word(seed, base, offset[kMask]);
    // A dropped element whose output does not depend on its input is not read.
    scalar_t x =
        Rule::kDroppedReadsInput || rule.keeps(word) ? static_cast<scalar_t>(ops.in[offset[kIn]]) : scalar_t(0);
    if (ops.bias != nullptr) x = plus_bias(x, ops.bias[linear % ops.last_size]);
    if constexpr (kTwoOperands) {
      ops.out[offset[kOut]] = rule.combine(ops.res[offset[kRes]], x, word);
    } else {
      ops.out[offset[kOut]] = rule(x, word);
    }
  }
}

}  // namespace fused_dropout
