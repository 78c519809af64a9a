// Launch-shape study for the row-major CUDA dropout kernel, outside PyTorch: the same shared
// Philox and output rule as the extension's kernels (csrc/philox.h; the kernels themselves
// are in csrc/cuda/kernels.cuh), run with several
// block sizes, steps per thread and grid shapes, each checked bit for bit against the host
// rule and timed against cudaMemcpy and a plain copy kernel of the same shape.
//
//     nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90 -Icsrc -I<torch include> \
//         benchmarks/studies/cuda_variants.cu -o cuda_variants
//     ./cuda_variants [results.csv]
//
// A "step" is 16 bytes: 4 float32 or 8 float16/bfloat16 elements. "persistent" grids hold
// as many blocks as fit on the GPU at once and loop; "one-shot" grids have one tile per block.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "philox.h"

#define CHECK_CUDA(call)                                                                            \
  do {                                                                                              \
    const cudaError_t err_ = (call);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

using fused_dropout::mask_words;
using fused_dropout::MaskedScale;
using fused_dropout::PhiloxWords;

template <typename T>
using Rule = MaskedScale<T, float>;

template <typename T>
constexpr int kStepElems = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kStepElems<T>];
};

// Thread t of a tile handles steps tile * kThreads * kUnroll + t + j * kThreads, j < kUnroll:
// each of its loads is coalesced across the warp, and all kUnroll loads are issued before
// any Philox work. numel is a multiple of the tile here, so there is no tail.
template <typename T, int kThreads, int kUnroll, bool kPersistent, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    tile_kernel(const T* in, T* out, int64_t numel, uint64_t seed, uint64_t base, Rule<T> rule) {
  constexpr int kStep = kStepElems<T>;
  const int64_t tiles = numel / (int64_t{kStep} * kThreads * kUnroll);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += kPersistent ? gridDim.x : tiles) {
    Vec<T> x[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t step = (tile * kUnroll + j) * kThreads + threadIdx.x;
      x[j] = reinterpret_cast<const Vec<T>*>(in)[step];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t step = (tile * kUnroll + j) * kThreads + threadIdx.x;
      Vec<T> y;
      if constexpr (kDropout) {
#pragma unroll
        for (int g = 0; g < kStep / 4; ++g) {
          const PhiloxWords w = mask_words(seed, base, static_cast<uint64_t>(step * (kStep / 4) + g));
#pragma unroll
          for (int k = 0; k < 4; ++k) y.v[4 * g + k] = rule(x[j].v[4 * g + k], w.w[k]);
        }
      } else {
        y = x[j];
      }
      reinterpret_cast<Vec<T>*>(out)[step] = y;
    }
  }
}

// Fresh, nonzero inputs in [-2, 2) from a Philox stream of another seed.
template <typename T>
__global__ void fill_kernel(T* out, int64_t numel, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel; i += int64_t{gridDim.x} * blockDim.x) {
    const uint32_t word = mask_words(seed, 0, static_cast<uint64_t>(i / 4)).w[i % 4];
    out[i] = static_cast<T>((static_cast<float>(word | 1u) * 0x1p-32f - 0.5f) * 4.0f);
  }
}

struct Variant {
  std::string name;
  int threads;
  int unroll;
  bool persistent;
  bool dropout;
  const void* kernel;
  void (*launch)(int grid, const void* in, void* out, int64_t numel, uint64_t seed, uint64_t base, const void* rule);
};

template <typename T, int kThreads, int kUnroll, bool kPersistent, bool kDropout>
Variant make_variant() {
  auto kernel = tile_kernel<T, kThreads, kUnroll, kPersistent, kDropout>;
  std::string name = std::string(kDropout ? "dropout" : "copy-kernel") + " t" + std::to_string(kThreads) + " u" +
                     std::to_string(kUnroll) + (kPersistent ? " persistent" : " one-shot");
  return Variant{
      name,
      kThreads,
      kUnroll,
      kPersistent,
      kDropout,
      reinterpret_cast<const void*>(kernel),
      [](int grid, const void* in, void* out, int64_t numel, uint64_t seed, uint64_t base, const void* rule) {
        tile_kernel<T, kThreads, kUnroll, kPersistent, kDropout><<<grid, kThreads>>>(
            static_cast<const T*>(in), static_cast<T*>(out), numel, seed, base, *static_cast<const Rule<T>*>(rule));
      }};
}

template <typename T>
std::vector<Variant> variants() {
  return {
      make_variant<T, 256, 1, true, true>(),  // the shape of the library's kernel today
      make_variant<T, 256, 2, true, true>(),   make_variant<T, 256, 4, true, true>(),
      make_variant<T, 256, 1, false, true>(),  make_variant<T, 256, 2, false, true>(),
      make_variant<T, 256, 4, false, true>(),  make_variant<T, 128, 4, false, true>(),
      make_variant<T, 512, 2, true, true>(),   make_variant<T, 256, 1, true, false>(),
      make_variant<T, 256, 4, false, false>(),
  };
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename Fn>
float time_ms(Fn&& fn, int warmup = 5, int reps = 25) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < warmup; ++i) fn(i);
  CHECK_CUDA(cudaGetLastError());
  std::vector<float> times;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    fn(i);
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return median(times);
}

