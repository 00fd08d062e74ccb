// Copyright © 2026 mlx-qsdpa contributors.
//
// The merge of split-K partials, done by the decode kernel itself, as a
// tree (split_plan.h's merge_tree gives its sizes). Every block of a
// (batch, kv head, row tile) writes its partial (o, m, l) rows into slot
// `split` of level 0 and counts itself in on its group's counter (groups
// of kMergeRadix consecutive slots); the block that arrives last in a group
// merges the group (the exact LSE merge) into slot `group` of the next
// level and counts itself in there, and so on; the last block of the last
// level (at most kMergeRadix slots) merges into the output, with the sink
// and the normalisation.
//
// Why in the kernel and why a tree: on MLX's CUDA build each graph node
// costs host time to record and GPU time to start (a separate merge kernel
// measured slower than the merge inside the decode kernel); and a single
// last block that
// merges all partials of a tile alone is latency-bound (one SM pulling every
// partial from L2 a few KB at a time). A merge step of the tree reads at
// most kMergeRadix partials, all loads in flight at once, and all but the
// last level overlap with blocks still decoding; a step is one round of
// loads (statistics and outputs together: a round for the statistics first
// would put a second round trip on the tail).
//
// The counters are zero when a kernel starts (the host hands out zeroed
// counters, quant_sdpa_cuda.cpp) and the last block of a group
// sets the group's counter back to zero, so counters can be handed out
// again once the kernel that used them has completed.
#pragma once

#include "common.cuh"
#include "ptx.cuh"

