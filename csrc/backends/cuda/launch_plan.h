// Copyright © 2026 mlx-qsdpa contributors.
//
// Everything about launching the CUDA decode kernels that needs no CUDA:
// which kernel a call runs (the generic one or the tensor-core one, and its
// row tiles), and with which grid, block, shared memory, key splits and
// split-K workspace, and the kernels' parameter block. quant_sdpa_cuda.cpp
// executes such a plan through MLX's command encoder; the CUDA simulator of
// the test suite (tests/cuda) executes the very same functions on the CPU,
// so the plan is tested without a GPU. Plain C++ (no CUDA headers).
#pragma once

#include <cstdint>

#include "backends/cuda/params.h"
#include "backends/cuda/split_plan.h"
#include "call.h"

namespace mlx_qsdpa::cuda {

// Switches for tests and tuning only; the defaults are the product's plan.
// Set through set_test_overrides (python: _ext._set_cuda_test_overrides).
struct TestOverrides {
  bool force_simt = false; // the generic kernel wherever the tensor-core one would run
  int splits = 0; // > 0: this many key splits (clamped as the plan's own)
  bool force_pool = false; // split-K memory from the stream-ordered pool, not the rings
};

// The overrides every later call plans with (defined by the host code,
// quant_sdpa_cuda.cpp), and the ones in effect.
void set_test_overrides(const TestOverrides& overrides);
TestOverrides test_overrides();

enum class KernelKind { Simt, Mma };

struct KernelChoice {
  KernelKind kind;
  int row_tiles; // the tensor-core kernel's row tiles of 8 rows (1 or 2); 1 for the generic kernel
  int rows_per_block; // query rows per block: 8 * row_tiles, or kSimtRows
};

// What the device says about the chosen kernel.
struct KernelFacts {
  int smem_bytes; // its dynamic shared memory (KernelRef)
  int blocks_per_sm; // how many of its blocks an SM holds (the occupancy API's)
};

struct LaunchPlan {
  KernelChoice kernel;
  uint32_t grid[3]; // (splits, Hkv * row tiles, B)
  uint32_t block; // threads per block
  int smem_bytes;
  int row_tiles; // blocks along the G * Lq rows of a kv head
  int n_splits; // key ranges; 1: no partials, no merge
  int keys_per_split;
  // Split-K workspace, 0 where n_splits == 1: bytes of the partial outputs
  // and of their (m, l) pairs, and the merge counters (zero at the start).
  int64_t partial_o_bytes;
  int64_t partial_ml_bytes;
  int64_t counters;
};

// Each split pays a block epilogue and a step of the merge: at least this
// many keys per block. For the tensor-core kernel 512 keys per split and at
// most 3 of the 4 blocks an SM holds in the wave were chosen by a sweep of
// forced split counts (benchmarks/RESULTS.md): fewer partials to merge than
// with 4, more warps to hide latency than with 2. The generic kernel takes
// the same keys per split and the occupancy's wave (not swept).
constexpr int kMinKeysPerSplitMma = 8 * kKeysPerBlockStep;
constexpr int kMinKeysPerSplitSimt = 8 * kKeysPerBlockStep;
constexpr int kMmaWaveBlocksPerSm = 3;

// Whether the kernels cover a call of these sizes: head dims up to
// kMaxHeadDim (a multiple of the group size, so of 16), any query length
// from 1, and a grid within CUDA's limits with the smallest (8-row) blocks.
bool kernels_cover(int B, int Hq, int Hkv, int Lq, int D);

// Whether the cache's layout allows the tensor-core kernel, which copies
// whole chunks of key rows with 16-byte copies: packed rows on 16-byte
// boundaries with a contiguous last axis, scale/bias rows dense (D /
// group_size elements, consecutive keys adjacent) with 16-byte aligned
// (batch, head) bases, and float scales (affine, turbo) in the query dtype (the kernel
// feeds them to the fp16/bf16 arithmetic as they are). mx.quantize's arrays
// and mlx-lm's QuantizedKVCache (and prefix views of it) are such.
bool mma_layout_ok(const Call& c);

// Whether two tensors have the same format (mode, bits, group size).
bool same_format(const QuantTensor& a, const QuantTensor& b);

// The kernel a call runs: the tensor-core kernel where keys and values have
// one format (its instantiations are per format, not per pair), one is
// built for the query type, that format and head dim (mma_kernel_built)
// and the layout allows it (blocks of 8 query rows where the G * Lq rows of a kv head fit, else
// 16), the generic kernel otherwise.
KernelChoice choose_kernel(const Call& c, const TestOverrides& overrides);

// The launch of the chosen kernel on a GPU of sm_count SMs: the keys split
// over at most one wave of blocks (split_plan.h), the grid, and the split-K
// workspace. Requires kernels_cover and a non-empty output.
LaunchPlan plan_launch(
    const Call& c,
    const KernelChoice& kernel,
    const KernelFacts& facts,
    int sm_count,
    const TestOverrides& overrides);

// The kernels' parameter block for the plan; the split-K pointers
// (part_o, part_ml, counters) are left null for the host to bind.
Params make_params(const Call& c, const LaunchPlan& plan);

} // namespace mlx_qsdpa::cuda
