// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core kernel's decoders of one cache format (MODE, BITS) into
// its MMA operand type T (__half or __nv_bfloat16): the values formats.h
// defines, computed with bit tricks where those are exact.
//
// Codes become T exactly: affine codes < 256 by their magic form (one LOP3,
// magic_pair), fp4 e2m1 codes by bit placement (fp4_pair), others (fp8,
// the turbo codebook) through float. Scales are formats.h's (the float
// scales of affine and turbo are T already). dequant_pair
// applies a group's scale (and bias) to a code pair with one rounding in T,
// so that the MMA sees the values mx.dequantize gives in the cache dtype.
//
// tests/cuda/mma_traits_check.cpp checks every decoder here against
// formats.h's (decode_code, decode_fp_scale and the scalar decoders under
// them) for every code of every format of the table the kernel is built
// for.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mlx_qsdpa/formats.h"
#include "params.h"
#include "ptx.cuh"

namespace mlx_qsdpa::cuda {


namespace mma_detail {

// Two floats rounded to a T pair (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// a * b of two T pairs, elementwise, one rounding each.
template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
}

// lo + hi of a T pair, in fp32.
template <typename T>
__device__ __forceinline__ float pair_sum(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&x));
    return f.x + f.y;
  } else {
    return __uint_as_float(x << 16) + __uint_as_float(x & 0xffff0000u);
  }
}

} // namespace mma_detail

template <typename T_, int MODE, int BITS>
struct MmaFormat {
  static_assert(mma_decodes(BITS), "code widths of the tensor-core kernel");
  using T = T_;
  static constexpr int kMode = MODE;
  static constexpr int kBits = BITS;
  static constexpr bool kAffine = MODE == qsdpa::kAffine;
  static constexpr bool kFp4 = MODE == qsdpa::kMxfp4 || MODE == qsdpa::kNvfp4;
  static constexpr bool kIsHalf = std::is_same_v<T, __half>;
  // Scales of T (affine, turbo; mma_layout_ok asks for the query dtype), or
  // uint8 codes; biases (affine) of T too.
  static constexpr bool kFloatScales = qsdpa::mode_float_scales(MODE);
  static constexpr bool kHasBias = qsdpa::mode_has_bias(MODE);
  // Bytes of a group's scale (and bias).
  static constexpr int kScaleBytes = kFloatScales ? int(sizeof(T)) : 1;
  static constexpr int kCodesPerWord = 32 / BITS;
  static constexpr uint32_t kCodeMask = (1u << BITS) - 1u;
  static constexpr uint32_t kPairMask = kCodeMask | (kCodeMask << 16);
  // The pair trick reads code k and code k + kCodesPerWord / 2 of a word as
  // the low and high halves: formats.h's layout must put them 16 bits apart.
  static_assert(qsdpa::element_shift(kCodesPerWord / 2, BITS) == 16, "pair layout");

  // fp16 holds 1024 + code exactly for every code; bf16 (8 significant
  // bits) 128 + code only below 128, so 8-bit affine codes go through float
  // for bf16.
  static constexpr bool kHalfMagic = kAffine && (kIsHalf || BITS <= 4);

  // A code as float, formats.h's decode_code<MODE, BITS>(code). An affine code
  // without an int->float conversion instruction (those run at a quarter
  // rate): 2^23 + code is a float whose low mantissa bits are the code.
  static __device__ __forceinline__ float code_value(uint32_t code) {
    if constexpr (kAffine) {
      return __uint_as_float(code | 0x4b000000u) - 8388608.0f;
    } else {
      return qsdpa::decode_code<MODE, BITS>(code);
    }
  }

  // A raw scale or bias (kScaleBytes bytes, zero-extended) as float: T's
  // value for the float scales, formats.h's decode_fp_scale<MODE> otherwise.
  static __device__ __forceinline__ float scale_value(uint32_t raw) {
    if constexpr (!kFloatScales) {
      return qsdpa::decode_fp_scale<MODE>(raw);
    } else if constexpr (kIsHalf) {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
    } else {
      return __uint_as_float(raw << 16);
    }
  }

