// Copyright © 2026 mlx-qsdpa contributors.
//
// CUDA on the host, for the CPU simulator: what csrc/backends/cuda/decode_mma.cuh (and
// common.cuh, split_merge.cuh) use of CUDA C++, implemented on the
// simulators' shared runtime (tests/sim: a block is a qsim threadgroup, its
// threads fibers, a warp a 32-lane simdgroup). Included through the stand-in
// <cuda_fp16.h> / <cuda_bf16.h> of this directory, so the kernel sources
// compile unchanged with QSDPA_CUDA_SIM defined (which swaps csrc/backends/cuda/ptx.cuh's
// asm for ptx_sim.h).
//
// Semantics kept exact where the kernels' results depend on them: 16-bit
// conversions and arithmetic round to nearest even once (numerics.h), warp
// shuffles and votes exchange all 32 lanes' values at one point (a lane
// missing from it is reported by the runtime), __byte_perm is PTX prmt.
// Blocks run one after another, so atomics are plain read-modify-writes and
// fences are no-ops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "qsim/runtime.h"
#include "qsim_cuda/numerics.h"

// ---------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n)
// The kernels' dynamic shared memory is declared
//   extern __shared__ __align__(16) unsigned char smem_raw[];
// With __shared__ and __align__ empty and smem_raw the expression below,
// that line declares the function qsim_dynamic_smem (returning a pointer to
// an array of unknown bound), and every use of smem_raw reads the block's
// shared memory: the qsim threadgroup memory, checked like every buffer.
#define __shared__
#define smem_raw (*qsim_dynamic_smem())

namespace qsim_cuda {
inline unsigned char* dynamic_smem() {
  return static_cast<unsigned char*>(qsim::current_thread().threadgroup_memory);
}
} // namespace qsim_cuda

// The block-scope declaration above names the function of the enclosing
// namespace: define it for the kernels' namespace, and for its unnamed
// namespace (decode_simt.cu's kernel lives there).
namespace mlx_qsdpa::cuda {
inline unsigned char (*qsim_dynamic_smem())[] {
  return reinterpret_cast<unsigned char (*)[]>(qsim_cuda::dynamic_smem());
}
namespace {
inline unsigned char (*qsim_dynamic_smem())[] {
  return reinterpret_cast<unsigned char (*)[]>(qsim_cuda::dynamic_smem());
}
} // namespace
} // namespace mlx_qsdpa::cuda

// ---------------------------------------------------------------------------
// Vector types and built-in variables
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
// The 2- and 4-element vector types copy member by member: a copy of a
// whole struct becomes a memcpy intrinsic, which -fsanitize-coverage does
// not trace, so a float4 row written to one buffer and read back by another
// block would go unchecked. Member copies are traced scalar loads and
// stores. Each copy also checks that both addresses are aligned to the
// vector's size, as the GPU's vector loads and stores require (a float4 at
// an 8-byte offset of shared memory faults the kernel on a GPU, which
// member copies alone would let pass here).
// The empty asm hides where the addresses came from: the compiler assumes
// that a reference to a vector is aligned and would fold the test away.
inline void qsim_check_vector_align(const void* a, const void* b, std::size_t align) {
  std::uintptr_t ua = reinterpret_cast<std::uintptr_t>(a), ub = reinterpret_cast<std::uintptr_t>(b);
  asm volatile("" : "+r"(ua), "+r"(ub));
  if (ua % align != 0 || ub % align != 0) {
    qsim::kernel_fault("vector load or store at an address not aligned to its size");
  }
}
#define QSIM_CUDA_VEC2(name, T)                                   \
  struct alignas(2 * sizeof(T)) name {                           \
    T x, y;                                                       \
    name() = default;                                             \
    constexpr name(T x_, T y_) : x(x_), y(y_) {}                  \
    name(const name& o) : x(o.x), y(o.y) {                        \
      qsim_check_vector_align(this, &o, sizeof(name));            \
    }                                                             \
    name& operator=(const name& o) {                              \
      qsim_check_vector_align(this, &o, sizeof(name));            \
      x = o.x;                                                    \
      y = o.y;                                                    \
      return *this;                                               \
    }                                                             \
  };
