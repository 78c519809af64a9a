// CPU kernels: one pass over memory, parallel over chunks of whole Philox groups, random
// words generated in small batches that stay in L1 (never a materialised mask).
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../dropout.h"
#include "simd.h"

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

namespace {

// Philox groups per batch: 1024 elements' worth of words, 4 KiB on the stack.
constexpr int64_t kBatchGroups = 256;
// Groups per parallel task: big enough to amortise thread start-up.
constexpr int64_t kGrainGroups = 8192;

// The inner loops, picked once per process from what the CPU supports.
// FUSED_DROPOUT_DISABLE_AVX512=1 forces the portable ones (the tests check both).
struct InnerLoops {
  FillWordsFn fill_words = &fill_mask_words;
  ApplyFloatFn apply_float = nullptr;  // nullptr: the generic loop
  Apply2ByteFn apply_half = nullptr;
  Apply2ByteFn apply_bfloat16 = nullptr;
  Apply2ByteAddFn apply_half_add = nullptr;
  Apply2ByteAddFn apply_bfloat16_add = nullptr;

  // The vector loops of a 2-byte scalar_t (dropout, dropout_add), or nullptrs.
  template <typename scalar_t>
  std::pair<Apply2ByteFn, Apply2ByteAddFn> two_byte() const {
    if constexpr (std::is_same_v<scalar_t, c10::Half>) return {apply_half, apply_half_add};
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return {apply_bfloat16, apply_bfloat16_add};
    return {nullptr, nullptr};
  }

  static const InnerLoops& get() {
    static const InnerLoops loops = [] {
      InnerLoops picked;
#ifdef FUSED_DROPOUT_HAVE_AVX512
      const char* disable = std::getenv("FUSED_DROPOUT_DISABLE_AVX512");
      const bool disabled = disable != nullptr && std::string(disable) == "1";
      if (!disabled && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) {
        picked.fill_words = &fill_mask_words_avx512;
        picked.apply_float = &apply_float_avx512;
        picked.apply_half = &apply_half_avx512;
        picked.apply_bfloat16 = &apply_bfloat16_avx512;
        picked.apply_half_add = &apply_half_add_avx512;
        picked.apply_bfloat16_add = &apply_bfloat16_add_avx512;
      }
#endif
      return picked;
    }();
    return loops;
  }
};

struct RngState {
  uint64_t seed;
  uint64_t base;
};

// Row-major walk over a tensor's logical indices that tracks the memory offsets of N
// operands (input, output, ... and the mask index, whose "strides" are the mask layout's),
// for layouts that are not plain row-major (permuted, channels_last, sliced) or masks shared
// over some dims: the mask follows the logical index, whatever the memory order.
template <int N>
struct StridedWalk {
  int64_t ndim;
  const int64_t* sizes;
  std::array<const int64_t*, N> strides;
  std::array<int64_t, kMaxDims> index{};
  std::array<int64_t, N> offset{};