  // Magic pairs. A code whose bits sit inside T's mantissa, lowest bit at
  // bit p, reads as the T value 2^(MANT - p) + code once the exponent of
  // 2^(MANT - p) is ORed in: the mantissa's bit p weighs 1 there. So a pair
  // at bit p < 16 of a word (hi code 16 bits above) becomes a T pair with
  // one LOP3 where it fits under the mantissa's top, p + BITS <= MANT, and
  // with a shift first otherwise (integer instructions issue at half rate;
  // the decode is most of them).
  static constexpr int kMant = kIsHalf ? 10 : 7; // T's explicit mantissa bits
  // Where a pair does not fit in place, it is shifted by a whole byte where
  // that makes it fit (the pairs at bits 8 and 12 of a 4-bit word share one
  // shift to bits 0 and 4 in fp16), to bit 0 otherwise.
  static __host__ __device__ constexpr int magic_pos(int shift) {
    return shift + BITS <= kMant ? shift : (shift % 8 + BITS <= kMant ? shift % 8 : 0);
  }
  // The T pair (M, M), M = 2^(MANT - p), and M as a float.
  static __host__ __device__ constexpr uint32_t magic_bits(int p) {
    return (kIsHalf ? uint32_t(25 - p) << 10 : uint32_t(134 - p) << 7) * 0x10001u;
  }
  static __host__ __device__ constexpr float magic_value(int p) {
    return float(1 << (kMant - p));
  }

  // The code pair at bit `shift` (< 16) of x as the T pair (M + lo, M + hi),
  // exact, M = magic_value(magic_pos(shift)).
  static __device__ __forceinline__ uint32_t magic_pair(uint32_t x, int shift) {
    const int p = magic_pos(shift);
    return mma_detail::and_or(x >> (shift - p), kPairMask << p, magic_bits(p));
  }

  // An fp4 e2m1 code pair (lo code at bit `shift` < 16 of x, hi code 16 bits
  // above) as the exact T pair, without float: each code's exponent bits go
  // to T's lowest exponent bits, its mantissa bit to T's highest mantissa
  // bit, its sign to T's sign. That T number is the e2m1 value times
  // 2^(2 - bias of T) for all 16 codes (the exponent-zero codes land on T's
  // subnormals as e2m1's own do), so one multiply by 2^(bias - 2) makes it
  // formats.h's fp4_e2m1_to_float exactly.
  static constexpr int kFp4MagBit = kIsHalf ? 9 : 6; // T's highest mantissa bit
  static constexpr uint32_t kFp4Unscale = kIsHalf ? 0x74007400u : 0x7e807e80u; // 2^14, 2^126
  static __device__ __forceinline__ uint32_t shift_left(uint32_t x, int n) {
    return n >= 0 ? x << n : x >> -n;
  }
  static __device__ __forceinline__ uint32_t fp4_pair(uint32_t x, int shift) {
    const uint32_t mag = shift_left(x, kFp4MagBit - shift) & ((7u << kFp4MagBit) * 0x10001u);
    const uint32_t y = mma_detail::and_or(shift_left(x, 12 - shift), 0x80008000u, mag);
    return mma_detail::mul2<T>(y, kFp4Unscale);
  }

  // Whether a scale is exact in T as a positive normal number (fp4_pair's
  // path needs that; e8m0 and e4m3 scales have at most 4 significant bits).
  static __device__ __forceinline__ bool exact_in_t(float x) {
    return kIsHalf ? (x >= 6.103515625e-05f && x <= 65504.0f) : (x >= 1.17549435e-38f && x <= 3.38953139e38f);
  }

  // Scale and bias of two codes (lo, hi halves of a pair register), in the
  // form dequant_pair takes: T pairs for the magic path, floats otherwise.
  struct PairScale {
    uint32_t s2, b2;
    float s0, b0, s1, b1;
    bool exact; // fp4: both scales exact in T (s2 holds them), so fp4_pair's path applies
  };

