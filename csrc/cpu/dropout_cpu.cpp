// CPU kernels: one pass over memory, parallel over chunks of whole Philox groups, random
// words generated in small batches that stay in L1 (never a materialised mask).
#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
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

// The AVX-512 loops where the CPU has them (picked once per process), else none: the
// portable loops below. FUSED_DROPOUT_DISABLE_AVX512=1 forces the portable ones (the tests
// check both).
const Avx512Loops* simd_loops() {
  static const Avx512Loops* const loops = []() -> const Avx512Loops* {
#ifdef FUSED_DROPOUT_HAVE_AVX512
    const char* disable = std::getenv("FUSED_DROPOUT_DISABLE_AVX512");
    const bool disabled = disable != nullptr && std::string(disable) == "1";
    if (!disabled && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) return &avx512_loops();
#endif
    return nullptr;
  }();
  return loops;
}

void fill_words(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words) {
  const Avx512Loops* simd = simd_loops();
  (simd != nullptr ? simd->fill_words : &fill_mask_words)(seed, base, first_group, groups, words);
}

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

// A run of a 2-byte type as the raw bits the AVX-512 loops take.
template <typename scalar_t>
Run<uint16_t> as_bits(const Run<scalar_t>& run) {
  return {reinterpret_cast<const uint16_t*>(run.x),
          reinterpret_cast<const uint16_t*>(run.residual),
          reinterpret_cast<const uint16_t*>(run.bias),
          run.column,
          run.last_size,
          reinterpret_cast<uint16_t*>(run.y),
          run.words,
          run.count};
}

