// Copyright © 2026 mlx-qsdpa contributors.
//
// GPU hooks of a build with neither Metal nor CUDA (the Linux CPU build).
// MLX itself has no GPU device in such a build, so eval_gpu is unreachable
// through normal use; it still fails loudly rather than silently.
#include <stdexcept>

#include "backend.h"

namespace mlx_qsdpa {

bool gpu_kernel_supports(const QuantSDPAConfig&, const CallShape&) {
  return false;
}

void eval_gpu_kernel(
    const QuantSDPAConfig&,
    const std::vector<mx::array>&,
    std::vector<mx::array>&,
    mx::Stream) {
  throw std::runtime_error(
      "[quant_sdpa] mlx_qsdpa was built without a GPU backend (neither Metal "
      "nor CUDA); run it on the CPU (stream=mx.cpu) or rebuild against MLX's "
      "Metal or CUDA build.");
}

const char* gpu_backend_name() {
  return "none";
}

} // namespace mlx_qsdpa
