// AVX-512 versions of the CPU kernel's inner loops.
//
// Random words: 16 Philox lanes per register, through the same rounds as the scalar Philox
// (philox4x32_10_rounds) with a lane policy whose 32x32->64 multiply is two vpmuludq: about
// 3x the throughput of the auto-vectorised scalar loop, which cannot express that multiply.
// Output: the shared output rule for float32, vectorised 16 wide, and for float16 with the
// F16C conversion instructions in place of c10::Half's software ones.
//
// The whole file is compiled for AVX-512F and includes nothing but philox.h (no ATen), so
// no AVX-512 code can end up in an inline function or static initialiser that other files
// share; its functions are only called after a run-time CPU check.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,f16c")
#include <immintrin.h>
#endif

#include "simd.h"

#ifdef FUSED_DROPOUT_HAVE_AVX512

namespace fused_dropout {
namespace {

struct Avx512Word {
  __m512i v;
};

inline Avx512Word operator^(Avx512Word a, Avx512Word b) {
  return {_mm512_xor_si512(a.v, b.v)};
}
inline Avx512Word operator^(Avx512Word a, uint32_t k) {
  return {_mm512_xor_si512(a.v, _mm512_set1_epi32(static_cast<int>(k)))};
}

struct Avx512Lanes {
  using word = Avx512Word;
  static inline void mul_hi_lo(uint32_t m, Avx512Word a, Avx512Word& hi, Avx512Word& lo) {
    const __m512i mv = _mm512_set1_epi32(static_cast<int>(m));
    const __m512i even = _mm512_mul_epu32(a.v, mv);                         // lanes 0, 2, ...: 64-bit products
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), mv);   // lanes 1, 3, ...
    constexpr __mmask16 kOddLanes = 0xAAAA;
    lo.v = _mm512_mask_blend_epi32(kOddLanes, even, _mm512_slli_epi64(odd, 32));
    hi.v = _mm512_mask_blend_epi32(kOddLanes, _mm512_srli_epi64(even, 32), odd);
  }
};

// Interleaves four registers of word 0, 1, 2, 3 of groups 0..15 into group order
// (g0w0 g0w1 g0w2 g0w3 g1w0 ...) and stores the 64 words.
inline void store_group_order(__m512i w0, __m512i w1, __m512i w2, __m512i w3, uint32_t* out) {
  const __m512i t0 = _mm512_unpacklo_epi32(w0, w1);  // per 128-bit block b: w0[4b] w1[4b] w0[4b+1] w1[4b+1]
  const __m512i t1 = _mm512_unpackhi_epi32(w0, w1);  //                      w0[4b+2] w1[4b+2] w0[4b+3] w1[4b+3]
  const __m512i t2 = _mm512_unpacklo_epi32(w2, w3);
  const __m512i t3 = _mm512_unpackhi_epi32(w2, w3);
  const __m512i g0 = _mm512_unpacklo_epi64(t0, t2);  // block b: group 4b
  const __m512i g1 = _mm512_unpackhi_epi64(t0, t2);  // block b: group 4b+1
  const __m512i g2 = _mm512_unpacklo_epi64(t1, t3);  // block b: group 4b+2
  const __m512i g3 = _mm512_unpackhi_epi64(t1, t3);  // block b: group 4b+3
  // 4x4 transpose of 128-bit blocks.
  const __m512i v0 = _mm512_shuffle_i32x4(g0, g1, 0x44);  // g0.b0 g0.b1 g1.b0 g1.b1
  const __m512i v1 = _mm512_shuffle_i32x4(g0, g1, 0xEE);  // g0.b2 g0.b3 g1.b2 g1.b3
  const __m512i v2 = _mm512_shuffle_i32x4(g2, g3, 0x44);
  const __m512i v3 = _mm512_shuffle_i32x4(g2, g3, 0xEE);
  _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(v0, v2, 0x88));   // groups 0..3
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(v0, v2, 0xDD));  // groups 4..7
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(v1, v3, 0x88));  // groups 8..11
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(v1, v3, 0xDD));  // groups 12..15
}

}  // namespace

