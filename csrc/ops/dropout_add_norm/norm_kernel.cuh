// dropout_add_norm's CUDA kernel: one block per row, h = residual + dropout(input) and the
// row's LayerNorm or RMSNorm in one pass over memory. Each thread loads steps of kVec
// consecutive elements (one 16-byte load of the input where the rows allow it), writes h, and
// keeps h in registers (in float32, or float64 for a float64 call), so that the mean, the
// variance and the output are computed on chip: rows up to kValuesPerThread * kMaxNormThreads
// = 8192 elements. A wider row is correct too, through a second pass that reads h back.
// The sums are block reductions over shared memory in a fixed order, so a call gives the same
// bits on every run. The mask is the mask of dropout at the same seed: each element's word is
// that of its mask index, as the CPU kernel draws it.
//
// Plain C++ apart from the CUDA keywords, like cuda/kernels.cuh, so that
// tests/norm_kernel_on_host.cpp runs this source on the CPU, one host thread per CUDA thread.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/kernels.cuh"
#include "ops/dropout_add_norm/norm_mask_rows.h"
#include "philox.h"

namespace fused_dropout {

constexpr int kMaxNormThreads = 256;
constexpr int kValuesPerThread = 32;

// One call's operands, row-major: rows of `width` elements. sum_t is float32, or float64
// where the input or h is float64; weight and bias are sum_t (or null), as are mean and rstd.
template <typename in_t, typename res_t, typename h_t, typename sum_t>
struct NormOperands {
  const in_t* in;
  const res_t* res;  // may be null: h = dropout(input)
  const sum_t* weight;
  const sum_t* bias;
  in_t* out;
  h_t* h;
  sum_t* mean;
  sum_t* rstd;
  int64_t rows, width;
  sum_t eps;
  bool rms;
};

// The sum of every thread's v, in the same tree order on every call; `partial` is the
// block's shared memory, one slot per thread (blockDim.x a power of two).
template <typename sum_t>
__device__ __forceinline__ sum_t block_sum(sum_t v, sum_t* partial) {
  const int tid = static_cast<int>(threadIdx.x);
  partial[tid] = v;
  __syncthreads();
  for (int s = static_cast<int>(blockDim.x) / 2; s > 0; s /= 2) {
    if (tid < s) partial[tid] += partial[tid + s];
    __syncthreads();
  }
  const sum_t total = partial[0];
  __syncthreads();  // every thread has read it before the slots are reused
  return total;
}

// The threads for rows of `steps` steps: a power of two from 32 to kMaxNormThreads, about two
// steps per thread.
inline int norm_threads(int64_t steps) {
  int threads = 32;
  while (threads < kMaxNormThreads && 2 * threads < steps) threads *= 2;
  return threads;
}

// One row. kOnChip: this thread's steps fit in registers (values[] is indexed by constants
// only, so it stays in registers), and h is not read back.
template <bool kOnChip, int kVec, typename in_t, typename res_t, typename h_t, typename sum_t>
__device__ __forceinline__ void norm_row(const NormOperands<in_t, res_t, h_t, sum_t>& ops, int64_t row,
                                         int64_t mask_base, int64_t mask_step, uint64_t seed, uint64_t base,
                                         const MaskedScale<in_t>& rule, sum_t* partial) {
  constexpr int kMaxSteps = kValuesPerThread / kVec;
  const int64_t width = ops.width, threads = blockDim.x, first = row * width;
  const int64_t my_steps = (width / kVec - threadIdx.x + threads - 1) / threads;  // steps tid, tid + threads, ...
  sum_t values[kOnChip ? kValuesPerThread : 1];
  // f(i, at) for each step i of this thread, at its element offset in the row.
  const auto for_each_step = [&](auto f) {
    if constexpr (kOnChip) {
#pragma unroll
      for (int i = 0; i < kMaxSteps; ++i) {
        if (i < my_steps) f(i, (threadIdx.x + i * threads) * kVec);
      }
    } else {
      for (int64_t i = 0; i < my_steps; ++i) f(i, (threadIdx.x + i * threads) * kVec);
    }
  };
  // Step i's h as sum_t: from registers, or read back.
  const auto h_of = [&](auto i, int64_t at, sum_t(&h)[kVec]) {
    if constexpr (kOnChip) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) h[v] = values[i * kVec + v];
    } else {
      const Vec<h_t, kVec> stored = *reinterpret_cast<const Vec<h_t, kVec>*>(ops.h + first + at);
#pragma unroll
      for (int v = 0; v < kVec; ++v) h[v] = static_cast<sum_t>(stored.v[v]);
    }
  };

  // h = residual + dropout(x), rounded to h's dtype as the CPU kernel rounds it, written.
  CachedGroup cache;
  sum_t total = 0;
  for_each_step([&](auto i, int64_t at) {
    const Vec<in_t, kVec> x = *reinterpret_cast<const Vec<in_t, kVec>*>(ops.in + first + at);
    Vec<res_t, kVec> r;
    if (ops.res != nullptr) r = *reinterpret_cast<const Vec<res_t, kVec>*>(ops.res + first + at);
    Vec<h_t, kVec> h;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const in_t dropped = rule(x.v[v], cache.word(seed, base, mask_base + (at + v) * mask_step));
      h.v[v] = ops.res != nullptr ? static_cast<h_t>(static_cast<sum_t>(r.v[v]) + static_cast<sum_t>(dropped))
                                  : static_cast<h_t>(dropped);
      const sum_t value = static_cast<sum_t>(h.v[v]);
      if constexpr (kOnChip) values[i * kVec + v] = value;
      total += value;
    }
    *reinterpret_cast<Vec<h_t, kVec>*>(ops.h + first + at) = h;
  });
  const sum_t mu = ops.rms ? sum_t(0) : block_sum(total, partial) / static_cast<sum_t>(width);
  sum_t squares = 0;
  for_each_step([&](auto i, int64_t at) {
    sum_t h[kVec];
    h_of(i, at, h);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const sum_t centered = h[v] - mu;
      squares += centered * centered;
    }
  });
  const sum_t r = sum_t(1) / std::sqrt(block_sum(squares, partial) / static_cast<sum_t>(width) + ops.eps);
  for_each_step([&](auto i, int64_t at) {
    sum_t h[kVec];
    h_of(i, at, h);
    Vec<in_t, kVec> y;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      sum_t value = (h[v] - mu) * r;
      if (ops.weight != nullptr) value = value * ops.weight[at + v];
      if (ops.bias != nullptr) value = value + ops.bias[at + v];
      y.v[v] = static_cast<in_t>(value);
    }
    *reinterpret_cast<Vec<in_t, kVec>*>(ops.out + first + at) = y;
  });
  if (threadIdx.x == 0) {
    ops.mean[row] = mu;
    ops.rstd[row] = r;
  }
}