template <typename T>
void run_dtype(const char* dtype, int log2n, FILE* csv, const cudaDeviceProp& prop) {
  const int64_t numel = int64_t{1} << log2n;
  const size_t bytes = numel * sizeof(T);
  const uint64_t seed = 0x243F6A8885A308D3ull, base = 12345;
  const Rule<T> rule = Rule<T>::for_p(0.5);
  // Two input/output pairs, alternated, so that no timed run finds its input in L2.
  void *in[2], *out[2];
  for (int b = 0; b < 2; ++b) {
    CHECK_CUDA(cudaMalloc(&in[b], bytes));
    CHECK_CUDA(cudaMalloc(&out[b], bytes));
    fill_kernel<T><<<prop.multiProcessorCount * 8, 256>>>(static_cast<T*>(in[b]), numel, 1000 + b);
    CHECK_CUDA(cudaGetLastError());
  }
  CHECK_CUDA(cudaDeviceSynchronize());

  // The host rule on a sample of indices, from the same header.
  std::vector<T> host_in(numel);
  CHECK_CUDA(cudaMemcpy(host_in.data(), in[0], bytes, cudaMemcpyDeviceToHost));
  std::mt19937_64 pick(log2n);
  std::vector<int64_t> sample(4096);
  for (auto& i : sample) i = static_cast<int64_t>(pick() % static_cast<uint64_t>(numel));
  sample.push_back(0);
  sample.push_back(numel - 1);

  const float memcpy_ms =
      time_ms([&](int i) { CHECK_CUDA(cudaMemcpyAsync(out[i & 1], in[i & 1], bytes, cudaMemcpyDeviceToDevice)); });
  const double memcpy_gbps = 2.0 * bytes / memcpy_ms / 1e6;
  std::printf("%-9s 2^%-3d %-34s %8.4f ms %7.0f GB/s %5.0f%%\n", dtype, log2n, "cudaMemcpy D2D", memcpy_ms, memcpy_gbps,
              100.0);
  std::fprintf(csv, "%s,%d,cudaMemcpy D2D,%.5f,%.1f,100.0,\n", dtype, log2n, memcpy_ms, memcpy_gbps);

  std::vector<T> reference;  // the first dropout variant's full output
  for (const Variant& v : variants<T>()) {
    int grid;
    const int64_t tiles = numel / (int64_t{kStepElems<T>} * v.threads * v.unroll);
    if (v.persistent) {
      int per_sm = 0;
      CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.kernel, v.threads, 0));
      grid = static_cast<int>(std::min<int64_t>(tiles, int64_t{per_sm} * prop.multiProcessorCount));
    } else {
      grid = static_cast<int>(tiles);
    }
    // Correctness: poison the output, run once, compare.
    CHECK_CUDA(cudaMemset(out[0], 0xFF, bytes));
    v.launch(grid, in[0], out[0], numel, seed, base, &rule);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<T> got(numel);
    CHECK_CUDA(cudaMemcpy(got.data(), out[0], bytes, cudaMemcpyDeviceToHost));
    bool ok = true;
    if (v.dropout) {
      for (int64_t i : sample) {
        const T want = rule(host_in[i], mask_words(seed, base, static_cast<uint64_t>(i / 4)).w[i % 4]);
        ok = ok && std::memcmp(&want, &got[i], sizeof(T)) == 0;
      }
      if (reference.empty()) {
        reference = got;
      } else {
        ok = ok && std::memcmp(reference.data(), got.data(), bytes) == 0;
      }
    } else {
      ok = std::memcmp(host_in.data(), got.data(), bytes) == 0;
    }
    const float ms = time_ms([&](int i) { v.launch(grid, in[i & 1], out[i & 1], numel, seed, base + i, &rule); });
    const double gbps = 2.0 * bytes / ms / 1e6;
    std::printf("%-9s 2^%-3d %-34s %8.4f ms %7.0f GB/s %5.0f%%  grid %-7d %s\n", dtype, log2n, v.name.c_str(), ms, gbps,
                100.0 * gbps / memcpy_gbps, grid, ok ? "bit-exact" : "MISMATCH");
    std::fprintf(csv, "%s,%d,%s,%.5f,%.1f,%.1f,%s\n", dtype, log2n, v.name.c_str(), ms, gbps,
                 100.0 * gbps / memcpy_gbps, ok ? "bit-exact" : "MISMATCH");
    if (!ok) std::exit(2);
  }
  for (int b = 0; b < 2; ++b) {
    CHECK_CUDA(cudaFree(in[b]));
    CHECK_CUDA(cudaFree(out[b]));
  }
}

int main(int argc, char** argv) {
  FILE* csv = std::fopen(argc > 1 ? argv[1] : "cuda_variants.csv", "w");
  if (csv == nullptr) {
    std::perror("cuda_variants: cannot open the CSV file");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, L2 %d MiB; p = 0.5; median of 25 runs after 5 warm-ups\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20);
  std::fprintf(csv, "dtype,log2_numel,variant,ms,GB/s,pct_of_memcpy,check\n");
  for (int log2n : {26, 28}) {
    run_dtype<float>("float32", log2n, csv, prop);
    run_dtype<c10::BFloat16>("bfloat16", log2n, csv, prop);
    run_dtype<c10::Half>("float16", log2n, csv, prop);
  }
  std::fclose(csv);
  return 0;
}
