// Batched random words for the CPU kernel: words[4*g + j] = word j of group (first_group + g).
#pragma once

#include <cstdint>

namespace fused_dropout {

// The portable version: the scalar Philox in a loop the compiler vectorises.
void fill_mask_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSED_DROPOUT_AVX512_WORDS 1
// The same words, 16 groups per AVX-512 step; call only where the CPU has AVX-512F.
void fill_mask_words_avx512(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);
#endif

}  // namespace fused_dropout
