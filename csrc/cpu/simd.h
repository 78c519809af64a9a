// The CPU kernel's inner loops that have an AVX-512 version, chosen at run time.
#pragma once

#include <cstdint>

#include "../philox.h"

namespace fused_dropout {

// words[4*g + j] = word j of group (first_group + g), for g in [0, groups).
using FillWordsFn = void (*)(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);
// y[i] = rule(x[i], words[i]) for i in [0, count): float32, and float16 or bfloat16 as raw bits.
using ApplyFloatFn = void (*)(const float* x, float* y, const uint32_t* words, int64_t count,
                              const MaskedScale<float, float>& rule);
using Apply2ByteFn = void (*)(const uint16_t* x, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                             float scale);
// y[i] = residual[i] + dropout(x[i] + bias[column]) for float16 or bfloat16 as raw bits; bias may be null,
// column is the first element's index in the last dim, which has last_size elements.
using Apply2ByteAddFn = void (*)(const uint16_t* x, const uint16_t* residual, const uint16_t* bias, int64_t column,
                                int64_t last_size, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                                float scale);

// The portable words: the scalar Philox in a loop the compiler vectorises.
void fill_mask_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSED_DROPOUT_HAVE_AVX512 1
// The same results with AVX-512F and F16C; call only where the CPU has both.
void fill_mask_words_avx512(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);
void apply_float_avx512(const float* x, float* y, const uint32_t* words, int64_t count,
                        const MaskedScale<float, float>& rule);
void apply_half_avx512(const uint16_t* x, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                       float scale);
void apply_bfloat16_avx512(const uint16_t* x, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                           float scale);
void apply_half_add_avx512(const uint16_t* x, const uint16_t* residual, const uint16_t* bias, int64_t column,
                           int64_t last_size, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                           float scale);
void apply_bfloat16_add_avx512(const uint16_t* x, const uint16_t* residual, const uint16_t* bias, int64_t column,
                               int64_t last_size, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                               float scale);
#endif

}  // namespace fused_dropout