#define QSIM_CUDA_VEC4(name, T)                                           \
  struct alignas(4 * sizeof(T)) name {                                   \
    T x, y, z, w;                                                         \
    name() = default;                                                     \
    constexpr name(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {} \
    name(const name& o) : x(o.x), y(o.y), z(o.z), w(o.w) {               \
      qsim_check_vector_align(this, &o, sizeof(name));                    \
    }                                                                     \
    name& operator=(const name& o) {                                      \
      qsim_check_vector_align(this, &o, sizeof(name));                    \
      x = o.x;                                                            \
      y = o.y;                                                            \
      z = o.z;                                                            \
      w = o.w;                                                            \
      return *this;                                                       \
    }                                                                     \
  };
QSIM_CUDA_VEC2(uint2, unsigned)
QSIM_CUDA_VEC4(uint4, unsigned)
QSIM_CUDA_VEC2(float2, float)
QSIM_CUDA_VEC4(float4, float)
#undef QSIM_CUDA_VEC2
#undef QSIM_CUDA_VEC4
inline float4 make_float4(float x, float y, float z, float w) {
  return float4{x, y, z, w};
}
inline float2 make_float2(float x, float y) {
  return float2{x, y};
}

namespace qsim_cuda {
inline uint3 builtin(qsim::Builtin b) {
  const uint32_t* v = qsim::current_thread().values[int(b)];
  return uint3{v[0], v[1], v[2]};
}
} // namespace qsim_cuda

#define threadIdx (::qsim_cuda::builtin(::qsim::Builtin::thread_position_in_threadgroup))
#define blockIdx (::qsim_cuda::builtin(::qsim::Builtin::threadgroup_position_in_grid))
#define blockDim (::qsim_cuda::builtin(::qsim::Builtin::threads_per_threadgroup))
#define gridDim (::qsim_cuda::builtin(::qsim::Builtin::threadgroups_per_grid))

// ---------------------------------------------------------------------------
// Synchronisation, warp collectives, atomics, cache-hinted loads
// ---------------------------------------------------------------------------
#define __syncthreads() ::qsim::threadgroup_barrier(__FILE__, __LINE__)

inline void __threadfence() {} // blocks run one after another

namespace qsim_cuda {

// Every lane's `value` (<= 16 bytes); `mask` must name the whole warp (the
// kernels' collectives all do).
// orders_memory: the collective orders the lanes' shared memory accesses
// (__syncwarp does; shuffles and votes do not), for the race detector.
template <typename T>
const unsigned char* exchange(
    unsigned mask, const T& value, const char* op, const char* file, int line, bool orders_memory = false) {
  static_assert(sizeof(T) <= 16, "one exchange carries 16 bytes per lane");
  if (mask != 0xffffffffu) {
    qsim::kernel_fault("warp collective with a partial lane mask (not modelled)");
  }
  unsigned lanes = 0, lane = 0;
  const unsigned char* all = qsim::simd_exchange(&value, sizeof(T), op, file, line, &lanes, &lane, orders_memory);
  if (lanes != 32) {
    qsim::kernel_fault("warp collective in a partial warp");
  }
  return all;
}

template <typename T>
T lane_value(const unsigned char* all, unsigned lane) {
  T v;
  std::memcpy(&v, all + 16 * lane, sizeof(T));
  return v;
}

inline unsigned lane_id() {
  return qsim::current_thread().values[int(qsim::Builtin::thread_index_in_simdgroup)][0];
}

} // namespace qsim_cuda

template <typename T>
T __shfl_xor_sync(
    unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const unsigned char* all = qsim_cuda::exchange(mask, v, "__shfl_xor_sync", file, line);
  const unsigned self = qsim_cuda::lane_id();
  unsigned src = self ^ unsigned(lane_mask);
  // A source outside the caller's width-lane segment returns its own value.
  if (src / unsigned(width) != self / unsigned(width)) {
    src = self;
  }
  return qsim_cuda::lane_value<T>(all, src % 32);
}

template <typename T>
T __shfl_sync(
    unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const unsigned char* all = qsim_cuda::exchange(mask, v, "__shfl_sync", file, line);
  const unsigned self = qsim_cuda::lane_id();
  const unsigned src = (self / unsigned(width)) * unsigned(width) + unsigned(src_lane) % unsigned(width);
  return qsim_cuda::lane_value<T>(all, src);
}

// A rendezvous of the warp's lanes (every lane must reach it), which orders
// their memory accesses (the fibers of a warp run one after another between
// collectives).
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  qsim_cuda::exchange(mask, 0, "__syncwarp", file, line, true);
}

inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const unsigned char* all = qsim_cuda::exchange(mask, pred != 0, "__any_sync", file, line);
  for (unsigned l = 0; l < 32; ++l) {
    if (qsim_cuda::lane_value<bool>(all, l)) {
      return 1;
    }
  }
  return 0;
}

// Blocks are cooperative fibers run one block at a time: nothing else runs
// between the read and the write.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------------------
// Integer and bit intrinsics
// ---------------------------------------------------------------------------
namespace qsim_cuda {
// The bits of `from` read as To (same size).
template <typename To, typename From>
inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
} // namespace qsim_cuda
inline float __int_as_float(int x) {
  return qsim_cuda::bits_as<float>(x);
}
inline float __uint_as_float(unsigned x) {
  return qsim_cuda::bits_as<float>(x);
}
inline unsigned __float_as_uint(float f) {
  return qsim_cuda::bits_as<unsigned>(f);
}
inline int __float_as_int(float f) {
  return qsim_cuda::bits_as<int>(f);
}

