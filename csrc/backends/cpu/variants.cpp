// Copyright © 2026 mlx-qsdpa contributors.
//
// Which compute variant of the CPU kernel runs: the best one this CPU can
// execute, picked once per process from the CPU's feature flags (the
// compiler's __builtin_cpu_supports, which also checks that the OS saves
// the AVX / AVX-512 registers). This file is built for the baseline
// target, so it runs on any CPU the library loads on.
#include <atomic>
#include <stdexcept>
#include <string>

#include "backends/cpu/variants.h"

namespace mlx_qsdpa::cpu {

namespace {

struct Entry {
  const Variant* variant;
  bool (*supported)();
};

[[maybe_unused]] bool always() {
  return true;
}

#if !defined(QSDPA_CPU_NATIVE) && (defined(__x86_64__) || defined(_M_X64))
bool has_x86_64_v2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt") &&
      __builtin_cpu_supports("ssse3");
}
bool has_x86_64_v3() {
  return has_x86_64_v2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
      __builtin_cpu_supports("bmi2");
}
bool has_x86_64_v4() {
  return has_x86_64_v3() && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
}
constexpr Entry kEntries[] = {
    {&kVariantX86V4, has_x86_64_v4},
    {&kVariantX86V3, has_x86_64_v3},
    {&kVariantX86V2, has_x86_64_v2},
};
#elif defined(QSDPA_CPU_NATIVE)
// Built with -march=native (MLX_QSDPA_NATIVE_CPU): for the build machine only.
constexpr Entry kEntries[] = {{&kVariantNative, always}};
#elif defined(__aarch64__) || defined(_M_ARM64)
// NEON is part of the arm64 baseline.
constexpr Entry kEntries[] = {{&kVariantArm64Neon, always}};
#else
constexpr Entry kEntries[] = {{&kVariantGeneric, always}};
#endif

const Variant* best() {
  for (const Entry& e : kEntries) {
    if (e.supported()) {
      return e.variant;
    }
  }
  return nullptr;
}

// The variant in use; null until the first call picks one.
std::atomic<const Variant*> g_active{nullptr};

} // namespace

const Variant& active_variant() {
  const Variant* v = g_active.load(std::memory_order_acquire);
  if (!v) {
    v = best();
    if (!v) {
      throw std::runtime_error(
          "[quant_sdpa] this CPU lacks the instructions of every compiled CPU "
          "kernel (x86-64 needs at least SSE4.2 and POPCNT, x86-64-v2).");
    }
    g_active.store(v, std::memory_order_release);
  }
  return *v;
}

std::vector<std::pair<std::string, bool>> compiled_variants() {
  std::vector<std::pair<std::string, bool>> out;
  for (const Entry& e : kEntries) {
    out.emplace_back(e.variant->name, e.supported());
  }
  return out;
}

void select_variant(const std::string& name) {
  if (name.empty()) {
    g_active.store(best(), std::memory_order_release);
    return;
  }
  std::string known;
  for (const Entry& e : kEntries) {
    if (name == e.variant->name) {
      if (!e.supported()) {
        throw std::invalid_argument(
            "[quant_sdpa] CPU kernel variant '" + name + "' needs instructions this CPU lacks.");
      }
      g_active.store(e.variant, std::memory_order_release);
      return;
    }
    known += (known.empty() ? "'" : ", '") + std::string(e.variant->name) + "'";
  }
  throw std::invalid_argument(
      "[quant_sdpa] unknown CPU kernel variant '" + name + "'; compiled: " + known + ".");
}

} // namespace mlx_qsdpa::cpu
