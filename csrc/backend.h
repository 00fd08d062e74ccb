// Copyright © 2026 mlx-qsdpa contributors.
//
// The seam between the primitive and its backends. The CPU kernel is always
// built; exactly one GPU implementation is linked: Metal (macOS), CUDA
// (MLX's CUDA build) or none (gpu_none.cpp).
#pragma once

#include <stdexcept>
#include <vector>

#include "mlx_qsdpa/formats.h"
#include "primitive.h"

namespace mlx_qsdpa {

// The kernels' element type (formats.h's qsdpa::ElemType) of a dtype the op
// accepted: float32/float16/bfloat16 queries, outputs and affine scales,
// uint8 scale codes of the fp modes.
inline qsdpa::ElemType elem_type(mx::Dtype t) {
  if (t == mx::float32) {
    return qsdpa::kElemFloat32;
  } else if (t == mx::float16) {
    return qsdpa::kElemFloat16;
  } else if (t == mx::bfloat16) {
    return qsdpa::kElemBFloat16;
  } else if (t == mx::uint8) {
    return qsdpa::kElemUint8;
  }
  throw std::invalid_argument("[quant_sdpa] no kernel element type for this dtype");
}

// The sizes of one call (queries [B, Hq, Lq, D], keys [B, Hkv, Lk, ...]).
struct CallShape {
  int B, Hq, Hkv, Lq, Lk, D;
};

// The fused CPU kernel. Fills `outputs` (allocated by the primitive).
void eval_cpu_kernel(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// Whether the GPU kernels cover a call of these sizes (head dim, query
// length, and for CUDA the grid they need).
// The op routes calls they do not cover to dequantized_attention on the GPU.
bool gpu_kernel_supports(const QuantSDPAConfig& config, const CallShape& shape);

// The fused GPU kernels. Fill `outputs` (allocated by the primitive).
void eval_gpu_kernel(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// The name of the GPU backend compiled in: "metal", "cuda" or "none".
const char* gpu_backend_name();

} // namespace mlx_qsdpa