// PTX prmt.b32 in its default mode: bytes 0-3 of x and 4-7 of y; each
// selector nibble picks a byte with its low three bits and, when its high
// bit is set, replicates that byte's sign bit instead. (CUDA's
// __byte_perm documents only the low three bits; the kernels' selectors
// never set the high one.)
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = uint64_t(x) | (uint64_t(y) << 32);
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned sel = (s >> (4 * n)) & 0xfu;
    unsigned b = unsigned(bytes >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) {
      b = (b & 0x80u) ? 0xffu : 0x00u;
    }
    r |= b << (8 * n);
  }
  return r;
}

// A product rounded to float that the compiler may not fuse into an FMA
// (the host compiler fuses only within one expression; this is a call).
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline unsigned min(unsigned a, unsigned b) {
  return a < b ? a : b;
}
inline int64_t min(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t max(int64_t a, int64_t b) {
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------
// 16-bit floating-point types
// ---------------------------------------------------------------------------
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  return qsim::half_bits_to_float(h.__x);
}
inline __half __float2half_rn(float f) {
  return __half{qsim::float_to_half_bits(f)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  return qsim_cuda::bfloat_bits_to_float(b.__x);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{qsim::float_to_bfloat_bits(f)};
}
inline __half __ushort_as_half(unsigned short u) {
  return __half{u};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __half22float2(__half2 h) {
  return float2{__half2float(h.x), __half2float(h.y)};
}

namespace qsim_cuda {

// a - b and a * b + c, each rounded once to the format (exact products of
// 16-bit values fit a double; the sum is carried as TwoSum's pair).
inline double sub_once(double a, double b, Format16 f) {
  double hi, lo;
  two_sum(a, -b, hi, lo);
  return round_exact(hi, lo, f);
}
inline double fma_once(double a, double b, double c, Format16 f) {
  double hi, lo;
  two_sum(a * b, c, hi, lo); // a * b: 22 significant bits at most, exact
  return round_exact(hi, lo, f);
}
inline double mul_once(double a, double b, Format16 f) {
  return round_exact(a * b, 0.0, f);
}

} // namespace qsim_cuda

namespace qsim_cuda {

// The element of each 16-bit pair type: its value, its format, and a value
// of that format back to bits.
template <typename P>
struct Pair16;
template <>
struct Pair16<__half2> {
  static constexpr Format16 kFormat = kHalf;
  static double value(__half h) {
    return __half2float(h);
  }
  static __half element(double v) {
    return __half{half_bits_of(v)};
  }
};
template <>
struct Pair16<__nv_bfloat162> {
  static constexpr Format16 kFormat = kBfloat;
  static double value(__nv_bfloat16 b) {
    return __bfloat162float(b);
  }
  static __nv_bfloat16 element(double v) {
    return __nv_bfloat16{bfloat_bits_of(v)};
  }
};

enum class Op16 { Sub, Fma, Mul };

// a - b, a * b + c or a * b in each lane (c unused but for Fma), the exact
// result rounded once.
template <typename P>
inline P lanewise(Op16 op, P a, P b, P c) {
  using E = Pair16<P>;
  auto lane = [&](auto x, auto y, auto z) {
    const double vx = E::value(x), vy = E::value(y), vz = E::value(z);
    const double r = op == Op16::Sub ? sub_once(vx, vy, E::kFormat)
        : op == Op16::Fma            ? fma_once(vx, vy, vz, E::kFormat)
                                     : mul_once(vx, vy, E::kFormat);
    return E::element(r);
  };
  return P{lane(a.x, b.x, c.x), lane(a.y, b.y, c.y)};
}

} // namespace qsim_cuda

inline __half2 __hsub2(__half2 a, __half2 b) {
  return qsim_cuda::lanewise(qsim_cuda::Op16::Sub, a, b, a);
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return qsim_cuda::lanewise(qsim_cuda::Op16::Fma, a, b, c);
}
inline __half2 __hmul2(__half2 a, __half2 b) {
  return qsim_cuda::lanewise(qsim_cuda::Op16::Mul, a, b, a);
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return qsim_cuda::lanewise(qsim_cuda::Op16::Sub, a, b, a);
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return qsim_cuda::lanewise(qsim_cuda::Op16::Fma, a, b, c);
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return qsim_cuda::lanewise(qsim_cuda::Op16::Mul, a, b, a);
}
// fp32 math (exp2f, fmaf, fmaxf, log2f) is the C library's, which the
// kernels call unqualified as CUDA's device functions.
