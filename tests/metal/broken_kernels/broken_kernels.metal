// Copyright © 2026 mlx-qsdpa contributors.
//
// Deliberately broken kernels: each has exactly one defect that the Metal
// simulator must report (tests/metal/test_metal_sim_detectors.py). They are
// never part of the metallib. `well_formed` uses the same features
// correctly and must run clean.
#include <metal_stdlib>

using namespace metal;

constant bool fc_never_set [[function_constant(7)]];

// Control: barrier, threadgroup memory, SIMD-group functions, all correct.
[[kernel]] void well_formed(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint3 tpg [[threads_per_threadgroup]]) {
  tg[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float neighbour = tg[(tid + 1) % tpg.x];
  out[tid] = simd_sum(neighbour) + float(lane);
}

// Threads 0..15 return before the barrier that the others wait at.
[[kernel]] void early_return_before_barrier(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 16) {
    return;
  }
  tg[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tg[tid];
}

// Even and odd simdgroups wait at two different barriers.
[[kernel]] void mismatched_barriers(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint sgid [[simdgroup_index_in_threadgroup]]) {
  if (sgid % 2 == 0) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0f;
}

// simd_sum under a lane-dependent condition: only lanes 0..15 call it.
[[kernel]] void divergent_simd_sum(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  float x = float(lane);
  if (lane < 16) {
    x = simd_sum(x);
  }
  out[tid] = x;
}

// Off by one: the last thread reads one element past the end of `in`.
[[kernel]] void read_past_end(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid < n) {
    out[gid] = in[gid] + in[gid + 1];
  }
}

// Off by one: thread n writes one element past the end of `out`.
[[kernel]] void write_past_end(
    device float* out [[buffer(0)]],
    constant uint& n [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid <= n) {
    out[gid] = 1.0f;
  }
}

// The last element of threadgroup memory is never written, and read.
[[kernel]] void read_unwritten_threadgroup(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tpg [[threads_per_threadgroup]]) {
  if (tid + 1 < tpg.x) {
    tg[tid] = float(tid);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tg[(tid + 1) % tpg.x];
}

// No barrier between the writes of one simdgroup and the reads of another.
[[kernel]] void missing_barrier(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tpg [[threads_per_threadgroup]]) {
  tg[tid] = float(tid);
  out[tid] = tg[(tid + 32) % tpg.x];
}

// Threadgroup memory indexed one past the length the host set.
[[kernel]] void threadgroup_past_end(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  tg[tid + 1] = float(tid);
  out[tid] = 0.0f;
}

// Reads a function constant that the launch does not set.
[[kernel]] void reads_unset_constant(
    device float* out [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  out[gid] = fc_never_set ? 1.0f : 2.0f;
}

// Accumulates into an output that nothing initialised.
[[kernel]] void accumulates_into_unwritten_output(
    device float* out [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  out[gid] += 1.0f;
}

// Stores a float4 at a 4-byte offset: Metal's float4 has alignment 16.
[[kernel]] void misaligned_float4_store(
    device float* out [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid < 8) {
    *((device float4*)(out + 1 + 4 * gid)) = float4(1.0f);
  }
}

// Stores a float 2 bytes into the buffer: a scalar must be aligned to its
// size too.
[[kernel]] void misaligned_float_store(
    device float* out [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid == 0) {
    *((device float*)((device uchar*)out + 2)) = 1.0f;
  }
}

// Races on threadgroup memory (the race detector). Each touches a byte from
// two threads in one barrier interval, at least one of them writing.

// Simdgroup 0 reads what simdgroup 1 then overwrites, with no barrier
// between (write-after-read).
[[kernel]] void write_after_read(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint sgid [[simdgroup_index_in_threadgroup]]) {
  tg[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sgid == 0) {
    out[tid] = tg[tid + 32]; // the read
  } else {
    tg[tid] = 0.0f; // the write
  }
}

// Simdgroup 0 writes what the other simdgroups read, with no barrier
// between (read-after-write). The bytes hold an earlier value, so no read
// is of an unwritten byte; simdgroup 0 reads only its own lanes' writes.
[[kernel]] void read_after_write(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  tg[tid] = 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sgid == 0) {
    tg[lane] = float(lane + 1); // the write
  }
  out[tid] = tg[lane]; // the read
}

// Two simdgroups write the same bytes in one interval.
[[kernel]] void write_after_write(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  tg[lane] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tg[lane];
}

// A barrier without mem_threadgroup between a write and another
// simdgroup's read: it orders device memory only.
[[kernel]] void barrier_without_threadgroup_flag(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tpg [[threads_per_threadgroup]]) {
  tg[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_device);
  out[tid] = tg[(tid + 32) % tpg.x];
}

// Lane 0 writes, the other lanes of its simdgroup read after a simd_sum,
// which exchanges values but orders no memory. With `ordered` set, a
// simdgroup_barrier(mem_threadgroup) orders them instead (clean);
// `execution_only` uses simdgroup_barrier(mem_none) (a race).
constant bool fc_ordered [[function_constant(3)]];
constant bool fc_execution_only [[function_constant(4)]];
[[kernel]] void lanes_share_threadgroup_memory(
    device float* out [[buffer(0)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  if (lane == 0) {
    tg[sgid] = float(sgid + 1); // the write
  }
  if (fc_ordered) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
  } else if (fc_execution_only) {
    simdgroup_barrier(mem_flags::mem_none);
  }
  const float s = simd_sum(float(lane));
  out[tid] = tg[sgid] + s; // the read
}
