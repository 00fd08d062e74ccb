// Copyright © 2026 mlx-qsdpa contributors.
//
// Tensor-core decode kernels for f16 queries, head dim 128 (decode_mma.cuh).
#include "decode_mma.cuh"

namespace mlx_qsdpa::cuda {

KernelRef mma_kernel_f16_d128(int mode, int bits, int group_size) {
  return mma_kernel_for<__half, 128>(mode, bits, group_size);
}

KernelRef mma_kernel_f16_d128_a4g64_minb2() {
  return KernelRef{
      reinterpret_cast<const void*>(&qsdpa_decode_mma<__half, qsdpa::kAffine, 4, 64, 128, 2>),
      MmaDecode<__half, qsdpa::kAffine, 4, 64, 128>::kSmemBytes};
}

} // namespace mlx_qsdpa::cuda
