// Copyright © 2026 mlx-qsdpa contributors.
//
// Kernels that probe the Metal simulator itself: their outputs are checked
// against what Metal specifies (tests/metal/test_metal_sim_compat.py), so
// that the simulator's SIMD-group functions, built-ins and conversions can
// be trusted when they run the real kernels.
#include <metal_stdlib>

using namespace metal;

constant int fc_scale [[function_constant(0)]];

// Per thread, 16 results of SIMD-group functions of lane-dependent values.
[[kernel]] void simd_functions(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const float x = float(lane) + 1.0f;
  device float* o = out + tid * 16;
  o[0] = simd_sum(x);
  o[1] = simd_max(x);
  o[2] = simd_min(x);
  o[3] = simd_prefix_inclusive_sum(x);
  o[4] = simd_prefix_exclusive_sum(x);
  o[5] = simd_shuffle(x, (lane + 3) % 32);
  o[6] = simd_shuffle_down(x, 4u);
  o[7] = simd_shuffle_up(x, 4u);
  o[8] = simd_shuffle_xor(x, 5u);
  o[9] = simd_broadcast(x, 7);
  o[10] = simd_broadcast_first(x);
  o[11] = simd_any(lane == 9) ? 1.0f : 0.0f;
  o[12] = simd_all(lane < 31) ? 1.0f : 0.0f;
  o[13] = float(simd_sum(int(lane)));
  o[14] = simd_shuffle_rotate_down(x, 1u);
  o[15] = float(fc_scale) * x;
}

// Built-in values: 11 per thread.
[[kernel]] void builtins(
    device uint* out [[buffer(0)]],
    uint3 gpos [[thread_position_in_grid]],
    uint3 lpos [[thread_position_in_threadgroup]],
    uint lidx [[thread_index_in_threadgroup]],
    uint3 group [[threadgroup_position_in_grid]],
    uint3 groups [[threadgroups_per_grid]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  const uint3 grid_threads = groups * 4u;
  const uint linear = (gpos.z * grid_threads.y + gpos.y) * grid_threads.x + gpos.x;
  device uint* o = out + linear * 11;
  o[0] = gpos.x;
  o[1] = gpos.y;
  o[2] = gpos.z;
  o[3] = lpos.x;
  o[4] = lpos.y;
  o[5] = lidx;
  o[6] = group.x;
  o[7] = group.z;
  o[8] = sgid;
  o[9] = lane;
  o[10] = nsg;
}

// float -> half (stored), half -> float, and float -> bfloat -> float.
[[kernel]] void conversions(
    const device float* in [[buffer(0)]],
    device half* as_half [[buffer(1)]],
    device float* half_back [[buffer(2)]],
    device float* bfloat_back [[buffer(3)]],
    uint gid [[thread_position_in_grid]]) {
  as_half[gid] = half(in[gid]);
  half_back[gid] = float(as_half[gid]);
  const bfloat b = bfloat(in[gid]);
  bfloat_back[gid] = float(b);
}

// A reduction over a threadgroup whose last simdgroup is partial.
[[kernel]] void partial_simdgroup_sum(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* partial [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  const float s = simd_sum(in[tid]);
  if (lane == 0) {
    partial[sgid] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float total = 0.0f;
    for (uint i = 0; i < nsg; ++i) {
      total += partial[i];
    }
    out[0] = total;
  }
}

// The order in which the simulator runs threads: each thread appends its
// index to a log in device memory (log[0] counts the entries) twice, with
// a SIMD-group function between, where the scheduler may switch
// simdgroups. Device memory is not race-checked, and the simulator runs one
// fiber at a time, so the log is the order of the threads' turns.
[[kernel]] void turn_order(
    device uint* log [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  uint at = log[0];
  log[0] = at + 1;
  log[1 + at] = tid;
  simdgroup_barrier(mem_flags::mem_none);
  at = log[0];
  log[0] = at + 1;
  log[1 + at] = tid;
}
