// Copyright © 2026 mlx-qsdpa contributors.
//
// The interface between the CUDA kernels (csrc/backends/cuda/*.cu) and their host code
// (csrc/backends/cuda/quant_sdpa_cuda.cpp): the parameter block every kernel takes by
// value, and the functions that hand out the kernels' addresses. Plain C++:
// the host side is compiled by the C++ compiler, not nvcc.
#pragma once

#include <cstdint>

#include "mlx_qsdpa/formats.h"

namespace mlx_qsdpa::cuda {

// Element types (q_type, out_type, scale_type): formats.h's qsdpa::ElemType.

enum MaskType : int { kMaskNone = 0, kMaskCausal = 1, kMaskBool = 2, kMaskAdditive = 3 };

// One quantized tensor: packed words [B, Hkv, Lk, D * bits / 32], scales and
// biases [B, Hkv, Lk, D / group_size], each a strided view (element strides,
// possibly negative or zero).
struct QuantTensor {
  const uint32_t* w;
  int64_t ws[4];
  const void* scales;
  int64_t ss[4];
  const void* biases; // nullptr for the fp modes
  int64_t bs[4];
  int scale_type; // qsdpa::ElemType of scales and biases
};

// n / d for 0 <= n < 2^31 and a divisor 1 <= d < 2^31 fixed for a call: one
// multiply-high, an add and a shift on the GPU (fast_div below),
// with the divisor's magic worked out once on the host (make_fast_div). The
// GPU's own integer division is ~20 dependent instructions through a float
// reciprocal; the kernels divide by G and Hkv on their start and merge
// paths, which run with few warps to hide latencies (cuda/README.md).
// With s = ceil(log2 d) and mul = floor(2^32 (2^s - d) / d) + 1 (< 2^32),
// n / d = (mulhi(n, mul) + n) >> s (Granlund and Montgomery's round-up
// multiplier; mul + 2^32 is the 33-bit magic, n < 2^31 keeps the add in 32
// bits). tests/cuda/split_plan_check.cpp checks it against `/`.
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
// The GPU takes its multiply-high intrinsic (one IMAD.HI; the 64-bit
// product compiled to wide multiplies and a longer kernel, cuobjdump).
QSDPA_FUNC int fast_div(FastDiv d, int n) {
#if defined(__CUDA_ARCH__)
  const uint32_t hi = __umulhi(uint32_t(n), d.mul);
#else
  const uint32_t hi = uint32_t((uint64_t(uint32_t(n)) * d.mul) >> 32);
#endif
  return int((hi + uint32_t(n)) >> d.shift);
}

// Query rows: the G * Lq rows that share a kv head are numbered
// r = i * G + g (i: query position, g: head within the group), as the CPU
// kernel does. A block handles a tile of consecutive rows of one
// (batch, kv head) and one range of keys (a split).
struct Params {
  int B, Hq, Hkv, Lq, Lk, D, G;
  int rows; // G * Lq
  int group_size;
  int n_splits; // key ranges; 1: the kernel writes the final output
  int keys_per_split; // a multiple of kKeysPerBlockStep
  float scale_log2; // scale * log2(e): scores live in base-2 units
  FastDiv div_G, div_Hkv; // set_divisors: G's and Hkv's

  const void* q;
  int64_t qs[4];
  int q_type;

  QuantTensor k, v;

  int mask_type;
  const void* mask; // [B, Hq, Lq, Lk] strided view: bool or float32
  int64_t ms[4];

  const float* sinks; // [Hq] (strided) or nullptr
  int64_t sink_stride;

  void* out; // [B, Hq, Lq, D] row contiguous, q's dtype
  int out_type;
  float* lse; // [B, Hq, Lq] or nullptr

  // Split-K partials, n_splits > 1 only: o [slots][B*Hq*Lq][D] (not
  // normalised) and (m, l) [slots][B*Hq*Lq][2] in base-2 units, and the
  // merge counters [counters][B * grid rows], zero at the start; slots and
  // counters of split_plan.h's merge_tree (see split_merge.cuh).
  float* part_o;
  float* part_ml;
  unsigned int* counters;
};

// The divisors of p's fields the kernels divide by (after B .. G are set).
inline void set_divisors(Params& p) {
  p.div_G = make_fast_div(p.G);
  p.div_Hkv = make_fast_div(p.Hkv);
}

// Keys a block advances per step of its four warps: every split starts at a
// multiple of it.
constexpr int kKeysPerBlockStep = 64;
constexpr int kThreads = 128; // 4 warps per block, every decode kernel
constexpr int kMaxHeadDim = 256;
// Partials a merge step combines (split_merge.cuh). QSDPA_MERGE_RADIX: a
// measurement knob (run_gpu.sh variants; host and kernels must agree).
#ifndef QSDPA_MERGE_RADIX
#define QSDPA_MERGE_RADIX 8
#endif
constexpr int kMergeRadix = QSDPA_MERGE_RADIX;

// Rows per block of the generic decode kernel; the tensor-core kernel takes
// 8 or 16 (one or two row tiles of 8, mma_kernel's row_tiles).
constexpr int kSimtRows = 8;

// A kernel and the dynamic shared memory (bytes) it is launched with.
struct KernelRef {
  const void* fn;
  int smem_bytes;
};

// The generic decode kernel (fp32 arithmetic, any format, any head dim up to
// kMaxHeadDim, any last-axis stride): never null for a valid format.
KernelRef simt_kernel(int mode, int bits);

// The tensor-core decode kernel for fp16/bf16 queries (q_type kElemFloat16/kElemBFloat16)
// and blocks of 8 * row_tiles query rows (row_tiles 1 or 2), or {nullptr, 0}
// where none is built for this format / head dim. It needs dense, 16-byte
// aligned key rows of packed words and scales (the host checks).
KernelRef mma_kernel(int q_type, int mode, int bits, int group_size, int D, int row_tiles);

} // namespace mlx_qsdpa::cuda
