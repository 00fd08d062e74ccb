// Copyright © 2026 mlx-qsdpa contributors.
//
// Checks the tensor-core kernel's decoders (MmaFormat, csrc/backends/cuda/
// mma_decode.cuh) against formats.h for every format of the format table
// (kFormatTable) that the kernel decodes, with fp16 and bf16 as its operand
// type T, for every code:
//   code_value   == the table's CodeKind decoder (fp4_e2m1_to_float,
//                   fp8_e4m3_to_float, gaussian_code_to_float, the unsigned
//                   code) and decode_code;
//   scale_value  == the table's ScaleKind decoder (e8m0_to_float,
//                   fp8_e4m3_to_float, T's own value) and decode_fp_scale,
//                   for every raw scale; exact_in_t says whether a scale is
//                   a positive normal T number;
//   magic_pair   == (M + lo, M + hi) in T, M = magic_value(magic_pos), for
//                   every code pair at every shift (the magic formats);
//   fp4_pair     == fp4_e2m1_to_float in T, every code pair at every shift;
//   dequant_pair == code * scale + bias rounded to fp32, then to T (for the
//                   magic formats only where that value is exact in fp32:
//                   their magic path rounds once; zeros of either sign), on
//                   every path the format has (magic, float, fp4_pair's),
//                   every code pair at every shift.
// Built by tests/cuda/test_mma_traits.py with the CUDA simulator's headers
// (QSDPA_CUDA_SIM: device code compiled as C++, the PTX wrappers' models),
// as the simulator builds the kernels. Prints one line per failure (the
// first few of each check), one line per table row, and "checked N values,
// F failures"; exits 1 on any failure.
#ifndef QSDPA_CUDA_SIM
#define QSDPA_CUDA_SIM 1
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>

#include "backends/cuda/mma_decode.cuh"
#include "mlx_qsdpa/formats.h"

using mlx_qsdpa::cuda::MmaFormat;
using mlx_qsdpa::cuda::mma_decodes;

namespace {

long checked = 0;
long failures = 0;
int reported = 0; // failure lines of the current check

// Equal values: the same value and sign, or both NaN.
bool same(double got, double want) {
  if (std::isnan(got) || std::isnan(want)) {
    return std::isnan(got) && std::isnan(want);
  }
  return got == want && std::signbit(got) == std::signbit(want);
}

// Equal values, zeros of either sign equal (the fp4_pair path's -0 * s is
// the float path's -0 * s + 0 = +0: the same operand to the MMA).
bool same_value(double got, double want) {
  return got == want || (std::isnan(got) && std::isnan(want));
}

void expect(bool ok, const char* format, const char* type, const char* what, long a, long b, double got, double want) {
  ++checked;
  if (ok) {
    return;
  }
  ++failures;
  if (++reported <= 5) {
    std::printf("FAIL %s %s %s (%ld, %ld): got %.9g, want %.9g\n", format, type, what, a, b, got, want);
  }
}

template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, __half>;

// The value of a T number's bits, by formats.h's decoders.
template <typename T>
double t_value(uint32_t bits) {
  return kIsHalf<T> ? qsdpa::half_bits_to_float(bits & 0xffffu) : qsdpa::bf16_bits_to_float(bits & 0xffffu);
}

// An exact value rounded once (to nearest even) to T.
template <typename T>
double round_to_t(double exact) {
  return qsim_cuda::round_exact(exact, 0.0, kIsHalf<T> ? qsim_cuda::kHalf : qsim_cuda::kBfloat);
}

// formats.h's decoder of a code of this format, chosen by the table's
// CodeKind.
float table_code_value(int mode, int bits, uint32_t code) {
  switch (qsdpa::mode_code_kind(mode)) {
    case qsdpa::kCodeFp4E2M1:
#if defined(MMA_TRAITS_CHECK_MUTANT)
      // The test's proof that a wrong decoder is caught: e2m1 code 3 (1.5)
      // believed to be 1.25.
      if (code == 3) {
        return 1.25f;
      }
#endif
      return qsdpa::fp4_e2m1_to_float(code);
    case qsdpa::kCodeFp8E4M3:
      return qsdpa::fp8_e4m3_to_float(code);
    case qsdpa::kCodeGaussian:
      return qsdpa::gaussian_code_to_float(code, bits);
    default:
      return float(code);
  }
}

// formats.h's decoder of a raw scale (an 8-bit code, or T's bits for the
// float scales), chosen by the table's ScaleKind.
template <typename T>
double table_scale_value(int mode, uint32_t raw) {
  switch (qsdpa::mode_scale_kind(mode)) {
    case qsdpa::kScaleE8M0:
      return qsdpa::e8m0_to_float(raw);
    case qsdpa::kScaleFp8E4M3:
      return qsdpa::fp8_e4m3_to_float(raw);
    default:
      return t_value<T>(raw);
  }
}

// The shifts at which the kernel decodes a code pair: every code position
// of a word's low half (the high code sits 16 bits above).
template <int BITS, typename Fn>
void each_shift(Fn&& f) {
  for (int shift = 0; shift < 16; shift += BITS) {
    f(shift);
  }
}

// f(lo, hi) for the code pairs a check decodes: every pair up to 4-bit
// codes; for 8-bit codes every code as lo, with two partners as hi (so
// every code is also a hi code).
template <int BITS, typename Fn>
void each_pair(Fn&& f) {
  constexpr uint32_t kCodes = 1u << BITS;
  for (uint32_t lo = 0; lo < kCodes; ++lo) {
    if constexpr (BITS <= 4) {
      for (uint32_t hi = 0; hi < kCodes; ++hi) {
        f(lo, hi);
      }
    } else {
      f(lo, (lo * 37u + 11u) % kCodes);
      f(lo, lo ^ 0xa5u);
    }
  }
}

// A word with codes lo at `shift` and hi at shift + 16, other bits random
// (the decoders must ignore them).
uint32_t pair_word(std::mt19937& rng, int bits, int shift, uint32_t lo, uint32_t hi) {
  const uint32_t mask = (1u << bits) - 1u;
  const uint32_t other = uint32_t(rng()) & ~((mask << shift) | (mask << (shift + 16)));
  return other | (lo << shift) | (hi << (shift + 16));
}

template <typename T, int MODE, int BITS>
struct FormatCheck {
  using F = MmaFormat<T, MODE, BITS>;
  const char* name;
  const char* type = kIsHalf<T> ? "f16" : "bf16";
  std::mt19937 rng{7};
  static constexpr uint32_t kCodes = 1u << BITS;