// One contiguous run (simd.h): the AVX-512 loops where the CPU has them (plain dropout and
// dropout_add), else a loop the compiler vectorises.
template <typename scalar_t, bool kPair, typename Rule>
void apply_run(const Run<scalar_t>& run, const Rule& rule) {
  const Avx512Loops* simd = std::is_same_v<Rule, OutputRule<scalar_t>> ? simd_loops() : nullptr;
  if constexpr (std::is_same_v<Rule, OutputRule<scalar_t>>) {
    if (simd != nullptr) {
      if constexpr (std::is_same_v<scalar_t, float> && !kPair) return simd->dropout_float(run, rule);
      if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
        const TwoByteLoops& loops = std::is_same_v<scalar_t, c10::Half> ? simd->half : simd->bfloat16;
        return (kPair ? loops.dropout_add : loops.dropout)(as_bits(run),
                                                           MaskedScale<float, float>{rule.keep, rule.scale});
      }
    }
  }
  // One row segment at a time, so the bias index is the loop index plus a constant and the
  // loop vectorises.
  const int64_t row_size = run.bias != nullptr ? run.last_size : run.count;
  for (int64_t i = 0, column = run.bias != nullptr ? run.column : 0; i < run.count; column = 0) {
    const int64_t n = std::min(run.count - i, row_size - column);
    const scalar_t* x = run.x + i;
    scalar_t* y = run.y + i;
    const uint32_t* words = run.words + i;
    if (run.bias == nullptr) {
      if constexpr (kPair) {
        for (int64_t j = 0; j < n; ++j) y[j] = rule.combine(run.residual[i + j], x[j], words[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) y[j] = rule(x[j], words[j]);
      }
    } else {
      const scalar_t* bias = run.bias + column;
      if constexpr (kPair) {
        for (int64_t j = 0; j < n; ++j) y[j] = rule.combine(run.residual[i + j], plus_bias(x[j], bias[j]), words[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) y[j] = rule(plus_bias(x[j], bias[j]), words[j]);
      }
    }
    i += n;
  }
}

// The operands of one call: plain dropout reads `in`; the two-operand rules also `res`
// (dropout_add's residual, act_dropout_backward's gradient), and `bias` where given.
template <typename scalar_t>
struct CpuOperands {
  const scalar_t* in;
  const scalar_t* res;
  const scalar_t* bias;
  scalar_t* out;
  int64_t last_size;

  CpuOperands(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias_tensor, at::Tensor& output)
      : in(input.const_data_ptr<scalar_t>()),
        res(residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr),
        bias(bias_tensor.defined() ? bias_tensor.const_data_ptr<scalar_t>() : nullptr),
        out(output.mutable_data_ptr<scalar_t>()),
        last_size(input.dim() > 0 ? input.size(-1) : 1) {}
};

// The row-major elements [first, first + count) of the operands (first a multiple of 4): the
// random words in batches of whole Philox groups, each batch one contiguous run.
template <typename scalar_t, bool kPair, typename Rule>
void apply_row_major_range(const CpuOperands<scalar_t>& ops, int64_t first, int64_t count, RngState state,
                           const Rule& rule) {
  alignas(64) uint32_t words[4 * kBatchGroups];
  for (int64_t done = 0; done < count; done += 4 * kBatchGroups) {
    const int64_t at = first + done;
    const int64_t n = std::min(4 * kBatchGroups, count - done);
    fill_words(state.seed, state.base, static_cast<uint64_t>(at / 4), (n + 3) / 4, words);
    apply_run<scalar_t, kPair>({ops.in + at, kPair ? ops.res + at : nullptr, ops.bias, at % ops.last_size,
                                ops.last_size, ops.out + at, words, n},
                               rule);
  }
}

// Row-major operands and a full mask: the mask index is the memory index, so the work splits
// into ranges of whole Philox groups.
template <typename scalar_t, bool kPair, typename Rule>
void apply_row_major(const CpuOperands<scalar_t>& ops, int64_t numel, RngState state, const Rule& rule) {
  const int64_t groups = static_cast<int64_t>(counters_for(numel));
  at::parallel_for(0, groups, kGrainGroups, [&](int64_t group_begin, int64_t group_end) {
    apply_row_major_range<scalar_t, kPair>(ops, group_begin * 4, std::min(group_end * 4, numel) - group_begin * 4,
                                           state, rule);
  });
}

constexpr int64_t kChunk = 4 * kBatchGroups;  // elements of a strided run handled at once

// The random words of `count` mask indices from `first_index` on, `step` apart: whole Philox
// groups for consecutive indices, one value for a run that shares it (step 0), else one
// group per index, kept while the index stays in it. Returns where the count words start.
const uint32_t* draw_run_words(RngState state, int64_t first_index, int64_t step, int64_t count,
                               uint32_t (&group_words)[4 * (kBatchGroups + 1)], uint32_t (&words)[kChunk]) {
  if (step == 1) {
    const int64_t first_group = first_index >> 2;
    fill_words(state.seed, state.base, static_cast<uint64_t>(first_group),
               ((first_index + count - 1) >> 2) - first_group + 1, group_words);
    return group_words + (first_index & 3);
  }
  CachedGroup cache;
  if (step == 0) {
    std::fill_n(words, count, cache.word(state.seed, state.base, first_index));
  } else {
    for (int64_t i = 0; i < count; ++i) words[i] = cache.word(state.seed, state.base, first_index + i * step);
  }
  return words;
}

// Any other layout (permuted, channels_last, sliced) or a mask shared over some dims. The
// steps: the dims are merged (layout.h); the work is split into chunks of up to kChunk
// elements of the inner runs; each chunk's words are drawn; the output rule runs on the
// chunk in place where it is contiguous, or on a gathered copy that is then scattered back,
// so that strided runs take the vector loops too.
template <typename scalar_t, bool kPair, typename Rule>
void apply_by_runs(const CpuOperands<scalar_t>& ops, const MergedLayout& layout, int64_t numel, RngState state,
                   const Rule& rule) {
  const int64_t inner = layout.inner();
  const int64_t chunks_per_row = (inner + kChunk - 1) / kChunk;
  const int64_t in_step = layout.inner_stride(kIn), out_step = layout.inner_stride(kOut);
  const int64_t mask_step = layout.inner_stride(kMask), res_step = layout.inner_stride(kRes);
  const int64_t grain = std::max<int64_t>(1, kGrainGroups * 4 / std::min(inner, kChunk));
  at::parallel_for(0, numel / inner * chunks_per_row, grain, [&](int64_t unit_begin, int64_t unit_end) {
    alignas(64) uint32_t group_words[4 * (kBatchGroups + 1)];
    alignas(64) uint32_t words[kChunk];
    alignas(64) scalar_t x_run[kChunk], res_run[kPair ? kChunk : 1], y_run[kChunk];
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
      const uint32_t* run_words =
          draw_run_words(state, walk.offset[kMask] + start * mask_step, mask_step, count, group_words, words);
      const scalar_t* x = ops.in + walk.offset[kIn] + start * in_step;
      int64_t x_step = in_step;
      if (!Rule::kDroppedReadsInput && mask_step == 0 && !rule.keeps(run_words[0])) {
        // The run shares one dropped mask value and the rule's dropped value does not depend
        // on the input: read zeros instead (a dropped sample costs no read of its branch).
        std::fill_n(x_run, count, scalar_t(0));
        x = x_run;
        x_step = 1;
      }
      const scalar_t* r = kPair ? ops.res + walk.offset[kRes] + start * res_step : nullptr;
      scalar_t* y = ops.out + walk.offset[kOut] + start * out_step;
      const int64_t column = (row * inner + start) % ops.last_size;  // the logical index's place in the last dim
      if (x_step == 1 && out_step == 1 && (!kPair || res_step == 1)) {
        apply_run<scalar_t, kPair>({x, r, ops.bias, column, ops.last_size, y, run_words, count}, rule);
        continue;
      }
      if (x != x_run) {
        for (int64_t i = 0; i < count; ++i) x_run[i] = x[i * x_step];
      }
      if constexpr (kPair) {
        for (int64_t i = 0; i < count; ++i) res_run[i] = r[i * res_step];
      }
      apply_run<scalar_t, kPair>({x_run, res_run, ops.bias, column, ops.last_size, y_run, run_words, count}, rule);
      for (int64_t i = 0; i < count; ++i) y[i * out_step] = y_run[i];
    }
  });
}

