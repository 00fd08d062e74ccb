// Copyright © 2026 mlx-qsdpa contributors.
//
// The second pass of split-K decoding: the exact merge of the partial
// (o, m, l) of every key range of a row (the LSE merge), then the sink and
// the normalisation. Also the table of the tensor-core kernels.
#include "common.cuh"
#include "decode_mma.cuh"

namespace mlx_qsdpa::cuda {

namespace {

constexpr int kMaxSplitsMerge = 1024; // the host never splits further

template <bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, off);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    scratch[warp] = x;
  }
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) {
    x = kMax ? fmaxf(x, scratch[w]) : x + scratch[w];
  }
  __syncthreads();
  return x;
}

// One block per output row (b, h, i).
__global__ void __launch_bounds__(kThreads) qsdpa_merge(const __grid_constant__ Params p) {
  __shared__ float factor[kMaxSplitsMerge];
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.Lq;
  const int h = int((row / p.Lq) % p.Hq);
  const int n = p.n_splits;

  float M = neg_inf();
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    M = fmaxf(M, p.part_ml[(s * n_rows + row) * 2]);
  }
  M = block_reduce<true>(M, scratch);
  float L = 0.0f;
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const float ms = p.part_ml[(s * n_rows + row) * 2];
    const float f = ms == neg_inf() ? 0.0f : exp2f(ms - M);
    factor[s] = f;
    L += f * p.part_ml[(s * n_rows + row) * 2 + 1];
  }
  L = block_reduce<false>(L, scratch); // (its barrier also publishes factor[])

  const Finalized fin = finalize_row(p, h, M, L);
  // Splits whose rows saw nothing hold zeros (factor 0): no branch, so that
  // the loads of several splits are in flight together.
  const int64_t split_stride = n_rows * p.D;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    const float* src = p.part_o + row * p.D + d;
    float acc = 0.0f;
    int s = 0;
    for (; s + 8 <= n; s += 8) {
      float x[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        x[u] = src[(s + u) * split_stride];
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        acc = fmaf(factor[s + u], x[u], acc);
      }
    }
    for (; s < n; ++s) {
      acc = fmaf(factor[s], src[s * split_stride], acc);
    }
    store_from_float(p.out, row * p.D + d, acc * fin.mult, p.out_type);
  }
  if (threadIdx.x == 0 && p.lse) {
    p.lse[row] = fin.lse;
  }
}

} // namespace

const void* merge_kernel() {
  return reinterpret_cast<const void*>(&qsdpa_merge);
}

KernelRef mma_kernel_tuned_minb2() {
  return mma_kernel_f16_d128_a4g64_minb2();
}

KernelRef mma_kernel(int q_type, int mode, int bits, int group_size, int D) {
  const bool f16 = q_type == kF16;
  if (q_type != kF16 && q_type != kBF16) {
    return KernelRef{nullptr, 0};
  }
  switch (D) {
    case 64:
      return f16 ? mma_kernel_f16_d64(mode, bits, group_size) : mma_kernel_bf16_d64(mode, bits, group_size);
    case 128:
      return f16 ? mma_kernel_f16_d128(mode, bits, group_size) : mma_kernel_bf16_d128(mode, bits, group_size);
    case 256:
      return f16 ? mma_kernel_f16_d256(mode, bits, group_size) : mma_kernel_bf16_d256(mode, bits, group_size);
    default:
      return KernelRef{nullptr, 0};
  }
}

} // namespace mlx_qsdpa::cuda
