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

// Row-major walk over the outer dims of a merged layout (all but the inner run), tracking
// each operand's offset.
struct RowWalk {
  const MergedLayout& layout;
  std::array<int64_t, kMaxDims> index{};
  std::array<int64_t, kOperands> offset{};

  void seek(int64_t row) {
    offset.fill(0);
    for (int64_t d = layout.ndim - 2; d >= 0; --d) {
      index[d] = row % layout.sizes[d];
      row /= layout.sizes[d];
      for (int k = 0; k < kOperands; ++k) offset[k] += index[d] * layout.strides[k][d];
    }
  }
  void next() {
    for (int64_t d = layout.ndim - 2; d >= 0; --d) {
      for (int k = 0; k < kOperands; ++k) offset[k] += layout.strides[k][d];
      if (++index[d] < layout.sizes[d]) return;
      for (int k = 0; k < kOperands; ++k) offset[k] -= index[d] * layout.strides[k][d];
      index[d] = 0;
    }
  }
};

// A 2-byte type's elements as the raw bits the vector loops take.
template <typename scalar_t>
const uint16_t* as_bits(const scalar_t* p) {
  return reinterpret_cast<const uint16_t*>(p);
}
template <typename scalar_t>
uint16_t* as_bits(scalar_t* p) {
  return reinterpret_cast<uint16_t*>(p);
}

// Contiguous operands: out[i] = rule(in[i], words[i]) for i in [0, count), or with kAdd
// res[i] + rule(in[i] + bias[column of i], words[i]), where column is element 0's index in
// the last dim. The AVX-512 loops where the CPU has them, else a loop the compiler vectorises.
template <typename scalar_t, bool kAdd>
void apply_run(const scalar_t* in, const scalar_t* res, const scalar_t* bias, int64_t column, int64_t last_size,
               scalar_t* out, const uint32_t* words, int64_t count, const OutputRule<scalar_t>& op) {
  const InnerLoops& loops = InnerLoops::get();
  if constexpr (!kAdd) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (loops.apply_float != nullptr) return loops.apply_float(in, out, words, count, op);
    }
    if (const Apply2ByteFn apply = loops.two_byte<scalar_t>().first) {
      return apply(as_bits(in), as_bits(out), words, count, op.keep, op.scale);
    }
    for (int64_t i = 0; i < count; ++i) out[i] = op(in[i], words[i]);
  } else {
    if (const Apply2ByteAddFn apply = loops.two_byte<scalar_t>().second) {
      return apply(as_bits(in), as_bits(res), as_bits(bias), column, last_size, as_bits(out), words, count, op.keep,
                   op.scale);
    }
    for (int64_t i = 0; i < count; ++i) {
      scalar_t x = in[i];
      if (bias != nullptr) x = OutputRule<scalar_t>::plus_bias(x, bias[column]);
      out[i] = op.add_to(res[i], x, words[i]);
      if (++column == last_size) column = 0;
    }
  }
}

// Row-major operands and a full mask: the mask index is the memory index, so the random
// words come in batches of whole Philox groups and every batch is one contiguous run.
template <typename scalar_t, bool kAdd>
void apply_row_major(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
                     RngState state, const OutputRule<scalar_t>& op) {
  const int64_t numel = input.numel();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* res = kAdd ? residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = kAdd && bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t last_size = input.dim() > 0 ? input.size(-1) : 1;  // where the bias runs
  const int64_t groups = static_cast<int64_t>(counters_for(numel));
  const InnerLoops& loops = InnerLoops::get();
  at::parallel_for(0, groups, kGrainGroups, [&](int64_t group_begin, int64_t group_end) {
    alignas(64) uint32_t words[4 * kBatchGroups];
    for (int64_t g = group_begin; g < group_end; g += kBatchGroups) {
      const int64_t batch = std::min(kBatchGroups, group_end - g);
      loops.fill_words(state.seed, state.base, static_cast<uint64_t>(g), batch, words);
      const int64_t first = g * 4;
      apply_run<scalar_t, kAdd>(in + first, kAdd ? res + first : nullptr, b, first % last_size, last_size,
                                out + first, words, std::min(batch * 4, numel - first), op);
    }
  });
}

