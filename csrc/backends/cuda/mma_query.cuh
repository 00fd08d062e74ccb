// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core kernel's query rows as the B operands of S^T = K Q^T:
// query row nt * 8 + g, the slots of lane t's K quarter (the top of
// decode_mma.cuh says which). A lane's slots of a K span are one run of
// S::kLaneSpan elements; where the layout allows (a dense last axis and
// rows at 16-byte boundaries, as mx arrays usually are) it is read with
// 16-byte loads, element by element otherwise.
//
// The loads are issued first and unpacked later (load, then unpack), so
// that the kernel can put its first copies out between them: issued after
// the copies, the query loads waited behind every block's copies; unpacked
// before the copies went out, they held the copies back by a round trip.
#pragma once

#include "common.cuh"
#include "mma_shape.cuh"

namespace mlx_qsdpa::cuda {

template <typename S>
struct MmaQuery {
  using F = typename S::F;
  static constexpr int NT = S::kRowTiles;
  static constexpr int kRunLoads = S::kLaneSpan / 8; // 16-byte loads per lane, span and row

  // What the K side of the MMA needs of the queries.
  struct Operands {
    uint32_t b[NT][S::kDimChunks][2]; // B fragments per row tile and k-chunk
    // Scale after the MMA: each accumulator row's (2t, 2t + 1 of each row
    // tile) sum of its queries over each span, and -sum(M q) with each
    // element's magic M (the MMA's products are (M + c) q), from the T
    // values the MMA sees.
    float sum[NT][S::kSpans][2];
    float neg_magic_sum[NT][S::kSpans][2];
  };

  // The 16-byte path's loads, before they are unpacked.
  struct Loads {
    uint4 words[NT][S::kSpans][kRunLoads];
    bool vec; // the 16-byte path; the element path fills the operands at once
  };

  // Issues the lane's query loads: into l.words on the 16-byte path, else
  // straight into q.b.
  static __device__ __forceinline__ void load(
      const Params& p, const MmaBlock& k, Loads& l, Operands& q) {
    const uint16_t* qp = static_cast<const uint16_t*>(p.q);
    l.vec = p.qs[3] == 1 && (p.qs[0] | p.qs[1] | p.qs[2]) % 8 == 0 && reinterpret_cast<uintptr_t>(p.q) % 16 == 0;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = nt * 8 + k.g;
      const bool ok = r < k.nr;
      const RowRef ref = row_ref(p, k.b, k.kvh, k.r0 + min(r, k.nr - 1));
      const int64_t base = int64_t(k.b) * p.qs[0] + int64_t(ref.h) * p.qs[1] + int64_t(ref.i) * p.qs[2];
      if (l.vec) {
#pragma unroll
        for (int sp = 0; sp < S::kSpans; ++sp) {
          const uint4* src = reinterpret_cast<const uint4*>(qp + base + S::kSpan * sp + S::kLaneSpan * k.t);
#pragma unroll
          for (int v = 0; v < kRunLoads; ++v) {
            l.words[nt][sp][v] = ok ? src[v] : uint4{0u, 0u, 0u, 0u};
          }
        }
      } else {
#pragma unroll
        for (int c = 0; c < S::kDimChunks; ++c) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int lo = S::kSpan * (c / S::kChunksPerSpan) + S::kLaneSpan * k.t +
                S::pair_lo(2 * (c % S::kChunksPerSpan) + j);
            const int hi = lo + F::kCodesPerWord / 2;
            q.b[nt][c][j] = ok ? uint32_t(qp[base + lo * p.qs[3]]) | (uint32_t(qp[base + hi * p.qs[3]]) << 16) : 0u;
          }
        }
      }
    }
  }

  // The 16-byte path's words into q.b.
  static __device__ __forceinline__ void unpack(const Loads& l, Operands& q) {
    if (!l.vec) {
      return;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int sp = 0; sp < S::kSpans; ++sp) {
        uint32_t w[S::kLaneSpan / 2]; // the run's elements, two per word
#pragma unroll
        for (int v = 0; v < kRunLoads; ++v) {
          w[4 * v] = l.words[nt][sp][v].x;
          w[4 * v + 1] = l.words[nt][sp][v].y;
          w[4 * v + 2] = l.words[nt][sp][v].z;
          w[4 * v + 3] = l.words[nt][sp][v].w;
        }
#pragma unroll
        for (int cc = 0; cc < S::kChunksPerSpan; ++cc) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            // Elements lo and hi = lo + kCodesPerWord / 2 of the run: the
            // same half of their words (kCodesPerWord / 2 is even).
            const int lo = S::pair_lo(2 * cc + j);
            const int hi = lo + F::kCodesPerWord / 2;
            q.b[nt][sp * S::kChunksPerSpan + cc][j] = __byte_perm(w[lo / 2], w[hi / 2], lo % 2 ? 0x7632u : 0x5410u);
          }
        }
      }
    }
  }

  // q.sum and q.neg_magic_sum (scale after the MMA only), from q.b.
  static __device__ __forceinline__ void span_sums(int t, Operands& q) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int sp = 0; sp < S::kSpans; ++sp) {
        float x = 0.0f, y = 0.0f; // row nt * 8 + g, this lane's slots
#pragma unroll
        for (int cc = 0; cc < S::kChunksPerSpan; ++cc) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float q2 = mma_detail::pair_sum<typename S::T>(q.b[nt][sp * S::kChunksPerSpan + cc][j]);
            const int sh = qsdpa::element_shift(S::pair_lo(2 * cc + j) % F::kCodesPerWord, S::kBits);
            x += q2;
            y = fmaf(-F::magic_value(F::magic_pos(sh)), q2, y); // negative: no negation in the loop
          }
        }
#pragma unroll
        for (int lanes = 1; lanes <= 2; lanes *= 2) {
          x += __shfl_xor_sync(0xffffffffu, x, lanes);
          y += __shfl_xor_sync(0xffffffffu, y, lanes);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          q.sum[nt][sp][e] = __shfl_sync(0xffffffffu, x, 4 * (2 * t + e));
          q.neg_magic_sum[nt][sp][e] = __shfl_sync(0xffffffffu, y, 4 * (2 * t + e));
        }
      }
    }
  }
};

} // namespace mlx_qsdpa::cuda