namespace mlx_qsdpa::cuda {

struct MergeSmem {
  int last; // whether this block arrived last in its group
};

namespace merge_detail {

__device__ __forceinline__ float4 fma4(float4 x, float f, float4 acc) {
  return make_float4(fmaf(x.x, f, acc.x), fmaf(x.y, f, acc.y), fmaf(x.z, f, acc.z), fmaf(x.w, f, acc.w));
}

// Merge the partials in slots [first, first + members) of the tile's rows
// into slot `dst` (dst >= 0) or into the output (dst < 0). One round of
// loads: a thread reads, for each of its float4 columns, every member's
// column and (m, l), and works out the row's max and denominator itself
// (the threads of a row repeat that arithmetic instead of waiting on each
// other through shared memory). Partial rows are read with ld.global.cg
// (from L2): other blocks wrote them.
//
// The step runs with one warp per scheduler and nothing to hide its
// latencies, so the instructions before its loads are issued count: a
// member's column is one pointer step from the previous member's (slots
// lie n_rows rows apart), not a 64-bit index product per member, and a
// column past the tile's rows skips its loads (cuobjdump: the loads issue a
// few hundred instructions sooner after the counter atomic than with
// per-member index products). kD: the head dim where the kernel has it at
// compile time (its divisions become shifts), else 0. kCols: float4 columns
// per thread and round (each adds 24 registers; the one-tile-row
// tensor-core kernels take 1, so that the merge does not make them spill).
template <int kD, int kCols>
__device__ inline void merge_step(
    const Params& p, int b, int kvh, int r0, int nr, int64_t first, int members, int64_t dst) {
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.Lq;
  const int D4 = (kD > 0 ? kD : p.D) / 4;
  const int n_cols = nr * D4;
  const int64_t o_slot = n_rows * D4; // float4s from a slot's row to the next slot's
  for (int c0 = threadIdx.x; c0 < n_cols; c0 += kCols * kThreads) {
    float4 x[kCols][kMergeRadix];
    float m[kCols][kMergeRadix], l[kCols][kMergeRadix];
    RowRef refs[kCols];
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int idx = c0 + k * kThreads;
      const int r = idx / D4;
      refs[k] = row_ref(p, b, kvh, r0 + min(r, nr - 1)); // r < nr unless idx >= n_cols
      if (idx < n_cols) {
        const int64_t slot_row = first * n_rows + refs[k].out_row; // member 0's
        const float4* po = reinterpret_cast<const float4*>(p.part_o) + slot_row * D4 + (idx - r * D4);
        const float2* pml = reinterpret_cast<const float2*>(p.part_ml) + slot_row;
#pragma unroll
        for (int u = 0; u < kMergeRadix; ++u) {
          const bool ok = u < members;
          x[k][u] = ok ? __ldcg(po) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          const float2 ml = ok ? __ldcg(pml) : make_float2(neg_inf(), 0.0f);
          m[k][u] = ml.x;
          l[k][u] = ml.y;
          po += o_slot;
          pml += n_rows;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int idx = c0 + k * kThreads;
      if (idx >= n_cols) {
        break;
      }
      const int r = idx / D4;
      const int d4 = idx - r * D4;
      const RowRef& ref = refs[k];
      float M = neg_inf();
#pragma unroll
      for (int u = 0; u < kMergeRadix; ++u) {
        M = mma_detail::fmax_nan(M, m[k][u]); // NaN: a poisoned partial (common.cuh)
      }
      float L = 0.0f;
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int u = 0; u < kMergeRadix; ++u) {
        const float f = qsdpa::rescale(m[k][u], M); // 0: a partial that saw no key
        L = fmaf(l[k][u], f, L);
        acc = fma4(x[k][u], f, acc);
      }
      if (dst >= 0) {
        const int64_t row = dst * n_rows + ref.out_row;
        reinterpret_cast<float4*>(p.part_o)[row * D4 + d4] = acc;
        if (d4 == 0) {
          p.part_ml[row * 2] = M;
          p.part_ml[row * 2 + 1] = L;
        }
      } else {
        const qsdpa::Finalized fin = finalize_row(p, ref.h, M, L);
        const int64_t o = (ref.out_row * D4 + d4) * 4;
        store_from_float(p.out, o, scaled_output(acc.x, fin.mult), p.out_type);
        store_from_float(p.out, o + 1, scaled_output(acc.y, fin.mult), p.out_type);
        store_from_float(p.out, o + 2, scaled_output(acc.z, fin.mult), p.out_type);
        store_from_float(p.out, o + 3, scaled_output(acc.w, fin.mult), p.out_type);
        if (d4 == 0 && p.lse) {
          p.lse[ref.out_row] = fin.lse;
        }
      }
    }
  }
}

} // namespace merge_detail

// Called by every thread of every block once its partial rows (r0 .. r0 +
// nr - 1 of kv head kvh, batch b; slot blockIdx.x of level 0) are written;
// `s` may alias shared memory the block no longer reads. Returns once the
// block is not the last of its group at some level, or has written the
// output. kD, kCols: merge_step's.
template <int kD = 0, int kCols = 2>
__device__ inline void merge_splits(const Params& p, int b, int kvh, int r0, int nr, MergeSmem& s) {
  const int64_t n_tiles = int64_t(gridDim.z) * gridDim.y;
  const int64_t tile = int64_t(b) * gridDim.y + blockIdx.y;
  int count = p.n_splits; // partials of this level
  int index = blockIdx.x; // this block's partial in it
  int64_t slot_base = 0; // the level's first slot
  int64_t counter_base = 0; // and first counter
  while (true) {
    const int group = index / kMergeRadix;
    const int first = group * kMergeRadix;
    const int members = min(kMergeRadix, count - first);
    // Every thread's partial writes are visible GPU-wide before the block is
    // counted in: the barrier orders them before thread 0's release (the
    // atomic's acq_rel), which is cumulative (the pattern of cooperative
    // groups' grid barrier), so one fence per block does instead of one per
    // thread. Its acquire half, followed by the second barrier, orders the
    // other members' partials before this block's reads of them (which go
    // to L2, ld.global.cg) when it arrives last.
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int* counter = p.counters + (counter_base + group) * n_tiles + tile;
      const unsigned int before = mma_detail::atomic_add_acq_rel(counter, 1u);
      s.last = before == unsigned(members - 1);
      if (s.last) {
        *counter = 0u; // every member has counted: ready for reuse
      }
    }
    __syncthreads();
    if (!s.last) {
      return;
    }
    const bool root = count <= kMergeRadix;
    const int64_t dst = root ? -1 : slot_base + count + group;
    merge_detail::merge_step<kD, kCols>(p, b, kvh, r0, nr, slot_base + first, members, dst);
    if (root) {
      return;
    }
    counter_base += (count + kMergeRadix - 1) / kMergeRadix;
    slot_base += count;
    index = group;
    count = (count + kMergeRadix - 1) / kMergeRadix;
  }
}

} // namespace mlx_qsdpa::cuda
