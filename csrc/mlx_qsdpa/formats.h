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
// * turbo (this project's, not mx.quantize's): q indexes the Lloyd-Max
//   codebook of a standard normal variable (gaussian_code_to_float), scale is
//   a float of the input's dtype, no bias: w = scale * codebook[q]. Meant for
//   rotated vectors (quantize.cpp), whose coordinates are close to normal.
//   Codes are packed as affine codes of the same width.
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
#define QSDPA_HOST_FUNC inline
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
// csrc/backends/cpu/kernel.h).
#ifndef QSDPA_FUNC
#define QSDPA_FUNC inline
#endif
#ifndef QSDPA_HOST_FUNC
#define QSDPA_HOST_FUNC inline
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
  kTurbo = 4,
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

// Level m (0: the smallest) of the non-negative half of the Lloyd-Max
// codebook of a standard normal variable with 2^bits levels, bits 2, 3, 4:
// the levels that minimise the mean squared error of N(0, 1) quantized to
// the nearest level (computed by Lloyd's iteration in float64, rounded to
// 9 digits). The codebook is symmetric: code c < 2^(bits-1) is the negative
// of level 2^(bits-1) - 1 - c, code c >= 2^(bits-1) is level c - 2^(bits-1);
// codes ascend with their values.
QSDPA_FUNC QSDPA_CONSTEXPR float gaussian_level(int bits, int m) {
  if (bits == 2) {
    return m == 0 ? 0.452780035f : 1.510417608f;
  }
  if (bits == 3) {
    return m == 0 ? 0.245094179f : m == 1 ? 0.756005281f : m == 2 ? 1.343909279f : 2.151945705f;
  }
  return m == 0 ? 0.128395030f
      : m == 1  ? 0.388048299f
      : m == 2  ? 0.656759119f
      : m == 3  ? 0.942340456f
      : m == 4  ? 1.256231197f
      : m == 5  ? 1.618046386f
      : m == 6  ? 2.069017227f
                : 2.732589571f;
}

