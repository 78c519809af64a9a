// Runs dropout_add_norm's CUDA kernel source (csrc/ops/dropout_add_norm/norm_kernel.cuh) on the
// CPU: the threads of each block run as host threads, __syncthreads() is a barrier among them
// and __shared__ memory is one static array per kernel, as a block's is. Each launch is
// compared with a plain loop over the rows: h bit for bit against the mask rule, and mean,
// rstd and the output against the same formulas in float64, within the rounding of the sums.
// Covered: every dtype of input, h and residual the kernel takes, with and without residual,
// weight and bias; LayerNorm and RMSNorm; widths from 1 to rows kept on chip (8192) and wider
// rows read back (the two-pass path), with 16-byte steps and one-element steps; masks shared
// along the row or another dim, a DTensor shard's mask origin, and fewer blocks than rows.
// Built and run by tests/test_cuda_kernel_on_host.py; exits non-zero on any difference.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

// The CUDA keywords and launch indices the kernel source uses, for a host compiler.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static
struct LaunchIndex {
  int64_t x;
};
static LaunchIndex blockDim, gridDim;
static thread_local LaunchIndex blockIdx, threadIdx;
static std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ops/dropout_add_norm/norm_kernel.cuh"

namespace fused_dropout {

struct HostState {
  uint64_t seed, base;
};
inline void resolve_state(const HostState& src, uint64_t& seed, uint64_t& base) {
  seed = src.seed;
  base = src.base;
}

// One launch of `blocks` blocks of `threads` threads: one host thread per CUDA thread, which
// runs the blocks in turn, each block's threads concurrently.
template <typename Body>
void launch_on_host(int64_t blocks, int64_t threads, Body body) {
  gridDim.x = blocks;
  blockDim.x = threads;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([t, blocks, &body] {
      threadIdx.x = t;
      for (blockIdx.x = 0; blockIdx.x < blocks; ++blockIdx.x) {
        body();
        block_barrier->arrive_and_wait();  // the block has ended before the next one starts
      }
    });
  }
  for (auto& thread : pool) thread.join();
}

struct NormCase {
  int64_t rows, width;
  bool residual, weight, bias, rms;
  int64_t mask_step;   // 1, or 0: the row shares one mask value
  int64_t row_stride;  // the mask stride of a row (0: every row shares the mask of row 0)
  int64_t origin;      // a shard's first mask index
  int64_t blocks;      // fewer than rows: the blocks loop over rows
  bool one_element;    // steps of one element even where 16-byte steps fit
};

template <typename T>
double tolerance_of() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  if constexpr (std::is_same_v<T, float>) return 2e-5;
  if constexpr (std::is_same_v<T, c10::Half>) return 2e-3;
  return 1.6e-2;  // bfloat16
}

