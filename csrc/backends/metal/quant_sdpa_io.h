// Copyright © 2026 mlx-qsdpa contributors.
//
// Loads and stores of the element types the kernels read and write, chosen
// by a function constant (so the choice costs nothing at run time), and the
// strided addressing of K/V rows.
#pragma once

#include "mlx_qsdpa/formats.h"
#include "quant_sdpa_params.h"

namespace qsdpa {

// Element `i` of an array of ElemType `type`, as float. bfloat16 is decoded
// with formats.h (no dependence on MSL's optional bfloat type).
inline float load_elem(const device uchar* base, int64_t i, int type) {
  if (type == kElemFloat32) {
    return ((const device float*)base)[i];
  } else if (type == kElemFloat16) {
    return float(((const device half*)base)[i]);
  }
  return bf16_bits_to_float(((const device ushort*)base)[i]);
}

// float -> bfloat16 bits, round to nearest even (NaN stays NaN), as MLX's
// float32 -> bfloat16 conversion.
inline ushort float_to_bf16_bits(float x) {
  uint u = as_type<uint>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return ushort((u >> 16) | 0x40u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return ushort(u >> 16);
}

inline void store_elem(device uchar* base, int64_t i, float x, int type) {
  if (type == kElemFloat32) {
    ((device float*)base)[i] = x;
  } else if (type == kElemFloat16) {
    ((device half*)base)[i] = half(x);
  } else {
    ((device ushort*)base)[i] = float_to_bf16_bits(x);
  }
}

// One packed row of K or V: its 32-bit words, with the stride of the last
// axis (1 for a contiguous cache). formats.h's unpack_element indexes it
// like a pointer.
struct PackedRow {
  const device uint* words;
  int64_t stride;
  uint operator[](int i) const {
    return words[i * stride];
  }
};

// Offset of element [b, h, l, x] of a 4-d strided array.
inline int64_t offset4(const constant int64_t* strides, int b, int h, int l, int x) {
  return b * strides[0] + h * strides[1] + l * strides[2] + x * strides[3];
}

} // namespace qsdpa