  void codes() {
    reported = 0;
    for (uint32_t c = 0; c < kCodes; ++c) {
      const float got = F::code_value(c);
      expect(same(got, table_code_value(MODE, BITS, c)), name, type, "code_value", c, 0, got,
             table_code_value(MODE, BITS, c));
      expect(same(got, qsdpa::decode_code<MODE, BITS>(c)), name, type, "code_value = decode_code", c, 0, got,
             qsdpa::decode_code<MODE, BITS>(c));
    }
  }

  void scales() {
    reported = 0;
    const uint32_t n = F::kFloatScales ? 1u << 16 : 1u << 8;
    for (uint32_t raw = 0; raw < n; ++raw) {
      const double want = table_scale_value<T>(MODE, raw);
      const float got = F::scale_value(raw);
      expect(same(got, want), name, type, "scale_value", raw, 0, got, want);
      if constexpr (!F::kFloatScales) {
        expect(same(got, qsdpa::decode_fp_scale<MODE>(raw)), name, type, "scale_value = decode_fp_scale", raw, 0, got,
               qsdpa::decode_fp_scale<MODE>(raw));
        // A positive normal T number is exact in T (fp4_pair's path needs it).
        const bool normal_t = std::isfinite(want) && want > 0.0 && round_to_t<T>(want) == want &&
            want >= (kIsHalf<T> ? 0x1p-14 : 0x1p-126);
        expect(F::exact_in_t(got) == normal_t, name, type, "exact_in_t", raw, 0, F::exact_in_t(got), normal_t);
      }
    }
  }

  // The magic form of a pair: (M + lo, M + hi), M = magic_value(magic_pos).
  void magic_pairs() {
    reported = 0;
    each_shift<BITS>([&](int shift) {
      const int p = F::magic_pos(shift);
      const double m = F::magic_value(p);
      const uint32_t bits = F::magic_bits(p);
      expect(t_value<T>(bits) == m && t_value<T>(bits >> 16) == m, name, type, "magic_bits", shift, 0,
             t_value<T>(bits), m);
      each_pair<BITS>([&](uint32_t lo, uint32_t hi) {
        const uint32_t r = F::magic_pair(pair_word(rng, BITS, shift, lo, hi), shift);
        expect(t_value<T>(r) == m + lo, name, type, "magic_pair lo", shift, lo, t_value<T>(r), m + lo);
        expect(t_value<T>(r >> 16) == m + hi, name, type, "magic_pair hi", shift, hi, t_value<T>(r >> 16), m + hi);
      });
    });
  }

