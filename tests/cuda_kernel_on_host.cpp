// Runs the row-major CUDA kernel's source (csrc/cuda/row_major_kernel.cuh) on the CPU: every
// (block, thread) of the launch that dropout_cuda.cu would make runs the kernel body in turn,
// and the output is compared bit for bit with a plain loop over the elements of the mask
// rule. This checks the kernel's indexing (full and partial steps, aligned and unaligned
// operands, the bias column) wherever a C++ compiler is, GPU or not.
// Built and run by tests/test_cuda_kernel_on_host.py; exits non-zero on any difference.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

// The CUDA keywords and launch indices the kernel source uses, for a host compiler.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
struct LaunchIndex {
  int64_t x;
};
static LaunchIndex blockIdx, threadIdx;

#include "cuda/row_major_kernel.cuh"

namespace fused_dropout {

struct HostState {
  uint64_t seed, base;
};
inline void resolve_state(const HostState& src, uint64_t& seed, uint64_t& base) {
  seed = src.seed;
  base = src.base;
}

// One launch, as dropout_cuda.cu sizes it: one thread per step of step_elems() elements.
template <typename T, bool kAligned, bool kAdd, bool kBias>
bool kernel_matches_rule(int64_t numel, int64_t last_size, int misalign, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  const auto fresh = [&](size_t n) {
    std::vector<T> v(n);
    for (auto& e : v) e = T(normal(gen));
    return v;
  };
  // Operands start 64-byte aligned, plus `misalign` elements; sentinels around the output
  // catch writes out of bounds.
  const std::vector<T> in = fresh(numel + 64), res = fresh(numel + 64), bias = fresh(last_size);
  std::vector<T> out_buffer(numel + 64, T(7.0f)), want(numel + 16, T(7.0f));
  const auto aligned = [](auto* p) {
    const auto bytes = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<decltype(p)>((bytes + 63) & ~uintptr_t{63});
  };
  const T* x = aligned(in.data()) + misalign;
  const T* r = aligned(res.data()) + misalign;
  T* out = aligned(out_buffer.data());
  const auto rule = OutputRule<T>::for_p(0.3);
  const HostState state{0x9E3779B97F4A7C15ull, (uint64_t{1} << 32) - 3};  // the counter carries mid-call
  const Operands<T> ops{x, kAdd ? r : nullptr, kBias ? bias.data() : nullptr, out + misalign, numel, last_size};

  constexpr int64_t kStep = step_elems<T>();
  const int64_t blocks = std::max<int64_t>(1, ((numel + kStep - 1) / kStep + kThreads - 1) / kThreads);
  for (blockIdx.x = 0; blockIdx.x < blocks; ++blockIdx.x) {
    for (threadIdx.x = 0; threadIdx.x < kThreads; ++threadIdx.x) {
      contiguous_kernel<T, kAligned, kAdd, kBias>(ops, state, rule);
    }
  }
  for (int64_t i = 0; i < numel; ++i) {
    const uint32_t word = mask_words(state.seed, state.base, static_cast<uint64_t>(i / 4)).w[i % 4];
    const T v = kBias ? OutputRule<T>::plus_bias(x[i], bias[i % last_size]) : x[i];
    want[misalign + i] = kAdd ? rule.add_to(r[i], v, word) : rule(v, word);
  }
  if (std::memcmp(out, want.data(), want.size() * sizeof(T)) == 0) return true;
  std::printf("differs: %zu-byte type, numel %lld, last dim %lld, offset %d elements, aligned=%d add=%d bias=%d\n",
              sizeof(T), static_cast<long long>(numel), static_cast<long long>(last_size), misalign, kAligned, kAdd,
              kBias);
  return false;
}

template <typename T>
int failures(std::mt19937& gen) {
  std::vector<int64_t> sizes;
  for (int64_t n = 0; n <= 70; ++n) sizes.push_back(n);  // every partial step, a few blocks' worth of threads
  for (int64_t n : {2047, 2048, 2049, 4101, 6151, 100003}) sizes.push_back(n);  // several blocks
  int failed = 0, cases = 0;
  for (const int64_t n : sizes) {
    for (const int64_t last_size : {1, 3, 8, 13, 64}) {
      // Offset operands take the unaligned kernel, as a misaligned tensor does.
      failed += !kernel_matches_rule<T, false, false, false>(n, last_size, 1, gen);
      failed += !kernel_matches_rule<T, false, true, false>(n, last_size, 1, gen);
      failed += !kernel_matches_rule<T, false, true, true>(n, last_size, 3, gen);
      failed += !kernel_matches_rule<T, true, false, false>(n, last_size, 0, gen);
      failed += !kernel_matches_rule<T, true, true, false>(n, last_size, 0, gen);
      failed += !kernel_matches_rule<T, true, true, true>(n, last_size, 0, gen);
      cases += 6;
    }
  }
  std::printf("%zu-byte type: %d of %d launches differ\n", sizeof(T), failed, cases);
  return failed;
}

}  // namespace fused_dropout

int main() {
  using namespace fused_dropout;
  std::mt19937 gen(2024);
  const int failed = failures<float>(gen) + failures<double>(gen) + failures<c10::Half>(gen) +
                     failures<c10::BFloat16>(gen);
  return failed == 0 ? 0 : 1;
}
