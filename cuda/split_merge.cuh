// Copyright © 2026 mlx-qsdpa contributors.
//
// The merge of split-K partials, done by the decode kernel itself, as a
// tree (split_plan.h's merge_tree gives its sizes; the host picks its radix,
// Params::merge_radix). Every block of a (batch, kv head, row tile) writes
// its partial (o, m, l) rows into slot `split` of level 0 and counts itself
// in on its group's counter (groups of merge_radix consecutive slots); the
// block that arrives last in a group merges the group (the exact LSE merge)
// into slot `group` of the next level and counts itself in there, and so
// on; the last block of the last level (at most merge_radix slots) merges
// into the output, with the sink and the normalisation.
//
// Why in the kernel: on MLX's CUDA build each graph node costs host time to
// record and GPU time to start (a separate merge kernel took ~5 us,
// 2026-11-28). Why few levels: every level adds a chain of round trips to
// L2 after the last block's partial (its writes acknowledged before the
// count, the atomic, the loads): two levels of 8 took ~5 us of a 32K call
// (2026-11-29, a build without the merge). A merge step streams its
// members' rows through the block's shared memory with cp.async, two rounds
// in flight, so one step over 64 small partials costs about one round trip
// plus the bytes; the host keeps a step's bytes near kMergeStepBytes
// (split_plan.h) and the tree flat.
//
// The counters are zero when a kernel starts (the host hands out zeroed
// counters, csrc/cuda/quant_sdpa_cuda.cpp) and the last block of a group
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

__device__ __forceinline__ float4 scale4(float4 x, float f) {
  return make_float4(x.x * f, x.y * f, x.z * f, x.w * f);
}

// A thread's running merge of one float4 column: the max so far, the
// denominator and the column, both relative to that max.
struct Running {
  float M = neg_inf();
  float L = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
};

// Round `k` of R members of a thread's column (row `row` of the partials,
// float4 d4): the o columns go to the thread's slots of buffer k % 2 with
// cp.async (16 bytes each, zero-filled past the last member), (m, l) to
// registers with 8-byte loads from L2 (other blocks wrote them: .cg).
// Commits one cp.async group, empty past the last round, so that a wait for
// all but the newest group always finds round k - 1 complete.
template <int R>
__device__ __forceinline__ void issue_round(const Params& p, int64_t n_rows, int64_t row, int d4, int64_t first,
    int members, int k, float4* slots, float2 (&ml)[R]) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int mu = k * R + u;
    const bool ok = mu < members;
    const int64_t slot_row = (first + mu) * n_rows + row;
    const float* src = ok ? p.part_o + slot_row * p.D + 4 * d4 : p.part_o;
    mma_detail::cp_async16(slots + ((k % 2) * R + u) * kThreads, src, ok ? 16 : 0);
    ml[u] = ok ? __ldcg(reinterpret_cast<const float2*>(p.part_ml) + slot_row) : make_float2(neg_inf(), 0.0f);
  }
  mma_detail::cp_async_commit();
}

// Folds round k (landed) into the running merge.
template <int R>
__device__ __forceinline__ void fold_round(const float4* slots, int k, const float2 (&ml)[R], Running& run) {
  float M = run.M;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    M = fmaxf(M, ml[u].x);
  }
  // A partial that saw no key (m = -inf) weighs nothing; so does the
  // running merge while it has seen none.
  const float keep = run.M == neg_inf() ? 0.0f : exp2f(run.M - M);
  run.L *= keep;
  run.acc = scale4(run.acc, keep);
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const float f = ml[u].x == neg_inf() ? 0.0f : exp2f(ml[u].x - M);
    run.L = fmaf(ml[u].y, f, run.L);
    run.acc = fma4(slots[((k % 2) * R + u) * kThreads], f, run.acc);
  }
  run.M = M;
}

