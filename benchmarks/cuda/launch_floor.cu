// The GPU time of kernels that do (almost) nothing, launched with the decode
// kernel's shapes at 32K keys (grid 64 x 8, 128 threads, ~54 KB of dynamic
// shared memory): what a call costs before it reads a byte of the cache.
// Run under Nsight Compute (run_gpu.sh floor):
//   nvcc -std=c++17 -O3 -arch=sm_90 -I. -o /tmp/launch_floor benchmarks/cuda/launch_floor.cu
//   ncu --metrics gpu__time_duration.sum /tmp/launch_floor
#include <cstdio>

#include <cuda_runtime.h>

#include "backends/cuda/ptx.cuh"

// Nothing at all.
__global__ void floor_empty() {}

// One 16-byte load per thread from a cold buffer and one store: a round
// trip to memory, as the decode kernel's queries.
__global__ void floor_load_store(const float4* in, float4* out) {
  const int i = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  out[i] = in[i];
}

// The load, a block barrier, one atomic per block with acquire/release
// semantics and a barrier again: one level of the split merge's protocol
// (split_merge.cuh) without the merge itself.
__global__ void floor_count(const float4* in, float4* out, unsigned int* counters) {
  __shared__ unsigned int last;
  const int i = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  out[i] = in[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    last = mlx_qsdpa::cuda::mma_detail::atomic_add_acq_rel(counters + blockIdx.y, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    counters[blockIdx.y] = 0;
  }
}

int main() {
  const dim3 grid(64, 8), block(128);
  const int smem = 54 * 1024;
  const int n = grid.x * grid.y * block.x;
  float4 *in, *out;
  unsigned int* counters;
  cudaMalloc(&in, n * sizeof(float4));
  cudaMalloc(&out, n * sizeof(float4));
  cudaMalloc(&counters, grid.y * sizeof(unsigned int));
  cudaMemset(in, 0, n * sizeof(float4));
  cudaMemset(counters, 0, grid.y * sizeof(unsigned int));
  cudaFuncSetAttribute(floor_empty, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(floor_load_store, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(floor_count, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  for (int rep = 0; rep < 3; ++rep) {
    floor_empty<<<grid, block, smem>>>();
    floor_load_store<<<grid, block, smem>>>(in, out);
    floor_count<<<grid, block, smem>>>(in, out, counters);
  }
  const cudaError_t err = cudaDeviceSynchronize();
  std::printf("launch_floor: %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
