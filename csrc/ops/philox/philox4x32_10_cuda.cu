// The raw generator op on CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/kernels.cuh"
#include "ops/philox/philox4x32_10.h"
#include "philox.h"

namespace fused_dropout {
namespace {

__global__ void philox_kernel(const int64_t* counter, const int64_t* key, int64_t* out, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const PhiloxWords w =
      philox4x32_10(static_cast<uint32_t>(counter[4 * row]), static_cast<uint32_t>(counter[4 * row + 1]),
                    static_cast<uint32_t>(counter[4 * row + 2]), static_cast<uint32_t>(counter[4 * row + 3]),
                    static_cast<uint32_t>(key[2 * row]), static_cast<uint32_t>(key[2 * row + 1]));
#pragma unroll
  for (int j = 0; j < 4; ++j) out[4 * row + j] = static_cast<int64_t>(w.w[j]);
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c, at::MemoryFormat::Contiguous);
  const int64_t rows = c.size(0);
  if (rows == 0) return out;
  const int blocks = static_cast<int>((rows + kThreads - 1) / kThreads);
  philox_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CUDA, m) { m.impl("philox4x32_10", &fused_dropout::philox4x32_10_cuda); }
