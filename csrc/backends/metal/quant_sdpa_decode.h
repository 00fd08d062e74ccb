// Copyright © 2026 mlx-qsdpa contributors.
//
// The decode kernel: attention of up to kRowsPerThreadgroup query rows of
// one (batch, kv head) over a range of keys of a quantized K/V cache.
//
// A threadgroup (8 simdgroups) covers query rows r0 .. r0 + 31 of the
// G * Lq rows of its (batch, kv head) (attention_math.h's row_position) and
// the keys of its block. Keys are decoded
// tile by tile (keys_per_tile(D) keys) into threadgroup memory by all 256
// threads together, so each packed K/V word is read once per threadgroup
// and then serves every query head of the GQA group and every query
// position. The simdgroups are arranged as n_row_groups x n_splits: a
// simdgroup keeps 4 query rows in registers (lane l holds elements l,
// l + 32, ... of q and of the output) and takes every n_splits-th key of
// each tile; the few rows of single-token decode thus still keep all 8
// simdgroups busy. Each (row, key) score is one simd_sum; the softmax is
// online, in base 2 and float32 (attention_math.h: running max, merge,
// finalisation). At the end the key splits merge their (max, sum, output)
// through threadgroup memory.
//
// 1-pass (fc_write_final): the threadgroup covers all keys and writes the
// normalised output (sink included) and lse. 2-pass (fc_write_partials):
// it covers one block of keys and writes the unnormalised output, max and
// sum for quant_sdpa_merge.
//
// Formats: the kernel is compiled for the keys' format (MODE, BITS, a row of
// formats.h's table); the values' format is a set of function constants
// (decode4_values), so keys and values may have different modes, widths and
// group sizes.
#pragma once

#include "function_constants.h"
#include "mlx_qsdpa/attention_math.h"
#include "quant_sdpa_io.h"
#include "quant_sdpa_params.h"

