// Copyright © 2026 mlx-qsdpa contributors.
//
// Every inline-PTX wrapper of the CUDA kernels, in one place: the kernels'
// other code is plain CUDA C++, which the CPU simulator (tests/cuda/sim)
// compiles with a host compiler. With QSDPA_CUDA_SIM defined, the
// simulator's models of these instructions (same names, same signatures)
// stand in for the asm; the GPU build is unaffected.
#pragma once

#if defined(QSDPA_CUDA_SIM)
#include "qsim_cuda/ptx_sim.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace mlx_qsdpa::cuda::mma_detail {

// D = A B + C, one warp: A 16x16 (row), B 16x8 (col), fp32 C/D; T is __half
// or __nv_bfloat16. Fragment layouts: PTX ISA, mma.m16n8k16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The 8x8 16-bit matrix whose row lane/4, columns 2(lane%4), +1 this lane
// holds in x, transposed (same distribution).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared; only the first src_bytes are read, the rest of
// the 16 are zero-filled (0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Every copy of this thread has landed.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// (x & mask) | bits in one LOP3 (the compiler splits it in two when both
// are immediates).
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t mask, uint32_t bits) {
  uint32_t y;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(y) : "r"(x), "r"(mask), "r"(bits));
  return y;
}

// 2^x with one MUFU instruction (exp2f adds a denormal-result fixup around
// it); results below 2^-126 flush to zero, exp2(-inf) is 0.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// max(a, b), NaN if either is NaN (max.NaN.f32, sm_80+: one instruction,
// as fmaxf, which instead ignores a NaN operand). A row's running max
// through it stays NaN once a NaN score has entered (a poisoned row).
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// *counter += 1 at GPU scope with acquire and release semantics; returns the
// old value. Orders this thread's earlier writes (and, after a block
// barrier, its block's) before the count, and the count before its later
// reads: one MEMBAR.ALL.GPU before the atomic and an L1 invalidate after
// it, instead of __threadfence()'s sequentially consistent MEMBAR.SC.GPU.
__device__ __forceinline__ unsigned int atomic_add_acq_rel(unsigned int* counter, unsigned int v) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(counter), "r"(v) : "memory");
  return old;
}

} // namespace mlx_qsdpa::cuda::mma_detail

#endif // QSDPA_CUDA_SIM
