#include "cpu/state.h"

#include <cstdlib>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/empty.h>

#include "operands.h"

namespace fused_dropout {

RngState draw_state(const std::optional<int64_t>& seed, int64_t offset, const std::optional<at::Generator>& generator) {
  if (seed.has_value()) return {static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset)};
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  // A fresh 64-bit key per call; the mutex keeps concurrent callers from drawing the same one.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {gen->random64(), 0};
}

RngState read_state(const at::Tensor& rng_state) {
  const at::Tensor s = rng_state.contiguous();
  return {static_cast<uint64_t>(s.const_data_ptr<int64_t>()[0]), static_cast<uint64_t>(s.const_data_ptr<int64_t>()[1])};
}

at::Tensor state_tensor(RngState state) {
  at::Tensor t = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  t.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(state.seed);
  t.mutable_data_ptr<int64_t>()[1] = static_cast<int64_t>(state.base);
  return t;
}

namespace {

// A fresh output of tens of MiB is mapped by the OS on first write, one 4 KiB page fault at a
// time, which can cost more than the kernel. With FUSED_DROPOUT_HUGE_PAGES=1 the
// out-of-place ops ask for transparent huge pages on the 2 MiB-aligned part of a large
// output before writing it, which turns 512 faults into one; the hint covers only memory
// this op owns and is about to fill. It is off by default: when the OS must compact memory
// to find huge pages, single calls stall (docs/performance.md has the tail latencies).
bool huge_pages_requested() {
  static const bool requested = [] {
    const char* value = std::getenv("FUSED_DROPOUT_HUGE_PAGES");
    return value != nullptr && std::string(value) == "1";
  }();
  return requested;
}

}  // namespace

at::Tensor new_output(const at::Tensor& input, std::optional<at::ScalarType> dtype) {
  at::Tensor output = empty_output_like(input, dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const size_t bytes = output.storage().nbytes();
  if (bytes >= 8 * kHugePage && huge_pages_requested()) {
    const auto start = reinterpret_cast<uintptr_t>(output.storage().mutable_data());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return output;
}

}  // namespace fused_dropout
