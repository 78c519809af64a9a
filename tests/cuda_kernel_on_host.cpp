// Runs the CUDA kernels' source (csrc/cuda/kernels.cuh) on the CPU: every (block, thread) of
// the launch that cuda/launch.cuh would make runs the kernel body in turn, and the output is
// compared bit for bit with a plain loop over the elements of the mask rule. This checks the
// kernels' indexing wherever a C++ compiler is, GPU or not: for the row-major kernel the full
// and partial steps, aligned and unaligned operands and the bias column; for the strided
// kernel permuted, channels_last, sliced, expanded and transposed operands and shared masks,
// walked in the merged layout that the launch plan (csrc/cuda/launch_plan.h) gives it, or sent
// to the row-shared kernel where the plan sends them; for the row-shared kernel rows
// of every length from one step, and that it never reads a dropped row's input; and the
// mixed-dtype launches (a float32 residual and output beside a 2-byte input, a float32 input
// converted to a 2-byte output) in each kernel.
// Built and run by tests/test_cuda_kernel_on_host.py; exits non-zero on any difference.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

// The CUDA keywords and launch indices the kernel source uses, for a host compiler.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
struct LaunchIndex {
  int64_t x;
};
static LaunchIndex blockIdx, threadIdx;

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/kernels.cuh"
#include "cuda/launch_plan.h"

