// Copyright © 2026 mlx-qsdpa contributors.
//
// The one definition of MLX's quantization formats, as `mx.quantize` in
// MLX 0.32.4 writes them. Every backend decodes K/V through these functions:
// the CPU kernel (C++), the CUDA kernels (nvcc) and the Metal kernels (MSL,
// and the Metal simulator, which compiles the .metal sources as C++). The
// file is therefore written in the common subset of the three languages:
// value-in/value-out functions, templates over the pointer type so that any
// address space works, and one macro block that picks the bit cast and the
// function qualifiers of each language.
//
// Layout facts (checked against MLX's CPU `quantize`/`dequantize`):
// * A row of D elements quantized with `bits` is a little-endian bit stream:
//   element i occupies bits [i*bits, (i+1)*bits) of the row's bytes. For
//   bits in {1, 2, 4, 8} no element crosses a 32-bit word; for 3, 5 and 6 MLX
//   packs 8 (or 4) elements into 3 (or 5) bytes, which is the same stream.
//   Every group of `group_size` elements starts on a 32-bit word boundary
//   (group_size * bits is a multiple of 32 for every supported format).
// * affine: w = scale * q + bias; scale and bias have the dtype of the
//   quantized input (float16, bfloat16 or float32), one per group.
// * mxfp4: q is fp4 e2m1, scale is e8m0 (uint8), group 32.
// * mxfp8: q is fp8 e4m3, scale is e8m0 (uint8), group 32.
// * nvfp4: q is fp4 e2m1, scale is fp8 e4m3 (uint8), group 16.
#pragma once