// The walk for every op: batches over the memory where every operand is row-major and the
// mask is full, else the merged runs. `residual` is the second operand of the two-operand
// rules (dropout_add's residual, act_dropout_backward's gradient) and undefined for the others,
// `bias` where the op has none.
template <typename scalar_t, bool kPair, typename Rule>
void apply(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& bias, at::Tensor& output,
           const MaskLayout& mask, RngState state, const Rule& rule) {
  if (input.numel() == 0) return;
  const CpuOperands<scalar_t> ops(input, residual, bias, output);
  if (!mask.shared && input.is_contiguous() && output.is_contiguous() && (!kPair || residual.is_contiguous())) {
    apply_row_major<scalar_t, kPair>(ops, input.numel(), state, rule);
  } else {
    apply_by_runs<scalar_t, kPair>(ops, merged_layout(input, output, mask, residual), input.numel(), state, rule);
  }
}

// output = rule(input + bias) for the rule `spec` names (bias may be undefined).
void dispatch_apply(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, const MaskLayout& layout,
                    RngState state, double p, const RuleSpec& spec = {}) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout", [&] {
    visit_rule<scalar_t>(spec, p, [&](const auto& rule) {
      apply<scalar_t, false>(input, at::Tensor(), bias, output, layout, state, rule);
    });
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