namespace fused_dropout {

struct HostState {
  uint64_t seed, base;
};
inline void resolve_state(const HostState& src, uint64_t& seed, uint64_t& base) {
  seed = src.seed;
  base = src.base;
}

// One launch, as cuda/launch.cuh sizes it: one thread per step of step_elems() elements.
// The output rules the kernels are checked with: plain dropout, alpha dropout, GELU + dropout,
// GELU + dropout's backward (a two-operand rule), dropout_add beside a float32 residual (the
// sum in float32), and dropout of a float32 input converted to the rule's type first.
enum class TestRule { kDropout, kAlpha, kGelu, kGeluGrad, kPromotedAdd, kFromFloat };

template <typename T, TestRule kRule>
auto test_rule() {
  if constexpr (kRule == TestRule::kDropout || kRule == TestRule::kFromFloat) return MaskedScale<T>::for_p(0.3);
  if constexpr (kRule == TestRule::kAlpha) return AlphaRule<T, acc_type<T>>::for_p(0.3);
  if constexpr (kRule == TestRule::kGelu) return ActRule<Activation::kGelu, T, acc_type<T>>{MaskedScale<T>::for_p(0.3)};
  if constexpr (kRule == TestRule::kGeluGrad) {
    return ActGradRule<Activation::kGelu, T, acc_type<T>>{MaskedScale<T>::for_p(0.3)};
  }
  if constexpr (kRule == TestRule::kPromotedAdd) return PromotedAdd<T, float>{MaskedScale<T>::for_p(0.3)};
}

// The types the operands are stored in, for a rule running in T.
template <typename T, TestRule kRule>
struct StoredAs {
  using in = std::conditional_t<kRule == TestRule::kFromFloat, float, T>;
  using res = std::conditional_t<kRule == TestRule::kPromotedAdd, float, T>;
  using out = res;  // the promoted sum, else T
  using Ops = Operands<T, in, res, out>;
};

template <typename U>
std::vector<U> fresh_values(size_t n, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  std::vector<U> v(n);
  for (auto& e : v) e = U(normal(gen));
  return v;
}

// The row-major kernel, or with row_size > 0 the row-shared kernel (mask index = index / row_size).
template <typename T, bool kAligned, bool kTwoOperands, bool kBias, TestRule kRule = TestRule::kDropout>
bool kernel_matches_rule(int64_t numel, int64_t last_size, int misalign, std::mt19937& gen, int64_t row_size = 0) {
  using In = typename StoredAs<T, kRule>::in;
  using Res = typename StoredAs<T, kRule>::res;
  using Out = typename StoredAs<T, kRule>::out;
  // Operands start 64-byte aligned, plus `misalign` elements; sentinels around the output
  // catch writes out of bounds.
  const std::vector<In> in = fresh_values<In>(numel + 64, gen);
  const std::vector<Res> res = fresh_values<Res>(numel + 64, gen);
  const std::vector<T> bias = fresh_values<T>(last_size, gen);
  std::vector<Out> out_buffer(numel + 64, Out(7.0f)), want(numel + 16, Out(7.0f));
  const auto aligned = [](auto* p) {
    const auto bytes = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<decltype(p)>((bytes + 63) & ~uintptr_t{63});
  };
  const In* x = aligned(in.data()) + misalign;
  const Res* r = aligned(res.data()) + misalign;
  Out* out = aligned(out_buffer.data());
  const auto rule = test_rule<T, kRule>();
  const HostState state{0x9E3779B97F4A7C15ull, (uint64_t{1} << 32) - 3};  // the counter carries mid-call
  const typename StoredAs<T, kRule>::Ops ops{
      x, kTwoOperands ? r : nullptr, kBias ? bias.data() : nullptr, out + misalign, numel, last_size};

  constexpr int64_t kStep = step_elems<T>();
  // Both kernels take a step per thread, as the plan for row-major operands sizes the grid.
  const LaunchPlan plan = plan_launch(numel, kStep, /*row_major=*/true, kBias, 1, &numel, {});
  const int64_t blocks = std::max<int64_t>(1, (plan.work_items + kThreads - 1) / kThreads);
  for (blockIdx.x = 0; blockIdx.x < blocks; ++blockIdx.x) {
    for (threadIdx.x = 0; threadIdx.x < kThreads; ++threadIdx.x) {
      if (row_size > 0) {
        row_shared_kernel<T, kAligned, kTwoOperands, kBias>(ops, row_size, state, rule);
      } else {
        contiguous_kernel<T, kAligned, kTwoOperands, kBias>(ops, state, rule);
      }
    }
  }
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t mask_index = row_size > 0 ? i / row_size : i;
    const uint32_t word = mask_words(state.seed, state.base, static_cast<uint64_t>(mask_index / 4)).w[mask_index % 4];
    const T converted = static_cast<T>(x[i]);
    const T v = kBias ? plus_bias(converted, bias[i % last_size]) : converted;
    if constexpr (kTwoOperands) {
      want[misalign + i] = rule.combine(r[i], v, word);
    } else {
      want[misalign + i] = rule(v, word);
    }
  }
  if (std::memcmp(out, want.data(), want.size() * sizeof(Out)) == 0) return true;
  std::printf(
      "differs: %zu-byte type, numel %lld, last dim %lld, row %lld, offset %d elements, aligned=%d pair=%d bias=%d "
      "rule=%d\n",
      sizeof(T), static_cast<long long>(numel), static_cast<long long>(last_size), static_cast<long long>(row_size),
      misalign, kAligned, kTwoOperands, kBias, static_cast<int>(kRule));
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
      failed += !kernel_matches_rule<T, false, false, false, TestRule::kAlpha>(n, last_size, 1, gen);
      failed += !kernel_matches_rule<T, true, false, false, TestRule::kAlpha>(n, last_size, 0, gen);
      failed += !kernel_matches_rule<T, false, false, true, TestRule::kGelu>(n, last_size, 1, gen);
      failed += !kernel_matches_rule<T, true, false, true, TestRule::kGelu>(n, last_size, 0, gen);
      failed += !kernel_matches_rule<T, false, true, true, TestRule::kGeluGrad>(n, last_size, 1, gen);
      failed += !kernel_matches_rule<T, true, true, false, TestRule::kGeluGrad>(n, last_size, 0, gen);
      cases += 12;
      if constexpr (sizeof(T) == 2) {  // the mixed-dtype launches: a 2-byte branch beside float32
        failed += !kernel_matches_rule<T, false, true, true, TestRule::kPromotedAdd>(n, last_size, 1, gen);
        failed += !kernel_matches_rule<T, true, true, false, TestRule::kPromotedAdd>(n, last_size, 0, gen);
        failed += !kernel_matches_rule<T, true, true, true, TestRule::kPromotedAdd>(n, last_size, 0, gen);
        failed += !kernel_matches_rule<T, false, false, false, TestRule::kFromFloat>(n, last_size, 1, gen);
        failed += !kernel_matches_rule<T, true, false, false, TestRule::kFromFloat>(n, last_size, 0, gen);
        cases += 5;
      }
    }
  }
  std::printf("row-major kernel, %zu-byte type: %d of %d launches differ\n", sizeof(T), failed, cases);
  return failed;
}

