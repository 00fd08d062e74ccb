// Copyright © 2026 mlx-qsdpa contributors.
//
// Measurement builds only (-DQSDPA_DEBUG_TIMELINE=1, run_gpu.sh timeline):
// thread 0 of every block of the decode kernel prints when its block
// reached a few points of its life (the GPU's global nanosecond timer) and
// how many of its SM's cycles each phase took, and every step of the split
// merge prints when its block arrived and when it finished merging.
// benchmarks/cuda/timeline.py turns the prints into a call's timeline: how
// long a block takes to get its first keys, to stream them, to write its
// partial, and how long the merge runs after the last block has decoded.
// Without the define every macro is empty and the kernels are unchanged.
#pragma once

#if defined(QSDPA_DEBUG_TIMELINE) && !defined(QSDPA_CUDA_SIM)

#include <cstdio>

namespace mlx_qsdpa::cuda::timeline {

// The points of a block's life that run() marks, in order.
// kJoined: past the barrier that waits for the block's four warps;
// kReduced: the rows' block max and sum known; kSummed: the warps' outputs
// summed in shared memory (the epilogue's steps). The tensor-core kernel
// (decode_mma.cuh) has one barrier, after its warps wrote their slices, and
// works out the statistics and sums as it writes the rows: its three points
// coincide, and its "streamed -> joined" includes writing the slices.
enum Point { kStart = 0, kFirstKeys, kStreamed, kJoined, kReduced, kSummed, kPartial, kPoints };

struct Marks {
  unsigned long long ns[kPoints]; // %globaltimer
  long long cycles[kPoints]; // clock64() of the block's SM
};

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned int sm_id() {
  unsigned int id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

__device__ __forceinline__ void mark(Marks& m, int point) {
  if (threadIdx.x == 0) {
    m.ns[point] = global_ns();
    m.cycles[point] = clock64();
  }
}

// "qsdpa-tl B x y z sm keys" and then each point's ns (kStart first) and
// each later point's cycles counted from kStart.
__device__ __forceinline__ void print_block(const Marks& m, int keys) {
  static_assert(kPoints == 7, "the format below");
  if (threadIdx.x == 0) {
    printf("qsdpa-tl B %d %d %d %u %d %llu %llu %llu %llu %llu %llu %llu %lld %lld %lld %lld %lld %lld\n", blockIdx.x,
           blockIdx.y, blockIdx.z, sm_id(), keys, m.ns[0], m.ns[1], m.ns[2], m.ns[3], m.ns[4], m.ns[5], m.ns[6],
           m.cycles[1] - m.cycles[0], m.cycles[2] - m.cycles[0], m.cycles[3] - m.cycles[0],
           m.cycles[4] - m.cycles[0], m.cycles[5] - m.cycles[0], m.cycles[6] - m.cycles[0]);
  }
}

// A block's steps of the split merge: per level it reached, when it entered
// the count-in (before the block barrier), when thread 0's counter atomic
// returned, when the block had counted itself in (after the second barrier)
// and whether it arrived last there; where it did, when thread 0 had its
// first column's loads in registers (merge_step) and when the step was done
// (the whole block: a barrier first). Printed once the block leaves the
// merge, so that printing does not delay its next level.
constexpr int kMaxMergeLevels = 8;
struct MergeMarks {
  int levels;
  unsigned long long enter[kMaxMergeLevels], counted[kMaxMergeLevels], arrive[kMaxMergeLevels];
  unsigned long long loaded[kMaxMergeLevels], done[kMaxMergeLevels];
  bool last[kMaxMergeLevels];
  unsigned long long pending_enter, pending_counted, pending_loaded; // of the level in progress
};

__device__ __forceinline__ void merge_enter(MergeMarks& m) {
  if (threadIdx.x == 0) {
    m.pending_enter = global_ns();
  }
}

// The timer reads below are taken on a branch on a value they must follow
// (the counter's old value; a sum of the loaded partials), so the GPU
// reads the timer only once that value is there.
__device__ __forceinline__ unsigned long long global_ns_after(unsigned int dep) {
  return dep == 0xFFFFFFFFu ? 0ull : global_ns();
}

// Thread 0 only, once its atomic has returned `before`.
__device__ __forceinline__ void merge_counted(MergeMarks& m, unsigned int before) {
  m.pending_counted = global_ns_after(before);
}

__device__ __forceinline__ void merge_arrived(MergeMarks& m, bool last) {
  if (threadIdx.x == 0 && m.levels < kMaxMergeLevels) {
    const int i = m.levels;
    m.arrive[i] = global_ns();
    m.enter[i] = m.pending_enter;
    m.counted[i] = m.pending_counted;
    m.last[i] = last;
    m.loaded[i] = 0;
    m.done[i] = 0;
    m.pending_loaded = 0;
    ++m.levels;
  }
}

// In merge_step, thread 0 once its first column's loads are in registers
// (dep is computed from them; the GPU's NaN is 0x7FFFFFFF, so the branch
// always reads the timer).
__device__ __forceinline__ void step_loaded(unsigned long long& loaded, float dep) {
  if (threadIdx.x == 0) {
    loaded = global_ns_after(__float_as_uint(dep));
  }
}

__device__ __forceinline__ void merge_done(MergeMarks& m) {
  __syncthreads();
  if (threadIdx.x == 0 && m.levels > 0) {
    m.done[m.levels - 1] = global_ns();
    m.loaded[m.levels - 1] = m.pending_loaded;
  }
}

// "qsdpa-tl M x y z level last arrive_ns done_ns enter_ns counted_ns
// loaded_ns" per level (done_ns and loaded_ns 0 where the block did not
// arrive last).
__device__ __forceinline__ void print_merges(const MergeMarks& m) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < m.levels; ++i) {
      printf("qsdpa-tl M %d %d %d %d %d %llu %llu %llu %llu %llu\n", blockIdx.x, blockIdx.y, blockIdx.z, i,
             m.last[i] ? 1 : 0, m.arrive[i], m.done[i], m.enter[i], m.counted[i], m.loaded[i]);
    }
  }
}

} // namespace mlx_qsdpa::cuda::timeline