// Merge the partials in slots [first, first + members) of the tile's rows
// into slot `dst` (dst >= 0) or into the output (dst < 0). A thread takes
// float4 columns of the rows, one after another, and streams each column's
// members through its own shared slots (2 R float4, `slots` + j kThreads for
// j < 2 R, the thread's own, so no barrier is needed between a copy and its
// read), R members a round, the next round's copies in flight while the
// current one is folded in.
template <int R>
__device__ inline void merge_step(const Params& p, int b, int kvh, int r0, int nr, int64_t first, int members,
    int64_t dst, float4* slots) {
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.Lq;
  const int D4 = p.D / 4;
  const int n_cols = nr * D4;
  const int rounds = (members + R - 1) / R;
  for (int idx = threadIdx.x; idx < n_cols; idx += kThreads) {
    const int r = idx / D4;
    const int d4 = idx - r * D4;
    const RowRef ref = row_ref(p, b, kvh, r0 + r);
    Running run;
    float2 ml_a[R], ml_b[R]; // rounds k (even) and k + 1
    issue_round<R>(p, n_rows, ref.out_row, d4, first, members, 0, slots, ml_a);
    for (int k = 0; k < rounds; k += 2) {
      issue_round<R>(p, n_rows, ref.out_row, d4, first, members, k + 1, slots, ml_b);
      mma_detail::cp_async_wait<1>();
      fold_round<R>(slots, k, ml_a, run);
      if (k + 1 < rounds) {
        issue_round<R>(p, n_rows, ref.out_row, d4, first, members, k + 2, slots, ml_a);
        mma_detail::cp_async_wait<1>();
        fold_round<R>(slots, k + 1, ml_b, run);
      }
    }
    mma_detail::cp_async_wait_all(); // the empty last group, before the slots are reused
    if (dst >= 0) {
      const int64_t row = dst * n_rows + ref.out_row;
      reinterpret_cast<float4*>(p.part_o + row * p.D)[d4] = run.acc;
      if (d4 == 0) {
        reinterpret_cast<float2*>(p.part_ml)[row] = make_float2(run.M, run.L);
      }
    } else {
      const Finalized fin = finalize_row(p, ref.h, run.M, run.L);
      const int64_t o = ref.out_row * p.D + 4 * d4;
      store_from_float(p.out, o, run.acc.x * fin.mult, p.out_type);
      store_from_float(p.out, o + 1, run.acc.y * fin.mult, p.out_type);
      store_from_float(p.out, o + 2, run.acc.z * fin.mult, p.out_type);
      store_from_float(p.out, o + 3, run.acc.w * fin.mult, p.out_type);
      if (d4 == 0 && p.lse) {
        p.lse[ref.out_row] = fin.lse;
      }
    }
  }
}

} // namespace merge_detail

// Called by every thread of every block once its partial rows (r0 .. r0 +
// nr - 1 of kv head kvh, batch b; slot blockIdx.x of level 0) are written,
// with shared memory `smem` of kSmemBytes that the block no longer reads.
// Returns once the block is not the last of its group at some level, or has
// written the output. Not inlined: inlined, its loop of copies changed
// ptxas's register plan of the decode loops before it (spills in the
// 16-row and fp4 loops, 2026-11-29); a call keeps the two apart.
template <int kSmemBytes>
__device__ __noinline__ void merge_splits(const Params& p, int b, int kvh, int r0, int nr, unsigned char* smem) {
#if defined(QSDPA_TIMING_SKIP_MERGE)
  // Measurement builds only (run_gpu.sh variants): the call's time without
  // the merge; the output is NOT written. The counters stay zero.
  return;
#endif
  // Members per round: two rounds of a float4 per thread and member fit
  // after the flag (at most 16: the (m, l) pairs wait in registers).
  constexpr int kSlotBytes = kSmemBytes - 16;
  constexpr int R = kSlotBytes / (2 * 16 * kThreads) < 16 ? kSlotBytes / (2 * 16 * kThreads) : 16;
  static_assert(R >= 1, "room for two rounds of one member");
  MergeSmem& s = *reinterpret_cast<MergeSmem*>(smem);
  float4* const slots = reinterpret_cast<float4*>(smem + 16) + threadIdx.x;
  const int radix = p.merge_radix;
  const int64_t n_tiles = int64_t(gridDim.z) * gridDim.y;
  const int64_t tile = int64_t(b) * gridDim.y + blockIdx.y;
  int count = p.n_splits; // partials of this level
  int index = blockIdx.x; // this block's partial in it
  int64_t slot_base = 0; // the level's first slot
  int64_t counter_base = 0; // and first counter
  while (true) {
    const int group = index / radix;
    const int first = group * radix;
    const int members = min(radix, count - first);
    // Every thread's partial writes are visible GPU-wide before the block is
    // counted in: the barrier orders them before thread 0's release (the
    // atomic's acq_rel), which is cumulative (the pattern of cooperative
    // groups' grid barrier), so one fence per block does instead of one per
    // thread. Its acquire half, followed by the second barrier, orders the
    // other members' partials before this block's reads of them (which go
    // to L2: ld.global.cg, cp.async.cg) when it arrives last.
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
    const bool root = count <= radix;
    const int64_t dst = root ? -1 : slot_base + count + group;
    merge_detail::merge_step<R>(p, b, kvh, r0, nr, slot_base + first, members, dst, slots);
    if (root) {
      return;
    }
    counter_base += (count + radix - 1) / radix;
    slot_base += count;
    index = group;
    count = (count + radix - 1) / radix;
  }
}

} // namespace mlx_qsdpa::cuda
