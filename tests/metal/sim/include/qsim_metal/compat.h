// Copyright © 2026 mlx-qsdpa contributors.
//
// Metal Shading Language on the host compiler, for the Metal simulator.
// `#include <metal_stdlib>` resolves to this header when the simulator
// compiles a .metal file (tests/metal/sim/include is on the include path),
// so the kernels compile unchanged as C++ (clang, which the address spaces
// and the memory instrumentation need).
//
// What maps to what:
// * Address spaces: `device` and `constant` are clang address spaces 1 and
//   2, so passing a pointer of one space where another is expected fails as
//   it does in MSL. `threadgroup` is the `__unaligned` qualifier (clang with
//   -fms-extensions): a real address space cannot be used because MSL also
//   spells the attribute `[[threadgroup(0)]]`, and a keyword there is parsed
//   as an (ignored) attribute name. `thread` is the default space.
// * Attributes ([[kernel]], [[buffer(i)]], [[function_constant(c)]], the
//   built-ins) are ignored by the compiler (-Wno-unknown-attributes); the
//   simulator's build step reads them from the source and generates the
//   code that binds arguments and sets function constants.
// * Function constants are the kernel translation unit's globals, set by the
//   launcher before each dispatch.
// * half is clang's __fp16 (storage type; arithmetic happens in float and
//   is rounded when stored, where MSL computes in half precision). bfloat
//   is a class usable in thread memory only. Both round to nearest even.
// * Vector types are clang ext vectors (components, swizzles, arithmetic,
//   splat from a scalar). MSL's multi-argument constructor form
//   `float4(a, b, c, d)` is not C++: build vectors by component instead.
// * SIMD-group functions and barriers call the runtime (runtime.h), which
//   runs each threadgroup's threads as cooperative fibers with 32-lane
//   simdgroups, in the order of the launch's schedule, and reports misuse
//   and races on threadgroup memory.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "qsim/float16.h"
#include "qsim/runtime.h"

#if !defined(__clang__)
#error "The Metal simulator needs clang (address spaces, ext vectors, -fsanitize-coverage=trace-loads)."
#endif

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#if defined(QSIM_MSL_RULES)
// The compile of tests/metal/msl_rules.py, which sees the source with
// `[[threadgroup(i)]]` renamed: threadgroup is a real address space there
// (a thread or device pointer passed as a threadgroup one fails, as in
// MSL), and `thread` an attribute clang ignores but keeps in the printed
// type ('thread float *'), so that a pointer declared without an address
// space can be told from one in thread space.
#define threadgroup __attribute__((address_space(3)))
#define thread __attribute__((btf_type_tag("thread")))
#else
#define threadgroup __unaligned
#define thread
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong; // 64-bit, as in MSL (LP64 hosts)
static_assert(sizeof(ulong) == 8, "MSL ulong is 64-bit");

// ---------------------------------------------------------------------------
// half and bfloat
// ---------------------------------------------------------------------------

// half is clang's storage-only __fp16 (a builtin type, so it lives in any
// address space; arithmetic promotes to float). Its conversions call the
// helpers defined in runtime.cpp, which round to nearest even.
typedef __fp16 half;

// bfloat has no builtin storage type in clang 14 on x86: a class, usable in
// thread memory only (the kernels of this project read and write bfloat16
// as ushort bits through formats.h).
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) : bits(qsim::float_to_bfloat_bits(f)) {}
  operator float() const {
    return qsim::bits_float(uint32_t(bits) << 16);
  }
};

// ---------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------
#define QSIM_VECTOR_TYPES(T, name)                          \
  typedef T name##2 __attribute__((ext_vector_type(2))); \
  typedef T name##3 __attribute__((ext_vector_type(3))); \
  typedef T name##4 __attribute__((ext_vector_type(4)));
QSIM_VECTOR_TYPES(float, float)
QSIM_VECTOR_TYPES(int, int)
QSIM_VECTOR_TYPES(uint, uint)
QSIM_VECTOR_TYPES(short, short)
QSIM_VECTOR_TYPES(ushort, ushort)
QSIM_VECTOR_TYPES(char, char)
QSIM_VECTOR_TYPES(uchar, uchar)
#undef QSIM_VECTOR_TYPES

// ---------------------------------------------------------------------------
// as_type: reinterpretation of the bits of a value of the same size
// (unqualified, as in MSL).
// ---------------------------------------------------------------------------
template <typename T, typename U>
inline T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T t;
  std::memcpy(&t, &x, sizeof(T));
  return t;
}

#ifndef MAXFLOAT
#define MAXFLOAT 3.40282346638528859812e+38f
#endif

// Caller's source position, taken as default arguments so that barriers and
// SIMD-group functions can name the line that misused them.
#define QSIM_SITE_PARAMS const char *qsim_file = __builtin_FILE(), int qsim_line = __builtin_LINE()
#define QSIM_SITE_ARGS qsim_file, qsim_line