// Code `q` (low `bits` bits) of the Gaussian codebook -> float.
QSDPA_FUNC QSDPA_CONSTEXPR float gaussian_code_to_float(u32_t q, int bits) {
  const int mid = 1 << (bits - 1); // codes from mid up are the non-negative half
  const int c = int(q & ((1u << bits) - 1u));
  return c >= mid ? gaussian_level(bits, c - mid) : -gaussian_level(bits, mid - 1 - c);
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
// The format table
// ---------------------------------------------------------------------------
//
// Every format the op accepts, once. Everything else asks this table or is
// generated from it: validation and its messages (ops.cpp), Python's
// SUPPORTED_FORMATS (exported by the extension), the kernels each backend
// instantiates (the CPU variants' and CUDA kernels' dispatch_format, the
// Metal kernel list and names), the simulators and the test matrices.
//
// QSDPA_MODES(X): one row per quantization mode,
//   X(MODE, NAME, CODE, SCALE)
//   MODE  the QuantMode enumerator;   NAME  the mode string of mx.quantize;
//   CODE  how an element code decodes (CodeKind); SCALE  what a group's
//   scale is (ScaleKind; kScaleFloat groups also have a bias).
// QSDPA_FORMATS(X): one row per (mode, bits) that kernels are built for,
//   X(MODE, TOKEN, BITS, GROUP_SIZES)
//   TOKEN  the format's name in kernel names (affine4, mxfp4, ...);
//   GROUP_SIZES  the allowed group sizes, a mask of kGroupSize* bits.
// Adding a format: a row here (and in QSDPA_MODES for a new mode), its
// decode function below if its codes or scales are new, and one test row
// (tests/test_format_table.py walks the table on every backend).
#define QSDPA_MODES(X)                                     \
  X(kAffine, "affine", kCodeUnsigned, kScaleFloat)         \
  X(kMxfp4, "mxfp4", kCodeFp4E2M1, kScaleE8M0)             \
  X(kMxfp8, "mxfp8", kCodeFp8E4M3, kScaleE8M0)             \
  X(kNvfp4, "nvfp4", kCodeFp4E2M1, kScaleFp8E4M3)          \
  X(kTurbo, "turbo", kCodeGaussian, kScaleNorm)

#define QSDPA_FORMATS(X)                                   \
  X(kAffine, affine1, 1, kGroupSizes32To128)               \
  X(kAffine, affine2, 2, kGroupSizes32To128)               \
  X(kAffine, affine3, 3, kGroupSizes32To128)               \
  X(kAffine, affine4, 4, kGroupSizes32To128)               \
  X(kAffine, affine5, 5, kGroupSizes32To128)               \
  X(kAffine, affine6, 6, kGroupSizes32To128)               \
  X(kAffine, affine8, 8, kGroupSizes32To128)               \
  X(kMxfp4, mxfp4, 4, kGroupSize32)                        \
  X(kMxfp8, mxfp8, 8, kGroupSize32)                        \
  X(kNvfp4, nvfp4, 4, kGroupSize16)                        \
  X(kTurbo, turbo2, 2, kGroupSizes32To128)                 \
  X(kTurbo, turbo3, 3, kGroupSizes32To128)                 \
  X(kTurbo, turbo4, 4, kGroupSizes32To128)

// How an element code decodes (without its group's scale).
enum CodeKind : int {
  kCodeUnsigned = 0, // the code itself, 0 .. 2^bits - 1
  kCodeFp4E2M1 = 1,
  kCodeFp8E4M3 = 2,
  kCodeGaussian = 3, // gaussian_code_to_float(code, bits)
};

// What a group's scale is: a float of the quantized input's dtype, with a
// bias of the same dtype (w = scale * q + bias) or without one (kScaleNorm:
// w = scale * q), or an 8-bit code (no bias).
enum ScaleKind : int {
  kScaleFloat = 0,
  kScaleE8M0 = 1,
  kScaleFp8E4M3 = 2,
  kScaleNorm = 3,
};

// Group sizes as a bit mask: bit log2(group_size).
enum GroupSizeMask : int {
  kGroupSize16 = 1 << 4,
  kGroupSize32 = 1 << 5,
  kGroupSizes32To128 = (1 << 5) | (1 << 6) | (1 << 7),
};

// The largest group size a GroupSizeMask can name.
QSDPA_FUNC QSDPA_CONSTEXPR int max_group_size() {
  return 1024;
}

#define QSDPA_MODE_CODE_CASE(MODE, NAME, CODE, SCALE) \
  if (mode == MODE) {                                 \
    return CODE;                                      \
  }
#define QSDPA_MODE_SCALE_CASE(MODE, NAME, CODE, SCALE) \
  if (mode == MODE) {                                  \
    return SCALE;                                      \
  }
#define QSDPA_FORMAT_GROUPS_CASE(MODE, TOKEN, BITS, GROUPS) \
  if (mode == MODE && bits == BITS) {                       \
    return GROUPS;                                          \
  }

QSDPA_FUNC QSDPA_CONSTEXPR int mode_code_kind(int mode) {
  QSDPA_MODES(QSDPA_MODE_CODE_CASE)
  return -1;
}

QSDPA_FUNC QSDPA_CONSTEXPR int mode_scale_kind(int mode) {
  QSDPA_MODES(QSDPA_MODE_SCALE_CASE)
  return -1;
}

// Whether groups of this mode carry a bias (and float scales).
QSDPA_FUNC QSDPA_CONSTEXPR bool mode_has_bias(int mode) {
  return mode_scale_kind(mode) == kScaleFloat;
}

// Whether the scales of this mode are floats of the input's dtype (else
// uint8 codes).
QSDPA_FUNC QSDPA_CONSTEXPR bool mode_float_scales(int mode) {
  return mode_scale_kind(mode) == kScaleFloat || mode_scale_kind(mode) == kScaleNorm;
}

// The group sizes allowed for (mode, bits) as a GroupSizeMask; 0: no such
// format.
QSDPA_FUNC QSDPA_CONSTEXPR int format_group_sizes(int mode, int bits) {
  QSDPA_FORMATS(QSDPA_FORMAT_GROUPS_CASE)
  return 0;
}

// Whether the table has (mode, bits, group_size).
QSDPA_FUNC QSDPA_CONSTEXPR bool format_supported(int mode, int bits, int group_size) {
  return group_size > 0 && group_size <= max_group_size() && (group_size & (group_size - 1)) == 0 &&
      (format_group_sizes(mode, bits) & group_size) != 0;
}

#undef QSDPA_MODE_CODE_CASE
#undef QSDPA_MODE_SCALE_CASE
#undef QSDPA_FORMAT_GROUPS_CASE

// ---------------------------------------------------------------------------
// Element and scale decoding, by the table's kinds
// ---------------------------------------------------------------------------

// Decoded value of an element code `q` of a CodeKind and width, without the
// scale: the form for code that knows the format at run time only.
QSDPA_FUNC float decode_code_of_kind(int kind, int bits, u32_t q) {
  if (kind == kCodeUnsigned) {
    return float(q);
  } else if (kind == kCodeFp8E4M3) {
    return fp8_e4m3_to_float(q);
  } else if (kind == kCodeGaussian) {
    return gaussian_code_to_float(q, bits);
  } else {
    return fp4_e2m1_to_float(q);
  }
}

// The same for format (MODE, BITS) known at compile time (the branches fold).
template <int MODE, int BITS>
QSDPA_FUNC float decode_code(u32_t q) {
  return decode_code_of_kind(mode_code_kind(MODE), BITS, q);
}

// Decoded scale of the 8-bit-scale modes from its raw uint8 code (the
// float scales are read as floats of their dtype).
QSDPA_FUNC float decode_scale_code_of_kind(int kind, u32_t s) {
  if (kind == kScaleFp8E4M3) {
    return fp8_e4m3_to_float(s);
  } else {
    return e8m0_to_float(s);
  }
}

template <int MODE>
QSDPA_FUNC float decode_fp_scale(u32_t s) {
  return decode_scale_code_of_kind(mode_scale_kind(MODE), s);
}

#if !defined(__METAL_VERSION__)
// A row of QSDPA_FORMATS as a type, for code that instantiates a kernel per
// format: dispatch_format hands one to its callback.
template <int MODE, int BITS>
struct FormatTag {
  static constexpr int mode = MODE;
  static constexpr int bits = BITS;
};

// Calls f(FormatTag<MODE, BITS>{}) for the table's row (mode, bits) and
// returns true; false (f not called) where the table has no such row.
template <typename F>
QSDPA_HOST_FUNC bool dispatch_format(int mode, int bits, F&& f) {
#define QSDPA_DISPATCH_FORMAT_CASE(MODE, TOKEN, BITS, GROUPS) \
  if (mode == MODE && bits == BITS) {                         \
    f(FormatTag<MODE, BITS>{});                               \
    return true;                                              \
  }
  QSDPA_FORMATS(QSDPA_DISPATCH_FORMAT_CASE)
#undef QSDPA_DISPATCH_FORMAT_CASE
  return false;
}

// The table as data, for host code: validation messages, the Python
// module's format list, kernel names.
struct FormatRow {
  int mode; // QuantMode
  const char* mode_name; // "affine", "mxfp4", ...
  const char* token; // "affine4", "mxfp4", ...: the format in kernel names
  int bits;
  int group_sizes; // GroupSizeMask
};

#define QSDPA_FORMAT_ROW(MODE, TOKEN, BITS, GROUPS) FormatRow{MODE, mode_name(MODE), #TOKEN, BITS, GROUPS},

QSDPA_HOST_FUNC constexpr const char* mode_name(int mode) {
#define QSDPA_MODE_NAME_CASE(MODE, NAME, CODE, SCALE) \
  if (mode == MODE) {                                 \
    return NAME;                                      \
  }
  QSDPA_MODES(QSDPA_MODE_NAME_CASE)
#undef QSDPA_MODE_NAME_CASE
  return nullptr;
}

static constexpr FormatRow kFormatTable[] = {QSDPA_FORMATS(QSDPA_FORMAT_ROW)};
#undef QSDPA_FORMAT_ROW
static constexpr int kNumFormats = int(sizeof(kFormatTable) / sizeof(kFormatTable[0]));

// Calls f(g) for each group size g of a GroupSizeMask, ascending.
template <typename F>
QSDPA_HOST_FUNC void for_each_group_size(int mask, F&& f) {
  for (int g = 1; g <= max_group_size(); g *= 2) {
    if (mask & g) {
      f(g);
    }
  }
}

// The table's row (mode, bits), or nullptr.
QSDPA_HOST_FUNC const FormatRow* find_format(int mode, int bits) {
  for (const FormatRow& r : kFormatTable) {
    if (r.mode == mode && r.bits == bits) {
      return &r;
    }
  }
  return nullptr;
}
#endif

} // namespace qsdpa