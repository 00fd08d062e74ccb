// Copyright © 2026 mlx-qsdpa contributors.
//
// Checks the CUDA host code's plain-C++ logic, no GPU: split_plan.h (the
// split of a call over blocks) over a sweep of shapes, params.h's FastDiv,
// the merge tree, and launch_plan.cpp (the kernel choice from the cache's
// layout, the launch's grid and workspace, the parameter block). Prints one
// line per violation and "checked N plans"; exits 1 on any violation.
#include <cstdio>
#include <algorithm>
#include <initializer_list>
#include <vector>

#include "backends/cuda/launch_plan.h"

using namespace mlx_qsdpa::cuda;
using mlx_qsdpa::Call;
using mlx_qsdpa::QuantTensor;

namespace {

int failures = 0;

void expect(bool ok, const char* what, const SplitInput& in, const SplitPlan& p) {
  if (!ok) {
    ++failures;
    std::printf(
        "FAIL %s: B=%d Hkv=%d rows=%d Lk=%d D=%d n_rows=%lld rpb=%d wave=%lld min=%d forced=%d -> "
        "row_tiles=%d n_splits=%d kps=%d\n",
        what, in.B, in.Hkv, in.rows, in.Lk, in.D, (long long)in.n_rows, in.rows_per_block,
        (long long)in.wave, in.min_keys_per_split, in.forced_splits, p.row_tiles, p.n_splits,
        p.keys_per_split);
  }
}

void check(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

// A call as mx.quantize lays out its cache (dense rows; addresses on
// 256-byte boundaries), never dereferenced.
struct DenseCall {
  Call c{};
  explicit DenseCall(
      int B, int Hq, int Hkv, int Lq, int Lk, int D, int mode, int bits, int gs, int q_type, int scale_type) {
    c.B = B;
    c.Hq = Hq;
    c.Hkv = Hkv;
    c.Lq = Lq;
    c.Lk = Lk;
    c.D = D;
    c.G = Hq / Hkv;
    c.scale = 1.0f;
    c.scale_log2 = qsdpa::log2e();
    c.q = fake(1);
    dense(c.qs, Hq, Lq, D);
    c.q_type = q_type;
    c.out_type = q_type;
    const int64_t words = int64_t(D) * bits / 32;
    const int64_t groups = D / gs;
    int i = 2;
    for (QuantTensor* t : {&c.k, &c.v}) {
      t->mode = mode;
      t->bits = bits;
      t->group_size = gs;
      t->w = static_cast<const uint32_t*>(fake(i++));
      dense(t->ws, Hkv, Lk, words);
      t->scales = fake(i++);
      dense(t->ss, Hkv, Lk, groups);
      if (qsdpa::mode_has_bias(mode)) {
        t->biases = fake(i++);
        dense(t->bs, Hkv, Lk, groups);
      }
      t->scale_type = scale_type;
    }
    c.mask = qsdpa::kMaskNone;
  }
  static const void* fake(int i) {
    return reinterpret_cast<const void*>(uintptr_t(i) << 20);
  }
  static void dense(int64_t (&s)[4], int64_t H, int64_t L, int64_t W) {
    s[3] = 1;
    s[2] = W;
    s[1] = L * W;
    s[0] = H * L * W;
  }
};

const void* offset(const void* p, int bytes) {
  return static_cast<const unsigned char*>(p) + bytes;
}

bool mma(const Call& c, const TestOverrides& o = TestOverrides{}) {
  return choose_kernel(c, o).kind == KernelKind::Mma;
}

// launch_plan.cpp: which kernel a layout gets, and what a launch holds.
long check_launch_plan() {
  long n = 0;
  constexpr int F16 = qsdpa::kElemFloat16, BF16 = qsdpa::kElemBFloat16, F32 = qsdpa::kElemFloat32;
  constexpr int U8 = qsdpa::kElemUint8;
  const DenseCall base(1, 32, 8, 1, 4096, 128, qsdpa::kAffine, 4, 64, F16, F16);
  // The kernel choice.
  check(mma(base.c), "a dense fp16 affine 4-bit cache takes the tensor-core kernel");
  check(choose_kernel(base.c, {}).row_tiles == 1 && choose_kernel(base.c, {}).rows_per_block == 8,
        "one decode token of G = 4: 8-row blocks");
  const DenseCall lq4(1, 32, 8, 4, 4096, 128, qsdpa::kAffine, 4, 64, BF16, BF16);
  check(mma(lq4.c) && choose_kernel(lq4.c, {}).row_tiles == 2, "G * Lq = 16 rows: 16-row blocks");
  TestOverrides simt;
  simt.force_simt = true;
  check(!mma(base.c, simt) && choose_kernel(base.c, simt).rows_per_block == kSimtRows, "force_simt");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kAffine, 4, 64, F32, F32).c), "float32 queries: generic");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kAffine, 3, 64, F16, F16).c), "3-bit codes: generic");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 96, qsdpa::kAffine, 4, 32, F16, F16).c), "D = 96: generic");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 64, qsdpa::kAffine, 4, 128, F16, F16).c), "a group wider than D: generic");
  check(mma(DenseCall(1, 32, 8, 1, 4096, 256, qsdpa::kMxfp4, 4, 32, BF16, U8).c), "mxfp4 with its uint8 scales");
  check(mma(DenseCall(1, 32, 8, 1, 4096, 64, qsdpa::kNvfp4, 4, 16, F16, U8).c), "nvfp4");
  check(mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kMxfp8, 8, 32, F16, U8).c), "mxfp8");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kAffine, 4, 64, F16, BF16).c),
        "affine scales of another dtype than the queries: generic");
  check(mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kTurbo, 4, 64, F16, F16).c), "turbo4");
  check(mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kTurbo, 2, 32, BF16, BF16).c), "turbo2");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kTurbo, 3, 64, F16, F16).c), "turbo3: generic");
  check(!mma(DenseCall(1, 32, 8, 1, 4096, 128, qsdpa::kTurbo, 4, 64, F16, BF16).c),
        "turbo scales of another dtype than the queries: generic");
  {
    // Keys and values of different formats: the generic kernel (the
    // tensor-core kernels are built per format, not per pair).
    DenseCall d = base;
    d.c.v.group_size = 32;
    check(!mma(d.c), "values with another group size: generic");
    const DenseCall turbo(1, 32, 8, 1, 4096, 128, qsdpa::kTurbo, 4, 64, F16, F16);
    DenseCall mixed = base;
    mixed.c.v = turbo.c.v;
    check(!mma(mixed.c), "affine keys, turbo values: generic");
    check(same_format(base.c.k, base.c.v) && !same_format(mixed.c.k, mixed.c.v), "same_format");
  }
  {
    DenseCall d = base;
    d.c.k.w = static_cast<const uint32_t*>(offset(d.c.k.w, 4));
    check(!mma(d.c), "packed words off 16 bytes: generic");
  }
  {
    DenseCall d = base;
    d.c.v.ws[2] += 1; // rows 4 bytes apart from 16-byte boundaries
    check(!mma(d.c), "packed rows off 16 bytes: generic");
  }
  {
    DenseCall d = base;
    d.c.k.ws[2] += 4; // rows 16 bytes apart from adjacent: still aligned
    d.c.k.ws[1] = d.c.k.ws[2] * d.c.Lk;
    d.c.k.ws[0] = d.c.k.ws[1] * d.c.Hkv;
    check(mma(d.c), "packed rows with 16 bytes of padding: tensor cores");
  }
  {
    DenseCall d = base;
    d.c.k.ws[3] = 2;
    check(!mma(d.c), "a strided last axis of the packed words: generic");
  }
  {
    DenseCall d = base;
    d.c.v.bs[2] = 4; // scale rows not dense (2 groups per row, 4 apart)
    check(!mma(d.c), "bias rows not dense: generic");
  }
  {
    DenseCall d = base;
    d.c.k.scales = offset(d.c.k.scales, 2);
    check(!mma(d.c), "scales off 16 bytes: generic");
  }
  {
    DenseCall d = base;
    d.c.k.ss[0] = 3; // B = 1: the batch stride does not matter
    check(mma(d.c), "an axis of size 1 may have any stride");
  }
  // The launch: grid, block, workspace and parameters, over shapes and devices.
  for (int B : {1, 3}) {
    for (int Lq : {1, 4, 9}) {
      for (int Lk : {1, 512, 4096, 131072}) {
        for (int forced : {0, 1, 5, 100}) {
          for (bool force_simt : {false, true}) {
            DenseCall d(B, 32, 8, Lq, Lk, 128, qsdpa::kAffine, 4, 64, F16, F16);
            TestOverrides o;
            o.force_simt = force_simt;
            o.splits = forced;
            const KernelChoice k = choose_kernel(d.c, o);
            const int sm_count = 132, blocks_per_sm = 4;
            const LaunchPlan p = plan_launch(d.c, k, KernelFacts{12345, blocks_per_sm}, sm_count, o);
            ++n;
            const int rows = d.c.G * Lq;
            check(p.kernel.kind == k.kind && p.row_tiles == (rows + k.rows_per_block - 1) / k.rows_per_block,
                  "the plan's row tiles cover the rows with the kernel's blocks");
            check(p.grid[0] == uint32_t(p.n_splits) && p.grid[1] == uint32_t(8 * p.row_tiles) && p.grid[2] == uint32_t(B),
                  "grid = (splits, Hkv * row tiles, B)");
            check(p.block == uint32_t(kThreads) && p.smem_bytes == 12345, "block and shared memory");
            check(int64_t(p.n_splits) * p.keys_per_split >= Lk && (Lk == 0 || int64_t(p.n_splits - 1) * p.keys_per_split < Lk),
                  "the splits cover the keys, none empty");
            if (forced > 0) {
              check(p.n_splits <= forced, "forced splits bound the plan");
            } else if (k.kind == KernelKind::Mma) {
              check(p.n_splits == 1 || int64_t(B) * 8 * p.row_tiles * p.n_splits <= kMmaWaveBlocksPerSm * sm_count,
                    "the tensor-core kernel's wave: at most 3 blocks per SM");
            } else {
              check(p.n_splits == 1 || int64_t(B) * 8 * p.row_tiles * p.n_splits <= blocks_per_sm * sm_count,
                    "the generic kernel's wave: its occupancy");
            }
            const MergeTree t = merge_tree(p.n_splits);
            const int64_t n_rows = int64_t(B) * 32 * Lq;
            check(p.partial_o_bytes == t.slots * n_rows * 128 * 4 && p.partial_ml_bytes == t.slots * n_rows * 8 &&
                      p.counters == int64_t(B) * 8 * p.row_tiles * t.counters,
                  "the workspace holds the merge tree's slots and counters");
            const Params params = make_params(d.c, p);
            check(params.B == B && params.Lk == Lk && params.k.w == d.c.k.w && params.scale_log2 == d.c.scale_log2 &&
                      params.rows == rows && params.n_splits == p.n_splits && params.keys_per_split == p.keys_per_split &&
                      fast_div(params.div_G, 1000) == 1000 / 4 && fast_div(params.div_Hkv, 1000) == 1000 / 8 &&
                      params.part_o == nullptr && params.counters == nullptr,
                  "make_params: the call, the split and the divisors");
          }
        }
      }
    }
  }
  // What the kernels cover.
  check(kernels_cover(1, 32, 8, 1, 256) && !kernels_cover(1, 32, 8, 1, 272) && !kernels_cover(1, 32, 8, 1, 8) &&
            !kernels_cover(1, 32, 8, 0, 128) && kernels_cover(1, 32, 8, 4096, 128) &&
            !kernels_cover(1, 1 << 20, 1, 1, 128),
        "kernels_cover: head dims 16-256, Lq >= 1, grids within CUDA's limits");
  return n;
}

} // namespace