  void fp4_pairs() {
    reported = 0;
    each_shift<BITS>([&](int shift) {
      each_pair<BITS>([&](uint32_t lo, uint32_t hi) {
        const uint32_t r = F::fp4_pair(pair_word(rng, BITS, shift, lo, hi), shift);
        const double want_lo = table_code_value(MODE, BITS, lo), want_hi = table_code_value(MODE, BITS, hi);
        expect(same(t_value<T>(r), want_lo), name, type, "fp4_pair lo", shift, lo, t_value<T>(r), want_lo);
        expect(same(t_value<T>(r >> 16), want_hi), name, type, "fp4_pair hi", shift, hi, t_value<T>(r >> 16), want_hi);
      });
    });
  }

  // dequant_pair<FP4_PATH> of every code pair at every shift, scales rs and
  // biases rb (raw) of the lo and hi codes.
  template <bool FP4_PATH>
  void dequant(const uint32_t (&rs)[2], const uint32_t (&rb)[2]) {
    const typename F::PairScale ps = F::pair_scale(rs[0], rs[1], [&](int h) { return rb[h]; });
    double s[2], b[2];
    for (int h = 0; h < 2; ++h) {
      s[h] = table_scale_value<T>(MODE, rs[h]);
      b[h] = F::kHasBias ? table_scale_value<T>(MODE, rb[h]) : 0.0;
    }
    each_shift<BITS>([&](int shift) {
      each_pair<BITS>([&](uint32_t lo, uint32_t hi) {
        const uint32_t r = F::template dequant_pair<FP4_PATH>(pair_word(rng, BITS, shift, lo, hi), shift, ps);
        const uint32_t code[2] = {lo, hi};
        for (int h = 0; h < 2; ++h) {
          const double exact = double(table_code_value(MODE, BITS, code[h])) * s[h] + b[h];
          if (F::kHalfMagic && !std::isnan(exact) && double(float(exact)) != exact && std::isfinite(float(exact))) {
            continue; // not exact in fp32: the magic path rounds once, the float path twice
          }
          const double want = round_to_t<T>(double(float(exact)));
          const double got = t_value<T>(r >> (16 * h));
          expect(same_value(got, want), name, type, FP4_PATH ? "dequant_pair (fp4_pair)" : "dequant_pair", shift,
                 long(code[h]) + 1000 * long(rs[h]), got, want);
        }
      });
    });
  }

  void dequant_pairs() {
    reported = 0;
    if constexpr (F::kFloatScales) {
      // Scales and biases as T values: small, large, negative, a zero scale
      // (the biases ignored by the formats without them).
      const float values[] = {1.0f, 0.5f, 0.09375f, -1.25f, 0.005859375f, 3.0f, 96.0f, 0.0f, -8.0f, 0.375f};
      for (float sv : values) {
        for (float bv : values) {
          const uint32_t s = to_t_bits(sv), b = to_t_bits(bv);
          dequant<false>({s, to_t_bits(sv * 0.5f)}, {b, to_t_bits(-bv)});
        }
      }
    } else {
      for (uint32_t raw = 0; raw < 256; ++raw) {
        const uint32_t rs[2] = {raw, (raw * 7 + 3) & 0xffu}, rb[2] = {0u, 0u};
        dequant<false>(rs, rb);
        if constexpr (F::kFp4) {
          const typename F::PairScale ps = F::pair_scale(rs[0], rs[1], [](int) { return 0u; });
          if (ps.exact) {
            dequant<true>(rs, rb);
          }
        }
      }
    }
  }

  static uint32_t to_t_bits(float x) {
    if constexpr (kIsHalf<T>) {
      return __float2half_rn(x).__x;
    } else {
      return __float2bfloat16_rn(x).__x;
    }
  }

  void run() {
    codes();
    scales();
    if constexpr (F::kHalfMagic) {
      magic_pairs();
    }
    if constexpr (F::kFp4) {
      fp4_pairs();
    }
    dequant_pairs();
  }
};

} // namespace

int main() {
  int decoded = 0;
  for (const qsdpa::FormatRow& row : qsdpa::kFormatTable) {
    qsdpa::dispatch_format(row.mode, row.bits, [&](auto fmt) {
      constexpr int kMode = decltype(fmt)::mode;
      constexpr int kBits = decltype(fmt)::bits;
      if constexpr (mma_decodes(kBits)) {
        FormatCheck<__half, kMode, kBits>{row.token}.run();
        FormatCheck<__nv_bfloat16, kMode, kBits>{row.token}.run();
        std::printf("format %s: checked\n", row.token);
        ++decoded;
      } else {
        std::printf("format %s: not decoded by the tensor-core kernel\n", row.token);
      }
    });
  }
  std::printf("%d formats decoded; checked %ld values, %ld failures\n", decoded, checked, failures);
  return failures == 0 ? 0 : 1;
}
