// Copyright © 2026 mlx-qsdpa contributors.
//
// Pass 2 of the 2-pass decode: merges the partial results of the key
// blocks of each output row exactly (rescaling every block by 2^(m_block -
// m), m the row's max over the blocks), then finishes the row as the 1-pass
// kernel does: attention_math.h's finalize_row adds the sink and gives the
// output's factor and the lse. One simdgroup per row: the lanes split the
// blocks for the max and the sum, then the head dim.
#pragma once

#include "function_constants.h"
#include "mlx_qsdpa/attention_math.h"
#include "quant_sdpa_io.h"
#include "quant_sdpa_params.h"

namespace qsdpa {

inline void quant_sdpa_merge(
    const device float* partial_out,
    const device float* partial_stats,
    const device float* sinks,
    device uchar* out,
    device float* lse,
    constant MergeParams& p,
    uint tgid,
    uint sgid,
    uint lane) {
  const int row = int(tgid) * kMergeSimdgroups + int(sgid);
  if (row >= p.rows) {
    return; // the whole simdgroup: no SIMD-group function is left half-called
  }
  const int head = (row / p.Lq) % p.Hq;
  const device float* stats = partial_stats + int64_t(row) * p.blocks * 2;
  const device float* part = partial_out + int64_t(row) * p.blocks * p.D;

  // The blocks' max. A poisoned block (max NaN, attention_math.h) poisons
  // the row: counted by a sum, whatever simd_max does with a NaN.
  float m = -INFINITY;
  float poisoned = 0.0f;
  for (int blk = int(lane); blk < p.blocks; blk += kSimdWidth) {
    const float mb = stats[blk * 2];
    m = metal::max(m, mb);
    poisoned += mb != mb ? 1.0f : 0.0f;
  }
  m = metal::simd_max(m);
  if (metal::simd_sum(poisoned) > 0.0f) {
    m = NAN;
  }
  // Blocks that saw no key have max -inf and contribute nothing (m is -inf
  // only if every block is empty).
  float l = 0.0f;
  for (int blk = int(lane); blk < p.blocks; blk += kSimdWidth) {
    const float mb = stats[blk * 2];
    if (mb != -INFINITY) {
      l += stats[blk * 2 + 1] * metal::exp2(mb - m);
    }
  }
  l = metal::simd_sum(l);
  // The sink: one more key with logit sinks[head] and a zero value.
  const float s2 = fc_has_sinks ? sinks[head * p.sink_stride] * log2e() : 0.0f;
  const Finalized f = finalize_row(m, l, fc_has_sinks, s2);
  for (int d = int(lane); d < p.D; d += kSimdWidth) {
    float acc = 0.0f;
    for (int blk = 0; blk < p.blocks; ++blk) {
      const float mb = stats[blk * 2];
      if (mb != -INFINITY) {
        acc += part[int64_t(blk) * p.D + d] * metal::exp2(mb - m);
      }
    }
    store_elem(out, int64_t(row) * p.D + d, scaled_output(acc, f.mult), fc_query_type);
  }
  if (fc_write_lse && lane == 0) {
    lse[row] = f.lse;
  }
}

} // namespace qsdpa
