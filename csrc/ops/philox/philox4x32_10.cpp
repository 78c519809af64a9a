// philox4x32_10's schema, checks and Meta kernel.
#include "ops/philox/philox4x32_10.h"

#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace fused_dropout {

void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.sym_size(1) == 4, kPhiloxOp,
              ": counter must be int64 of shape [N, 4], got ", counter.scalar_type(), " of shape ",
              counter.sym_sizes());
  TORCH_CHECK(key.scalar_type() == at::kLong && key.dim() == 2 && key.sym_size(1) == 2 &&
                  key.sym_size(0) == counter.sym_size(0),
              kPhiloxOp, ": key must be int64 of shape [N, 2] with N = ", counter.sym_size(0), ", got ",
              key.scalar_type(), " of shape ", key.sym_sizes());
  TORCH_CHECK(key.device() == counter.device(), kPhiloxOp, ": key must be on the counter's device ", counter.device(),
              ", got ", key.device());
}

namespace {

at::Tensor philox4x32_10_meta(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  return at::empty_like(counter, at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace fused_dropout

// Returns the four output words of each row as int64[N, 4].
TORCH_LIBRARY_FRAGMENT(fused_dropout, m) { m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor"); }

TORCH_LIBRARY_IMPL(fused_dropout, Meta, m) { m.impl("philox4x32_10", &fused_dropout::philox4x32_10_meta); }
