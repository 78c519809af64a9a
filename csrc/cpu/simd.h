// The boundary between the CPU kernel and its AVX-512 inner loops (simd_avx512.cpp): one
// struct of operands for a contiguous run, and one table of loops, chosen at run time.
#pragma once

#include <cstdint>

#include "philox.h"

namespace fused_dropout {

// One contiguous run of elements: y[i] = rule(x[i], words[i]) for i in [0, count), or for
// dropout_add y[i] = residual[i] + rule(x[i] + bias[column of i], words[i]), each step
// rounded as the unfused ops round it. float16 and bfloat16 cross the boundary as raw bits
// (uint16_t). The residual and the output may be of a wider type than the input (a float32
// residual stream), and the input of a wider type than the output (a float32 gradient
// replayed into a 2-byte one: converted first).
template <typename T, typename Res = T, typename Out = T>
struct Run {
  const T* x;
  const Res* residual;  // the second operand of a two-operand rule; null for the others
  const T* bias;        // may be null
  int64_t column;       // element 0's index in the last dim, where the bias runs
  int64_t last_size;    // the last dim's size
  Out* y;
  const uint32_t* words;
  int64_t count;
};

// words[4*g + j] = word j of group (first_group + g), for g in [0, groups).
using FillWordsFn = void (*)(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);
// A run through the float32 output rule (2-byte formats: widened to float32 and narrowed back).
template <typename T, typename Res = T, typename Out = T>
using RunFn = void (*)(const Run<T, Res, Out>& run, MaskedScale<float, float> rule);

// The portable words: the scalar Philox in a loop the compiler vectorises.
void fill_mask_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);

struct TwoByteLoops {
  RunFn<uint16_t> dropout;
  RunFn<uint16_t> dropout_add;
  // float32 residual + dropout(x + bias), the sum in float32.
  RunFn<uint16_t, float, float> dropout_add_float_residual;
  // dropout of a float32 input converted to the 2-byte format (a replay into another dtype).
  RunFn<float, float, uint16_t> dropout_from_float;
};

struct Avx512Loops {
  FillWordsFn fill_words;
  RunFn<float> dropout_float;
  TwoByteLoops half;
  TwoByteLoops bfloat16;
};

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSED_DROPOUT_HAVE_AVX512 1
// The AVX-512F and F16C loops, with the same results as the portable ones; call them only
// where the CPU has both.
const Avx512Loops& avx512_loops();
#endif

}  // namespace fused_dropout