#define QSDPA_TL_MARKS ::mlx_qsdpa::cuda::timeline::Marks qsdpa_tl_marks {}
#define QSDPA_TL_MARK(point) ::mlx_qsdpa::cuda::timeline::mark(qsdpa_tl_marks, ::mlx_qsdpa::cuda::timeline::point)
#define QSDPA_TL_PRINT_BLOCK(keys) ::mlx_qsdpa::cuda::timeline::print_block(qsdpa_tl_marks, keys)
// Only the level count is set: zeroing the whole struct (`{}`), which lives in
// local memory, cost every thread ~26 16-byte local stores right before the
// merge, inside the window the timeline measures (2026-11-29i: 0.6 us median
// from a block's "partial written" mark to its merge entry). Each level's
// fields are written when the level is reached.
#define QSDPA_TL_MERGE_MARKS          \
  ::mlx_qsdpa::cuda::timeline::MergeMarks qsdpa_tl_merge; \
  qsdpa_tl_merge.levels = 0
#define QSDPA_TL_MERGE_ENTER() ::mlx_qsdpa::cuda::timeline::merge_enter(qsdpa_tl_merge)
#define QSDPA_TL_MERGE_COUNTED(before) ::mlx_qsdpa::cuda::timeline::merge_counted(qsdpa_tl_merge, before)
#define QSDPA_TL_MERGE_ARRIVED(last) ::mlx_qsdpa::cuda::timeline::merge_arrived(qsdpa_tl_merge, last)
#define QSDPA_TL_MERGE_DONE() ::mlx_qsdpa::cuda::timeline::merge_done(qsdpa_tl_merge)
#define QSDPA_TL_MERGE_PRINT() ::mlx_qsdpa::cuda::timeline::print_merges(qsdpa_tl_merge)
// merge_step's extra parameter and argument (its "loaded" mark), and the mark.
#define QSDPA_TL_STEP_PARAM , unsigned long long& qsdpa_tl_loaded
#define QSDPA_TL_STEP_ARG , qsdpa_tl_merge.pending_loaded
#define QSDPA_TL_STEP_LOADED(dep) ::mlx_qsdpa::cuda::timeline::step_loaded(qsdpa_tl_loaded, dep)

#else

#define QSDPA_TL_MARKS
#define QSDPA_TL_MARK(point)
#define QSDPA_TL_PRINT_BLOCK(keys)
#define QSDPA_TL_MERGE_MARKS
#define QSDPA_TL_MERGE_ENTER()
#define QSDPA_TL_MERGE_COUNTED(before)
#define QSDPA_TL_MERGE_ARRIVED(last)
#define QSDPA_TL_MERGE_DONE()
#define QSDPA_TL_MERGE_PRINT()
#define QSDPA_TL_STEP_PARAM
#define QSDPA_TL_STEP_ARG
#define QSDPA_TL_STEP_LOADED(dep)

#endif
