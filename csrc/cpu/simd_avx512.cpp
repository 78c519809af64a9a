// AVX-512 versions of the CPU kernel's inner loops (the table avx512_loops(), simd.h).
//
// Random words: 16 Philox lanes per register, through the same rounds as the scalar Philox
// (philox4x32_10_rounds) with a lane policy whose 32x32->64 multiply is two vpmuludq, which
// the auto-vectorised scalar loop cannot express.
// Output: the shared output rule for float32, vectorised 16 wide; float16 and bfloat16
// widened to float32 (F16C for float16, shifts for bfloat16), through the same rule, and
// narrowed back with c10's rounding; dropout_add in float16 and bfloat16 the same way, with a
// residual of the same format or of float32; and a float32 input replayed into a 2-byte output.
//
// The whole file is compiled for AVX-512F and includes nothing but philox.h (no ATen), so
// no AVX-512 code can end up in an inline function or static initialiser that other files
// share; its functions are only called after a run-time CPU check.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,f16c")
#include <immintrin.h>
#endif

#include <cstring>

#include "simd.h"

#ifdef FUSED_DROPOUT_HAVE_AVX512

namespace fused_dropout {
namespace {

struct Avx512Word {
  __m512i v;
};

inline Avx512Word operator^(Avx512Word a, Avx512Word b) { return {_mm512_xor_si512(a.v, b.v)}; }
inline Avx512Word operator^(Avx512Word a, uint32_t k) {
  return {_mm512_xor_si512(a.v, _mm512_set1_epi32(static_cast<int>(k)))};
}

struct Avx512Lanes {
  using word = Avx512Word;
  static inline void mul_hi_lo(uint32_t m, Avx512Word a, Avx512Word& hi, Avx512Word& lo) {
    const __m512i mv = _mm512_set1_epi32(static_cast<int>(m));
    const __m512i even = _mm512_mul_epu32(a.v, mv);                        // lanes 0, 2, ...: 64-bit products
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), mv);  // lanes 1, 3, ...
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

// The two 2-byte formats, 16 lanes of raw bits at a time, widened to and narrowed from float32
// exactly as c10::Half and c10::BFloat16 convert one value.
struct HalfLanes {
  // F16C, round-to-nearest-even.
  static __m512 widen(__m256i bits) { return _mm512_cvtph_ps(bits); }
  static __m256i narrow(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};

struct BFloat16Lanes {
  // bfloat16 is the upper half of a float32.
  static __m512 widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
  // c10's round-to-nearest-even: add 0x7FFF plus the lowest bit that stays, keep the upper
  // half; every NaN becomes 0x7FC0.
  static __m256i narrow(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7FFF));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
  }
};

constexpr int kLanes = 16;

inline __m256i load_lanes(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store_lanes(uint16_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// A 2-byte rule, cast(float(x) * scale) or +0, is the float32 rule applied to float(x) and
// then narrowed, because +0.0f narrows to +0. So the lanes go through the float32 rule
// between widening and narrowing: KeepRule's test (keeps_any and word <= max_kept_word) as
// one unsigned compare, the multiply, and a zeroing select; the result is still a float,
// which callers narrow. Written out rather than left to the auto-vectoriser, which built
// the keep mask one lane at a time here (a third of the 2-byte loops' speed).
inline __m512 dropout_lanes(__m512 x, const uint32_t* words, const MaskedScale<float, float>& rule) {
  const __m512i word = _mm512_loadu_si512(words);
  const __mmask16 keep =
      rule.keep.keeps_any != 0
          ? _mm512_cmple_epu32_mask(word, _mm512_set1_epi32(static_cast<int>(rule.keep.max_kept_word)))
          : __mmask16{0};
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(x, _mm512_set1_ps(rule.scale)));
}

// Runs `lanes(i, x16, residual16, words16, y16)` over [0, count) 16 at a time (residual may
// be null); the last partial 16 runs on zero-padded copies, so every element takes the same
// vector path.
template <typename X, typename R, typename Y, typename Lanes16>
inline void for_each_16(const X* x, const R* residual, const uint32_t* words, Y* y, int64_t count, Lanes16 lanes) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    lanes(i, x + i, residual != nullptr ? residual + i : nullptr, words + i, y + i);
  }
  if (i == count) return;
  alignas(64) X x_pad[kLanes] = {};
  alignas(64) R residual_pad[kLanes] = {};
  alignas(64) Y y_pad[kLanes];
  alignas(64) uint32_t words_pad[kLanes] = {};
  const int64_t rest = count - i;
  std::memcpy(x_pad, x + i, rest * sizeof(X));
  if (residual != nullptr) std::memcpy(residual_pad, residual + i, rest * sizeof(R));
  std::memcpy(words_pad, words + i, rest * sizeof(uint32_t));
  lanes(i, x_pad, residual_pad, words_pad, y_pad);
  std::memcpy(y + i, y_pad, rest * sizeof(Y));
}

