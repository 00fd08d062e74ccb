// Copyright © 2026 mlx-qsdpa contributors.
//
// The table of the tensor-core decode kernels, by query type and head dim
// (each (type, head dim) is compiled in its own decode_mma_*.cu).
#include "decode_mma.cuh"

namespace mlx_qsdpa::cuda {

KernelRef mma_kernel(int q_type, int mode, int bits, int group_size, int D, int row_tiles) {
  const bool f16 = q_type == qsdpa::kElemFloat16;
  if (q_type != qsdpa::kElemFloat16 && q_type != qsdpa::kElemBFloat16) {
    return KernelRef{nullptr, 0};
  }
  switch (D) {
    case 64:
      return f16 ? mma_kernel_f16_d64(mode, bits, group_size, row_tiles) : mma_kernel_bf16_d64(mode, bits, group_size, row_tiles);
    case 128:
      return f16 ? mma_kernel_f16_d128(mode, bits, group_size, row_tiles) : mma_kernel_bf16_d128(mode, bits, group_size, row_tiles);
    case 256:
      return f16 ? mma_kernel_f16_d256(mode, bits, group_size, row_tiles) : mma_kernel_bf16_d256(mode, bits, group_size, row_tiles);
    default:
      return KernelRef{nullptr, 0};
  }
}

} // namespace mlx_qsdpa::cuda