  void seek(int64_t linear) {
    offset.fill(0);
    for (int64_t d = ndim - 1; d >= 0; --d) {
      index[d] = linear % sizes[d];
      linear /= sizes[d];
      for (int k = 0; k < N; ++k) offset[k] += index[d] * strides[k][d];
    }
  }
  C10_ALWAYS_INLINE void next() {
    for (int64_t d = ndim - 1; d >= 0; --d) {
      for (int k = 0; k < N; ++k) offset[k] += strides[k][d];
      if (++index[d] < sizes[d]) return;
      for (int k = 0; k < N; ++k) offset[k] -= index[d] * strides[k][d];
      index[d] = 0;
    }
  }
};

// Operand order of the walks: input, output, mask index, and residual for dropout_add.
constexpr int kIn = 0, kOut = 1, kMask = 2, kRes = 3;

StridedWalk<4> operand_walk(const at::Tensor& input, const at::Tensor& output, const MaskLayout& layout,
                            const at::Tensor& residual) {
  const int64_t* res_strides = residual.defined() ? residual.strides().data() : input.strides().data();
  return {input.dim(), input.sizes().data(),
          {input.strides().data(), output.strides().data(), layout.strides.data(), res_strides}};
}

// A 2-byte type's elements as the raw bits the vector loops take.
template <typename scalar_t>
const uint16_t* as_bits(const scalar_t* p) {
  return reinterpret_cast<const uint16_t*>(p);
}
template <typename scalar_t>
uint16_t* as_bits(scalar_t* p) {
  return reinterpret_cast<uint16_t*>(p);
}

// Full mask: the mask index is the logical index, so random words come in batches. With
// kAdd it computes residual + dropout(input + bias) instead (bias optional, along the last
// dim); plain dropout passes undefined residual and bias.
template <typename scalar_t, bool kAdd>
void apply_full_mask(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
                     const MaskLayout& layout, RngState state, const OutputRule<scalar_t>& op) {
  const int64_t numel = input.numel();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* res = kAdd ? residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = kAdd && bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const bool row_major = input.is_contiguous() && output.is_contiguous() && (!kAdd || residual.is_contiguous());
  const int64_t last_dim = input.dim() - 1;  // where the bias runs
  const int64_t last_size = input.dim() > 0 ? input.size(-1) : 1;
  const int64_t groups = static_cast<int64_t>(counters_for(numel));
  const InnerLoops& loops = InnerLoops::get();
  at::parallel_for(0, groups, kGrainGroups, [&](int64_t group_begin, int64_t group_end) {
    alignas(64) uint32_t words[4 * kBatchGroups];
    StridedWalk<4> walk = operand_walk(input, output, layout, residual);
    if (!row_major) walk.seek(group_begin * 4);
    for (int64_t g = group_begin; g < group_end; g += kBatchGroups) {
      const int64_t batch = std::min(kBatchGroups, group_end - g);
      loops.fill_words(state.seed, state.base, static_cast<uint64_t>(g), batch, words);
      const int64_t first = g * 4;
      const int64_t count = std::min(batch * 4, numel - first);
      if (row_major && !kAdd) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (loops.apply_float != nullptr) {
            loops.apply_float(in + first, out + first, words, count, op);
            continue;
          }
        }
        if (const Apply2ByteFn apply = loops.two_byte<scalar_t>().first) {
          apply(as_bits(in + first), as_bits(out + first), words, count, op.keep, op.scale);
          continue;
        }
        for (int64_t i = 0; i < count; ++i) out[first + i] = op(in[first + i], words[i]);
      } else if (row_major) {
        int64_t column = first % last_size;
        if (const Apply2ByteAddFn apply = loops.two_byte<scalar_t>().second) {
          apply(as_bits(in + first), as_bits(res + first), as_bits(b), column, last_size, as_bits(out + first), words,
                count, op.keep, op.scale);
          continue;
        }
        for (int64_t i = 0; i < count; ++i) {
          scalar_t x = in[first + i];
          if (b != nullptr) x = OutputRule<scalar_t>::plus_bias(x, b[column]);
          out[first + i] = op.add_to(res[first + i], x, words[i]);
          if (++column == last_size) column = 0;
        }
      } else {
        for (int64_t i = 0; i < count; ++i) {
          if constexpr (kAdd) {
            scalar_t x = in[walk.offset[kIn]];
            if (b != nullptr) x = OutputRule<scalar_t>::plus_bias(x, b[walk.index[last_dim]]);
            out[walk.offset[kOut]] = op.add_to(res[walk.offset[kRes]], x, words[i]);
          } else {
            out[walk.offset[kOut]] = op(in[walk.offset[kIn]], words[i]);
          }
          walk.next();
        }
      }
    }
  });
}

// Mask shared over some dims: neighbouring elements mostly reuse one mask value (channel-
// wise dropout) or walk consecutive mask indices (dropout locked over time), so each task
// keeps the Philox group it computed last.
template <typename scalar_t>
void apply_shared_mask(const at::Tensor& input, at::Tensor& output, const MaskLayout& layout, RngState state,
                       const OutputRule<scalar_t>& op) {
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, input.numel(), kGrainGroups * 4, [&](int64_t begin, int64_t end) {
    StridedWalk<4> walk = operand_walk(input, output, layout, at::Tensor());
    walk.seek(begin);
    int64_t cached_group = -1;
    PhiloxWords words{};
    for (int64_t i = begin; i < end; ++i) {
      const int64_t mask_index = walk.offset[kMask];
      if ((mask_index >> 2) != cached_group) {
        cached_group = mask_index >> 2;
        words = mask_words(state.seed, state.base, static_cast<uint64_t>(cached_group));
      }
      out[walk.offset[kOut]] = op(in[walk.offset[kIn]], words.w[mask_index & 3]);
      walk.next();
    }
  });
}