template <typename in_t, typename res_t, typename h_t>
bool norm_kernel_matches(const NormCase& c, std::mt19937& gen) {
  using sum_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<h_t, double>, double, float>;
  constexpr int kVec = 16 / sizeof(in_t);
  const bool vectorised = !c.one_element && c.width % kVec == 0;
  std::normal_distribution<float> normal;
  const int64_t n = c.rows * c.width;
  // 64-byte aligned storage: std::vector's new is 16-byte aligned on x86-64 at least, and the
  // 32-byte steps of a float32 h need 32.
  const auto fresh = [&](auto tag, int64_t count) {
    using T = decltype(tag);
    std::vector<T> v(count + 64);
    for (auto& e : v) e = T(normal(gen));
    return v;
  };
  const auto aligned = [](auto& v) {
    const auto bytes = reinterpret_cast<uintptr_t>(v.data());
    return reinterpret_cast<decltype(v.data())>((bytes + 63) & ~uintptr_t{63});
  };
  auto in_store = fresh(in_t{}, n);
  auto res_store = fresh(res_t{}, n);
  auto out_store = fresh(in_t{}, n);
  auto h_store = fresh(h_t{}, n);
  const std::vector<sum_t> weight = fresh(sum_t{}, c.width), bias = fresh(sum_t{}, c.width);
  std::vector<sum_t> mean(c.rows, sum_t(7)), rstd(c.rows, sum_t(7));
  const in_t* x = aligned(in_store);
  const res_t* r = aligned(res_store);
  in_t* out = aligned(out_store);
  h_t* h = aligned(h_store);
  const NormOperands<in_t, res_t, h_t, sum_t> ops{x,
                                                  c.residual ? r : nullptr,
                                                  c.weight ? weight.data() : nullptr,
                                                  c.bias ? bias.data() : nullptr,
                                                  out,
                                                  h,
                                                  mean.data(),
                                                  rstd.data(),
                                                  c.rows,
                                                  c.width,
                                                  sum_t(1e-5),
                                                  c.rms};
  // Rows as dims (2, rows / 2) where they split, so the mask's row base walks two dims.
  NormMaskRows mask{};
  if (c.rows % 2 == 0) {
    mask.outer_dims = 2;
    mask.sizes[0] = 2;
    mask.sizes[1] = c.rows / 2;
    mask.strides[0] = c.row_stride * (c.rows / 2);
    mask.strides[1] = c.row_stride;
  } else {
    mask.outer_dims = 1;
    mask.sizes[0] = c.rows;
    mask.strides[0] = c.row_stride;
  }
  mask.origin = c.origin;
  mask.step = c.mask_step;
  const HostState state{0x9E3779B97F4A7C15ull, (uint64_t{1} << 32) - 5};
  const auto rule = MaskedScale<in_t>::for_p(0.3);
  const int threads = norm_threads(vectorised ? c.width / kVec : c.width);
  const int64_t blocks = std::min(c.blocks, c.rows);
  if (vectorised) {
    launch_on_host(blocks, threads, [&] { norm_forward_kernel<kVec>(ops, mask, state, rule); });
  } else {
    launch_on_host(blocks, threads, [&] { norm_forward_kernel<1>(ops, mask, state, rule); });
  }

  const double tol = tolerance_of<in_t>(), stat_tol = std::is_same_v<sum_t, double> ? 1e-12 : 2e-5;
  for (int64_t row = 0; row < c.rows; ++row) {
    const int64_t base = c.origin + row * c.row_stride;  // the mask index of the row's first element
    double total = 0;
    for (int64_t j = 0; j < c.width; ++j) {
      const int64_t i = row * c.width + j, index = base + j * c.mask_step;
      const uint32_t word = mask_words(state.seed, state.base, static_cast<uint64_t>(index / 4)).w[index % 4];
      const in_t dropped = rule(x[i], word);
      const h_t want = c.residual ? static_cast<h_t>(static_cast<sum_t>(r[i]) + static_cast<sum_t>(dropped))
                                  : static_cast<h_t>(dropped);
      if (std::memcmp(&want, &h[i], sizeof(h_t)) != 0) {
        std::printf("differs: h at row %lld, column %lld\n", static_cast<long long>(row), static_cast<long long>(j));
        return false;
      }
      total += static_cast<double>(h[i]);
    }
    const double mu = c.rms ? 0.0 : total / static_cast<double>(c.width);
    double squares = 0;
    for (int64_t j = 0; j < c.width; ++j) {
      const double centered = static_cast<double>(h[row * c.width + j]) - mu;
      squares += centered * centered;
    }
    const double rs = 1.0 / std::sqrt(squares / static_cast<double>(c.width) + 1e-5);
    const auto close = [](double got, double want, double tolerance) {
      return std::abs(got - want) <= tolerance * std::max(1.0, std::abs(want));
    };
    if (!close(mean[row], mu, stat_tol) || !close(rstd[row], rs, stat_tol)) {
      std::printf("differs: mean %g (want %g) or rstd %g (want %g) of row %lld\n", static_cast<double>(mean[row]), mu,
                  static_cast<double>(rstd[row]), rs, static_cast<long long>(row));
      return false;
    }
    for (int64_t j = 0; j < c.width; ++j) {
      double want = (static_cast<double>(h[row * c.width + j]) - mu) * rs;
      if (c.weight) want *= static_cast<double>(weight[j]);
      if (c.bias) want += static_cast<double>(bias[j]);
      if (!close(static_cast<double>(out[row * c.width + j]), want, tol)) {
        std::printf("differs: output %g (want %g) at row %lld, column %lld\n",
                    static_cast<double>(out[row * c.width + j]), want, static_cast<long long>(row),
                    static_cast<long long>(j));
        return false;
      }
    }
  }
  return true;
}

std::vector<NormCase> norm_cases() {
  std::vector<NormCase> cases;
  // Widths from one element to rows kept on chip (8192 with 16-byte steps, 256 threads) and
  // wider rows, read back; odd widths take one-element steps.
  for (const int64_t width : {1, 3, 8, 24, 100, 768, 1000, 4104, 8192, 8200, 20000}) {
    const int64_t rows = width >= 4096 ? 2 : 6;
    cases.push_back({rows, width, true, true, true, false, 1, width, 0, rows, false});
    cases.push_back({rows, width, false, true, false, true, 1, width, 0, rows, false});
    cases.push_back({rows, width, true, false, false, false, 1, width, 0, rows, true});
  }
  cases.push_back({6, 9000, true, true, false, false, 1, 9000, 0, 6, true});  // one-element steps, read back
  // Masks: one value per row (drop path), rows sharing a mask (shared outer dim), a shard's
  // origin that is not a multiple of 4, and fewer blocks than rows.
  cases.push_back({8, 64, true, true, true, false, 0, 1, 0, 8, false});
  cases.push_back({8, 64, true, true, true, false, 1, 0, 0, 8, false});
  cases.push_back({6, 96, true, true, true, true, 1, 96, 3 * 96 + 5, 6, false});
  cases.push_back({9, 40, true, true, true, false, 1, 40, 0, 4, false});
  return cases;
}

template <typename in_t>
int failures(std::mt19937& gen) {
  int failed = 0, launched = 0;
  for (const NormCase& c : norm_cases()) {
    // h in the input's dtype or float32; a residual in the input's dtype or h's.
    failed += !norm_kernel_matches<in_t, in_t, in_t>(c, gen);
    ++launched;
    if constexpr (!std::is_same_v<in_t, float>) {
      failed += !norm_kernel_matches<in_t, in_t, float>(c, gen);
      failed += !norm_kernel_matches<in_t, float, float>(c, gen);
      launched += 2;
    }
  }
  std::printf("norm kernel, %zu-byte input: %d of %d launches differ\n", sizeof(in_t), failed, launched);
  return failed;
}

}  // namespace fused_dropout

int main() {
  using namespace fused_dropout;
  std::mt19937 gen(2024);
  const int failed =
      failures<float>(gen) + failures<double>(gen) + failures<c10::Half>(gen) + failures<c10::BFloat16>(gen);
  return failed == 0 ? 0 : 1;
}
