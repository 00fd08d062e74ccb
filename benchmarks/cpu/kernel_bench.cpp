// Copyright © 2026 mlx-qsdpa contributors.
//
// The CPU kernel alone, one thread, no MLX: thread CPU time of one variant's
// run_item over every kv head of a decode call (B=1, Hq=32, Hkv=8, D=128,
// random affine codes, float16 scales and queries), best of REPS (default 7).
// Thread CPU time does not count time the thread waits for a core, so it
// compares builds on a busy machine. benchmarks/cpu/kernel_bench.sh builds
// and runs it:
//
//   bash benchmarks/cpu/kernel_bench.sh [Lk [bits [Lq [MODE [group_size]]]]]
//
// MODE: affine or turbo (float16 scales), mxfp4, mxfp8 or nvfp4 (8-bit
// scale codes; their own group sizes).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/kernel.h"
#include "mlx_qsdpa/formats.h"

using namespace mlx_qsdpa::cpu;

namespace {

// Thread CPU time in seconds.
double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

} // namespace

int main(int argc, char** argv) {
  const int Lk = argc > 1 ? std::atoi(argv[1]) : 32768;
  const int bits = argc > 2 ? std::atoi(argv[2]) : 4;
  const int Lq = argc > 3 ? std::atoi(argv[3]) : 1;
  const std::string mode_name = argc > 4 ? argv[4] : "affine";
  int mode = -1;
  for (const auto& row : qsdpa::kFormatTable) {
    if (mode_name == row.mode_name) {
      mode = row.mode;
    }
  }
  if (mode < 0) {
    std::fprintf(stderr, "unknown mode %s\n", mode_name.c_str());
    return 2;
  }
  const bool float_scales = qsdpa::mode_float_scales(mode);
  const int reps = std::getenv("REPS") ? std::atoi(std::getenv("REPS")) : 7;
  const int gs = argc > 5 ? std::atoi(argv[5]) : mode == qsdpa::kNvfp4 ? 16 : float_scales ? 64 : 32;
  const int Hq = 32, Hkv = 8, D = 128, G = Hq / Hkv;
  const int words = D * bits / 32, ng = D / gs;
  std::mt19937 rng(1);

  std::vector<uint32_t> kw(size_t(Hkv) * Lk * words), vw(kw.size());
  for (auto* a : {&kw, &vw}) {
    for (auto& w : *a) {
      w = rng();
    }
  }
  // float16 scales and biases in [2^-7, 2^-5), queries in [0.125, 0.25).
  std::vector<uint16_t> ks(size_t(Hkv) * Lk * ng), kb(ks.size()), vs(ks.size()), vb(ks.size());
  for (auto* a : {&ks, &kb, &vs, &vb}) {
    for (auto& x : *a) {
      x = 0x2000 + rng() % 0x1000;
    }
  }
  // The fp modes' 8-bit scale codes: e8m0 2^-3..2^3, e4m3 in [0.25, 4).
  std::vector<uint8_t> ks8(ks.size()), vs8(ks.size());
  for (auto* a : {&ks8, &vs8}) {
    for (auto& x : *a) {
      x = mode == qsdpa::kNvfp4 ? 0x28 + rng() % 0x20 : 124 + rng() % 7;
    }
  }
  std::vector<uint16_t> q(size_t(Hq) * Lq * D);
  for (auto& x : q) {
    x = 0x3000 + rng() % 0x800;
  }

  Problem p{};
  p.B = 1, p.Hq = Hq, p.Hkv = Hkv, p.Lq = Lq, p.Lk = Lk, p.D = D, p.G = G;
  p.scale_log2 = 0.125f;
  p.q = q.data();
  p.q_type = qsdpa::kElemFloat16;
  p.qs[3] = 1, p.qs[2] = D, p.qs[1] = int64_t(D) * Lq, p.qs[0] = p.qs[1] * Hq;
  auto view = [&](const std::vector<uint32_t>& w, const std::vector<uint16_t>& s,
                  const std::vector<uint16_t>& b, const std::vector<uint8_t>& s8) {
    mlx_qsdpa::QuantTensor v{};
    v.mode = mode, v.bits = bits, v.group_size = gs;
    v.w = w.data();
    v.ws[3] = 1, v.ws[2] = words, v.ws[1] = int64_t(words) * Lk, v.ws[0] = v.ws[1] * Hkv;
    v.scales = float_scales ? static_cast<const void*>(s.data()) : static_cast<const void*>(s8.data());
    v.biases = qsdpa::mode_has_bias(mode) ? b.data() : nullptr;
    v.ss[3] = 1, v.ss[2] = ng, v.ss[1] = int64_t(ng) * Lk, v.ss[0] = v.ss[1] * Hkv;
    for (int i = 0; i < 4; ++i) {
      v.bs[i] = v.ss[i];
    }
    v.scale_type = qsdpa::kElemFloat16;
    return v;
  };
  p.k = view(kw, ks, kb, ks8);
  p.v = view(vw, vs, vb, vs8);
  p.mask = Lq > 1 ? qsdpa::kMaskCausal : qsdpa::kMaskNone;

  const Variant& var = QSDPA_CPU_VARIANT;
  const int rows = G * Lq, rb = std::min(rows, 64);
  std::vector<char> scratch(var.scratch_bytes(p, rb) + 64);
  void* work = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
  std::vector<float> o(size_t(rb) * D), m(rb), l(rb);
  double best = 1e9;
  for (int rep = 0; rep < reps; ++rep) {
    const double t0 = thread_seconds();
    for (int h = 0; h < Hkv; ++h) {
      for (int r0 = 0; r0 < rows; r0 += rb) {
        const Item it{0, h, r0, std::min(rb, rows - r0), 0, Lk};
        var.run_item(p, it, work, ItemResult{o.data(), m.data(), l.data()});
      }
    }
    best = std::min(best, thread_seconds() - t0);
  }
  std::printf("%s %s Lk=%d bits=%d Lq=%d: %.2f ms of one thread per call (%.1f ns per key and kv head)\n",
              var.name, mode_name.c_str(), Lk, bits, Lq, best * 1e3, best * 1e9 / Lk / Hkv);
}