void dispatch_apply(const at::Tensor& input, at::Tensor& output, const MaskLayout& layout, RngState state,
                    double p) {
  if (input.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout", [&] {
    const auto op = OutputRule<scalar_t>::for_p(p);
    if (layout.shared) {
      apply_shared_mask<scalar_t>(input, output, layout, state, op);
    } else {
      apply_full_mask<scalar_t, false>(input, at::Tensor(), at::Tensor(), output, layout, state, op);
    }
  });
}

RngState draw_state(const std::optional<int64_t>& seed, int64_t offset, const std::optional<at::Generator>& generator) {
  if (seed.has_value()) return {static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset)};
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  // A fresh 64-bit key per call; the mutex keeps concurrent callers from drawing the same one.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {gen->random64(), 0};
}

at::Tensor state_tensor(RngState state) {
  at::Tensor t = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  t.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(state.seed);
  t.mutable_data_ptr<int64_t>()[1] = static_cast<int64_t>(state.base);
  return t;
}

// A fresh output of tens of MiB is mapped by the OS on first write, one 4 KiB page fault at a
// time. That cost more than the kernel: 19 of 28 ms for a forward of 2^24 float32 elements on
// the 2-core machine. So the out-of-place ops ask for transparent huge pages on the 2 MiB-
// aligned part of a large output before writing it, which turns 512 faults into one. The
// hint covers only memory this op owns and is about to fill; where the kernel grants no
// huge pages (THP "never", or memory already mapped) nothing changes.
at::Tensor new_output(const at::Tensor& input) {
  at::Tensor output = empty_output_like(input);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const size_t bytes = output.storage().nbytes();
  if (bytes >= 8 * kHugePage) {
    const auto start = reinterpret_cast<uintptr_t>(output.storage().mutable_data());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return output;
}

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                               int64_t offset, std::optional<at::Generator> generator,
                                               at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout";
  const MaskLayout layout = check_dropout_call(kOp, input, p, seed, offset, generator, shared_dims, /*inplace=*/false);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  dispatch_apply(input, output, layout, state, p);
  return {output, state_tensor(state)};
}

at::Tensor dropout_inplace_cpu(at::Tensor& input, double p, std::optional<int64_t> seed, int64_t offset,
                               std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_";
  const MaskLayout layout = check_dropout_call(kOp, input, p, seed, offset, generator, shared_dims, /*inplace=*/true);
  const RngState state = draw_state(seed, offset, generator);
  dispatch_apply(input, input, layout, state, p);
  return state_tensor(state);
}

at::Tensor dropout_replay_cpu(const at::Tensor& input, const at::Tensor& rng_state, double p,
                              at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_replay";
  const MaskLayout layout = check_replay_call(kOp, input, rng_state, p, shared_dims);
  const at::Tensor s = rng_state.contiguous();
  const RngState state{static_cast<uint64_t>(s.const_data_ptr<int64_t>()[0]),
                       static_cast<uint64_t>(s.const_data_ptr<int64_t>()[1])};
  at::Tensor output = new_output(input);
  dispatch_apply(input, output, layout, state, p);
  return output;
}

std::tuple<at::Tensor, at::Tensor> dropout_add_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                   const std::optional<at::Tensor>& bias, double p,
                                                   std::optional<int64_t> seed, int64_t offset,
                                                   std::optional<at::Generator> generator) {
  constexpr const char* kOp = "fused_dropout::dropout_add";
  const MaskLayout layout = check_dropout_add_call(kOp, input, residual, bias, p, seed, offset, generator);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  const at::Tensor bias_contiguous = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (input.numel() == 0) return {output, state_tensor(state)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add", [&] {
    apply_full_mask<scalar_t, true>(input, residual, bias_contiguous, output, layout, state,
                                    OutputRule<scalar_t>::for_p(p));
  });
  return {output, state_tensor(state)};
}

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

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", &fused_dropout::dropout_cpu);
  m.impl("dropout_", &fused_dropout::dropout_inplace_cpu);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cpu);
  m.impl("dropout_add", &fused_dropout::dropout_add_cpu);
  m.impl("philox4x32_10", &fused_dropout::philox4x32_10_cpu);
}
