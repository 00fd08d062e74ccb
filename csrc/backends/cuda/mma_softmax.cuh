// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core kernel's online softmax over a warp's step: its scores
// (S^T's accumulators: keys g, g + 8 of each tile, query rows 2t, 2t + 1 of
// each row tile) scaled into log2 units, masked, weighed against the rows'
// running max with a lazy max, and turned into P^T's B fragments.
//
// A lazy max: p = 2^(s - base) with base the row's reference max (0 while
// it has seen no key), which moves only when a score exceeds it by more
// than kLazyMax; then O and l are rescaled, and the step's scores shifted to
// the new base. So p <= 2^kLazyMax (exact enough in T, far from its
// overflow), and a step whose scores stay under their rows' thresholds
// (nearly all, once the first steps have set the max) costs one vote
// instead of a max reduction across the row's lanes (three shuffles). A NaN
// or +inf score also fails the test, so the slow path alone sees them: its
// max keeps the NaN (fmax_nan, attention_math.h's max_nan in one
// instruction) and turns +inf into NaN, which poisons the row (common.cuh).
// A poisoned row's scores over its NaN base are NaN, so it takes the slow
// path on every later step, and stays NaN.
#pragma once

#include "common.cuh"
#include "mma_decode.cuh"
#include "mma_shape.cuh"
#include "ptx.cuh"

namespace mlx_qsdpa::cuda {

template <typename S>
struct MmaSoftmax {
  using T = typename S::T;
  static constexpr int NT = S::kRowTiles;
  static constexpr int TPW = S::kTilesPerWarp;
  // The lazy max's limit on a weight's exponent (log2 units): weights up to
  // 2^8 in T.
  static constexpr float kLazyMax = 8.0f;

  // Per row of this lane (row tile nt, row 2t + e): the exponent's base (the
  // reference max m, or 0 while m is -inf), the lazy max's limit on a score
  // over the base (kLazyMax, or -inf while m is -inf), and the lane's share
  // of the denominator. m itself is not kept: it is -inf where lim is and
  // base elsewhere (ref_max), one register per row less in the loop.
  struct Rows {
    float base[NT][2], lim[NT][2], l[NT][2];
  };