at::Tensor new_output(const at::Tensor& input) {
  at::Tensor output = empty_output_like(input);
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

// A random op with dropout's signature: dropout, or alpha dropout (the rule `spec` names).
std::tuple<at::Tensor, at::Tensor> random_op_cpu(const char* op, const RuleSpec& spec, const at::Tensor& input,
                                                 double p, std::optional<int64_t> seed, int64_t offset,
                                                 std::optional<at::Generator> generator, at::IntArrayRef shared_dims) {
  const MaskLayout layout = check_dropout_call(op, input, p, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, state, p, spec);
  return {output, state_tensor(state)};
}

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                               int64_t offset, std::optional<at::Generator> generator,
                                               at::IntArrayRef shared_dims) {
  return random_op_cpu("fused_dropout::dropout", {}, input, p, seed, offset, std::move(generator), shared_dims);
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
                              at::IntArrayRef shared_dims, std::optional<double> scale) {
  constexpr const char* kOp = "fused_dropout::dropout_replay";
  const MaskLayout layout = check_replay_call(kOp, input, rng_state, p, shared_dims, /*inplace=*/false);
  at::Tensor output = new_output(input);
  dispatch_apply(input, at::Tensor(), output, layout, read_state(rng_state), p, RuleSpec{{}, {}, scale});
  return output;
}

at::Tensor& dropout_replay_inplace_cpu(at::Tensor& input, const at::Tensor& rng_state, double p,
                                       at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_replay_";
  const MaskLayout layout = check_replay_call(kOp, input, rng_state, p, shared_dims, /*inplace=*/true);
  dispatch_apply(input, at::Tensor(), input, layout, read_state(rng_state), p);
  return input;
}

std::tuple<at::Tensor, at::Tensor> alpha_dropout_cpu(const at::Tensor& input, double p, std::optional<int64_t> seed,
                                                     int64_t offset, std::optional<at::Generator> generator,
                                                     at::IntArrayRef shared_dims) {
  return random_op_cpu("fused_dropout::alpha_dropout", RuleSpec{RuleSpec::Form::kAlpha}, input, p, seed, offset,
                       std::move(generator), shared_dims);
}

// Elements per block of the cache-blocked activation path below, before rounding to whole
// rows: small enough that a block's operands stay in L2, large enough that ATen's per-call
// cost is a few percent of the block's.
constexpr int64_t kActivationBlock = int64_t{1} << 16;

bool runs_activation_through_aten(Activation act) {
  return act == Activation::kGelu || act == Activation::kGeluTanh || act == Activation::kSiLU;
}

// erf, tanh and exp one element at a time cost several times a pass over memory on the CPU,
// so gelu, gelu_tanh and silu run through ATen's vectorised kernels. To keep one pass over
// memory, the work goes one block of whole rows (of the last dim, where the bias runs) at a
// time: ATen's bias add and activation (or its backward) on the block, then the mask rule on
// the block while it is still in cache. A block is a whole number of rows and of Philox
// groups. `block(first_row, rows, scratch)` does one block; with `with_scratch`, scratch is a
// block-sized buffer of the input's dtype for it to use (else undefined).
template <typename Block>
void for_each_activation_block(const at::Tensor& input, bool with_scratch, Block&& block) {
  const int64_t row_size = input.dim() > 0 ? input.size(-1) : 1, rows = input.numel() / row_size;
  const int64_t rows_per_group_step = 4 / std::gcd(row_size, int64_t{4});  // rows that fill whole groups
  const int64_t rows_per_block =
      std::max<int64_t>(1, kActivationBlock / row_size / rows_per_group_step) * rows_per_group_step;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    // The ATen calls below are this kernel's own steps, so they run below autograd, as the
    // calling thread does; a worker thread does not inherit that from it.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor scratch = with_scratch ? at::empty({rows_per_block, row_size},
                                                  input.options().memory_format(at::MemoryFormat::Contiguous))
                                      : at::Tensor();
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t first_row = b * rows_per_block;
      block(first_row, std::min(rows_per_block, rows - first_row), scratch);
    }
  });
}