namespace qsdpa {

// The device buffers of a decode launch. Arguments that a function
// constant removes are never read: their pointers are only copied here
// when the constant is true.
struct DecodeBuffers {
  const device uchar* queries;
  const device uint* keys;
  const device uchar* key_scales;
  const device uchar* key_biases;
  const device uint* values;
  const device uchar* value_scales;
  const device uchar* value_biases;
  const device bool* bool_mask;
  const device float* float_mask;
  const device float* sinks;
  device uchar* out;
  device float* lse;
  device float* partial_out;
  device float* partial_stats;
};

// Elements e0 .. e0 + 3 of key/value row `key` (all in one quantization
// group: every group size is a multiple of 4), decoded with formats.h. Their
// 4 * BITS bits are loaded once, as one word or (3, 5 and 6 bits, when they
// straddle) two, and taken apart like one of MLX's packs. `scale_type` (the
// ElemType of float scales and biases) and `group_size` are function
// constants at every call, so they fold like MODE and BITS.
template <int MODE, int BITS>
inline float4 decode4(
    const device uint* words,
    const device uchar* scales,
    const device uchar* biases,
    const constant int64_t* w_strides,
    const constant int64_t* s_strides,
    const constant int64_t* b_strides,
    int scale_type,
    int group_size,
    int b,
    int h,
    int key,
    int e0) {
  const PackedRow row = {words + offset4(w_strides, b, h, key, 0), w_strides[3]};
  const int w0 = element_word(e0, BITS);
  const int shift = element_shift(e0, BITS);
  ulong bits4 = row[w0];
  if (shift + 4 * BITS > 32) {
    bits4 |= ulong(row[w0 + 1]) << 32; // never past the row: groups end on a word
  }
  bits4 >>= shift;

  const int g = e0 / group_size;
  const int64_t s_at = offset4(s_strides, b, h, key, g);
  float scale;
  float bias = 0.0f;
  if (mode_float_scales(MODE)) {
    scale = load_elem(scales, s_at, scale_type);
    if (mode_has_bias(MODE)) {
      bias = load_elem(biases, offset4(b_strides, b, h, key, g), scale_type);
    }
  } else {
    scale = decode_fp_scale<MODE>(scales[s_at]);
  }
  float4 v;
  for (int k = 0; k < 4; ++k) {
    v[k] = decode_code<MODE, BITS>(unpack_from_pack<BITS>(bits4, k)) * scale + bias;
  }
  return v;
}

// Elements e0 .. e0 + 3 of key row `key`: the kernel's own format.
template <int MODE, int BITS>
inline float4 decode4_keys(
    thread const DecodeBuffers& buf, constant DecodeParams& p, int b, int h, int key, int e0) {
  return decode4<MODE, BITS>(
      buf.keys, buf.key_scales, buf.key_biases, p.k_strides, p.k_scale_strides, p.k_bias_strides,
      fc_key_scale_type, fc_key_group_size, b, h, key, e0);
}

// Elements e0 .. e0 + 3 of value row `key`, in the values' format
// (fc_value_mode, fc_value_bits): one case per row of the format table, of
// which the compiler keeps only the one the constants name when it
// specialises the pipeline. Kernels thus stay one per keys' format, and any
// values' format of the table pairs with them.
inline float4 decode4_values(
    thread const DecodeBuffers& buf, constant DecodeParams& p, int b, int h, int key, int e0) {
#define QSDPA_DECODE_VALUES_CASE(MODE, TOKEN, BITS, GROUP_SIZES)                                   \
  if (fc_value_mode == MODE && fc_value_bits == BITS) {                                           \
    return decode4<MODE, BITS>(                                                                   \
        buf.values, buf.value_scales, buf.value_biases, p.v_strides, p.v_scale_strides,           \
        p.v_bias_strides, fc_value_scale_type, fc_value_group_size, b, h, key, e0);               \
  }
  QSDPA_FORMATS(QSDPA_DECODE_VALUES_CASE)
#undef QSDPA_DECODE_VALUES_CASE
  return float4(0.0f); // not reached: the plan only sets formats of the table
}

template <int MODE, int BITS, int D>
inline void quant_sdpa_decode(
    thread const DecodeBuffers& buf,
    constant DecodeParams& p,
    threadgroup float* smem,
    uint3 tgid,
    uint tid,
    uint sgid,
    uint lane) {
  constexpr int DPL = (D + kSimdWidth - 1) / kSimdWidth; // elements per lane
  constexpr int RPS = kRowsPerSimdgroup;
  constexpr int BK = keys_per_tile(D);
  constexpr int kQuads = D / 4; // decode steps per key row

  const int block = int(tgid.x);
  const int kvh = int(tgid.y) % p.Hkv;
  const int row_block = int(tgid.y) / p.Hkv;
  const int b = int(tgid.z);
  const int r0 = row_block * kRowsPerThreadgroup;
  const int n_rows = metal::min(int(kRowsPerThreadgroup), p.rows - r0);

  // Role of this simdgroup: rows row_group * RPS .. + RPS - 1 of the
  // threadgroup, keys j = split (mod n_splits) of each tile.
  int n_row_groups = 1;
  while (n_row_groups * RPS < n_rows) {
    n_row_groups *= 2;
  }
  const int n_splits = kSimdgroups / n_row_groups;
  const int row_group = int(sgid) % n_row_groups;
  const int split = int(sgid) / n_row_groups;

  // The rows: query (scaled to base 2), running max and sum, output.
  float q[RPS][DPL];
  float o[RPS][DPL];
  float m[RPS];
  float l[RPS];
  int head[RPS];
  int pos[RPS];
  int limit[RPS]; // keys [0, limit) are visible; 0 for rows past the end
  for (int rr = 0; rr < RPS; ++rr) {
    const int lr = row_group * RPS + rr;
    const bool valid = lr < n_rows;
    const RowPos rp = row_position(kvh, r0 + lr, p.G);
    pos[rr] = valid ? rp.i : 0;
    head[rr] = valid ? rp.h : 0;
    limit[rr] = 0;
    if (valid) {
      limit[rr] = fc_causal ? causal_limit(p.Lq, p.Lk, pos[rr]) : p.Lk;
    }
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
    const int64_t q_row = offset4(p.q_strides, b, head[rr], pos[rr], 0);
    for (int t = 0; t < DPL; ++t) {
      const int d = int(lane) + t * kSimdWidth;
      q[rr][t] = (valid && d < D)
          ? load_elem(buf.queries, q_row + d * p.q_strides[3], fc_query_type) * p.scale_log2
          : 0.0f;
      o[rr][t] = 0.0f;
    }
  }

  // The keys of this threadgroup. With a causal mask the last row (the
  // largest query position) sees the most keys; none sees beyond it.
  const int k_begin = block * p.keys_per_block;
  int k_end = metal::min(p.Lk, k_begin + p.keys_per_block);
  if (fc_causal) {
    const int last_pos = row_position(kvh, r0 + n_rows - 1, p.G).i;
    k_end = metal::min(k_end, causal_limit(p.Lq, p.Lk, last_pos));
  }

  threadgroup float* k_tile = smem;
  threadgroup float* v_tile = smem + BK * D;
  for (int t0 = k_begin; t0 < k_end; t0 += BK) {
    const int nk = metal::min(BK, k_end - t0);
    // Decode the tile: 4 elements of K and of V per step and thread.
    for (int u = int(tid); u < nk * kQuads; u += kThreadsPerGroup) {
      const int j = u / kQuads;
      const int e0 = (u % kQuads) * 4;
      *((threadgroup float4*)(k_tile + j * D + e0)) = decode4_keys<MODE, BITS>(buf, p, b, kvh, t0 + j, e0);
      *((threadgroup float4*)(v_tile + j * D + e0)) = decode4_values(buf, p, b, kvh, t0 + j, e0);
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

    for (int j = split; j < nk; j += n_splits) {
      const int key = t0 + j;
      float kv[DPL];
      float vv[DPL];
      for (int t = 0; t < DPL; ++t) {
        const int d = int(lane) + t * kSimdWidth;
        kv[t] = d < D ? k_tile[j * D + d] : 0.0f;
        vv[t] = d < D ? v_tile[j * D + d] : 0.0f;
      }
      // Every condition below depends on (row, key) only, so it is the same
      // for all lanes and simd_sum is reached by all of them or none.
      for (int rr = 0; rr < RPS; ++rr) {
        if (key >= limit[rr]) {
          continue;
        }
        float mask_add = 0.0f;
        if (fc_bool_mask || fc_float_mask) {
          const int64_t at = offset4(p.mask_strides, b, head[rr], pos[rr], key);
          if (fc_bool_mask && !buf.bool_mask[at]) {
            continue;
          }
          if (fc_float_mask) {
            mask_add = buf.float_mask[at] * log2e();
          }
        }
        float dot = 0.0f;
        for (int t = 0; t < DPL; ++t) {
          dot += q[rr][t] * kv[t];
        }
        const float s = metal::simd_sum(dot) + mask_add;
        if (s == -INFINITY) {
          continue; // masked by -inf: the key weighs nothing
        }
        // A NaN or +inf score poisons the row (attention_math.h).
        const float m_new = running_max(m[rr], s);
        const float corr = metal::exp2(m[rr] - m_new);
        const float pr = metal::exp2(s - m_new);
        l[rr] = l[rr] * corr + pr;
        for (int t = 0; t < DPL; ++t) {
          o[rr][t] = o[rr][t] * corr + pr * vv[t];
        }
        m[rr] = m_new;
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }

  // Merge the key splits pairwise: splits [half, 2 * half) hand their rows
  // to splits [0, half) through threadgroup memory (the tiles are free now).
  threadgroup float* x_out = smem; // [kMergeRows][D]
  threadgroup float* x_stats = smem + kMergeRows * D; // [kMergeRows][2]
  for (int half_n = n_splits / 2; half_n >= 1; half_n /= 2) {
    if (split >= half_n && split < 2 * half_n) {
      for (int rr = 0; rr < RPS; ++rr) {
        const int slot = ((split - half_n) * n_row_groups + row_group) * RPS + rr;
        for (int t = 0; t < DPL; ++t) {
          const int d = int(lane) + t * kSimdWidth;
          if (d < D) {
            x_out[slot * D + d] = o[rr][t];
          }
        }
        if (lane == 0) {
          x_stats[slot * 2] = m[rr];
          x_stats[slot * 2 + 1] = l[rr];
        }
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    if (split < half_n) {
      for (int rr = 0; rr < RPS; ++rr) {
        const int slot = (split * n_row_groups + row_group) * RPS + rr;
        const RowStats theirs = {x_stats[slot * 2], x_stats[slot * 2 + 1]};
        const RowStats ours = {m[rr], l[rr]};
        const Merged mg = merge_stats(ours, theirs); // NaN max: either is poisoned
        if (mg.stats.m == -INFINITY) {
          continue; // neither saw a key
        }
        for (int t = 0; t < DPL; ++t) {
          const int d = int(lane) + t * kSimdWidth;
          o[rr][t] = o[rr][t] * mg.ca + (d < D ? x_out[slot * D + d] : 0.0f) * mg.cb;
        }
        m[rr] = mg.stats.m;
        l[rr] = mg.stats.l;
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  if (split != 0) {
    return;
  }

  for (int rr = 0; rr < RPS; ++rr) {
    if (row_group * RPS + rr >= n_rows) {
      continue;
    }
    // Output row (b, head, pos) of [B, Hq, Lq].
    const int64_t row = (int64_t(b) * p.Hq + head[rr]) * p.Lq + pos[rr];
    if (fc_write_partials) {
      const int64_t at = row * p.blocks + block;
      for (int t = 0; t < DPL; ++t) {
        const int d = int(lane) + t * kSimdWidth;
        if (d < D) {
          buf.partial_out[at * D + d] = o[rr][t];
        }
      }
      if (lane == 0) {
        buf.partial_stats[at * 2] = m[rr];
        buf.partial_stats[at * 2 + 1] = l[rr];
      }
    }
    if (fc_write_final) {
      // The sink: one more key with logit sinks[head] and a zero value.
      const float s2 = fc_has_sinks ? buf.sinks[head[rr] * p.sink_stride] * log2e() : 0.0f;
      const Finalized f = finalize_row(m[rr], l[rr], fc_has_sinks, s2);
      for (int t = 0; t < DPL; ++t) {
        const int d = int(lane) + t * kSimdWidth;
        if (d < D) {
          store_elem(buf.out, row * D + d, scaled_output(o[rr][t], f.mult), fc_query_type);
        }
      }
      if (fc_write_lse && lane == 0) {
        buf.lse[row] = f.lse;
      }
    }
  }
}

} // namespace qsdpa
