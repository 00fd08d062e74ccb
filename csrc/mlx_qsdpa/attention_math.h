// Copyright © 2026 mlx-qsdpa contributors.
//
// The attention math every backend shares, once: how the G * Lq query rows
// of a kv head map to (query head, position), which keys a causal row sees,
// the online softmax's running max, the exact merge of partial results, and
// the final normalisation of a row (sink, 1 / sum, lse). Compiled as C++
// (the CPU kernel and host code), CUDA (the kernels) and MSL (the Metal
// kernels and their simulator), in the subset formats.h keeps to.
//
// Scores live in base-2 units (the query is pre-multiplied by scale *
// log2(e)), so weights are exp2(score - max) and lse = (max + log2(sum)) *
// ln(2).
//
// Non-finite inputs behave as in MLX's own SDPA: a score that is NaN or
// +inf (from a NaN or inf query element, key scale, bias or code, or
// additive mask entry; the sink counts as a score) makes its row NaN, output
// and lse. A row keeps such a score as a NaN running max (max_nan keeps it
// NaN where fmax would drop it), and every weight 2^(x - NaN) makes its sum
// and output NaN too. -inf scores weigh nothing; a row that sees no key (and
// no sink) gives zeros and lse = -inf.
#pragma once

#include "mlx_qsdpa/formats.h"

#if defined(__METAL_VERSION__)
#define QSDPA_EXP2(x) metal::exp2(x)
#define QSDPA_LOG2(x) metal::log2(x)
#elif defined(__CUDACC__)
#define QSDPA_EXP2(x) exp2f(x)
#define QSDPA_LOG2(x) log2f(x)
#else
#include <cmath>
#define QSDPA_EXP2(x) std::exp2(x)
#define QSDPA_LOG2(x) std::log2(x)
#endif

namespace qsdpa {

// How keys are hidden from a query row. The numeric values are passed to
// kernels (parameter blocks, function constants): keep them stable.
enum MaskKind : int {
  kMaskNone = 0,
  kMaskCausal = 1, // row i of Lq sees keys [0, Lk - Lq + i]
  kMaskBool = 2, // an array: False hides the key
  kMaskAdditive = 3, // an array added to the scores (natural-log units)
};

QSDPA_FUNC QSDPA_CONSTEXPR float log2e() {
  return 1.4426950408889634f;
}

QSDPA_FUNC QSDPA_CONSTEXPR float ln2() {
  return 0.6931471805599453f;
}

QSDPA_FUNC float neg_inf() {
  return bits_to_float(0xff800000u);
}

QSDPA_FUNC float quiet_nan() {
  return bits_to_float(0x7fc00000u);
}

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

// Row r of a kv head's G * Lq query rows is query position r / G of query
// head kvh * G + r % G: the G heads that share a kv head are adjacent, so a
// decode step's rows (Lq = 1) are the G heads.
struct RowPos {
  int h; // query head
  int i; // query position
};

QSDPA_FUNC RowPos row_position(int kvh, int r, int G) {
  RowPos p;
  p.i = r / G;
  p.h = kvh * G + (r - p.i * G);
  return p;
}

// The same for a caller that knows i = r / G already (the CUDA kernels
// divide by G through a precomputed multiplier, or keep i from an earlier
// row).
QSDPA_FUNC RowPos row_position_at(int kvh, int r, int G, int i) {
  RowPos p;
  p.i = i;
  p.h = kvh * G + (r - i * G);
  return p;
}

// The number of keys query position i sees under the causal mask (keys
// [0, limit)), the queries being the last Lq positions of the Lk keys.
QSDPA_FUNC int causal_limit(int Lq, int Lk, int i) {
  const int lim = Lk - Lq + i + 1;
  return lim < 0 ? 0 : (lim > Lk ? Lk : lim);
}

// ---------------------------------------------------------------------------
// Online softmax and merge
// ---------------------------------------------------------------------------

// max(a, b), NaN if either is NaN.
QSDPA_FUNC float max_nan(float a, float b) {
  return (a > b || a != a) ? a : b;
}

// The running max after a visible score s (not -inf): NaN for a NaN or +inf
// score, and for a row poisoned before.
QSDPA_FUNC float running_max(float m, float s) {
  return s < bits_to_float(0x7f800000u) ? max_nan(m, s) : quiet_nan();
}

// The factor that brings a partial result of max m to a total max M (>= m,
// or NaN): exp2(m - M), 0 for a partial that saw no key.
QSDPA_FUNC float rescale(float m, float M) {
  return m == neg_inf() ? 0.0f : QSDPA_EXP2(m - M);
}

// A row's softmax state: running max m and sum l of exp2(score - m).
struct RowStats {
  float m;
  float l;
};

// Two partial results of the same row over disjoint keys, merged exactly:
// the merged state, and the factors of each part's (unnormalised) output.
struct Merged {
  RowStats stats;
  float ca; // out = out_a * ca + out_b * cb
  float cb;
};

QSDPA_FUNC Merged merge_stats(RowStats a, RowStats b) {
  Merged r;
  const float M = max_nan(a.m, b.m);
  r.ca = rescale(a.m, M);
  r.cb = rescale(b.m, M);
  r.stats.m = M;
  r.stats.l = a.l * r.ca + b.l * r.cb;
  return r;
}

// ---------------------------------------------------------------------------
// The final normalisation
// ---------------------------------------------------------------------------

struct Finalized {
  float mult; // out = o * mult (scaled_output); 0: exactly zero
  float lse; // natural log
};

// The final normalisation of a row whose keys gave max m and sum l (base 2,
// l relative to m): the sink (logit s2 in base 2), if the call has sinks,
// joins as a key with a zero value; then out = o * mult with mult = 1 / l
// (times the sink's rescale of o) and lse = ln(l) + max. A row that sees
// nothing (no key, no sink or a -inf one) gives mult 0 and lse = -inf; a
// poisoned row (or a NaN or +inf sink) NaN.
QSDPA_FUNC Finalized finalize_row(float m, float l, bool has_sink, float s2) {
  float c = 1.0f;
  if (has_sink && s2 != neg_inf()) {
    const float m_new = max_nan(m, s2);
    c = rescale(m, m_new);
    l = l * c + QSDPA_EXP2(s2 - m_new);
    m = m_new;
  }
  Finalized f;
  if (m != m || l != l) {
    f.mult = quiet_nan();
    f.lse = quiet_nan();
  } else if (!(l > 0.0f)) {
    f.mult = 0.0f;
    f.lse = neg_inf();
  } else {
    f.mult = c / l;
    f.lse = (m + QSDPA_LOG2(l)) * ln2();
  }
  return f;
}

// An output element o (not normalised) times its row's mult. A row that
// sees no key (mult 0) is exactly zero, also where o is NaN (a masked key's
// NaN value met with weight 0).
QSDPA_FUNC float scaled_output(float o, float mult) {
  return mult == 0.0f ? 0.0f : o * mult;
}

} // namespace qsdpa