// ATen's activation: out = act(in); `out` may be `in`.
void aten_activation(const at::Tensor& in, at::Tensor& out, Activation act) {
  if (act == Activation::kSiLU) {
    at::silu_out(out, in);
  } else {
    at::gelu_out(out, in, act == Activation::kGelu ? "none" : "tanh");
  }
}

// ATen's activation backward at `pre`: grad_in = act'(pre) * grad_in, in place.
void aten_activation_backward(at::Tensor& grad_in, const at::Tensor& pre, Activation act) {
  if (act == Activation::kSiLU) {
    at::silu_backward_out(grad_in, grad_in, pre);
  } else {
    at::gelu_backward_out(grad_in, grad_in, pre, act == Activation::kGelu ? "none" : "tanh");
  }
}

// The call's mask rule over a block of its row-major elements from `first` on (a whole
// Philox group), `in` into `out` (which may be `in`): the mask of a call whose state starts
// first / 4 groups later.
void mask_block(const at::Tensor& in, at::Tensor& out, RngState state, double p, int64_t first) {
  MaskLayout full;
  full.numel = in.numel();
  dispatch_apply(in, at::Tensor(), out, full, {state.seed, state.base + static_cast<uint64_t>(first / 4)}, p);
}

// act_dropout's forward through ATen's activation, block by block (row-major input, full mask).
void act_dropout_by_blocks(const at::Tensor& input, const at::Tensor& bias, at::Tensor& output, RngState state,
                           double p, Activation act) {
  const int64_t row_size = input.dim() > 0 ? input.size(-1) : 1;
  const at::Tensor rows_in = input.view({-1, row_size});
  at::Tensor rows_out = output.view({-1, row_size});
  for_each_activation_block(input, /*with_scratch=*/false, [&](int64_t first_row, int64_t count, at::Tensor&) {
    at::Tensor out_block = rows_out.narrow(0, first_row, count);
    const at::Tensor in_block = rows_in.narrow(0, first_row, count);
    if (bias.defined()) {
      at::add_out(out_block, in_block, bias);
      aten_activation(out_block, out_block, act);
    } else {
      aten_activation(in_block, out_block, act);
    }
    mask_block(out_block, out_block, state, p, first_row * row_size);
  });
}

// act_dropout's backward through ATen's activation backward, block by block (row-major
// operands, full mask): the gradient through the mask into the block, then act' at
// input + bias (made in the scratch block where there is a bias).
void act_dropout_backward_by_blocks(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& bias,
                                    at::Tensor& grad_input, RngState state, double p, Activation act) {
  const int64_t row_size = input.dim() > 0 ? input.size(-1) : 1;
  const at::Tensor rows_in = input.view({-1, row_size});
  const at::Tensor rows_grad = grad.view({-1, row_size});
  at::Tensor rows_grad_in = grad_input.view({-1, row_size});
  for_each_activation_block(input, bias.defined(), [&](int64_t first_row, int64_t count, at::Tensor& scratch) {
    at::Tensor grad_in_block = rows_grad_in.narrow(0, first_row, count);
    mask_block(rows_grad.narrow(0, first_row, count), grad_in_block, state, p, first_row * row_size);
    at::Tensor pre = rows_in.narrow(0, first_row, count);
    if (bias.defined()) {
      at::Tensor sum = scratch.narrow(0, 0, count);
      at::add_out(sum, pre, bias);
      pre = sum;
    }
    aten_activation_backward(grad_in_block, pre, act);
  });
}

