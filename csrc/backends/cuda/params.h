// Copyright © 2026 mlx-qsdpa contributors.
//
// The interface between the CUDA kernels (csrc/backends/cuda/*.cu) and their
// host code (launch_plan.cpp, quant_sdpa_cuda.cpp): the parameter block
// every kernel takes by value, the block geometry both sides agree on, and
// the functions that hand out the kernels' addresses. Plain C++: the host
// side is compiled by the C++ compiler, not nvcc.
#pragma once

#include <cstdint>

#include "call.h"
#include "mlx_qsdpa/formats.h"

namespace mlx_qsdpa::cuda {

// n / d for 0 <= n < 2^31 and a divisor 1 <= d < 2^31 fixed for a call: one
// multiply-high, an add and a shift on the GPU (fast_div below), with the
// divisor's magic worked out once on the host (make_fast_div). The GPU's
// own integer division is ~20 dependent instructions through a float
// reciprocal; the kernels divide by G and Hkv on their start and merge
// paths, which run with few warps to hide latencies.
// With s = ceil(log2 d) and mul = floor(2^32 (2^s - d) / d) + 1 (< 2^32),
// n / d = (mulhi(n, mul) + n) >> s (Granlund and Montgomery's round-up
// multiplier; mul + 2^32 is the 33-bit magic, n < 2^31 keeps the add in 32
// bits). tests/cuda/launch_plan_check.cpp checks it against `/`.
struct FastDiv {
  uint32_t mul;
  uint32_t shift;
};

inline FastDiv make_fast_div(int d) {
  uint32_t s = 0;
  while ((uint64_t(1) << s) < uint64_t(d)) {
    ++s;
  }
  const uint64_t d64 = uint64_t(d);
  const uint64_t mul = (((uint64_t(1) << s) - d64) << 32) / d64 + 1;
  return FastDiv{uint32_t(mul), s};
}

// n / d for 0 <= n < 2^31, d's FastDiv: the kernels' division, and the one
// the host checks run (QSDPA_FUNC: formats.h's host-and-device qualifier).
// The GPU takes its multiply-high intrinsic (one IMAD.HI; a 64-bit product
// compiles to wide multiplies and a longer kernel).
QSDPA_FUNC int fast_div(FastDiv d, int n) {
#if defined(__CUDA_ARCH__)
  const uint32_t hi = __umulhi(uint32_t(n), d.mul);
#else
  const uint32_t hi = uint32_t((uint64_t(uint32_t(n)) * d.mul) >> 32);
#endif
  return int((hi + uint32_t(n)) >> d.shift);
}

// The parameter block of every decode kernel: the call (call.h: sizes,
// format, strides, mask kind, sinks, outputs) and how it is spread over
// blocks. Query rows: the G * Lq rows that share a kv head are numbered
// r = i * G + g (i: query position, g: head within the group; attention_math.h's
// row_position). A block handles a tile of consecutive rows of one
// (batch, kv head) and one range of keys (a split). launch_plan.h's
// make_params fills it.
struct Params : Call {
  int rows; // G * Lq
  int n_splits; // key ranges; 1: the kernel writes the final output
  int keys_per_split; // a multiple of kKeysPerBlockStep
  FastDiv div_G, div_Hkv;

  // Split-K partials, n_splits > 1 only: o [slots][B*Hq*Lq][D] (not
  // normalised) and (m, l) [slots][B*Hq*Lq][2] in base-2 units, and the
  // merge counters [counters][B * grid rows], zero at the start; slots and
  // counters of split_plan.h's merge_tree (see split_merge.cuh).
  float* part_o;
  float* part_ml;
  unsigned int* counters;
};

// Keys a block advances per step of its four warps: every split starts at a
// multiple of it.
constexpr int kKeysPerBlockStep = 64;
constexpr int kThreads = 128; // 4 warps per block, every decode kernel
constexpr int kMaxHeadDim = 256;
// Partials a merge step combines (split_merge.cuh): one round of loads of
// at most this many partials per step.
constexpr int kMergeRadix = 8;

// Rows per block of the generic decode kernel; the tensor-core kernel takes
// 8 or 16 (one or two row tiles of 8, mma_kernel's row_tiles).
constexpr int kSimtRows = 8;

// The code widths the tensor-core kernel decodes: a word holds whole
// codes, and the codes k and k + (32 / bits) / 2 of a word sit 16 bits
// apart (a pair). Other formats of the table take the generic kernel.
QSDPA_FUNC constexpr bool mma_decodes(int bits) {
  return bits == 2 || bits == 4 || bits == 8;
}

// Whether a tensor-core kernel is built for queries of element type q_type
// and this format and head dim: fp16/bf16 queries, codes mma_decodes, a
// group within a head-dim row, D 64, 128 or 256. mma_kernel's table instantiates exactly
// these (mma_table.cuh).
constexpr bool mma_kernel_built(int q_type, int mode, int bits, int group_size, int D) {
  return (q_type == qsdpa::kElemFloat16 || q_type == qsdpa::kElemBFloat16) && mma_decodes(bits) && qsdpa::format_supported(mode, bits, group_size) &&
      group_size <= D && (D == 64 || D == 128 || D == 256);
}

// A kernel and the dynamic shared memory (bytes) it is launched with.
struct KernelRef {
  const void* fn;
  int smem_bytes;
};

// The generic decode kernel (fp32 arithmetic, any format, any head dim up to
// kMaxHeadDim, any last-axis stride): never null for a format of the table.
KernelRef simt_kernel(int mode, int bits);

// The tensor-core decode kernel for blocks of 8 * row_tiles query rows
// (row_tiles 1 or 2), or {nullptr, 0} where none is built
// (mma_kernel_built). It needs dense, 16-byte aligned key rows of packed
// words and scales (launch_plan.h's mma_layout_ok).
KernelRef mma_kernel(int q_type, int mode, int bits, int group_size, int D, int row_tiles);

} // namespace mlx_qsdpa::cuda
