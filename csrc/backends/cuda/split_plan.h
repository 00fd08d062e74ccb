// Copyright © 2026 mlx-qsdpa contributors.
//
// How a call is spread over blocks: row tiles, key splits and keys per
// split, and the sizes of the split merge's tree. Plain C++ (no CUDA
// headers): launch_plan.cpp uses it, and it is unit-tested on machines
// without a GPU (tests/cuda/launch_plan_check.cpp, run by
// tests/test_cuda_host_logic.py).
#pragma once

#include <algorithm>
#include <cstdint>

#include "params.h"

namespace mlx_qsdpa::cuda {

// The grid's y extent (kv heads x row tiles) is limited to 65535 blocks.
constexpr int64_t kMaxGridY = 65535;
// The partials' indexing bounds the split count and the partial elements.
constexpr int kMaxSplits = 1024;
constexpr int64_t kMaxPartialElements = int64_t(1) << 30;

struct SplitInput {
  int B = 1, Hkv = 1, rows = 1; // rows: the G * Lq query rows of a kv head
  int Lk = 0, D = 128;
  int64_t n_rows = 1; // B * Hq * Lq output rows
  int rows_per_block = 8;
  int64_t wave = 1; // blocks that fill the GPU once (blocks per SM x SMs)
  int min_keys_per_split = kKeysPerBlockStep;
  int forced_splits = 0; // > 0: this many splits (clamped): tests and tuning
};

struct SplitPlan {
  int row_tiles; // blocks along the rows of a kv head
  int n_splits; // key ranges (1: one pass, no merge)
  int keys_per_split; // a multiple of kKeysPerBlockStep
};

// Whether a grid for these shapes fits CUDA's limits with blocks of
// rows_per_block query rows.
inline bool grid_fits(int B, int Hkv, int rows, int rows_per_block) {
  const int64_t row_tiles = (int64_t(rows) + rows_per_block - 1) / rows_per_block;
  return B <= 65535 && int64_t(Hkv) * row_tiles <= kMaxGridY;
}

// Split the keys into as many ranges as one wave of blocks holds (never
// more: a block past the wave waits for a free slot and runs after the
// others, and every block pays its first keys, its epilogue and a share of
// the merge, so more than a wave measured slower), with at least
// min_keys_per_split keys per block, at most kMaxSplits splits and
// kMaxPartialElements partial elements; no split is empty.
inline SplitPlan plan_splits(const SplitInput& in) {
  SplitPlan plan;
  plan.row_tiles = (in.rows + in.rows_per_block - 1) / in.rows_per_block;
  const int64_t base_blocks = std::max<int64_t>(1, int64_t(in.B) * in.Hkv * plan.row_tiles);
  int64_t splits = std::max<int64_t>(in.wave, 1) / base_blocks;
  splits = std::min<int64_t>(splits, (int64_t(in.Lk) + in.min_keys_per_split - 1) / in.min_keys_per_split);
  if (in.forced_splits > 0) {
    splits = in.forced_splits;
  }
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits));
  while (splits > 1 && splits * in.n_rows * in.D > kMaxPartialElements) {
    splits /= 2;
  }
  const int step = kKeysPerBlockStep;
  int64_t kps = (int64_t(in.Lk) + splits - 1) / splits;
  kps = std::max<int64_t>(step, (kps + step - 1) / step * step);
  plan.keys_per_split = int(kps);
  plan.n_splits = int(std::max<int64_t>(1, (int64_t(in.Lk) + kps - 1) / kps));
  return plan;
}

// The merge of the splits' partials is a tree (split_merge.cuh): the
// last block of each group of kMergeRadix partials of a level merges them
// into one partial of the next level, or into the output once a level has
// at most kMergeRadix partials. A merge step then reads at most kMergeRadix
// partials, one round of loads, and the levels below the last one are
// merged while other blocks still decode. Per output row a call needs
// `slots` partials, and per (batch, row tile) `counters` counters.
struct MergeTree {
  int64_t slots = 0;
  int64_t counters = 0;
};

inline MergeTree merge_tree(int n_splits) {
  MergeTree t;
  int64_t count = n_splits;
  while (count > 1) {
    t.slots += count;
    t.counters += (count + kMergeRadix - 1) / kMergeRadix;
    if (count <= kMergeRadix) {
      break;
    }
    count = (count + kMergeRadix - 1) / kMergeRadix;
  }
  return t;
}

} // namespace mlx_qsdpa::cuda
