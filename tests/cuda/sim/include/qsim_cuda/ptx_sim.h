// Copyright © 2026 mlx-qsdpa contributors.
//
// The simulator's models of csrc/backends/cuda/ptx.cuh's inline PTX (same names and
// signatures; csrc/backends/cuda/ptx.cuh includes this file under QSDPA_CUDA_SIM).
//
// * mma.sync.m16n8k16.row.col.f32.{f16,bf16}: the warp's fragments are
//   exchanged and every lane computes its four accumulators from the PTX
//   ISA's fragment layouts; products of 16-bit values are exact in double,
//   the 16 products and C are summed in double and rounded to fp32 once (the
//   tensor core's own accumulation order and internal rounding are not
//   modelled: the kernel must not depend on them).
// * movmatrix.m8n8.trans.b16: the 8x8 transpose across the warp.
// * cp.async: reads src_bytes bytes at issue and zero-fills the rest of the
//   16, both addresses 16-byte aligned (checked); the shared-memory store
//   lands only when the issuing thread's cp.async.wait_group (or wait_all)
//   completes its group, in that thread's context. So a thread that reads a
//   stage another thread copied, before a barrier orders that thread's wait
//   before the read, reads bytes that are unwritten or stale (the fibers of
//   a warp run one after another between collectives): the unwritten-read
//   check or the oracle catches a missing barrier. Its loads and stores are
//   the kernel translation unit's, so the runtime checks them against the
//   buffers.
// * lop3.b32 with the caller's truth table; ex2.approx.ftz as exp2f with
//   subnormal results flushed to zero; max.NaN.f32 as the larger operand,
//   or the canonical NaN where either is NaN.
//
// QSIM_CUDA_MUTANT_MMA_ROWS swaps the A fragment's rows g and g + 8: a
// wrong layout, which tests/cuda prove the comparison catches.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <vector>
#include <type_traits>

#include "qsim_cuda/cuda_compat.h"

namespace mlx_qsdpa::cuda::mma_detail {

namespace sim {

// Half h (0: low) of a 32-bit register holding two T values, as a double.
template <typename T>
inline double element(uint32_t reg, int h) {
  const uint16_t bits = uint16_t(reg >> (16 * h));
  if constexpr (std::is_same_v<T, __half>) {
    return qsim::half_bits_to_float(bits);
  } else {
    return qsim_cuda::bfloat_bits_to_float(bits);
  }
}

struct Frag4 {
  uint32_t r[4];
};
struct Frag2 {
  uint32_t r[2];
};

} // namespace sim

template <typename T>
inline void mma_16816(
    float (&c)[4],
    const uint32_t (&a)[4],
    uint32_t b0,
    uint32_t b1,
    const char* file = __builtin_FILE(),
    int line = __builtin_LINE()) {
  // Copy each exchange out at once: the runtime reuses its slots two
  // exchanges later.
  sim::Frag4 A[32];
  sim::Frag2 B[32];
  const sim::Frag4 mine_a{{a[0], a[1], a[2], a[3]}};
  {
    const unsigned char* all = qsim_cuda::exchange(0xffffffffu, mine_a, "mma.sync (A)", file, line);
    for (int l = 0; l < 32; ++l) {
      A[l] = qsim_cuda::lane_value<sim::Frag4>(all, l);
    }
  }
  {
    const sim::Frag2 mine_b{{b0, b1}};
    const unsigned char* all = qsim_cuda::exchange(0xffffffffu, mine_b, "mma.sync (B)", file, line);
    for (int l = 0; l < 32; ++l) {
      B[l] = qsim_cuda::lane_value<sim::Frag2>(all, l);
    }
  }
  const int lane = int(qsim_cuda::lane_id());
  const int g = lane / 4, t = lane % 4;
  // A (16 x 16, row major): a[0] row g, columns 2t, 2t+1; a[1] row g+8;
  // a[2] row g, columns 2t+8, 2t+9; a[3] row g+8, columns 2t+8, 2t+9.
  auto a_at = [&](int m, int k) {
#if defined(QSIM_CUDA_MUTANT_MMA_ROWS)
    m ^= 8;
#endif
    return sim::element<T>(A[4 * (m % 8) + (k % 8) / 2].r[(m / 8) + 2 * (k / 8)], k % 2);
  };
  // B (16 x 8, column major): b0 rows 2t, 2t+1 of column g; b1 rows 2t+8, 2t+9.
  auto b_at = [&](int k, int n) { return sim::element<T>(B[4 * n + (k % 8) / 2].r[k / 8], k % 2); };
  // C/D (16 x 8): c[0], c[1] row g, columns 2t, 2t+1; c[2], c[3] row g+8.
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2);
    const int n = 2 * t + i % 2;
    double acc = c[i];
    for (int k = 0; k < 16; ++k) {
      acc += a_at(m, k) * b_at(k, n);
    }
    c[i] = float(acc);
  }
}