int main() {
  long n = 0;
  for (int B : {1, 2, 8, 64}) {
    for (int Hkv : {1, 8, 32}) {
      for (int rows : {1, 4, 8, 9, 16, 32, 128, 4096}) {
        for (int Lk : {0, 1, 63, 64, 65, 127, 128, 1000, 4096, 32768, 131072, 1 << 20}) {
          for (int D : {64, 128, 256}) {
            for (int rpb : {8, 16}) {
              for (int64_t wave : {132LL, 528LL, 2112LL}) {
                for (int min_keys : {128, 512}) {
                  for (int forced : {0, 3, 16, 5000}) {
                    SplitInput in;
                    in.B = B;
                    in.Hkv = Hkv;
                    in.rows = rows;
                    in.Lk = Lk;
                    in.D = D;
                    in.n_rows = int64_t(B) * Hkv * rows;
                    in.rows_per_block = rpb;
                    in.wave = wave;
                    in.min_keys_per_split = min_keys;
                    in.forced_splits = forced;
                    const SplitPlan p = plan_splits(in);
                    ++n;
                    expect(p.row_tiles * rpb >= rows && (p.row_tiles - 1) * rpb < rows, "row tiles cover the rows", in, p);
                    expect(p.n_splits >= 1 && p.n_splits <= kMaxSplits, "1 <= splits <= kMaxSplits", in, p);
                    expect(p.keys_per_split >= kKeysPerBlockStep && p.keys_per_split % kKeysPerBlockStep == 0,
                           "keys per split: a positive multiple of the block step", in, p);
                    expect(int64_t(p.n_splits) * p.keys_per_split >= Lk, "the splits cover every key", in, p);
                    expect(Lk == 0 ? p.n_splits == 1 : int64_t(p.n_splits - 1) * p.keys_per_split < Lk,
                           "no split is empty", in, p);
                    expect(p.n_splits == 1 || int64_t(p.n_splits) * in.n_rows * D <= kMaxPartialElements,
                           "partials stay within int indexing", in, p);
                    if (forced == 0) {
                      const int64_t blocks = int64_t(B) * Hkv * p.row_tiles;
                      // Never more blocks than a wave, beyond what the rows alone need
                      // (a block past the wave runs after the others).
                      expect(p.n_splits == 1 || blocks * p.n_splits <= wave, "at most one wave of blocks", in, p);
                      // Nor fewer than half a wave, unless a limit stops the next split:
                      // kMaxSplits, min_keys, the wave, the partials' size, or keys per split
                      // down to one block step.
                      expect(p.n_splits == kMaxSplits || int64_t(p.n_splits + 1) * min_keys > Lk ||
                                 blocks * (p.n_splits + 1) > wave ||
                                 int64_t(p.n_splits) * 2 * in.n_rows * D > kMaxPartialElements ||
                                 (Lk + p.n_splits) / (p.n_splits + 1) <= kKeysPerBlockStep ||
                                 blocks * p.n_splits * 2 > wave,
                             "splits fill at least half a wave where the keys allow", in, p);
                      // Never fewer keys per split than asked, unless one split holds them all.
                      expect(p.n_splits == 1 || p.keys_per_split >= min_keys ||
                                 int64_t(p.n_splits) * min_keys > Lk,
                             "at least min_keys_per_split keys per split", in, p);
                      // Short of a wave, a long context is split.
                      expect(!(blocks * 2 <= wave && Lk >= 4 * min_keys && int64_t(B) * Hkv * rows * D < (1 << 20)) ||
                                 p.n_splits > 1,
                             "a long context on an idle GPU is split", in, p);
                    } else if (p.n_splits > 1) {
                      expect(p.n_splits <= forced, "forced splits are an upper bound", in, p);
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  // params.h's fast_div (the kernels' n / G and n / Hkv) against `/`: every
  // n below 20000 for divisors up to 1024, and, for those and some large
  // divisors, pseudo-random n and the n next to multiples of d up to
  // 2^31 - 1.
  {
    auto check_div = [&](int d, uint32_t n) {
      if (uint32_t(fast_div(make_fast_div(d), int(n))) != n / uint32_t(d)) {
        ++failures;
        if (failures < 20) {
          std::printf("FAIL fast_div: %u / %d\n", n, d);
        }
      }
    };
    std::vector<int> divisors;
    for (int d = 1; d <= 1024; ++d) {
      divisors.push_back(d);
    }
    for (int d : {4095, 4096, 4097, 65535, 65536, 65537, 1 << 20, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, 0x7fffffff}) {
      divisors.push_back(d);
    }
    uint64_t state = 88172645463325252ull;
    for (int d : divisors) {
      const FastDiv f = make_fast_div(d);
      for (uint32_t n = 0; d <= 1024 && n < 20000; ++n) {
        if (uint32_t(fast_div(f, int(n))) != n / uint32_t(d)) {
          check_div(d, n); // reports it
        }
      }
      for (int i = 0; i < 2000; ++i) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        check_div(d, uint32_t(state) & 0x7fffffffu);
      }
      for (uint64_t k : {uint64_t(1), uint64_t(2), uint64_t(0x7fffffff) / uint64_t(d)}) {
        for (int64_t delta : {-1, 0, 1}) {
          const int64_t n = int64_t(k * uint64_t(d)) + delta;
          if (n >= 0 && n <= 0x7fffffff) {
            check_div(d, uint32_t(n));
          }
        }
      }
      check_div(d, 0x7fffffffu);
    }
  }
  // Grid limits: kv heads x row tiles <= 65535, B <= 65535.
  if (!grid_fits(1, 8, 4, 8) || !grid_fits(65535, 8, 4, 8) || grid_fits(65536, 8, 4, 8) ||
      !grid_fits(1, 64, 1023 * 8, 8) || grid_fits(1, 64, 1023 * 8 + 1, 8) || !grid_fits(1, 1, 65535 * 16, 16)) {
    ++failures;
    std::printf("FAIL grid_fits\n");
  }
  // The merge tree: walk every block's path as split_merge.cuh does and
  // check that slots and counters stay within merge_tree's sizes, that no
  // slot is written twice, and that exactly one block reaches the output.
  for (int splits = 1; splits <= kMaxSplits; ++splits) {
    const MergeTree t = merge_tree(splits);
    std::vector<int> writes(size_t(t.slots), 0);
    std::vector<int> arrivals(size_t(t.counters), 0);
    int roots = 0;
    for (int blk = 0; blk < splits && splits > 1; ++blk) {
      int64_t count = splits, index = blk, slot_base = 0, counter_base = 0;
      if (blk < t.slots) {
        ++writes[size_t(blk)];
      }
      while (true) {
        const int64_t group = index / kMergeRadix;
        const int64_t first = group * kMergeRadix;
        const int64_t members = std::min<int64_t>(kMergeRadix, count - first);
        const int64_t ci = counter_base + group;
        if (ci >= t.counters) {
          ++failures;
          std::printf("FAIL merge tree: counter %lld of %lld (splits %d)\n", (long long)ci, (long long)t.counters, splits);
          break;
        }
        if (++arrivals[size_t(ci)] != members) {
          break; // not the last of its group
        }
        if (count <= kMergeRadix) {
          ++roots;
          break;
        }
        const int64_t dst = slot_base + count + group;
        if (dst >= t.slots) {
          ++failures;
          std::printf("FAIL merge tree: slot %lld of %lld (splits %d)\n", (long long)dst, (long long)t.slots, splits);
          break;
        }
        ++writes[size_t(dst)];
        counter_base += (count + kMergeRadix - 1) / kMergeRadix;
        slot_base += count;
        index = group;
        count = (count + kMergeRadix - 1) / kMergeRadix;
      }
    }
    bool once = true;
    for (int w : writes) {
      once = once && w == 1;
    }
    if (splits > 1 && (roots != 1 || !once)) {
      ++failures;
      std::printf("FAIL merge tree: splits %d: %d roots, every slot written once: %d\n", splits, roots, int(once));
    }
    if (splits == 1 && (t.slots != 0 || t.counters != 0)) {
      ++failures;
      std::printf("FAIL merge tree: one split needs no merge\n");
    }
  }
  n += check_launch_plan();
  std::printf("checked %ld plans, %d failures\n", n, failures);
  return failures ? 1 : 0;
}
