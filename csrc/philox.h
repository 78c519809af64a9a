// Philox4x32-10, the dropout mask rule and the output rule, shared by the CPU and CUDA
// kernels. Free of ATen (c10's macros and 2-byte types only), so that the CPU's AVX-512
// file and the CUDA kernels' host test can include it alone.
//
// The contract (README, "The mask rule"): for random state (seed, base) and drop
// probability p, the element with logical row-major index i of the mask shape is kept iff
//
//   r(i) = word (i mod 4) of Philox4x32-10(counter = (lo32(base + i/4), hi32(base + i/4), 0, 0),
//                                          key     = (lo32(seed), hi32(seed)))
//   r(i) < t,  t = round((1 - p) * 2^32)
//
// so the mask depends on nothing but (seed, base, i, p): not on the device, grid, vector
// width, dtype or memory layout.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/macros/Macros.h>

namespace fused_dropout {

struct PhiloxWords {
  uint32_t w[4];
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
}  // namespace philox_detail

// How one lane word is multiplied: the only operation of a Philox round that differs
// between a scalar and a SIMD word (the others are ^ and +, which both support). The CPU
// kernel's AVX-512 policy (cpu/simd_avx512.cpp) runs the same rounds on 16 lanes.
struct ScalarLanes {
  using word = uint32_t;
  C10_HOST_DEVICE C10_ALWAYS_INLINE static void mul_hi_lo(uint32_t m, uint32_t a, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    hi = __umulhi(m, a);
    lo = m * a;
#else
    const uint64_t product = static_cast<uint64_t>(m) * a;
    hi = static_cast<uint32_t>(product >> 32);
    lo = static_cast<uint32_t>(product);
#endif
  }
};

// The ten rounds of the standard Random123 Philox4x32-10, in place on the counter words.
template <typename Lanes, typename Word = typename Lanes::word>
C10_HOST_DEVICE C10_ALWAYS_INLINE void philox4x32_10_rounds(Word& c0, Word& c1, Word& c2, Word& c3, uint32_t k0,
                                                            uint32_t k1) {
  using namespace philox_detail;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    Word hi0, lo0, hi1, lo1;
    Lanes::mul_hi_lo(kMul0, c0, hi0, lo0);
    Lanes::mul_hi_lo(kMul1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
  }
}

// Philox4x32-10 of one full 128-bit counter.
C10_HOST_DEVICE C10_ALWAYS_INLINE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                            uint32_t k0, uint32_t k1) {
  philox4x32_10_rounds<ScalarLanes>(c0, c1, c2, c3, k0, k1);
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The four random words of elements 4*group .. 4*group+3 of a call with state (seed, base).
// Counter arithmetic wraps modulo 2^64, as the rule's unsigned 64-bit integers do.
C10_HOST_DEVICE C10_ALWAYS_INLINE PhiloxWords mask_words(uint64_t seed, uint64_t base, uint64_t group) {
  const uint64_t counter = base + group;
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// t = round((1 - p) * 2^32) lies in [0, 2^32]: p = 0 must keep every word (t = 2^32) and
// p = 1 must keep none (t = 0), so t needs 33 bits.
inline uint64_t keep_threshold(double p_drop) {
  return static_cast<uint64_t>(std::nearbyint((1.0 - p_drop) * 4294967296.0));
}

// keep(r) = r < t, evaluated in 32-bit arithmetic: r < t  <=>  t > 0 and r <= t - 1. Kernels
// use this form because 32-bit compares vectorise everywhere and 64-bit ones do not.
struct KeepRule {
  uint32_t max_kept_word;
  uint32_t keeps_any;  // 1 unless t = 0 (p = 1)

  static KeepRule for_p(double p_drop) {
    const uint64_t t = keep_threshold(p_drop);
    return KeepRule{t == 0 ? 0u : static_cast<uint32_t>(t - 1), t != 0 ? 1u : 0u};
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool operator()(uint32_t word) const {
    return (keeps_any & static_cast<uint32_t>(word <= max_kept_word)) != 0;
  }
};

// The accumulation type torch uses for a tensor dtype (its opmath type): float for
// float16, bfloat16 and float32, double for float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The output rule of plain dropout: a kept element is cast(acc(x) * scale), a dropped one
// is exactly +0.0, also when x is NaN or inf. The select is done on the bits (AND with an
// all-ones or all-zeros mask) rather than with a branch, so the CPU loops vectorise.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct MaskedScale {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  KeepRule keep;
  acc_t scale;

  // A dropped element's output does not depend on its input, so a kernel need not read it.
  static constexpr bool kDroppedReadsInput = false;
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool keeps(uint32_t word) const { return keep(word); }

  // scale = 1 / (1 - p), computed in double and held in the accumulation type.
  static MaskedScale for_p(double p_drop) {
    return MaskedScale{KeepRule::for_p(p_drop), static_cast<acc_t>(p_drop < 1.0 ? 1.0 / (1.0 - p_drop) : 0.0)};
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t operator()(scalar_t x, uint32_t word) const {
    const scalar_t scaled = static_cast<scalar_t>(static_cast<acc_t>(x) * scale);
    bits_t bits;
    std::memcpy(&bits, &scaled, sizeof(bits));
    bits &= static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(keep(word)));
    scalar_t out;
    std::memcpy(&out, &bits, sizeof(bits));
    return out;
  }

  // residual + dropout(x) with the roundings of those two ops done one by one, so the fused
  // op equals the unfused composition bit for bit in every dtype. The bit-select between the
  // multiply and the add also keeps compilers from contracting them into an FMA.
  C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t combine(scalar_t residual, scalar_t x, uint32_t word) const {
    return static_cast<scalar_t>(static_cast<acc_t>(residual) + static_cast<acc_t>((*this)(x, word)));
  }
};

// x + bias rounded to the dtype, as torch's add rounds it.
template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t plus_bias(scalar_t x, scalar_t bias) {
  return static_cast<scalar_t>(static_cast<acc_type<scalar_t>>(x) + static_cast<acc_type<scalar_t>>(bias));
}

// The word of mask index `index`, computing a Philox group only when the index leaves the
// group of the previous call: a walk over indices with a small or zero step mostly reuses it.
struct CachedGroup {
  int64_t group = -1;
  PhiloxWords words{};

  C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t word(uint64_t seed, uint64_t base, int64_t index) {
    if ((index >> 2) != group) {
      group = index >> 2;
      words = mask_words(seed, base, static_cast<uint64_t>(group));
    }
    return words.w[index & 3];
  }
};

// Counter values one call consumes: one Philox block serves four mask elements.
inline uint64_t counters_for(int64_t mask_numel) { return (static_cast<uint64_t>(mask_numel) + 3) / 4; }

}  // namespace fused_dropout
