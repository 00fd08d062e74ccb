// Copyright © 2026 mlx-qsdpa contributors.
//
// Exact roundings of the CUDA simulator's 16-bit arithmetic: a real number,
// given as an exact double plus a small exact remainder, rounded once (to
// nearest even) to binary16 or bfloat16. The GPU's __hsub2 / __hfma2 round
// the exact result once; computing in float first and rounding again could
// differ at ties, so the simulator never does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "qsim/float16.h"

namespace qsim_cuda {

// A 16-bit floating-point format: significand bits (with the implicit one),
// smallest normal exponent, largest finite value.
struct Format16 {
  int precision;
  int emin;
  double max_finite;
};
constexpr Format16 kHalf{11, -14, 65504.0};
constexpr Format16 kBfloat{8, -126, 3.3895313892515355e38};

// Rounds the exact value hi + lo (|lo| at most half an ulp of the double
// hi, as TwoSum leaves it) to the format, once. Returns a double the format
// holds exactly (or +-inf / NaN).
inline double round_exact(double hi, double lo, Format16 f) {
  if (!std::isfinite(hi)) {
    return hi; // inf or NaN
  }
  if (hi == 0.0) {
    return hi; // an exact zero (lo is 0 too), with the operation's IEEE sign: -0 * x is -0
  }
  int e2;
  std::frexp(hi, &e2); // hi = m 2^e2, 0.5 <= |m| < 1: the exponent is e2 - 1
  const int ulp_exp = std::max(e2 - 1, f.emin) - (f.precision - 1);
  const double scaled = std::ldexp(hi, -ulp_exp); // exact: a power-of-two scale
  double r = std::nearbyint(scaled); // to nearest even
  // hi alone may sit exactly on a tie that the remainder breaks.
  if (lo != 0.0 && std::fabs(scaled - std::trunc(scaled)) == 0.5) {
    r = lo > 0.0 ? std::ceil(scaled) : std::floor(scaled);
  }
  const double out = std::ldexp(r, ulp_exp);
  if (std::fabs(out) > f.max_finite) {
    return std::copysign(INFINITY, hi);
  }
  return out;
}

// a + b exactly as hi + lo (TwoSum).
inline void two_sum(double a, double b, double& hi, double& lo) {
  hi = a + b;
  const double bv = hi - a;
  lo = (a - (hi - bv)) + (b - bv);
  if (!std::isfinite(hi)) {
    lo = 0.0;
  }
}

inline uint16_t half_bits_of(double exact_in_half) {
  return qsim::float_to_half_bits(static_cast<float>(exact_in_half)); // exact: no rounding left
}

inline uint16_t bfloat_bits_of(double exact_in_bfloat) {
  return uint16_t(qsim::float_bits(static_cast<float>(exact_in_bfloat)) >> 16);
}

inline float bfloat_bits_to_float(uint16_t b) {
  return qsim::bits_float(uint32_t(b) << 16);
}

} // namespace qsim_cuda