// The row-shared kernel: rows from one step long (a step then meets two rows) to many steps,
// rows that do not divide the tensor, every rule and operand form.
template <typename T>
int row_shared_failures(std::mt19937& gen) {
  constexpr int64_t kStep = step_elems<T>();
  int failed = 0, cases = 0;
  for (const int64_t row_size : {kStep, kStep + 1, 3 * kStep - 1, int64_t{257}, int64_t{4096}}) {
    for (const int64_t n : {row_size, 2 * row_size - 5, 7 * row_size + 3, 64 * row_size}) {
      failed += !kernel_matches_rule<T, false, false, false>(n, 8, 1, gen, row_size);
      failed += !kernel_matches_rule<T, true, false, false>(n, 8, 0, gen, row_size);
      failed += !kernel_matches_rule<T, false, true, false>(n, 8, 1, gen, row_size);
      failed += !kernel_matches_rule<T, true, true, false>(n, 8, 0, gen, row_size);
      failed += !kernel_matches_rule<T, true, true, true>(n, 13, 0, gen, row_size);
      failed += !kernel_matches_rule<T, true, false, false, TestRule::kAlpha>(n, 8, 0, gen, row_size);
      failed += !kernel_matches_rule<T, false, false, true, TestRule::kGelu>(n, 13, 1, gen, row_size);
      failed += !kernel_matches_rule<T, true, true, true, TestRule::kGeluGrad>(n, 13, 0, gen, row_size);
      cases += 8;
      if constexpr (sizeof(T) == 2) {
        failed += !kernel_matches_rule<T, true, true, true, TestRule::kPromotedAdd>(n, 13, 0, gen, row_size);
        failed += !kernel_matches_rule<T, false, true, false, TestRule::kPromotedAdd>(n, 8, 1, gen, row_size);
        failed += !kernel_matches_rule<T, true, false, false, TestRule::kFromFloat>(n, 8, 0, gen, row_size);
        cases += 3;
      }
    }
  }
  std::printf("row-shared kernel, %zu-byte type: %d of %d launches differ\n", sizeof(T), failed, cases);
  return failed;
}

// A dropped row costs no read of its input: the input of every dropped row lies on pages
// that are made unreadable, so a read of one ends the process. One row is one page.
template <typename T>
int dropped_rows_read(std::mt19937& gen) {
  const int64_t page = sysconf(_SC_PAGESIZE), row_size = page / static_cast<int64_t>(sizeof(T)), rows = 64;
  void* memory = mmap(nullptr, rows * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return 1;
  T* in = static_cast<T*>(memory);
  std::normal_distribution<float> normal;
  std::vector<T> res(rows * row_size), out(rows * row_size), want(rows * row_size);
  for (int64_t i = 0; i < rows * row_size; ++i) {
    in[i] = T(normal(gen));
    res[i] = T(normal(gen));
  }
  const auto rule = MaskedScale<T>::for_p(0.5);
  const HostState state{12345, 678};
  int dropped = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const uint32_t word = mask_words(state.seed, state.base, static_cast<uint64_t>(row / 4)).w[row % 4];
    for (int64_t j = 0; j < row_size; ++j) {
      want[row * row_size + j] = rule.combine(res[row * row_size + j], in[row * row_size + j], word);
    }
    if (!rule.keeps(word)) {
      mprotect(static_cast<char*>(memory) + row * page, page, PROT_NONE);
      ++dropped;
    }
  }
  const Operands<T> ops{in, res.data(), nullptr, out.data(), rows * row_size, row_size};
  const int64_t blocks = (rows * row_size / step_elems<T>() + kThreads - 1) / kThreads;
  for (blockIdx.x = 0; blockIdx.x < blocks; ++blockIdx.x) {
    for (threadIdx.x = 0; threadIdx.x < kThreads; ++threadIdx.x) {
      row_shared_kernel<T, true, true, false>(ops, row_size, state, rule);
    }
  }
  munmap(memory, rows * page);
  const bool same = std::memcmp(out.data(), want.data(), out.size() * sizeof(T)) == 0;
  std::printf("row-shared kernel, %zu-byte type: %d of %lld rows dropped and not read, output %s\n", sizeof(T), dropped,
              static_cast<long long>(rows), same ? "matches" : "differs");
  return same && dropped > 0 ? 0 : 1;
}