// 16 lanes of float32 or of a 2-byte format's bits, as float32; and back.
template <typename Format>
inline __m512 load_float_lanes(const uint16_t* p) {
  return Format::widen(load_lanes(p));
}
template <typename Format>
inline __m512 load_float_lanes(const float* p) {
  return _mm512_loadu_ps(p);
}
template <typename Format>
inline void store_float_lanes(uint16_t* p, __m512 v) {
  store_lanes(p, Format::narrow(v));
}
template <typename Format>
inline void store_float_lanes(float* p, __m512 v) {
  _mm512_storeu_ps(p, v);
}

// A float32 value rounded to the 2-byte format, kept as float32.
template <typename Format>
inline __m512 round_to(__m512 v) {
  return Format::widen(Format::narrow(v));
}

template <typename Format>
// The rule is taken by value in each loop below: through the caller's reference the compiler
// must assume the output stores may change it, and reloads it for every lane.
void dropout_2byte(const Run<uint16_t>& run, const MaskedScale<float, float> rule) {
  for_each_16(run.x, static_cast<const uint16_t*>(nullptr), run.words, run.y, run.count,
              [&](int64_t, const uint16_t* x16, const uint16_t*, const uint32_t* w16, uint16_t* y16) {
                store_lanes(y16, Format::narrow(dropout_lanes(Format::widen(load_lanes(x16)), w16, rule)));
              });
}

// dropout of a float32 input rounded to the 2-byte format first: the replay of a float32
// gradient into a 2-byte one, as the conversion and then the 2-byte replay round it.
template <typename Format>
void dropout_from_float_2byte(const Run<float, float, uint16_t>& run, const MaskedScale<float, float> rule) {
  for_each_16(run.x, static_cast<const float*>(nullptr), run.words, run.y, run.count,
              [&](int64_t, const float* x16, const float*, const uint32_t* w16, uint16_t* y16) {
                store_lanes(y16, Format::narrow(dropout_lanes(round_to<Format>(_mm512_loadu_ps(x16)), w16, rule)));
              });
}

// residual + dropout(x + bias) for a 2-byte x and bias, and a residual and output of the
// same format or of float32: x + bias and the dropout narrowed to the 2-byte format, the sum
// to the output's, as the unfused ops (the last one promoting) would round them. The bias runs
// along rows of last_size elements.
template <typename Format, typename Wide>
void dropout_add_2byte(const Run<uint16_t, Wide, Wide>& run, const MaskedScale<float, float> rule) {
  const uint16_t* bias = run.bias;
  for_each_16(run.x, run.residual, run.words, run.y, run.count,
              [&](int64_t i, const uint16_t* x16, const Wide* res16, const uint32_t* w16, Wide* y16) {
                __m512 v = Format::widen(load_lanes(x16));
                if (bias != nullptr) {
                  alignas(32) uint16_t bias16[kLanes];
                  int64_t c = (run.column + i) % run.last_size;
                  if (c + kLanes <= run.last_size) {
                    std::memcpy(bias16, bias + c, sizeof(bias16));
                  } else {  // the 16 lanes cross the end of a row
                    for (int j = 0; j < kLanes; ++j, c = c + 1 == run.last_size ? 0 : c + 1) bias16[j] = bias[c];
                  }
                  v = round_to<Format>(_mm512_add_ps(v, Format::widen(load_lanes(bias16))));
                }
                const __m512 dropped = round_to<Format>(dropout_lanes(v, w16, rule));
                store_float_lanes<Format>(y16, _mm512_add_ps(load_float_lanes<Format>(res16), dropped));
              });
}

void dropout_float(const Run<float>& run, const MaskedScale<float, float> rule) {
  const float* x = run.x;
  float* y = run.y;
  const uint32_t* words = run.words;
  for (int64_t i = 0, count = run.count; i < count; ++i) y[i] = rule(x[i], words[i]);
}

// Constant-initialised: no AVX-512 code runs before a caller has checked the CPU.
constexpr Avx512Loops kLoops{
    &fill_mask_words_avx512,
    &dropout_float,
    {&dropout_2byte<HalfLanes>, &dropout_add_2byte<HalfLanes, uint16_t>, &dropout_add_2byte<HalfLanes, float>,
     &dropout_from_float_2byte<HalfLanes>},
    {&dropout_2byte<BFloat16Lanes>, &dropout_add_2byte<BFloat16Lanes, uint16_t>,
     &dropout_add_2byte<BFloat16Lanes, float>, &dropout_from_float_2byte<BFloat16Lanes>},
};

}  // namespace

const Avx512Loops& avx512_loops() { return kLoops; }

}  // namespace fused_dropout

#endif  // FUSED_DROPOUT_HAVE_AVX512