  static __device__ __forceinline__ Rows start() {
    Rows rows;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        rows.lim[nt][e] = neg_inf();
        rows.base[nt][e] = rows.l[nt][e] = 0.0f;
      }
    }
    return rows;
  }

  static __device__ __forceinline__ float ref_max(const Rows& rows, int nt, int e) {
    return rows.lim[nt][e] == neg_inf() ? neg_inf() : rows.base[nt][e];
  }

  // f(score, tile, row tile, accumulator) for each of a warp's scores.
  template <typename Fn>
  static __device__ __forceinline__ void each_score(float (&s)[TPW][NT][4], Fn&& f) {
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          f(s[u][nt][e4], u, nt, e4);
        }
      }
    }
  }

  // ---- Masks ----

  // What the masked steps need of this lane's rows. The query position of
  // each accumulator row (nt * 8 + 2t + e): the rest of a row's reference
  // follows from it without row_ref's division by G (lane_row). In
  // registers with one row tile (two ints). With two, four more registers
  // over the loop made ptxas spill the loop's hot state (the whole
  // references, three ints and a flag per row, did the same), so the
  // positions wait in the thread's own 16 bytes of shared memory (kPositionsShared),
  // loaded on masked steps only.
  static constexpr bool kPositionsShared = NT == 2;
  struct Masks {
    int pos[NT][2];
    uint4* shared_pos; // this thread's 16 bytes (kPositionsShared)
    bool causal;
    bool array; // a bool or additive mask array
    int causal_last; // the last key the block's first row sees: the causal mask hides later ones from some row
  };

  static __device__ __forceinline__ Masks masks(const Params& p, const MmaBlock& k, uint4* shared_pos) {
    Masks m;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        m.pos[nt][e] = row_ref(p, k.b, k.kvh, k.r0 + min(nt * 8 + 2 * k.t + e, k.nr - 1)).i;
      }
    }
    m.shared_pos = shared_pos;
    if constexpr (kPositionsShared) {
      static_assert(NT == 2, "four positions per thread");
      *shared_pos = uint4{uint32_t(m.pos[0][0]), uint32_t(m.pos[0][1]), uint32_t(m.pos[1][0]), uint32_t(m.pos[1][1])};
    }
    m.causal = p.mask == qsdpa::kMaskCausal;
    m.array = p.mask == qsdpa::kMaskBool || p.mask == qsdpa::kMaskAdditive;
    m.causal_last = row_ref(p, k.b, k.kvh, k.r0).causal_limit;
    return m;
  }

  // The rows' positions, for a masked step.
  static __device__ __forceinline__ void positions(const Masks& m, int (&pos)[NT][2]) {
    if constexpr (kPositionsShared) {
      const uint4 v = *m.shared_pos;
      pos[0][0] = int(v.x);
      pos[0][1] = int(v.y);
      pos[1][0] = int(v.z);
      pos[1][1] = int(v.w);
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        pos[nt][0] = m.pos[nt][0];
        pos[nt][1] = m.pos[nt][1];
      }
    }
  }

  // ---- Scores ----

  // The step's scores (its first key key0) in log2 units over their row's
  // base (one fused multiply-add where no mask applies); masks in a
  // warp-uniform branch: most steps see none. Each kind of masked step
  // takes a path of its own, which computes only what it needs: a tail step
  // (a split's last for its warp, one in ~10 of a warp's steps at 32K keys)
  // no row reference (every row sees the keys before k_end, and all of this
  // step's where no causal step is here), a causal step the rows' limits,
  // an array mask their whole references (lane_row).
  static __device__ __forceinline__ void scores(
      const Params& p, const MmaBlock& k, const Masks& m, const Rows& rows, int key0, float (&s)[TPW][NT][4]) {
    const bool tail = key0 + 16 * TPW > k.k_end;
    const bool causal_here = m.causal && key0 + 16 * TPW - 1 > m.causal_last;
    if (m.array) {
      masked_scores<true, true>(p, k, m, rows, key0, causal_here, s);
    } else if (causal_here) {
      masked_scores<true, false>(p, k, m, rows, key0, causal_here, s);
    } else if (tail) {
      masked_scores<false, false>(p, k, m, rows, key0, causal_here, s);
    } else {
      each_score(s, [&](float& x, int, int nt, int e4) { x = fmaf(x, p.scale_log2, -rows.base[nt][e4 & 1]); });
    }
  }

  // A masked step: a row sees the keys up to `last`. ROWS: the rows'
  // references are needed (a causal step, an array mask); ARRAY: the call
  // has a mask array.
  template <bool ROWS, bool ARRAY>
  static __device__ __forceinline__ void masked_scores(
      const Params& p,
      const MmaBlock& k,
      const Masks& m,
      const Rows& rows,
      int key0,
      bool causal_here,
      float (&s)[TPW][NT][4]) {
    int pos[NT][2];
    if constexpr (ROWS) {
      positions(m, pos);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = nt * 8 + 2 * k.t + e;
        RowRef ref{};
        int last = k.k_end - 1;
        if constexpr (ROWS) {
          ref = row_ref_at(p, k.b, k.kvh, k.r0 + min(r, k.nr - 1), pos[nt][e]);
          if (causal_here) {
            last = min(last, ref.causal_limit);
          }
        }
#pragma unroll
        for (int u = 0; u < TPW; ++u) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& x = s[u][nt][2 * h + e];
            const int key = key0 + 16 * u + k.g + 8 * h;
            x *= p.scale_log2;
            if (key > last) {
              x = neg_inf();
            } else if (ARRAY && r < k.nr) {
              x = apply_array_mask(p, k.b, ref, key, x);
            }
            x -= rows.base[nt][e];
          }
        }
      }
    }
  }

  // ---- The lazy max ----

  // Whether some score of the warp's step exceeds its row's limit (or is
  // NaN): a warp-uniform vote for raise_max.
  static __device__ __forceinline__ bool over_limit(const Rows& rows, float (&s)[TPW][NT][4]) {
    bool over = false;
    each_score(s, [&](float& x, int, int nt, int e4) { over |= !(x <= rows.lim[nt][e4 & 1]); });
    return __any_sync(0xffffffffu, over);
  }

  // The max of row (nt, e)'s scores of the step over the warp, NaN if any
  // is NaN.
  static __device__ __forceinline__ float step_max(const float (&s)[TPW][NT][4], int nt, int e) {
    float mx = neg_inf();
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx = mma_detail::fmax_nan(mx, s[u][nt][2 * h + e]);
      }
    }
    mx = mma_detail::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    mx = mma_detail::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
    mx = mma_detail::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    return mx;
  }

  // The slow path: every row moves its base to its new max, and its
  // denominator, its output rows o and the step's scores follow.
  template <int NCH>
  static __device__ __forceinline__ void raise_max(Rows& rows, float (&s)[TPW][NT][4], float (&o)[NCH][NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float corr[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float mx = step_max(s, nt, e);
        const float m_old = ref_max(rows, nt, e);
        const float m_max = mma_detail::fmax_nan(m_old, mx + rows.base[nt][e]);
        const float m_new = m_max == pos_inf() ? qsdpa::quiet_nan() : m_max; // NaN: poisoned
        const float b_new = m_new == neg_inf() ? 0.0f : m_new;
        corr[e] = mma_detail::exp2_fast(m_old - b_new); // 0 while m is -inf, 1 if unchanged
        const float shift = rows.base[nt][e] - b_new;
#pragma unroll
        for (int u = 0; u < TPW; ++u) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s[u][nt][2 * h + e] += shift;
          }
        }
        rows.base[nt][e] = b_new;
        rows.lim[nt][e] = m_new == neg_inf() ? neg_inf() : kLazyMax;
        rows.l[nt][e] *= corr[e];
      }
#pragma unroll
      for (int j = 0; j < NCH; ++j) {
        o[j][nt][0] *= corr[0];
        o[j][nt][1] *= corr[1];
        o[j][nt][2] *= corr[0];
        o[j][nt][3] *= corr[1];
      }
    }
  }

  // ---- Weights ----

  // The step's weights 2^s, summed into the rows' denominators, as P^T's B
  // fragments: S^T's accumulators hold (key g, query rows 2t, 2t+1);
  // movmatrix transposes each 8x8 half into the B layout (query row g, keys
  // 2t, 2t+1) in registers.
  static __device__ __forceinline__ void weights(Rows& rows, float (&s)[TPW][NT][4], uint32_t (&pb)[TPW][NT][2]) {
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p0 = mma_detail::exp2_fast(s[u][nt][e]);
          const float p1 = mma_detail::exp2_fast(s[u][nt][2 + e]);
          rows.l[nt][e] += p0 + p1;
          s[u][nt][e] = p0;
          s[u][nt][2 + e] = p1;
        }
        pb[u][nt][0] = mma_detail::transpose8x8(mma_detail::pack2<T>(s[u][nt][0], s[u][nt][1]));
        pb[u][nt][1] = mma_detail::transpose8x8(mma_detail::pack2<T>(s[u][nt][2], s[u][nt][3]));
      }
    }
  }
};

} // namespace mlx_qsdpa::cuda
