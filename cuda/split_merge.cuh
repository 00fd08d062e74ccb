// Copyright © 2026 mlx-qsdpa contributors.
//
// The merge of split-K partials, done by the decode kernel itself: every
// block of a (batch, kv head, row tile) writes its partial (o, m, l) rows,
// then counts itself in on the tile's counter; the block that arrives last
// merges the tile's rows over all splits (the exact LSE merge), applies the
// sink and the normalisation, and writes the output. One kernel per call
// instead of a decode kernel and a merge kernel: on MLX's CUDA build each
// graph node costs host time to record and GPU time to start, and the merge
// kernel of 2026-11-28 took ~5 us for ~1 MB of partials.
//
// The counters are zero when a kernel starts (the host hands out zeroed
// counters, csrc/cuda/quant_sdpa_cuda.cpp) and the last block sets its
// tile's counter back to zero, so a counter can be handed out again once the
// kernel that used it has completed.
#pragma once

#include "common.cuh"

namespace mlx_qsdpa::cuda {

// Rows of a tile the merge handles (the largest block of either kernel).
constexpr int kMaxMergeRows = 16;
// Splits whose loads a thread keeps in flight together (the merge reads
// partials from L2 and is latency-bound).
constexpr int kMergeDepth = 8;

struct MergeSmem {
  float M[kMaxMergeRows]; // each row's max over the splits
  float L[kMaxMergeRows]; // and its denominator at that max
  int last; // whether this block arrived last
};

namespace merge_detail {

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

} // namespace merge_detail

// Called by every thread of every block once its partial rows (r0 .. r0 +
// nr - 1 of kv head kvh, batch b) are written; `s` may alias shared memory
// the block no longer reads. Returns at once in all but the tile's last
// block, which writes the tile's output rows (and lse).
__device__ inline void merge_splits_if_last(const Params& p, int b, int kvh, int r0, int nr, MergeSmem& s) {
  // Each thread's partial writes are visible GPU-wide before its block is
  // counted in (the fence-then-count pattern of CUDA's threadFenceReduction).
  __threadfence();
  __syncthreads();
  const int64_t tile = int64_t(b) * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) {
    const unsigned int before = atomicAdd(&p.counters[tile], 1u);
    s.last = before == unsigned(p.n_splits - 1);
    if (s.last) {
      p.counters[tile] = 0u; // every block has counted: ready for reuse
    }
  }
  __syncthreads();
  if (!s.last) {
    return;
  }
  __threadfence();

  const int n = p.n_splits;
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.Lq;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Partials are read with ld.global.cg (L2): other blocks wrote them.
  auto m_of = [&](int split, int64_t out_row) { return __ldcg(p.part_ml + (split * n_rows + out_row) * 2); };
  auto l_of = [&](int split, int64_t out_row) { return __ldcg(p.part_ml + (split * n_rows + out_row) * 2 + 1); };

  // 1. Per row (a warp each): the max over the splits, then the denominator.
  for (int r = warp; r < nr; r += kThreads / 32) {
    const int64_t out_row = row_ref(p, b, kvh, r0 + r).out_row;
    float M = neg_inf();
    for (int sp = lane; sp < n; sp += 32) {
      M = fmaxf(M, m_of(sp, out_row));
    }
    M = merge_detail::warp_max(M);
    float L = 0.0f;
    for (int sp = lane; sp < n; sp += 32) {
      const float m = m_of(sp, out_row);
      L += m == neg_inf() ? 0.0f : l_of(sp, out_row) * exp2f(m - M);
    }
    L = merge_detail::warp_sum(L);
    if (lane == 0) {
      s.M[r] = M;
      s.L[r] = L;
    }
  }
  __syncthreads();

  // 2. The rows' outputs, a float4 of one row per thread and step; splits
  // whose rows saw no key have m = -inf and weigh nothing.
  const int D4 = p.D / 4;
  for (int idx = threadIdx.x; idx < nr * D4; idx += kThreads) {
    const int r = idx / D4;
    const int d4 = idx - r * D4;
    const RowRef ref = row_ref(p, b, kvh, r0 + r);
    const float M = s.M[r];
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s0 = 0; s0 < n; s0 += kMergeDepth) {
      float ms[kMergeDepth];
      float4 x[kMergeDepth];
#pragma unroll
      for (int u = 0; u < kMergeDepth; ++u) {
        const int sp = s0 + u;
        const bool ok = sp < n;
        ms[u] = ok ? m_of(sp, ref.out_row) : neg_inf();
        x[u] = ok ? __ldcg(reinterpret_cast<const float4*>(p.part_o + (sp * n_rows + ref.out_row) * p.D) + d4)
                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int u = 0; u < kMergeDepth; ++u) {
        const float f = ms[u] == neg_inf() ? 0.0f : exp2f(ms[u] - M);
        acc.x = fmaf(x[u].x, f, acc.x);
        acc.y = fmaf(x[u].y, f, acc.y);
        acc.z = fmaf(x[u].z, f, acc.z);
        acc.w = fmaf(x[u].w, f, acc.w);
      }
    }
    const Finalized fin = finalize_row(p, ref.h, M, s.L[r]);
    const int64_t o = ref.out_row * p.D + 4 * d4;
    store_from_float(p.out, o, acc.x * fin.mult, p.out_type);
    store_from_float(p.out, o + 1, acc.y * fin.mult, p.out_type);
    store_from_float(p.out, o + 2, acc.z * fin.mult, p.out_type);
    store_from_float(p.out, o + 3, acc.w * fin.mult, p.out_type);
    if (d4 == 0 && p.lse) {
      p.lse[ref.out_row] = fin.lse;
    }
  }
}

} // namespace mlx_qsdpa::cuda