namespace metal {

// No `using ::as_type` here: MSL's as_type is a language operator written
// unqualified (as MLX's kernels write it); `metal::as_type` is reported not
// to compile with Apple's compiler, so the simulator rejects it as well.

// ---------------------------------------------------------------------------
// Math (float; half and bfloat convert to float first).
// ---------------------------------------------------------------------------
#define QSIM_UNARY(name, impl)           \
  inline float name(float x) {          \
    return impl(x);                     \
  }
QSIM_UNARY(exp, std::exp)
QSIM_UNARY(exp2, std::exp2)
QSIM_UNARY(log, std::log)
QSIM_UNARY(log2, std::log2)
QSIM_UNARY(sqrt, std::sqrt)
QSIM_UNARY(fabs, std::fabs)
QSIM_UNARY(floor, std::floor)
QSIM_UNARY(ceil, std::ceil)
QSIM_UNARY(round, std::round)
QSIM_UNARY(trunc, std::trunc)
QSIM_UNARY(sin, std::sin)
QSIM_UNARY(cos, std::cos)
QSIM_UNARY(tanh, std::tanh)
#undef QSIM_UNARY

inline float rsqrt(float x) {
  return 1.0f / std::sqrt(x);
}
inline float abs(float x) {
  return std::fabs(x);
}
inline int abs(int x) {
  return x < 0 ? -x : x;
}
inline float pow(float x, float y) {
  return std::pow(x, y);
}
inline float powr(float x, float y) {
  return std::pow(x, y);
}
inline float fma(float a, float b, float c) {
  return std::fma(a, b, c);
}
inline float fmax(float a, float b) {
  return std::fmax(a, b);
}
inline float fmin(float a, float b) {
  return std::fmin(a, b);
}
// MSL's max/min of floats follow fmax/fmin (a NaN operand is ignored).
inline float max(float a, float b) {
  return std::fmax(a, b);
}
inline float min(float a, float b) {
  return std::fmin(a, b);
}
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline T max(T a, T b) {
  return a > b ? a : b;
}
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline T min(T a, T b) {
  return a < b ? a : b;
}
inline float clamp(float x, float lo, float hi) {
  return min(max(x, lo), hi);
}
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
inline bool isnan(float x) {
  return std::isnan(x);
}
inline bool isinf(float x) {
  return std::isinf(x);
}
inline bool isfinite(float x) {
  return std::isfinite(x);
}
inline bool signbit(float x) {
  return std::signbit(x);
}
template <typename T>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}

namespace fast {
using metal::cos;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::max;
using metal::min;
using metal::pow;
using metal::powr;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
} // namespace fast
namespace precise {
using namespace fast;
} // namespace precise

// ---------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------
enum class mem_flags : int {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
};
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(int(a) | int(b));
}

inline bool orders_threadgroup_memory(mem_flags flags) {
  return (int(flags) & int(mem_flags::mem_threadgroup)) != 0;
}

// Every thread of the threadgroup must reach the same barrier (checked).
// The simulator runs threads one after another, so every write is visible
// at once; the flags matter to the race detector: only a barrier with
// mem_threadgroup orders threadgroup memory accesses across it.
inline void threadgroup_barrier(mem_flags flags, QSIM_SITE_PARAMS) {
  qsim::threadgroup_barrier(QSIM_SITE_ARGS, orders_threadgroup_memory(flags));
}

// ---------------------------------------------------------------------------
// SIMD-group functions. Each one waits for all 32 lanes (the lanes that
// exist in a partial last simdgroup) to call it at the same source line,
// then every lane computes its result from all lanes' values. Only
// simdgroup_barrier with mem_threadgroup orders the lanes' threadgroup
// memory accesses for the race detector: MSL gives the others no memory
// ordering.
// ---------------------------------------------------------------------------
namespace detail {

template <typename T>
struct Lanes {
  T v[32];
  unsigned n; // lanes of this simdgroup
  unsigned me; // the caller's lane
};

template <typename T>
inline Lanes<T> exchange(T x, const char* op, const char* file, int line, bool orders_memory = false) {
  static_assert(sizeof(T) <= 16, "SIMD-group values are at most 16 bytes");
  Lanes<T> r;
  const unsigned char* all = qsim::simd_exchange(&x, sizeof(T), op, file, line, &r.n, &r.me, orders_memory);
  for (unsigned i = 0; i < r.n; ++i) {
    std::memcpy(&r.v[i], all + 16 * i, sizeof(T));
  }
  return r;
}

} // namespace detail

inline void simdgroup_barrier(mem_flags flags, QSIM_SITE_PARAMS) {
  detail::exchange(0, "simdgroup_barrier", QSIM_SITE_ARGS, orders_threadgroup_memory(flags));
}

