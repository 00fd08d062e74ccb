// Copyright © 2026 mlx-qsdpa contributors.
//
// Pass 2 of the 2-pass decode: merges the partial results of the key
// blocks of each output row exactly (rescaling every block by 2^(m_block -
// m)), adds the sink and writes the output and lse. One simdgroup per row:
// the lanes split the blocks for the max and the sum, then the head dim.
#pragma once

#include "function_constants.h"
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

  float m = -INFINITY;
  for (int blk = int(lane); blk < p.blocks; blk += kSimdWidth) {
    m = metal::max(m, stats[blk * 2]);
  }
  m = metal::simd_max(m);
  float sink = 0.0f;
  if (fc_has_sinks) {
    sink = sinks[head * p.sink_stride] * log2e();
    m = metal::max(m, sink);
  }
  // Blocks that saw no key have max -inf and contribute nothing (and m is
  // -inf only if every block is empty and there is no sink).
  float l = 0.0f;
  for (int blk = int(lane); blk < p.blocks; blk += kSimdWidth) {
    const float mb = stats[blk * 2];
    if (mb > -INFINITY) {
      l += stats[blk * 2 + 1] * metal::exp2(mb - m);
    }
  }
  l = metal::simd_sum(l);
  if (fc_has_sinks) {
    l += metal::exp2(sink - m);
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int d = int(lane); d < p.D; d += kSimdWidth) {
    float acc = 0.0f;
    for (int blk = 0; blk < p.blocks; ++blk) {
      const float mb = stats[blk * 2];
      if (mb > -INFINITY) {
        acc += part[int64_t(blk) * p.D + d] * metal::exp2(mb - m);
      }
    }
    store_elem(out, int64_t(row) * p.D + d, acc * inv, fc_query_type);
  }
  if (fc_write_lse && lane == 0) {
    lse[row] = l > 0.0f ? (m + metal::log2(l)) * ln2() : -INFINITY;
  }
}

} // namespace qsdpa
