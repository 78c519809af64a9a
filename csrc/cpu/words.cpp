// The random words of the CPU kernels, and which inner loops run them.
#include "cpu/words.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace fused_dropout {

// The loop body is the shared scalar Philox; the compiler vectorises it across groups for
// the widest instruction set target_clones finds on the running CPU.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
void fill_mask_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words) {
  for (int64_t g = 0; g < groups; ++g) {
    const PhiloxWords w = mask_words(seed, base, first_group + static_cast<uint64_t>(g));
    words[4 * g + 0] = w.w[0];
    words[4 * g + 1] = w.w[1];
    words[4 * g + 2] = w.w[2];
    words[4 * g + 3] = w.w[3];
  }
}

const Avx512Loops* simd_loops() {
  static const Avx512Loops* const loops = []() -> const Avx512Loops* {
#ifdef FUSED_DROPOUT_HAVE_AVX512
    const char* disable = std::getenv("FUSED_DROPOUT_DISABLE_AVX512");
    const bool disabled = disable != nullptr && std::string(disable) == "1";
    if (!disabled && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) return &avx512_loops();
#endif
    return nullptr;
  }();
  return loops;
}

void fill_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words) {
  const Avx512Loops* simd = simd_loops();
  (simd != nullptr ? simd->fill_words : &fill_mask_words)(seed, base, first_group, groups, words);
}

const uint32_t* draw_run_words(RngState state, int64_t first_index, int64_t step, int64_t count,
                               uint32_t (&group_words)[4 * (kBatchGroups + 1)], uint32_t (&words)[kChunk]) {
  if (step == 1) {
    const int64_t first_group = first_index >> 2;
    fill_words(state.seed, state.base, static_cast<uint64_t>(first_group),
               ((first_index + count - 1) >> 2) - first_group + 1, group_words);
    return group_words + (first_index & 3);
  }
  CachedGroup cache;
  if (step == 0) {
    std::fill_n(words, count, cache.word(state.seed, state.base, first_index));
  } else {
    for (int64_t i = 0; i < count; ++i) words[i] = cache.word(state.seed, state.base, first_index + i * step);
  }
  return words;
}

const char* cpu_loops_name() { return simd_loops() != nullptr ? "avx512" : "portable"; }

}  // namespace fused_dropout