std::tuple<at::Tensor, at::Tensor> act_dropout_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                                   double p, c10::string_view activation, std::optional<int64_t> seed,
                                                   int64_t offset, std::optional<at::Generator> generator,
                                                   at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::act_dropout";
  const auto [layout, act] =
      check_act_dropout_call(kOp, input, bias, p, activation, seed, offset, generator, shared_dims);
  const RngState state = draw_state(seed, offset, generator);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  if (runs_activation_through_aten(act)) {
    if (!layout.shared && input.is_contiguous()) {
      at::Tensor output = new_output(input);
      if (input.numel() > 0) act_dropout_by_blocks(input, bias_contiguous, output, state, p, act);
      return {output, state_tensor(state)};
    }
    // Any other layout: ATen's activation into the output, then the mask rule over it in place.
    const at::Tensor pre = bias_contiguous.defined() ? at::add(input, bias_contiguous) : input;
    at::Tensor output = empty_output_like(input);
    aten_activation(pre, output, act);
    dispatch_apply(output, at::Tensor(), output, layout, state, p);
    return {output, state_tensor(state)};
  }
  at::Tensor output = new_output(input);
  dispatch_apply(input, bias_contiguous, output, layout, state, p, RuleSpec{RuleSpec::Form::kAct, act});
  return {output, state_tensor(state)};
}

at::Tensor act_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& rng_state, double p,
                                    c10::string_view activation, at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::act_dropout_backward";
  const auto [layout, act] =
      check_act_dropout_backward_call(kOp, grad, input, bias, rng_state, p, activation, shared_dims);
  const RngState state = read_state(rng_state);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  at::Tensor grad_input = new_output(input);
  if (input.numel() == 0) return grad_input;
  if (runs_activation_through_aten(act)) {
    if (!layout.shared && input.is_contiguous() && grad.is_contiguous()) {
      act_dropout_backward_by_blocks(grad, input, bias_contiguous, grad_input, state, p, act);
    } else {
      // Any other layout: the replayed gradient, then ATen's activation backward over it.
      dispatch_apply(grad, at::Tensor(), grad_input, layout, state, p);
      aten_activation_backward(grad_input, bias_contiguous.defined() ? at::add(input, bias_contiguous) : input, act);
    }
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "act_dropout_backward", [&] {
    visit_act_grad_rule<scalar_t>(act, p, [&](const auto& rule) {
      apply<scalar_t, true>(input, grad, bias_contiguous, grad_input, layout, state, rule);
    });
  });
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> dropout_add_cpu(const at::Tensor& input, const at::Tensor& residual,
                                                   const std::optional<at::Tensor>& bias, double p,
                                                   std::optional<int64_t> seed, int64_t offset,
                                                   std::optional<at::Generator> generator,
                                                   at::IntArrayRef shared_dims) {
  constexpr const char* kOp = "fused_dropout::dropout_add";
  const MaskLayout layout = check_dropout_add_call(kOp, input, residual, bias, p, seed, offset, generator, shared_dims);
  if (residual.scalar_type() != input.scalar_type()) {
    return dropout_add_promoted(input, residual, bias, p, seed, offset, std::move(generator), shared_dims);
  }
  const RngState state = draw_state(seed, offset, generator);
  at::Tensor output = new_output(input);
  const at::Tensor bias_contiguous = contiguous_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_dropout_add", [&] {
    apply<scalar_t, true>(input, residual, bias_contiguous, output, layout, state, OutputRule<scalar_t>::for_p(p));
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

const char* cpu_loops_name() { return simd_loops() != nullptr ? "avx512" : "portable"; }

}  // namespace fused_dropout

TORCH_LIBRARY_IMPL(fused_dropout, CPU, m) {
  m.impl("dropout", &fused_dropout::dropout_cpu);
  m.impl("dropout_state", &fused_dropout::dropout_state_cpu);
  m.impl("dropout_replay", &fused_dropout::dropout_replay_cpu);
  m.impl("dropout_replay_", &fused_dropout::dropout_replay_inplace_cpu);
  m.impl("dropout_add", &fused_dropout::dropout_add_cpu);
  m.impl("alpha_dropout", &fused_dropout::alpha_dropout_cpu);
  m.impl("act_dropout", &fused_dropout::act_dropout_cpu);
  m.impl("act_dropout_backward", &fused_dropout::act_dropout_backward_cpu);
  m.impl("philox4x32_10", &fused_dropout::philox4x32_10_cpu);
}