#if defined(__METAL_VERSION__)
#define QSDPA_FUNC inline
#define QSDPA_CONSTEXPR constexpr
namespace qsdpa {
typedef uint u32_t;
typedef ushort u16_t;
QSDPA_FUNC float bits_to_float(u32_t u) {
  return as_type<float>(u);
}
} // namespace qsdpa
#elif defined(__CUDACC__)
#define QSDPA_FUNC __host__ __device__ __forceinline__
#define QSDPA_CONSTEXPR constexpr
#include <cstdint>
namespace qsdpa {
typedef uint32_t u32_t;
typedef uint16_t u16_t;
QSDPA_FUNC float bits_to_float(u32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
} // namespace qsdpa
#else
// The CPU kernel's per-instruction-set builds define QSDPA_FUNC as `static
// inline` so that each build keeps private copies of these functions (see
// csrc/cpu/kernel.h).
#ifndef QSDPA_FUNC
#define QSDPA_FUNC inline
#endif
#define QSDPA_CONSTEXPR constexpr
#include <cstdint>
#include <cstring>
namespace qsdpa {
typedef uint32_t u32_t;
typedef uint16_t u16_t;
QSDPA_FUNC float bits_to_float(u32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
} // namespace qsdpa
#endif

namespace qsdpa {

// The quantization modes of `mx.quantize`. The numeric values are part of
// the kernel ABI (they are passed as template arguments / function
// constants), keep them stable.
enum QuantMode : int {
  kAffine = 0,
  kMxfp4 = 1,
  kMxfp8 = 2,
  kNvfp4 = 3,
};

// Element types of the arrays the kernels read or write: queries, outputs,
// affine scales/biases, and (kElemUint8) the 8-bit scale codes of the fp
// modes. Every backend passes these numbers to its kernels (template
// arguments, parameter blocks, function constants): keep them stable.
enum ElemType : int {
  kElemFloat32 = 0,
  kElemFloat16 = 1,
  kElemBFloat16 = 2,
  kElemUint8 = 3,
};

// ---------------------------------------------------------------------------
// Scalar decoders
// ---------------------------------------------------------------------------

// IEEE binary16 -> float, exact for every input (subnormals, inf, nan).
// Written with integer operations so that it vectorises on the CPU and needs
// no half type in any language.
QSDPA_FUNC float half_bits_to_float(u32_t h) {
  u32_t sign = (h & 0x8000u) << 16;
  u32_t exp = (h >> 10) & 0x1fu;
  u32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) {
    return bits_to_float(sign | 0x7f800000u | (mant << 13));
  }
  if (exp == 0) {
    // Subnormal (or zero): mant * 2^-24, exact in float.
    float m = float(mant) * 5.9604644775390625e-08f;
    return sign ? -m : m;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// bfloat16 -> float: the top half of a float.
QSDPA_FUNC float bf16_bits_to_float(u32_t b) {
  return bits_to_float((b & 0xffffu) << 16);
}

// fp4 e2m1 (low 4 bits of `nib`) -> float. Values: +-{0, .5, 1, 1.5, 2, 3,
// 4, 6}. The exponent-zero code is the subnormal 0.5 * m, built without a
// float subnormal so that flush-to-zero hardware decodes it exactly.
QSDPA_FUNC float fp4_e2m1_to_float(u32_t nib) {
  u32_t e = (nib >> 1) & 3u;
  u32_t m = nib & 1u;
  float mag = e == 0 ? 0.5f * float(m) : bits_to_float(((e + 126u) << 23) | (m << 22));
  return (nib & 8u) ? -mag : mag;
}

// fp8 e4m3 (OCP "fn" variant, bias 7) -> float. Codes 0x7f/0xff are NaN,
// as in mx.dequantize (mx.quantize never emits them).
QSDPA_FUNC float fp8_e4m3_to_float(u32_t b) {
  if ((b & 0x7fu) == 0x7fu) {
    return bits_to_float(0x7fc00000u); // NaN, as mx.dequantize gives
  }
  u32_t e = (b >> 3) & 15u;
  u32_t m = b & 7u;
  float mag = e == 0 ? float(m) * 0.001953125f /* 2^-9 */
                     : bits_to_float(((e + 120u) << 23) | (m << 20));
  return (b & 0x80u) ? -mag : mag;
}

// e8m0 (a bare biased exponent) -> float = 2^(b - 127). Code 0 is 2^-127,
// a float subnormal, as in MLX; 0xff decodes to +inf as in MLX.
QSDPA_FUNC float e8m0_to_float(u32_t b) {
  b &= 0xffu;
  return b == 0 ? bits_to_float(0x00400000u) : bits_to_float(b << 23);
}

// ---------------------------------------------------------------------------
// Packing geometry
// ---------------------------------------------------------------------------

// Number of 32-bit words holding `n` elements of `bits` bits (n * bits must
// be a multiple of 32, which holds for every whole group).
QSDPA_FUNC QSDPA_CONSTEXPR int packed_words(int n, int bits) {
  return n * bits / 32;
}

// Where element i of a row lives: word element_word(i) of the row, from bit
// element_shift(i) of that word (continuing into the next word when
// element_shift(i) + bits > 32).
QSDPA_FUNC QSDPA_CONSTEXPR int element_word(int i, int bits) {
  return (i * bits) >> 5;
}
QSDPA_FUNC QSDPA_CONSTEXPR int element_shift(int i, int bits) {
  return (i * bits) & 31;
}

// The element of the bit stream that starts at `words` with index `i`.
// `WordPtr` is any pointer (or array) of 32-bit words in any address space.
// With `BITS` and `i` known at compile time this folds to a shift and a mask
// (two shifts and an or for the 3/5/6-bit elements that straddle words).
template <int BITS, typename WordPtr>
QSDPA_FUNC u32_t unpack_element(WordPtr words, int i) {
  const int w = element_word(i, BITS);
  const int sh = element_shift(i, BITS);
  u32_t v = u32_t(words[w]) >> sh;
  if (sh + BITS > 32) {
    v |= u32_t(words[w + 1]) << (32 - sh);
  }
  return v & ((1u << BITS) - 1u);
}

// The same stream seen as MLX's packs: pack p of a row starts at byte
// p * pack_bytes(bits) and holds pack_elems(bits) elements, little-endian,
// element k at bit k * bits of the pack. (3 and 5 bits: 8 elements in 3 and
// 5 bytes; 6 bits: 4 elements in 3 bytes; 1/2/4/8 bits: one 32-bit word.)
// Decoding a whole pack from one integer gives vector-friendly code (one
// load, constant shifts) where unpack_element's per-element word choice
// does not. Constexpr functions, not static data members: those are
// program-scope data, which MSL only allows in the constant address space
// (and an ODR-used static constexpr member needs a definition under MSL's
// C++14); tests/metal/msl_rules.py rejects them in everything the Metal
// kernels include.
QSDPA_FUNC QSDPA_CONSTEXPR int pack_elems(int bits) {
  return (bits == 3 || bits == 5) ? 8 : (bits == 6 ? 4 : 32 / bits);
}
QSDPA_FUNC QSDPA_CONSTEXPR int pack_bytes(int bits) {
  return pack_elems(bits) * bits / 8;
}

#if !defined(__METAL_VERSION__)
// The same numbers as the compile-time constants of the public C++/CUDA
// header (kept for its users; the Metal kernels call the functions above).
template <int BITS>
struct PackGeometry {
  static constexpr int kPackElems = pack_elems(BITS);
  static constexpr int kPackBytes = pack_bytes(BITS);
};
#endif

// Element k of a pack already loaded into an integer (32 or 64 bits wide).
template <int BITS, typename PackInt>
QSDPA_FUNC u32_t unpack_from_pack(PackInt pack, int k) {
  return u32_t(pack >> (k * BITS)) & ((1u << BITS) - 1u);
}

// ---------------------------------------------------------------------------
// Mode traits: bits of one element, bytes of one scale, element decoding.
// ---------------------------------------------------------------------------

// Decoded value of an element code `q` of mode MODE (without the scale).
template <int MODE>
QSDPA_FUNC float decode_code(u32_t q) {
  if (MODE == kAffine) {
    return float(q);
  } else if (MODE == kMxfp8) {
    return fp8_e4m3_to_float(q);
  } else {
    return fp4_e2m1_to_float(q);
  }
}

// Decoded scale of the fp modes from its raw uint8 code.
template <int MODE>
QSDPA_FUNC float decode_fp_scale(u32_t s) {
  if (MODE == kNvfp4) {
    return fp8_e4m3_to_float(s);
  } else {
    return e8m0_to_float(s);
  }
}

// Element bits of the fp modes (affine takes them from the caller).
QSDPA_FUNC QSDPA_CONSTEXPR int fp_mode_bits(int mode) {
  return mode == kMxfp8 ? 8 : 4;
}

// Group size every fp mode requires.
QSDPA_FUNC QSDPA_CONSTEXPR int fp_mode_group_size(int mode) {
  return mode == kNvfp4 ? 16 : 32;
}

} // namespace qsdpa
