// Copyright © 2026 mlx-qsdpa contributors.
//
// The second pass of split-K decoding: the exact merge of the partial
// (o, m, l) of every key range of a row (the LSE merge), then the sink and
// the normalisation. Also the table of the tensor-core kernels.
#include "common.cuh"
#include "decode_mma.cuh"

namespace mlx_qsdpa::cuda {

namespace {

// One block of kMergeThreads (8 warps) per output row (b, h, i). Warp w
// merges splits w, w + 8, ... in batches of kDepth whose loads are all in
// flight together (the merge is latency-bound: a row's partials are a few
// KB), keeping its own running max; the warps are then merged through
// shared memory. Lanes cover the head dim in float4s.
constexpr int kWarps = kMergeThreads / 32;
constexpr int kDepth = 8;
constexpr int kMaxD4 = kMaxHeadDim / 4;
constexpr int kV = kMaxD4 / 32; // float4s per lane

__device__ __forceinline__ float4 scale4(float4 a, float f) {
  return make_float4(a.x * f, a.y * f, a.z * f, a.w * f);
}

__device__ __forceinline__ float4 fma4(float4 x, float f, float4 acc) {
  return make_float4(fmaf(x.x, f, acc.x), fmaf(x.y, f, acc.y), fmaf(x.z, f, acc.z), fmaf(x.w, f, acc.w));
}

__global__ void __launch_bounds__(kMergeThreads) qsdpa_merge(const __grid_constant__ Params p) {
  __shared__ float wm[kWarps];
  __shared__ float wl[kWarps];
  __shared__ float4 wo[kWarps][kMaxD4];
  const int64_t row = blockIdx.x;
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.Lq;
  const int h = int((row / p.Lq) % p.Hq);
  const int n = p.n_splits;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int D4 = p.D / 4;

  float M = neg_inf();
  float L = 0.0f;
  float4 acc[kV];
#pragma unroll
  for (int v = 0; v < kV; ++v) {
    acc[v] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int s0 = warp; s0 < n; s0 += kWarps * kDepth) {
    float ms[kDepth], ls[kDepth];
    float4 x[kDepth][kV];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      const int s = s0 + u * kWarps;
      const bool ok = s < n;
      const int64_t prow = int64_t(ok ? s : 0) * n_rows + row;
      ms[u] = ok ? p.part_ml[prow * 2] : neg_inf();
      ls[u] = ok ? p.part_ml[prow * 2 + 1] : 0.0f;
      const float4* src = reinterpret_cast<const float4*>(p.part_o + prow * p.D);
#pragma unroll
      for (int v = 0; v < kV; ++v) {
        const int d4 = lane + 32 * v;
        x[u][v] = ok && d4 < D4 ? src[d4] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
    float Mn = M;
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      Mn = fmaxf(Mn, ms[u]);
    }
    const float base = Mn == neg_inf() ? 0.0f : Mn;
    const float c = M == neg_inf() ? 0.0f : exp2f(M - base);
    L *= c;
#pragma unroll
    for (int v = 0; v < kV; ++v) {
      acc[v] = scale4(acc[v], c);
    }
    // Splits whose rows saw nothing hold zeros (factor 0).
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      const float f = ms[u] == neg_inf() ? 0.0f : exp2f(ms[u] - base);
      L = fmaf(f, ls[u], L);
#pragma unroll
      for (int v = 0; v < kV; ++v) {
        acc[v] = fma4(x[u][v], f, acc[v]);
      }
    }
    M = Mn;
  }
  if (lane == 0) {
    wm[warp] = M;
    wl[warp] = L;
  }
#pragma unroll
  for (int v = 0; v < kV; ++v) {
    const int d4 = lane + 32 * v;
    if (d4 < D4) {
      wo[warp][d4] = acc[v];
    }
  }
  __syncthreads();

  float Mall = neg_inf();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    Mall = fmaxf(Mall, wm[w]);
  }
  float fw[kWarps];
  float Lall = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    fw[w] = wm[w] == neg_inf() ? 0.0f : exp2f(wm[w] - Mall);
    Lall = fmaf(fw[w], wl[w], Lall);
  }
  const Finalized fin = finalize_row(p, h, Mall, Lall);
  const float* wof = reinterpret_cast<const float*>(&wo[0][0]);
  for (int d = threadIdx.x; d < p.D; d += kMergeThreads) {
    float out = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      out = fmaf(fw[w], wof[w * kMaxHeadDim + d], out);
    }
    store_from_float(p.out, row * p.D + d, out * fin.mult, p.out_type);
  }
  if (threadIdx.x == 0 && p.lse) {
    p.lse[row] = fin.lse;
  }
}

} // namespace

const void* merge_kernel() {
  return reinterpret_cast<const void*>(&qsdpa_merge);
}

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
