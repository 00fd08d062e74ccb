// Copyright © 2026 mlx-qsdpa contributors.
//
// Checks csrc/backends/cuda/split_plan.h (the CUDA host code's split of a call over
// blocks) over a sweep of shapes; plain C++, no GPU. Prints one line per
// violation and "checked N plans"; exits 1 on any violation.
#include <cstdio>
#include <algorithm>
#include <initializer_list>
#include <vector>

#include "backends/cuda/split_plan.h"

using namespace mlx_qsdpa::cuda;

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
  std::printf("checked %ld plans, %d failures\n", n, failures);
  return failures ? 1 : 0;
}
