// Copyright © 2026 mlx-qsdpa contributors.
#include "backends/cuda/launch_plan.h"

#include <algorithm>
#include <limits>

namespace mlx_qsdpa::cuda {

namespace {

int elem_bytes(int type) {
  return type == qsdpa::kElemFloat32 ? 4 : (type == qsdpa::kElemUint8 ? 1 : 2);
}

// The base and the byte strides of the first `dims` axes (those of size 1
// do not matter) are multiples of 16.
bool aligned16(const void* base, const int64_t (&strides)[4], const int64_t (&shape)[4], int itemsize, int dims) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) {
    return false;
  }
  for (int i = 0; i < dims; ++i) {
    if (shape[i] > 1 && (strides[i] * itemsize) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// Packed words [B, Hkv, Lk, D * bits / 32]: a contiguous last axis, rows on
// 16-byte boundaries.
bool mma_words_ok(const Call& c, const QuantTensor& t) {
  const int64_t shape[4] = {c.B, c.Hkv, c.Lk, qsdpa::packed_words(c.D, t.bits)};
  return (shape[3] == 1 || t.ws[3] == 1) && aligned16(t.w, t.ws, shape, 4, 3);
}

// Scales or biases [B, Hkv, Lk, D / group_size]: dense rows of consecutive
// keys from 16-byte aligned (batch, head) bases.
bool mma_scales_ok(const Call& c, const QuantTensor& t, const void* base, const int64_t (&strides)[4], int type) {
  const int64_t n_groups = c.D / t.group_size;
  const int64_t shape[4] = {c.B, c.Hkv, c.Lk, n_groups};
  return (shape[3] == 1 || strides[3] == 1) && (shape[2] == 1 || strides[2] == n_groups) &&
      aligned16(base, strides, shape, elem_bytes(type), 2);
}

bool mma_tensor_ok(const Call& c, const QuantTensor& t) {
  if (qsdpa::mode_float_scales(t.mode) && t.scale_type != c.q_type) {
    return false;
  }
  if (!mma_scales_ok(c, t, t.scales, t.ss, t.scale_type)) {
    return false;
  }
  if (t.biases && !mma_scales_ok(c, t, t.biases, t.bs, t.scale_type)) {
    return false;
  }
  return mma_words_ok(c, t);
}

} // namespace

bool kernels_cover(int B, int Hq, int Hkv, int Lq, int D) {
  const int rows = (Hq / std::max(Hkv, 1)) * Lq;
  return D >= 16 && D <= kMaxHeadDim && Lq >= 1 && grid_fits(B, Hkv, rows, kSimtRows);
}

bool mma_layout_ok(const Call& c) {
  return mma_tensor_ok(c, c.k) && mma_tensor_ok(c, c.v);
}

bool same_format(const QuantTensor& a, const QuantTensor& b) {
  return a.mode == b.mode && a.bits == b.bits && a.group_size == b.group_size;
}

KernelChoice choose_kernel(const Call& c, const TestOverrides& overrides) {
  if (!overrides.force_simt && same_format(c.k, c.v) &&
      mma_kernel_built(c.q_type, c.k.mode, c.k.bits, c.k.group_size, c.D) && mma_layout_ok(c)) {
    const int row_tiles = c.G * c.Lq <= 8 ? 1 : 2;
    return KernelChoice{KernelKind::Mma, row_tiles, 8 * row_tiles};
  }
  return KernelChoice{KernelKind::Simt, 1, kSimtRows};
}

LaunchPlan plan_launch(
    const Call& c,
    const KernelChoice& kernel,
    const KernelFacts& facts,
    int sm_count,
    const TestOverrides& overrides) {
  const bool mma = kernel.kind == KernelKind::Mma;
  // The tensor-core kernel's wave is capped below its occupancy; the
  // generic kernel's is its occupancy.
  const int wave_blocks_per_sm = mma ? kMmaWaveBlocksPerSm : std::numeric_limits<int>::max();
  SplitInput in;
  in.B = c.B;
  in.Hkv = c.Hkv;
  in.rows = c.G * c.Lq;
  in.Lk = c.Lk;
  in.D = c.D;
  in.n_rows = int64_t(c.B) * c.Hq * c.Lq;
  in.rows_per_block = kernel.rows_per_block;
  in.wave = int64_t(std::max(std::min(facts.blocks_per_sm, wave_blocks_per_sm), 1)) * std::max(sm_count, 1);
  in.min_keys_per_split = mma ? kMinKeysPerSplitMma : kMinKeysPerSplitSimt;
  in.forced_splits = overrides.splits;
  const SplitPlan split = plan_splits(in);

  LaunchPlan plan{};
  plan.kernel = kernel;
  plan.row_tiles = split.row_tiles;
  plan.n_splits = split.n_splits;
  plan.keys_per_split = split.keys_per_split;
  plan.grid[0] = uint32_t(split.n_splits);
  plan.grid[1] = uint32_t(c.Hkv * split.row_tiles);
  plan.grid[2] = uint32_t(c.B);
  plan.block = kThreads;
  plan.smem_bytes = facts.smem_bytes;
  if (split.n_splits > 1) {
    const MergeTree tree = merge_tree(split.n_splits);
    plan.partial_o_bytes = tree.slots * in.n_rows * c.D * int64_t(sizeof(float));
    plan.partial_ml_bytes = tree.slots * in.n_rows * 2 * int64_t(sizeof(float));
    plan.counters = int64_t(c.B) * c.Hkv * split.row_tiles * tree.counters;
  }
  return plan;
}

Params make_params(const Call& c, const LaunchPlan& plan) {
  Params p{};
  static_cast<Call&>(p) = c;
  p.rows = c.G * c.Lq;
  p.n_splits = plan.n_splits;
  p.keys_per_split = plan.keys_per_split;
  p.div_G = make_fast_div(c.G);
  p.div_Hkv = make_fast_div(c.Hkv);
  return p;
}

} // namespace mlx_qsdpa::cuda