// Rows blockIdx.x, blockIdx.x + gridDim.x, ...; blockDim.x threads, a power of two up to
// kMaxNormThreads. The launch makes the width a multiple of kVec and every operand aligned to
// kVec of its elements.
template <int kVec, typename in_t, typename res_t, typename h_t, typename sum_t, typename StateSource>
__global__ void __launch_bounds__(kMaxNormThreads)
    norm_forward_kernel(NormOperands<in_t, res_t, h_t, sum_t> ops, NormMaskRows mask, StateSource src,
                        MaskedScale<in_t> rule) {
  __shared__ sum_t partial[kMaxNormThreads];
  uint64_t seed, base;
  resolve_state(src, seed, base);
  // The same for every thread of the block (the block sums are in both branches).
  const int64_t most_steps = (ops.width / kVec + blockDim.x - 1) / blockDim.x;
  const bool on_chip = most_steps * kVec <= kValuesPerThread;
  for (int64_t row = blockIdx.x; row < ops.rows; row += gridDim.x) {
    if (on_chip) {
      norm_row<true, kVec>(ops, row, mask.base(row), mask.step, seed, base, rule, partial);
    } else {
      norm_row<false, kVec>(ops, row, mask.base(row), mask.step, seed, base, rule, partial);
    }
  }
}

}  // namespace fused_dropout
