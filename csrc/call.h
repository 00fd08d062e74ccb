// Copyright © 2026 mlx-qsdpa contributors.
//
// One quant_sdpa call as every backend reads it: sizes, format, mask kind,
// and each array's address and strides. The primitive builds it once per
// evaluation (describe_call in backend.h) and hands it to the backend: the
// CPU kernel reads it as it is, the CUDA kernels take it inside their
// parameter block, and the Metal plan takes its sizes and strides (Metal
// binds the buffers themselves).
//
// Plain data on raw pointers, with no MLX and no standard library: the CPU
// kernel's per-instruction-set builds and nvcc include it (see
// backends/cpu/kernel.h for why the CPU builds need that).
#pragma once

#include <cstdint>

#include "mlx_qsdpa/attention_math.h"
#include "mlx_qsdpa/formats.h"

namespace mlx_qsdpa {

// One quantized tensor: packed words [B, Hkv, Lk, D * bits / 32], scales and
// biases [B, Hkv, Lk, D / group_size], each a strided view (element
// strides, possibly zero or negative). Keys and values each have their own
// format (a row of formats.h's table).
struct QuantTensor {
  int mode, bits, group_size;
  const uint32_t* w;
  int64_t ws[4];
  const void* scales;
  int64_t ss[4];
  const void* biases; // nullptr where the mode has no bias
  int64_t bs[4];
  int scale_type; // qsdpa::ElemType of scales and biases
};

struct Call {
  int B, Hq, Hkv, Lq, Lk, D;
  int G; // Hq / Hkv: query heads per kv head
  float scale;
  float scale_log2; // scale * log2(e): scores are kept in base-2 units

  const void* q; // [B, Hq, Lq, D]
  int64_t qs[4];
  int q_type; // qsdpa::ElemType of queries and output

  QuantTensor k, v;

  int mask; // qsdpa::MaskKind
  const void* mask_ptr; // bool or float32, broadcast to [B, Hq, Lq, Lk]
  int64_t ms[4];

  const float* sinks; // [Hq] strided, or nullptr
  int64_t sink_stride;

  void* out; // [B, Hq, Lq, D] row contiguous, q's dtype
  int out_type;
  float* lse; // [B, Hq, Lq] row contiguous, or nullptr
};

} // namespace mlx_qsdpa