// A strided operand set, as the ops see it: sizes, each operand's strides (input, output,
// mask index, residual), and which dims the mask shares.
struct StridedCase {
  std::string name;
  std::vector<int64_t> sizes;
  std::vector<int64_t> in, out;
  std::vector<int64_t> res;          // empty: row-major
  std::vector<int64_t> shared_dims;  // dims with one mask value
  bool wide_index = false;           // 64-bit index math, as for tensors of 2^31 elements or more
  // A DTensor shard's mask window (checks.h): the whole tensor's sizes and the shard's first
  // index along each dim; empty: the input is the whole tensor.
  std::vector<int64_t> whole_sizes = {}, shard_origin = {};
};

std::vector<int64_t> row_major(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t step = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = step;
    step *= sizes[d];
  }
  return strides;
}

std::vector<int64_t> permuted(const std::vector<int64_t>& strides, const std::vector<int>& order) {
  std::vector<int64_t> out;
  for (const int d : order) out.push_back(strides[d]);
  return out;
}

// The mask layout of checks.cpp (mask_layout): row-major strides of the mask shape, 0 along shared dims.
std::vector<int64_t> mask_strides(const std::vector<int64_t>& sizes, const std::vector<int64_t>& shared) {
  std::vector<int64_t> strides(sizes.size());
  int64_t step = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    const bool is_shared = std::find(shared.begin(), shared.end(), d) != shared.end();
    strides[d] = is_shared ? 0 : step;
    step *= is_shared ? 1 : sizes[d];
  }
  return strides;
}

int64_t span(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  int64_t last = 0;
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  return last + 1;
}

int row_shared_launches = 0;  // launches of strided cases that the plan sends to the row-shared kernel

template <typename T, bool kTwoOperands, TestRule kRule = TestRule::kDropout>
bool strided_kernel_matches_rule(const StridedCase& c, std::mt19937& gen) {
  using In = typename StoredAs<T, kRule>::in;
  using Res = typename StoredAs<T, kRule>::res;
  using Out = typename StoredAs<T, kRule>::out;
  constexpr bool kBias = kTwoOperands || kRule == TestRule::kGelu;  // every dropout_add case here has a bias
  const std::vector<int64_t> res_strides = c.res.empty() ? row_major(c.sizes) : c.res;
  const std::vector<int64_t> mask = mask_strides(c.whole_sizes.empty() ? c.sizes : c.whole_sizes, c.shared_dims);
  int64_t mask_origin = 0;
  for (size_t d = 0; d < c.shard_origin.size(); ++d) mask_origin += c.shard_origin[d] * mask[d];
  const int64_t numel = std::accumulate(c.sizes.begin(), c.sizes.end(), int64_t{1}, std::multiplies<>());
  const std::vector<In> in = fresh_values<In>(span(c.sizes, c.in), gen);
  const std::vector<Res> res = fresh_values<Res>(span(c.sizes, res_strides), gen);
  const std::vector<T> bias = fresh_values<T>(c.sizes.back(), gen);
  std::vector<Out> out(span(c.sizes, c.out), Out(7.0f)), want(out);
  const auto rule = test_rule<T, kRule>();
  const HostState state{0xD1B54A32D192ED03ull, (uint64_t{1} << 32) - 2};
  const typename StoredAs<T, kRule>::Ops ops{
      in.data(), kTwoOperands ? res.data() : nullptr, kBias ? bias.data() : nullptr, out.data(), numel, c.sizes.back()};
  // The launch cuda/launch.cuh makes: its plan (cuda/launch_plan.h) picks the kernel, the walk
  // and the grid. wide_index forces the 64-bit index math a small case would not get.
  const std::array<const int64_t*, kOperands> strides = {c.in.data(), c.out.data(), mask.data(), res_strides.data()};
  const int64_t ndim = static_cast<int64_t>(c.sizes.size());
  const LaunchPlan plan =
      plan_launch(numel, step_elems<T>(), /*row_major=*/false, kBias, ndim, c.sizes.data(), strides, mask_origin);
  const bool row_shared = plan.kernel == LaunchPlan::Kernel::kRowShared;
  row_shared_launches += row_shared;
  const int64_t blocks = std::max<int64_t>(1, (plan.work_items + kThreads - 1) / kThreads);
  for (blockIdx.x = 0; blockIdx.x < blocks; ++blockIdx.x) {
    for (threadIdx.x = 0; threadIdx.x < kThreads; ++threadIdx.x) {
      if (row_shared) {
        row_shared_kernel<T, /*kAligned=*/false, kTwoOperands, kBias>(ops, plan.row_size, state, rule);
      } else if (c.wide_index || !plan.index32) {
        strided_kernel<T, kTwoOperands, uint64_t>(ops, plan.layout, state, rule);
      } else {
        strided_kernel<T, kTwoOperands, uint32_t>(ops, plan.layout, state, rule);
      }
    }
  }
  // The plain walk: every logical index, its offsets from the unmerged strides.
  for (int64_t linear = 0; linear < numel; ++linear) {
    int64_t rest = linear, in_offset = 0, out_offset = 0, res_offset = 0, mask_index = mask_origin, column = 0;
    for (int64_t d = static_cast<int64_t>(c.sizes.size()) - 1; d >= 0; --d) {
      const int64_t index = rest % c.sizes[d];
      rest /= c.sizes[d];
      if (d == static_cast<int64_t>(c.sizes.size()) - 1) column = index;
      in_offset += index * c.in[d];
      out_offset += index * c.out[d];
      res_offset += index * res_strides[d];
      mask_index += index * mask[d];
    }
    const uint32_t word = mask_words(state.seed, state.base, static_cast<uint64_t>(mask_index / 4)).w[mask_index % 4];
    const T converted = static_cast<T>(in[in_offset]);
    const T v = kBias ? plus_bias(converted, bias[column]) : converted;
    if constexpr (kTwoOperands) {
      want[out_offset] = rule.combine(res[res_offset], v, word);
    } else {
      want[out_offset] = rule(v, word);
    }
  }
  if (std::memcmp(out.data(), want.data(), out.size() * sizeof(Out)) == 0) return true;
  std::printf("differs: strided kernel, %zu-byte type, %s, add=%d rule=%d (merged into %lld dims)\n", sizeof(T),
              c.name.c_str(), kTwoOperands, static_cast<int>(kRule), static_cast<long long>(plan.layout.ndim));
  return false;
}

