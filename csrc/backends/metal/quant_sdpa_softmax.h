// Copyright © 2026 mlx-qsdpa contributors.
//
// The online softmax's row state (running max, sum and output, base 2) as
// the decode kernel and the merge share it: the running max, and the
// finalisation of a row (sink, normalisation, lse).
//
// Non-finite inputs, as MLX's own SDPA treats them: a score that is NaN or
// +inf (from a NaN or inf query element, key scale, bias or code, or
// additive mask entry; the sink counts as a score) makes its row NaN, output
// and lse. The kernels keep such a row poisoned: its running max is NaN
// (max_nan keeps it so, where metal::max would return the other operand),
// and every weight and rescale 2^(x - NaN) makes its sum and output NaN too.
// -inf scores weigh nothing; a row that sees no key gives zeros and lse =
// -inf.
#pragma once

#include "quant_sdpa_io.h"

namespace qsdpa {

// max(a, b), NaN if either is NaN.
inline float max_nan(float a, float b) {
  return (a > b || a != a) ? a : b;
}

// The running max after a score s (not -inf): NaN for a NaN or +inf score,
// and for a row poisoned before.
inline float running_max(float m, float s) {
  return s < INFINITY ? max_nan(m, s) : NAN;
}

struct Finalized {
  float mult; // out = o * mult (scaled_output); 0: exactly zero
  float lse;
};

// The final normalisation of a row whose keys gave max m and sum l (base
// 2, l relative to m): the sink (logit s2, base 2), if the call has sinks,
// joins as a key with a zero value; then out = o * mult with mult = 1 / l
// (times the sink's rescale of o) and lse = ln(l) + max. A row that sees
// nothing (no key, no sink) gives mult 0 and lse = -inf; a poisoned row
// (or a NaN or +inf sink) NaN.
inline Finalized finalize_row(float m, float l, bool has_sink, float s2) {
  float c = 1.0f;
  if (has_sink && s2 != -INFINITY) {
    const float m_new = max_nan(m, s2);
    c = m == -INFINITY ? 0.0f : metal::exp2(m - m_new);
    l = l * c + metal::exp2(s2 - m_new);
    m = m_new;
  }
  Finalized f;
  if (m != m || l != l) {
    f.mult = NAN;
    f.lse = NAN;
  } else if (!(l > 0.0f)) {
    f.mult = 0.0f;
    f.lse = -INFINITY;
  } else {
    f.mult = c / l;
    f.lse = (m + metal::log2(l)) * ln2();
  }
  return f;
}

// An output element o (not normalised) times its row's mult. A row that
// sees no key (mult 0) is exactly zero.
inline float scaled_output(float o, float mult) {
  return mult == 0.0f ? 0.0f : o * mult;
}

} // namespace qsdpa
