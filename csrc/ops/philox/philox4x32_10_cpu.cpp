// The raw generator op on the CPU.
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "ops/philox/philox4x32_10.h"
#include "philox.h"

namespace fused_dropout {
namespace {

// Known-answer access to the raw generator: counter int64[N, 4] and key int64[N, 2], each
// holding 32-bit words; returns the four output words of each row as int64[N, 4].
at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c, at::MemoryFormat::Contiguous);
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* kp = k.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  for (const auto row : c10::irange(c.size(0))) {
    const auto w = philox4x32_10(static_cast<uint32_t>(cp[4 * row]), static_cast<uint32_t>(cp[4 * row + 1]),
                                 static_cast<uint32_t>(cp[4 * row + 2]), static_cast<uint32_t>(cp[4 * row + 3]),
                                 static_cast<uint32_t>(kp[2 * row]), static_cast<uint32_t>(kp[2 * row + 1]));
    for (int j = 0; j < 4; ++j) op[4 * row + j] = static_cast<int64_t>(w.w[j]);
  }
  return out;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) { m.impl("philox4x32_10", &fused_dropout::philox4x32_10_cpu); }
