// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core decode kernels by query type and head dim (each (type,
// head dim) is compiled in its own decode_mma_*.cu; mma_table.cuh).
#include "mma_table.cuh"

namespace mlx_qsdpa::cuda {

KernelRef mma_kernel(int q_type, int mode, int bits, int group_size, int D, int row_tiles) {
  if (!mma_kernel_built(q_type, mode, bits, group_size, D)) {
    return KernelRef{nullptr, 0};
  }
  const bool f16 = q_type == qsdpa::kElemFloat16;
  switch (D) {
    case 64:
      return f16 ? mma_kernel_f16_d64(mode, bits, group_size, row_tiles) : mma_kernel_bf16_d64(mode, bits, group_size, row_tiles);
    case 128:
      return f16 ? mma_kernel_f16_d128(mode, bits, group_size, row_tiles) : mma_kernel_bf16_d128(mode, bits, group_size, row_tiles);
    default:
      return f16 ? mma_kernel_f16_d256(mode, bits, group_size, row_tiles) : mma_kernel_bf16_d256(mode, bits, group_size, row_tiles);
  }
}

} // namespace mlx_qsdpa::cuda
