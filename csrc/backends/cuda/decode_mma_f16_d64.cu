// Copyright © 2026 mlx-qsdpa contributors.
//
// Tensor-core decode kernels for f16 queries, head dim 64 (decode_mma.cuh, mma_table.cuh).
#include "mma_table.cuh"

namespace mlx_qsdpa::cuda {

KernelRef mma_kernel_f16_d64(int mode, int bits, int group_size, int row_tiles) {
  return mma_kernel_for<__half, 64>(mode, bits, group_size, row_tiles);
}

} // namespace mlx_qsdpa::cuda
