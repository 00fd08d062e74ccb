// Copyright © 2026 mlx-qsdpa contributors.
//
// The seam between the primitive and its backends. The CPU kernel is always
// built; exactly one GPU implementation is linked: Metal (macOS), CUDA
// (MLX's CUDA build) or none (gpu_none.cpp).
#pragma once

#include <vector>

#include "primitive.h"

namespace mlx_qsdpa {

// The fused CPU kernel. Fills `outputs` (allocated by the primitive).
void eval_cpu_kernel(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// Whether the GPU kernels cover a call of this head dim and query length.
// The op routes calls they do not cover to dequantized_attention on the GPU.
bool gpu_kernel_supports(const QuantSDPAConfig& config, int head_dim, int q_len);

// The fused GPU kernels. Fill `outputs` (allocated by the primitive).
void eval_gpu_kernel(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// The name of the GPU backend compiled in: "metal", "cuda" or "none".
const char* gpu_backend_name();

} // namespace mlx_qsdpa