// Any other layout (permuted, channels_last, sliced) or a mask shared over some dims, in the
// merged layout's inner runs, a chunk of up to kChunk elements at a time: first the chunk's
// random words (one value for a run that shares it, whole Philox groups for consecutive mask
// indices, else one group per element, kept while the index stays in it), then the output
// rule in the contiguous loops, on the run itself or on a gathered copy of a strided run.
template <typename scalar_t, bool kAdd>
void apply_by_runs(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
                   const MaskLayout& mask, RngState state, const OutputRule<scalar_t>& op) {
  constexpr int64_t kChunk = 4 * kBatchGroups;
  const MergedLayout layout = merged_layout(input, output, mask, residual);
  const int64_t inner = layout.inner();
  const int64_t chunks_per_row = (inner + kChunk - 1) / kChunk;
  const int64_t rows = input.numel() / inner;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* res = kAdd ? residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = kAdd && bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t last_size = input.dim() > 0 ? input.size(-1) : 1;
  const int64_t in_step = layout.inner_stride(kIn), out_step = layout.inner_stride(kOut);
  const int64_t mask_step = layout.inner_stride(kMask), res_step = layout.inner_stride(kRes);
  const bool contiguous_run = in_step == 1 && out_step == 1 && (!kAdd || res_step == 1);
  const InnerLoops& loops = InnerLoops::get();
  const int64_t grain = std::max<int64_t>(1, kGrainGroups * 4 / std::min(inner, kChunk));
  at::parallel_for(0, rows * chunks_per_row, grain, [&](int64_t unit_begin, int64_t unit_end) {
    alignas(64) uint32_t group_words[4 * (kBatchGroups + 1)];
    alignas(64) uint32_t words[kChunk];
    alignas(64) scalar_t x_run[kChunk], res_run[kAdd ? kChunk : 1], y_run[kChunk];
    RowWalk walk{layout};
    int64_t row = unit_begin / chunks_per_row;
    walk.seek(row);
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      if (unit / chunks_per_row != row) {
        row = unit / chunks_per_row;
        walk.next();
      }
      const int64_t start = (unit % chunks_per_row) * kChunk;
      const int64_t count = std::min(kChunk, inner - start);
      const int64_t first_mask = walk.offset[kMask] + start * mask_step;
      const uint32_t* run_words = words;
      if (mask_step == 1) {  // a full mask: consecutive indices, whole groups in one batch
        const int64_t first_group = first_mask >> 2;
        loops.fill_words(state.seed, state.base, static_cast<uint64_t>(first_group),
                         ((first_mask + count - 1) >> 2) - first_group + 1, group_words);
        run_words = group_words + (first_mask & 3);
      } else if (mask_step == 0) {  // shared along the run
        std::fill_n(words, count, mask_words(state.seed, state.base, first_mask >> 2).w[first_mask & 3]);
      } else {
        int64_t cached_group = -1;
        PhiloxWords w{};
        for (int64_t i = 0; i < count; ++i) {
          const int64_t index = first_mask + i * mask_step;
          if ((index >> 2) != cached_group) {
            cached_group = index >> 2;
            w = mask_words(state.seed, state.base, static_cast<uint64_t>(cached_group));
          }
          words[i] = w.w[index & 3];
        }
      }
      const scalar_t* x = in + walk.offset[kIn] + start * in_step;
      const scalar_t* r = kAdd ? res + walk.offset[kRes] + start * res_step : nullptr;
      scalar_t* y = out + walk.offset[kOut] + start * out_step;
      int64_t column = (row * inner + start) % last_size;  // the logical index's place in the last dim
      if (contiguous_run) {
        apply_run<scalar_t, kAdd>(x, r, b, column, last_size, y, run_words, count, op);
        continue;
      }
      // A strided run is gathered into contiguous buffers, so that it too takes the vector
      // loops (the 2-byte conversions above all), and the result is scattered back.
      for (int64_t i = 0; i < count; ++i) x_run[i] = x[i * in_step];
      if constexpr (kAdd) {
        for (int64_t i = 0; i < count; ++i) res_run[i] = r[i * res_step];
      }
      apply_run<scalar_t, kAdd>(x_run, res_run, b, column, last_size, y_run, run_words, count, op);
      for (int64_t i = 0; i < count; ++i) y[i * out_step] = y_run[i];
    }
  });
}