// The 8x8 16-bit matrix whose row lane/4, columns 2(lane%4), +1 this lane
// holds in x, transposed (same distribution).
inline uint32_t transpose8x8(uint32_t x, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const unsigned char* all = qsim_cuda::exchange(0xffffffffu, x, "movmatrix", file, line);
  const int lane = int(qsim_cuda::lane_id());
  uint32_t y = 0;
  for (int h = 0; h < 2; ++h) {
    // Output (row lane/4, column 2(lane%4) + h) is input (that column, row).
    const int row = 2 * (lane % 4) + h, col = lane / 4;
    const uint32_t src = qsim_cuda::lane_value<uint32_t>(all, 4 * row + col / 2);
    y |= ((src >> (16 * (col % 2))) & 0xffffu) << (16 * h);
  }
  return y;
}

// The shared-memory address: the offset into the block's shared memory.
inline uint32_t smem_u32(const void* ptr) {
  return uint32_t(static_cast<const unsigned char*>(ptr) - qsim_cuda::dynamic_smem());
}

namespace async_detail {

struct Copy {
  unsigned char* dst;
  unsigned char data[16];
};
// A thread's copies not committed yet, and its committed groups, oldest
// first.
struct Pending {
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

// Per simulated thread (fibers share one OS thread), keyed by the runtime's
// thread context.
inline Pending& pending() {
  static std::map<const void*, Pending> all;
  return all[&qsim::current_thread()];
}

inline void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    volatile unsigned char* d = c.dst;
    for (int i = 0; i < 16; ++i) {
      d[i] = c.data[i];
    }
  }
}

} // namespace async_detail

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16) {
    qsim::kernel_fault("cp.async of 16 bytes with a misaligned address");
  }
  if (src_bytes < 0 || src_bytes > 16) {
    qsim::kernel_fault("cp.async with a source size outside 0..16");
  }
  (void)smem_u32(dst);
  // Byte loads (and, when the copy lands, stores) of this instrumented
  // translation unit: the runtime checks each against its buffer. volatile
  // keeps them bytewise, not a library memcpy the instrumentation would not
  // see.
  async_detail::Copy c;
  c.dst = static_cast<unsigned char*>(dst);
  const volatile unsigned char* s = static_cast<const unsigned char*>(src);
  for (int i = 0; i < 16; ++i) {
    c.data[i] = i < src_bytes ? s[i] : 0;
  }
  async_detail::pending().open.push_back(c);
}

inline void cp_async_commit() {
  async_detail::Pending& p = async_detail::pending();
  p.groups.push_back(std::move(p.open));
  p.open.clear();
}

// Completes all but the N most recent committed groups of this thread.
template <int N>
inline void cp_async_wait() {
  async_detail::Pending& p = async_detail::pending();
  while (p.groups.size() > size_t(N)) {
    async_detail::land(p.groups.front());
    p.groups.pop_front();
  }
}

// cp.async.wait_all: every copy of this thread, committed or not.
inline void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

// lop3.b32 d, a, b, c, lut: bit i of d is bit (a_i b_i c_i) of lut, where
// the operands' selectors are a = 0xF0, b = 0xCC, c = 0xAA.
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint8_t lut) {
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const int idx = int(((a >> i) & 1u) << 2 | ((b >> i) & 1u) << 1 | ((c >> i) & 1u));
    d |= uint32_t((lut >> idx) & 1u) << i;
  }
  return d;
}

inline uint32_t and_or(uint32_t x, uint32_t mask, uint32_t bits) {
  return lop3(x, mask, bits, 0xEA);
}

inline float exp2_fast(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) {
    x = 0.0f; // .ftz: subnormal inputs are zero
  }
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

inline float fmax_nan(float a, float b) {
  if (a != a || b != b) {
    const uint32_t canonical = 0x7fffffffu; // PTX's canonical NaN
    float n;
    std::memcpy(&n, &canonical, sizeof(n));
    return n;
  }
  if (a == b) {
    return std::signbit(a) ? b : a; // max(-0, +0) is +0
  }
  return a > b ? a : b;
}

// atom.acq_rel.gpu.add: blocks run one after another here, so the ordering
// is given; the count is what the merge's logic depends on.
inline unsigned int atomic_add_acq_rel(unsigned int* counter, unsigned int v) {
  return atomicAdd(counter, v);
}

} // namespace mlx_qsdpa::cuda::mma_detail