  // The PairScale of raw scales rs0 (lo code) and rs1 (hi code); for
  // the formats with biases, raw_bias(h) gives the raw bias of code h (0: lo, 1: hi), read
  // only by the formats that have biases.
  template <typename RawBias>
  static __device__ __forceinline__ PairScale pair_scale(uint32_t rs0, uint32_t rs1, RawBias&& raw_bias) {
    PairScale ps;
    ps.exact = false;
    if constexpr (kHalfMagic) {
      // Raw T bits straight into the pair (affine scales are T here).
      const uint32_t rb0 = raw_bias(0);
      const uint32_t rb1 = raw_bias(1);
      ps.s2 = rs0 | (rs1 << 16);
      ps.b2 = rb0 | (rb1 << 16);
      ps.s0 = ps.s1 = ps.b0 = ps.b1 = 0.0f;
    } else {
      ps.s2 = ps.b2 = 0u;
      ps.s0 = scale_value(rs0);
      ps.s1 = scale_value(rs1);
      if constexpr (kFp4) {
        ps.s2 = mma_detail::pack2<T>(ps.s0, ps.s1);
        ps.exact = exact_in_t(ps.s0) && exact_in_t(ps.s1);
      }
      if constexpr (kHasBias) {
        ps.b0 = scale_value(raw_bias(0));
        ps.b1 = scale_value(raw_bias(1));
      } else {
        ps.b0 = ps.b1 = 0.0f;
      }
    }
    return ps;
  }

  // The code pair at bit `shift` of x (lo code in bits [shift, shift +
  // BITS), hi code 16 bits above) as a dequantized T pair. FP4: fp4_pair's
  // path, for scales exact in T (PairScale::exact).
  template <bool FP4 = false>
  static __device__ __forceinline__ uint32_t dequant_pair(uint32_t x, int shift, const PairScale& ps) {
    if constexpr (FP4) {
      // One rounding of the exact product, as the float path's.
      return mma_detail::mul2<T>(fp4_pair(x, shift), ps.s2);
    } else if constexpr (kHalfMagic) {
      return magic_dequant(x, shift, ps);
    } else {
      const uint32_t codes = x >> shift;
      const float lo = code_value(codes & kCodeMask);
      const float hi = code_value((codes >> 16) & kCodeMask);
      return mma_detail::pack2<T>(fmaf(lo, ps.s0, ps.b0), fmaf(hi, ps.s1, ps.b1));
    }
  }

  // dequant_pair's magic path: T(magic + code) - T(magic) is the exact
  // code; one fused multiply-add in T applies scale and bias (one rounding,
  // as mx.dequantize in the cache dtype).
  static __device__ __forceinline__ uint32_t magic_dequant(uint32_t x, int shift, const PairScale& ps) {
    const uint32_t magic = magic_bits(magic_pos(shift));
    const uint32_t y = magic_pair(x, shift);
    if constexpr (kIsHalf) {
      const __half2 c = __hsub2(*reinterpret_cast<const __half2*>(&y), *reinterpret_cast<const __half2*>(&magic));
      const __half2 r =
          __hfma2(c, *reinterpret_cast<const __half2*>(&ps.s2), *reinterpret_cast<const __half2*>(&ps.b2));
      return *reinterpret_cast<const uint32_t*>(&r);
    } else {
      const __nv_bfloat162 c = __hsub2(
          *reinterpret_cast<const __nv_bfloat162*>(&y), *reinterpret_cast<const __nv_bfloat162*>(&magic));
      const __nv_bfloat162 r = __hfma2(
          c, *reinterpret_cast<const __nv_bfloat162*>(&ps.s2), *reinterpret_cast<const __nv_bfloat162*>(&ps.b2));
      return *reinterpret_cast<const uint32_t*>(&r);
    }
  }
};

} // namespace mlx_qsdpa::cuda
