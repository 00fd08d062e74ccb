// Copyright © 2026 mlx-qsdpa contributors.
//
// The simulators' runtime interface: what the compatibility headers (the
// Metal and CUDA front ends' compat.h and cuda_compat.h) and the generated
// kernel trampolines call. Implemented in tests/sim/runtime.cpp, which is
// compiled without the memory instrumentation that the kernels get.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qsim {

// The built-in values of a thread ([[thread_position_in_grid]], ...).
enum class Builtin : int {
  thread_position_in_grid,
  thread_position_in_threadgroup,
  thread_index_in_threadgroup,
  threadgroup_position_in_grid,
  threads_per_threadgroup,
  threadgroups_per_grid,
  threads_per_grid,
  simdgroup_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroups_per_threadgroup,
  threads_per_simdgroup,
};

// What a kernel thread sees of its launch.
struct ThreadContext {
  uint32_t values[11][3]; // indexed by Builtin
  // Pointers the kernel's [[buffer(i)]] arguments receive (index < 31).
  void* const* buffers;
  void* threadgroup_memory; // [[threadgroup(0)]]
  size_t threadgroup_memory_length;
};

// Returns the pointer a [[buffer(index)]] argument receives. `enabled` is
// the value of the argument's function constant (true without one). An
// argument that is enabled must be bound: checked before the launch.
void* buffer_argument(const ThreadContext& c, int index, bool enabled);
void* threadgroup_argument(const ThreadContext& c, int index);

// A kernel of the library: the trampoline that runs one thread, and what
// its arguments need (checked at launch).
struct ArgumentInfo {
  enum Kind { Buffer, Threadgroup } kind;
  int index;
  const char* name;
  const char* function_constant; // nullptr when the argument is unconditional
  const bool* enabled; // the function constant's storage, or nullptr
};

struct KernelInfo {
  const char* name;
  void (*run_thread)(const ThreadContext&);
  const ArgumentInfo* arguments;
  int n_arguments;
};

struct FunctionConstantInfo {
  int index;
  enum Type { Bool, Int } type;
  void* storage; // the kernel TU's global
  const char* name;
};

// A SIMD-group function: deposits this lane's value (size <= 16 bytes) and
// waits until every lane of the simdgroup called the same function at the
// same place. Returns the 32 lanes' values, 16 bytes apart; `lanes` receives
// the number of lanes of this simdgroup and `lane` the caller's index.
// `orders_threadgroup_memory`: the function is a SIMD-group barrier that
// orders the lanes' threadgroup memory accesses (Metal's
// simdgroup_barrier(mem_threadgroup), CUDA's __syncwarp); other SIMD-group
// functions exchange values only, and the race detector treats the lanes'
// accesses on either side of them as unordered.
const unsigned char* simd_exchange(
    const void* value,
    unsigned size,
    const char* op,
    const char* file,
    int line,
    unsigned* lanes,
    unsigned* lane,
    bool orders_threadgroup_memory = false);

// threadgroup_barrier: waits until every thread of the threadgroup reached
// this same barrier. `orders_threadgroup_memory` is false for a barrier
// without mem_threadgroup (Metal's mem_none, mem_device): it synchronises
// execution but does not end the race detector's barrier interval.
void threadgroup_barrier(const char* file, int line, bool orders_threadgroup_memory = true);

// The running thread's launch values (for front ends whose kernels read
// them through globals, as CUDA's threadIdx: tests/cuda/sim).
const ThreadContext& current_thread();

// Ends the launch with a report naming the running thread (a misuse the
// front end detects itself, e.g. a misaligned vector copy).
[[noreturn]] void kernel_fault(const char* message);

} // namespace qsim

// Provided by the generated trampolines of each kernel library.
extern "C" const qsim::KernelInfo* qsim_kernel_table(int* n);
extern "C" const qsim::FunctionConstantInfo* qsim_function_constant_table(int* n);