template <typename T>
inline T simd_sum(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_sum", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = acc + l.v[i];
  }
  return acc;
}

template <typename T>
inline T simd_product(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_product", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = acc * l.v[i];
  }
  return acc;
}

template <typename T>
inline T simd_max(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_max", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = max(acc, l.v[i]);
  }
  return acc;
}

template <typename T>
inline T simd_min(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_min", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = min(acc, l.v[i]);
  }
  return acc;
}

template <typename T>
inline T simd_and(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_and", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = acc & l.v[i];
  }
  return acc;
}

template <typename T>
inline T simd_or(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_or", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = acc | l.v[i];
  }
  return acc;
}

template <typename T>
inline T simd_xor(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_xor", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i < l.n; ++i) {
    acc = acc ^ l.v[i];
  }
  return acc;
}

inline bool simd_all(bool x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_all", QSIM_SITE_ARGS);
  bool acc = true;
  for (unsigned i = 0; i < l.n; ++i) {
    acc = acc && l.v[i];
  }
  return acc;
}

inline bool simd_any(bool x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_any", QSIM_SITE_ARGS);
  bool acc = false;
  for (unsigned i = 0; i < l.n; ++i) {
    acc = acc || l.v[i];
  }
  return acc;
}

// Inclusive / exclusive prefix sums in lane order.
template <typename T>
inline T simd_prefix_inclusive_sum(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_prefix_inclusive_sum", QSIM_SITE_ARGS);
  T acc = l.v[0];
  for (unsigned i = 1; i <= l.me; ++i) {
    acc = acc + l.v[i];
  }
  return acc;
}

template <typename T>
inline T simd_prefix_exclusive_sum(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_prefix_exclusive_sum", QSIM_SITE_ARGS);
  T acc = T(0);
  for (unsigned i = 0; i < l.me; ++i) {
    acc = acc + l.v[i];
  }
  return acc;
}

// The value of lane `src` (all lanes must name the same lane).
template <typename T, typename I>
inline T simd_broadcast(T x, I src, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_broadcast", QSIM_SITE_ARGS);
  return unsigned(src) < l.n ? l.v[unsigned(src)] : x;
}

template <typename T>
inline T simd_broadcast_first(T x, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_broadcast_first", QSIM_SITE_ARGS);
  return l.v[0];
}

// The value of lane `src` (any lane per caller).
template <typename T, typename I>
inline T simd_shuffle(T x, I src, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_shuffle", QSIM_SITE_ARGS);
  return unsigned(src) < l.n ? l.v[unsigned(src)] : x;
}

// Lane i receives lane i + delta; lanes without a source keep their value.
template <typename T, typename I>
inline T simd_shuffle_down(T x, I delta, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_shuffle_down", QSIM_SITE_ARGS);
  const unsigned src = l.me + unsigned(delta);
  return src < l.n ? l.v[src] : x;
}

// Lane i receives lane i - delta; lanes without a source keep their value.
template <typename T, typename I>
inline T simd_shuffle_up(T x, I delta, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_shuffle_up", QSIM_SITE_ARGS);
  return l.me >= unsigned(delta) ? l.v[l.me - unsigned(delta)] : x;
}

template <typename T, typename I>
inline T simd_shuffle_xor(T x, I mask, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_shuffle_xor", QSIM_SITE_ARGS);
  const unsigned src = l.me ^ unsigned(mask);
  return src < l.n ? l.v[src] : x;
}

template <typename T, typename I>
inline T simd_shuffle_rotate_down(T x, I delta, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_shuffle_rotate_down", QSIM_SITE_ARGS);
  return l.v[(l.me + unsigned(delta)) % l.n];
}

template <typename T, typename I>
inline T simd_shuffle_rotate_up(T x, I delta, QSIM_SITE_PARAMS) {
  auto l = detail::exchange(x, "simd_shuffle_rotate_up", QSIM_SITE_ARGS);
  return l.v[(l.me + l.n - unsigned(delta) % l.n) % l.n];
}

inline bool simd_is_first(QSIM_SITE_PARAMS) {
  auto l = detail::exchange(0, "simd_is_first", QSIM_SITE_ARGS);
  return l.me == 0;
}

} // namespace metal

namespace qsim {

// The value a built-in argument of type T receives: scalars take the x
// component, vectors as many components as they have.
template <typename T>
inline T builtin_value(const ThreadContext& c, Builtin b) {
  const uint32_t* v = c.values[int(b)];
  if constexpr (std::is_arithmetic<T>::value) {
    return T(v[0]);
  } else {
    T r = T(0);
    constexpr int n = sizeof(T) / sizeof(r[0]) < 3 ? sizeof(T) / sizeof(r[0]) : 3;
    for (int i = 0; i < n; ++i) {
      r[i] = v[i];
    }
    return r;
  }
}

} // namespace qsim
