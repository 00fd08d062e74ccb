// Copyright © 2026 mlx-qsdpa contributors.
//
// float <-> binary16 / bfloat16 bit conversions of the simulators (round
// to nearest even, as the GPU converts). Used by the Metal front end's
// compat.h, the CUDA front end's numerics.h and the runtime's __fp16
// helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qsim {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// float -> IEEE binary16, round to nearest even (overflow to inf, NaN kept).
inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) {
    return uint16_t(sign | 0x7e00u | ((absu >> 13) & 0x3ffu));
  }
  if (absu >= 0x477ff000u) { // rounds to >= 65520: inf
    return uint16_t(sign | 0x7c00u);
  }
  if (absu < 0x38800000u) { // below the smallest normal half: subnormal or 0
    // Scale so that one half-subnormal ulp (2^-24) is 1, then round to even.
    const float scaled = bits_float(absu) * 16777216.0f;
    const float r = std::nearbyint(scaled); // default mode: to nearest even
    return uint16_t(sign | uint32_t(r));
  }
  // Normal: drop 13 mantissa bits with round to nearest even.
  uint32_t h = absu - 0x38000000u; // rebias exponent 127 -> 15
  h += 0x0fffu + ((h >> 13) & 1u);
  return uint16_t(sign | (h >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) {
    return bits_float(sign | 0x7f800000u | (mant << 13));
  }
  if (exp == 0) {
    const float m = float(mant) * 5.9604644775390625e-08f;
    return sign ? -m : m;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_bfloat_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((u >> 16) | 0x40u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

} // namespace qsim