std::vector<StridedCase> strided_cases() {
  std::vector<StridedCase> cases;
  const std::vector<int64_t> image = {4, 6, 5, 8};
  const auto rm = row_major(image);
  const std::vector<int64_t> permuted_sizes = {5, 4, 8, 6};
  const auto permuted_strides = permuted(rm, {2, 0, 3, 1});
  cases.push_back({"permuted", permuted_sizes, permuted_strides, permuted_strides, {}, {}});
  const std::vector<int64_t> nchw = {2, 16, 7, 9};
  const std::vector<int64_t> channels_last = {16 * 7 * 9, 1, 9 * 16, 16};
  cases.push_back({"channels_last", nchw, channels_last, channels_last, channels_last, {}});
  cases.push_back({"channels_last, dropout2d", nchw, channels_last, channels_last, {}, {2, 3}});
  cases.push_back({"dropout2d", {3, 5, 6, 7}, row_major({3, 5, 6, 7}), row_major({3, 5, 6, 7}), {}, {2, 3}});
  cases.push_back({"locked over time", {9, 4, 33}, row_major({9, 4, 33}), row_major({9, 4, 33}), {}, {0}});
  const std::vector<int64_t> sliced_sizes = {4, 3, 4, 3};
  cases.push_back({"sliced", sliced_sizes, {240, 80, 8, 3}, row_major(sliced_sizes), {}, {}});
  cases.push_back({"expanded", image, {0, 8, 0, 1}, rm, {}, {}});
  cases.push_back({"residual transposed", {6, 40}, {40, 1}, {40, 1}, {1, 6}, {}});
  cases.push_back({"all dims of size 1", {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {}, {}});
  cases.push_back({"transposed, many blocks", {64, 300}, {1, 64}, {1, 64}, {}, {}});
  cases.push_back({"sliced rows, many blocks", {40, 700}, {2800, 2}, row_major({40, 700}), {}, {}});
  cases.push_back({"channels_last, 64-bit index", nchw, channels_last, channels_last, channels_last, {}, true});
  cases.push_back({"odd channels_last, short inner runs", {3, 3, 5, 2}, {30, 1, 6, 3}, {30, 1, 6, 3}, {}, {}});
  // Masks shared per sample (stochastic depth) and over everything (mode "batch").
  const std::vector<int64_t> samples = {6, 3, 4, 5};
  cases.push_back({"per sample", samples, row_major(samples), row_major(samples), {}, {1, 2, 3}});
  cases.push_back({"per sample, channels_last", nchw, channels_last, channels_last, channels_last, {1, 2, 3}});
  cases.push_back({"per sample, residual transposed", {6, 40}, {40, 1}, {40, 1}, {1, 6}, {1}});
  cases.push_back({"per sample, short rows", {9, 2}, {2, 1}, {2, 1}, {}, {1}});
  cases.push_back({"one mask value", samples, row_major(samples), row_major(samples), {}, {0, 1, 2, 3}});
  // Shards of a DTensor: the mask index starts at the shard's origin in the whole tensor's mask
  // (an origin that is not a multiple of 4) and steps by the whole tensor's strides.
  const std::vector<int64_t> shard = {5, 3, 7};
  cases.push_back(
      {"shard of the middle dim", shard, row_major(shard), row_major(shard), {}, {}, false, {5, 7, 7}, {0, 3, 0}});
  cases.push_back(
      {"shard of the last dim", shard, row_major(shard), row_major(shard), {}, {}, false, {5, 3, 9}, {0, 0, 1}});
  cases.push_back(
      {"shard of dim 0, 64-bit index", shard, row_major(shard), row_major(shard), {}, {}, true, {11, 3, 7}, {5, 0, 0}});
  cases.push_back({"shard of dim 0, per sample",
                   shard,
                   row_major(shard),
                   row_major(shard),
                   {},
                   {1, 2},
                   false,
                   {11, 3, 7},
                   {5, 0, 0}});
  cases.push_back({"shard, channels_last, dropout2d",
                   nchw,
                   channels_last,
                   channels_last,
                   {},
                   {2, 3},
                   false,
                   {2, 19, 7, 9},
                   {0, 3, 0, 0}});
  return cases;
}

template <typename T>
int strided_failures(std::mt19937& gen) {
  int failed = 0, cases = 0;
  for (const StridedCase& c : strided_cases()) {
    failed += !strided_kernel_matches_rule<T, false>(c, gen);
    failed += !strided_kernel_matches_rule<T, false, TestRule::kAlpha>(c, gen);
    cases += 2;
    failed += !strided_kernel_matches_rule<T, true>(c, gen);
    failed += !strided_kernel_matches_rule<T, false, TestRule::kGelu>(c, gen);
    failed += !strided_kernel_matches_rule<T, true, TestRule::kGeluGrad>(c, gen);
    cases += 3;
    if constexpr (sizeof(T) == 2) {
      failed += !strided_kernel_matches_rule<T, true, TestRule::kPromotedAdd>(c, gen);
      failed += !strided_kernel_matches_rule<T, false, TestRule::kFromFloat>(c, gen);
      cases += 2;
    }
  }
  std::printf("strided kernel, %zu-byte type: %d of %d launches differ (%d of them row-shared)\n", sizeof(T), failed,
              cases, row_shared_launches);
  row_shared_launches = 0;
  return failed;
}

}  // namespace fused_dropout

int main() {
  using namespace fused_dropout;
  std::mt19937 gen(2024);
  const int failed = failures<float>(gen) + failures<double>(gen) + failures<c10::Half>(gen) +
                     failures<c10::BFloat16>(gen) + strided_failures<float>(gen) + strided_failures<double>(gen) +
                     strided_failures<c10::Half>(gen) + strided_failures<c10::BFloat16>(gen) +
                     row_shared_failures<float>(gen) + row_shared_failures<double>(gen) +
                     row_shared_failures<c10::Half>(gen) + row_shared_failures<c10::BFloat16>(gen) +
                     dropped_rows_read<float>(gen) + dropped_rows_read<c10::BFloat16>(gen);
  return failed == 0 ? 0 : 1;
}
