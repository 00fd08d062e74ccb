// Copyright © 2026 mlx-qsdpa contributors.
//
// One violation of each rule of tests/metal/msl_rules.py, for
// test_metal_msl_rules.py: each line marked `expect: <rule>` must be
// reported with that rule, and nothing else may be. Valid C++14 (the
// simulator's compiler accepts all of it); not valid MSL.
#include <metal_stdlib>
#include <cstdint> // expect: includes

namespace bad {

// The construct of issue 3's review: program-scope data outside the
// constant address space, through a static data member.
template <int BITS>
struct PackGeometry {
  static constexpr int kPackElems = 32 / BITS; // expect: static-data
};

int counter = 0; // expect: static-data
constant int kFine = 3;
thread_local int per_thread = 0; // expect: static-data

inline int bump() {
  static int calls = 0; // expect: static-data
  return ++calls + counter; // expect: static-data
}

inline float first(float* x) { // expect: address-space
  return 2.0f * x[0];
}

inline float first_ok(thread float* x, const device float* y, threadgroup float* z, constant int& n) {
  return x[0] + y[0] + z[0] + float(n + kFine);
}

inline float halve(float x) {
  return x * 0.5; // expect: types
}

inline long long wide(int x) { return x; } // expect: types

inline int from_std(int x) {
  return std::int32_t(x); // expect: types
}

inline int with_register(int x) {
  register int y = x; // expect: forbidden
  return y;
}

inline float apply(float (*f)(float), float x) { // expect: types
  return f(x);
}

inline float varargs(int n, ...) { // expect: types
  return float(n);
}

inline float factorial(int n) { // expect: recursion
  return n <= 1 ? 1.0f : float(n) * factorial(n - 1);
}

inline float pong(int n);
inline float ping(int n) { // expect: recursion
  return n > 0 ? pong(n - 1) : 0.0f;
}
inline float pong(int n) {
  return ping(n);
}

inline float root(float x) {
  return std::sqrt(x); // expect: non-metal-calls
}

inline float bits(uint u) {
  float f;
  thread float* pf = &f;
  memcpy(pf, &u, 4); // expect: non-metal-calls
  return f;
}

inline float checked(float x) {
  if (x < 0.0f) {
    throw 1; // expect: forbidden
  }
  return x;
}

inline thread float* allocate() {
  return new float[4]; // expect: forbidden
}

inline int jump(int x) {
  if (x) {
    goto done; // expect: forbidden
  }
  x = 1;
done: // expect: forbidden
  return x;
}

inline int with_lambda(int x) {
  auto f = [](int y) { return y + 1; }; // expect: forbidden
  return f(x);
}

struct Shape {
  virtual int sides() const { // expect: forbidden
    return 0;
  }
};
struct Square : Shape { // expect: forbidden
  int sides() const override { // expect: forbidden
    return 4;
  }
};

inline int keyword(int vertex) { // expect: msl-keyword
  return vertex;
}

} // namespace bad

[[kernel]] void uses_thread_argument(
    thread float* out [[buffer(0)]], // expect: address-space
    const device float* in [[buffer(1)]],
    uint tid [[thread_position_in_grid]]) {
  out[tid] = in[tid];
}

// Well-formed: nothing to report.
[[kernel]] void well_formed(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant int& n [[buffer(2)]],
    threadgroup float* tg [[threadgroup(0)]],
    uint tid [[thread_position_in_grid]]) {
  float local[2] = {1.0f, 2.0f};
  thread const float* p = local;
  tg[tid] = in[tid] * p[1] * metal::exp2(1.0f);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  out[tid] = int(tid) < n ? tg[tid] + metal::simd_sum(1.0f) + as_type<float>(0u) : INFINITY;
}
