// Copyright © 2026 mlx-qsdpa contributors.
//
// The compatibility layer's scalar semantics as C functions, for
// tests/cuda/test_cuda_sim_numerics.py to compare with exact references:
// conversions, the single rounding of __hsub2/__hfma2/__hmul2, prmt, lop3,
// max.NaN;
// and the tensor-core kernel's fp4 decode against formats.h's.
#ifndef QSDPA_CUDA_SIM
#define QSDPA_CUDA_SIM 1 // csrc/backends/cuda/ptx.cuh's models, as in the kernel units
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backends/cuda/decode_mma.cuh"
#include "qsim_cuda/ptx_sim.h"

namespace {
__half h(uint16_t b) {
  return __half{b};
}
__nv_bfloat16 bf(uint16_t b) {
  return __nv_bfloat16{b};
}
} // namespace

extern "C" {
uint16_t probe_f2h(float x) {
  return __float2half_rn(x).__x;
}
uint16_t probe_f2bf(float x) {
  return __float2bfloat16_rn(x).__x;
}
// op: 0 sub (a - b), 1 fma (a * b + c), 2 mul (a * b); both lanes computed,
// the high lane on swapped operands, so lane routing is checked too.
uint32_t probe_h2(int op, uint16_t a, uint16_t b, uint16_t c) {
  const __half2 x{h(a), h(b)}, y{h(b), h(a)}, z{h(c), h(c)};
  const __half2 r = op == 0 ? __hsub2(x, y) : op == 1 ? __hfma2(x, y, z) : __hmul2(x, y);
  return uint32_t(r.x.__x) | (uint32_t(r.y.__x) << 16);
}
uint32_t probe_bf2(int op, uint16_t a, uint16_t b, uint16_t c) {
  const __nv_bfloat162 x{bf(a), bf(b)}, y{bf(b), bf(a)}, z{bf(c), bf(c)};
  const __nv_bfloat162 r = op == 0 ? __hsub2(x, y) : op == 1 ? __hfma2(x, y, z) : __hmul2(x, y);
  return uint32_t(r.x.__x) | (uint32_t(r.y.__x) << 16);
}
uint32_t probe_byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  return __byte_perm(x, y, s);
}
uint32_t probe_lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
  return mlx_qsdpa::cuda::mma_detail::lop3(a, b, c, uint8_t(lut));
}
// The kernel's fp4 e2m1 pair decode (MmaFormat::fp4_pair) for T = fp16 (0)
// or bf16 (1), and formats.h's definition of an e2m1 code.
uint32_t probe_fp4_pair(int bf16, uint32_t x, int shift) {
  namespace cu = mlx_qsdpa::cuda;
  return bf16 ? cu::MmaFormat<__nv_bfloat16, qsdpa::kMxfp4, 4>::fp4_pair(x, shift)
              : cu::MmaFormat<__half, qsdpa::kMxfp4, 4>::fp4_pair(x, shift);
}
float probe_e2m1(uint32_t nib) {
  return qsdpa::fp4_e2m1_to_float(nib);
}
// max.NaN.f32 (mma_detail::fmax_nan, the poisoned rows' running max).
uint32_t probe_fmax_nan(float a, float b) {
  const float r = mlx_qsdpa::cuda::mma_detail::fmax_nan(a, b);
  uint32_t bits;
  std::memcpy(&bits, &r, sizeof(bits));
  return bits;
}
}
