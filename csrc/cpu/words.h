// The random words of the CPU kernels: the AVX-512 Philox where the CPU has it (simd.h),
// else the portable loop over the shared scalar Philox (philox.h).
#pragma once

#include <cstdint>

#include "cpu/simd.h"
#include "cpu/state.h"

namespace fused_dropout {

// Philox groups per batch: 1024 elements' worth of words, 4 KiB on the stack.
constexpr int64_t kBatchGroups = 256;
// Groups per parallel task: big enough to amortise thread start-up.
constexpr int64_t kGrainGroups = 8192;

// The AVX-512 loops where the CPU has them (picked once per process), else null: the
// portable loops. FUSED_DROPOUT_DISABLE_AVX512=1 forces the portable ones (the tests check both).
const Avx512Loops* simd_loops();

// The CPU inner loops this process runs: "avx512" or "portable".
const char* cpu_loops_name();

// words[4*g + j] = word j of group (first_group + g), for g in [0, groups).
void fill_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words);

constexpr int64_t kChunk = 4 * kBatchGroups;  // elements of a strided run handled at once

// The random words of `count` mask indices from `first_index` on, `step` apart: whole Philox
// groups for consecutive indices, one value for a run that shares it (step 0), else one
// group per index, kept while the index stays in it. Returns where the count words start.
const uint32_t* draw_run_words(RngState state, int64_t first_index, int64_t step, int64_t count,
                               uint32_t (&group_words)[4 * (kBatchGroups + 1)], uint32_t (&words)[kChunk]);

}  // namespace fused_dropout
