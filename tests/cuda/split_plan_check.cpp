// Copyright © 2026 mlx-qsdpa contributors.
//
// Checks cuda/split_plan.h (the CUDA host code's split of a call over
// blocks) over a sweep of shapes; plain C++, no GPU. Prints one line per
// violation and "checked N plans"; exits 1 on any violation.
#include <cstdio>
#include <initializer_list>

#include "cuda/split_plan.h"

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
                      // Never more blocks than a wave, beyond what the rows alone need.
                      expect(p.n_splits == 1 || blocks * p.n_splits < wave + blocks * 2,
                             "at most about one wave of blocks", in, p);
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
  // Grid limits: kv heads x row tiles <= 65535, B <= 65535.
  if (!grid_fits(1, 8, 4, 8) || !grid_fits(65535, 8, 4, 8) || grid_fits(65536, 8, 4, 8) ||
      !grid_fits(1, 64, 1023 * 8, 8) || grid_fits(1, 64, 1023 * 8 + 1, 8) || !grid_fits(1, 1, 65535 * 16, 16)) {
    ++failures;
    std::printf("FAIL grid_fits\n");
  }
  std::printf("checked %ld plans, %d failures\n", n, failures);
  return failures ? 1 : 0;
}