void fill_mask_words_avx512(uint64_t seed, uint64_t base, uint64_t first_group, int64_t groups, uint32_t* words) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const uint64_t start = base + first_group + static_cast<uint64_t>(g);
    const __m512i start_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(start)));
    const __m512i lo = _mm512_add_epi32(start_lo, lane);
    // The 64-bit counter carries into its high word in the lanes whose low word wrapped.
    const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, start_lo);
    const __m512i start_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(start >> 32)));
    const __m512i hi = _mm512_mask_add_epi32(start_hi, carry, start_hi, _mm512_set1_epi32(1));
    Avx512Word c0{lo}, c1{hi}, c2{_mm512_setzero_si512()}, c3{_mm512_setzero_si512()};
    philox4x32_10_rounds<Avx512Lanes>(c0, c1, c2, c3, k0, k1);
    store_group_order(c0.v, c1.v, c2.v, c3.v, words + 4 * g);
  }
  for (; g < groups; ++g) {
    const PhiloxWords w = mask_words(seed, base, first_group + static_cast<uint64_t>(g));
    for (int j = 0; j < 4; ++j) words[4 * g + j] = w.w[j];
  }
}

// float16 as raw bits, converted by F16C with round-to-nearest-even, as c10::Half does.
struct F16cHalf {
  uint16_t bits;
  F16cHalf() = default;
  explicit F16cHalf(float value) : bits(static_cast<uint16_t>(_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT))) {}
  explicit operator float() const { return _cvtsh_ss(bits); }
};

// The float16 rule, cast(float(x) * scale) or +0, is the float32 rule applied to float(x)
// and then rounded to float16, because +0.0f rounds to +0. So 16 lanes at a time are widened
// with F16C, go through the shared float32 rule (a loop the compiler vectorises), and are
// narrowed with round-to-nearest-even; the tail takes the float16 rule itself.
void apply_half_avx512(const uint16_t* x, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                       float scale) {
  constexpr int kLanes = 16;
  const MaskedScale<float, float> wide_rule{keep, scale};
  alignas(64) float wide[kLanes];
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    _mm512_store_ps(wide, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
    for (int j = 0; j < kLanes; ++j) wide[j] = wide_rule(wide[j], words[i + j]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        _mm512_cvtps_ph(_mm512_load_ps(wide), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  const MaskedScale<F16cHalf, float> rule{keep, scale};
  const F16cHalf* in = reinterpret_cast<const F16cHalf*>(x);
  F16cHalf* out = reinterpret_cast<F16cHalf*>(y);
  for (; i < count; ++i) out[i] = rule(in[i], words[i]);
}

void apply_half_add_avx512(const uint16_t* x, const uint16_t* residual, const uint16_t* bias, int64_t column,
                           int64_t last_size, uint16_t* y, const uint32_t* words, int64_t count, KeepRule keep,
                           float scale) {
  using Rule = MaskedScale<F16cHalf, float>;
  const Rule rule{keep, scale};
  const F16cHalf* in = reinterpret_cast<const F16cHalf*>(x);
  const F16cHalf* res = reinterpret_cast<const F16cHalf*>(residual);
  const F16cHalf* b = reinterpret_cast<const F16cHalf*>(bias);
  F16cHalf* out = reinterpret_cast<F16cHalf*>(y);
  for (int64_t i = 0; i < count; ++i) {
    const F16cHalf v = b != nullptr ? Rule::plus_bias(in[i], b[column]) : in[i];
    out[i] = rule.add_to(res[i], v, words[i]);
    if (++column == last_size) column = 0;
  }
}

void apply_float_avx512(const float* x, float* y, const uint32_t* words, int64_t count,
                        const MaskedScale<float, float>& rule) {
  for (int64_t i = 0; i < count; ++i) y[i] = rule(x[i], words[i]);
}

}  // namespace fused_dropout

#endif  // FUSED_DROPOUT_HAVE_AVX512