// The walk for both ops: batches over the memory where every operand is row-major and the
// mask is full, else the merged runs. `residual` and `bias` are undefined for plain dropout.
template <typename scalar_t, bool kAdd>
void apply(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
           const MaskLayout& mask, RngState state, double p) {
  if (input.numel() == 0) return;
  const auto op = OutputRule<scalar_t>::for_p(p);
  if (!mask.shared && input.is_contiguous() && output.is_contiguous() && (!kAdd || residual.is_contiguous())) {
    apply_row_major<scalar_t, kAdd>(input, residual, bias, output, state, op);
  } else {
    apply_by_runs<scalar_t, kAdd>(input, residual, bias, output, mask, state, op);
  }
}

void dispatch_apply(const at::Tensor& input, at::Tensor& output, const MaskLayout& layout, RngState state,
                    double p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout", [&] {
    apply<scalar_t, false>(input, at::Tensor(), at::Tensor(), output, layout, state, p);
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
  const MaskLayout layout = check_dropout_call(kOp, input, p, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  dispatch_apply(input, output, layout, state, p);
  return {output, state_tensor(state)};
}

at::Tensor dropout_state_cpu(const at::Tensor& input, std::optional<int64_t> seed, int64_t offset,
                             std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  check_state_call("fused_dropout::dropout_state", input, seed, offset, generator, shared_dims);
  return state_tensor(draw_state(seed, offset, generator));
}

RngState read_state(const at::Tensor& rng_state) {
  const at::Tensor s = rng_state.contiguous();
  return {static_cast<uint64_t>(s.const_data_ptr<int64_t>()[0]), static_cast<uint64_t>(s.const_data_ptr<int64_t>()[1])};
}

at::Tensor dropout_replay_cpu(const at::Tensor& input, const at::Tensor& rng_state, double p,
                              at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_replay";
  const MaskLayout layout = check_replay_call(kOp, input, rng_state, p, shared_dims, /*inplace=*/false);
  at::Tensor output = new_output(input);
  dispatch_apply(input, output, layout, read_state(rng_state), p);
  return output;
}

at::Tensor& dropout_replay_inplace_cpu(at::Tensor& input, const at::Tensor& rng_state, double p,
                                       at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_replay_";
  const MaskLayout layout = check_replay_call(kOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  dispatch_apply(input, input, layout, read_state(rng_state), p);
  return input;
}

std::tuple<at::Tensor, at::Tensor> dropout_add_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                   const std::optional<at::Tensor>& bias, double p,
                                                   std::optional<int64_t> seed, int64_t offset,
                                                   std::optional<at::Generator> generator,
                                                   at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_add";
  const MaskLayout layout = check_dropout_add_call(kOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  const at::Tensor bias_contiguous = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add", [&] {
    apply<scalar_t, true>(input, residual, bias_contiguous, output, layout, state, p);
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
  m.impl("dropout_state", &fused_dropout::dropout_state_cpu);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cpu);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_cpu);
  m.impl("dropout_add", &fused_dropout::dropout_add_cpu);
  m.impl("philox4x32_10", &fused_dropout::philox4x32_10_cpu);
}
