// Copyright © 2026 mlx-qsdpa contributors.
//
// Tensor-core decode kernels for bf16 queries, head dim 64 (decode_mma.cuh, mma_table.cuh).
#include "mma_table.cuh"

namespace mlx_qsdpa::cuda {

KernelRef mma_kernel_bf16_d64(int mode, int bits, int group_size, int row_tiles) {
  return mma_kernel_for<__nv_bfloat16, 64>(mode, bits, group_size, row_tiles);
}

} // namespace mlx_qsdpa::cuda
