// Copyright © 2026 mlx-qsdpa contributors.
//
// Device code shared by the decode kernels: element loads/stores by
// run-time dtype, masks, key splits, and the block epilogue that merges the
// four warps of a block and writes either the final rows (one split) or the
// split-K partials (merged by split_merge.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mlx_qsdpa/attention_math.h"
#include "mlx_qsdpa/formats.h"
#include "params.h"
#include "ptx.cuh"

namespace mlx_qsdpa::cuda {

using qsdpa::neg_inf;

__device__ __forceinline__ float pos_inf() {
  return __int_as_float(0x7f800000);
}

// Non-finite inputs, as MLX's own SDPA treats them (attention_math.h): a
// score that is NaN or +inf makes its row NaN, output and lse. The kernels
// track this as a poisoned row state, whose running max is NaN: it stays NaN
// through mma_detail::fmax_nan (PTX max.NaN.f32, attention_math.h's max_nan
// in one instruction: the max of the block epilogue and of the split
// merge), every weight and rescale 2^(x - NaN) makes the row's sum and
// output NaN too, and finalize_row writes NaN. Nothing is added to the
// per-key work: the generic kernel sets the NaN on its new-max branch, the
// tensor-core kernel on its lazy max's slow path, which such scores take
// anyway. -inf scores weigh nothing, and a row that sees no key gives zeros
// and lse = -inf.

// A value of a run-time element type (queries, sinks, affine scales).
__device__ __forceinline__ float load_as_float(const void* base, int64_t i, int type) {
  switch (type) {
    case qsdpa::kElemFloat32:
      return static_cast<const float*>(base)[i];
    case qsdpa::kElemFloat16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case qsdpa::kElemBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return float(static_cast<const uint8_t*>(base)[i]);
  }
}

__device__ __forceinline__ void store_from_float(void* base, int64_t i, float x, int type) {
  switch (type) {
    case qsdpa::kElemFloat32:
      static_cast<float*>(base)[i] = x;
      break;
    case qsdpa::kElemFloat16:
      static_cast<__half*>(base)[i] = __float2half_rn(x);
      break;
    default:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x);
      break;
  }
}

// The raw bits of a scale or bias (loaded now, decoded later, so that the
// load of the next key tile can be in flight while this one is decoded).
__device__ __forceinline__ uint32_t load_raw(const void* base, int64_t i, int type) {
  switch (type) {
    case qsdpa::kElemFloat32:
      return static_cast<const uint32_t*>(base)[i];
    case qsdpa::kElemFloat16:
    case qsdpa::kElemBFloat16:
      return static_cast<const uint16_t*>(base)[i];
    default:
      return static_cast<const uint8_t*>(base)[i];
  }
}

// A raw affine scale/bias as float.
__device__ __forceinline__ float raw_to_float(uint32_t raw, int type) {
  switch (type) {
    case qsdpa::kElemFloat32:
      return __uint_as_float(raw);
    case qsdpa::kElemFloat16:
      return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
    default:
      return __uint_as_float(raw << 16); // bfloat16: the top half of a float
  }
}

// Decoded scale of a key group: a float scale of its dtype (affine, turbo),
// or the fp modes' 8-bit code through formats.h.
template <int MODE>
__device__ __forceinline__ float decode_scale(uint32_t raw, int type) {
  if constexpr (qsdpa::mode_float_scales(MODE)) {
    return raw_to_float(raw, type);
  } else {
    return qsdpa::decode_fp_scale<MODE>(raw);
  }
}

// The same for a mode known at run time only (a warp-uniform choice).
__device__ __forceinline__ float decode_scale(int mode, uint32_t raw, int type) {
  if (qsdpa::mode_float_scales(mode)) {
    return raw_to_float(raw, type);
  }
  return qsdpa::decode_scale_code_of_kind(qsdpa::mode_scale_kind(mode), raw);
}

// Code q of format (mode, bits), without its scale, for a format known at
// run time only.
__device__ __forceinline__ float decode_code(int mode, int bits, uint32_t q) {
  return qsdpa::decode_code_of_kind(qsdpa::mode_code_kind(mode), bits, q);
}

// The block's (kv head, first row) from blockIdx.y = row tile * Hkv + kv head.
struct TileRef {
  int kvh;
  int r0;
};

template <int RT>
__device__ __forceinline__ TileRef tile_ref(const Params& p) {
  const int tile = fast_div(p.div_Hkv, int(blockIdx.y));
  return TileRef{int(blockIdx.y) - tile * p.Hkv, tile * RT};
}

// Where row r (of the G * Lq rows of one kv head) lives.
struct RowRef {
  int i; // query position
  int h; // query head
  int64_t out_row; // (b * Hq + h) * Lq + i
  int causal_limit; // keys j <= causal_limit are visible (causal mask)
};

// Row r of kv head kvh, whose query position i = r / G the caller knows
// (the decode loop keeps it, instead of dividing again).
__device__ __forceinline__ RowRef row_ref_at(const Params& p, int b, int kvh, int r, int i) {
  const qsdpa::RowPos pos = qsdpa::row_position_at(kvh, r, p.G, i);
  RowRef ref;
  ref.i = pos.i;
  ref.h = pos.h;
  ref.out_row = (int64_t(b) * p.Hq + ref.h) * p.Lq + ref.i;
  ref.causal_limit = qsdpa::causal_limit(p.Lq, p.Lk, ref.i) - 1;
  return ref;
}

// Row r of kv head kvh: its position through the call's FastDiv by G.
__device__ __forceinline__ RowRef row_ref(const Params& p, int b, int kvh, int r) {
  return row_ref_at(p, b, kvh, r, fast_div(p.div_G, r));
}

// The array mask applied to the base-2 score x of (row, key j): a bool mask
// selects (False gives -inf whatever x is, so that a NaN score of a key the
// row does not see stays out, as with MLX's where), an additive one adds
// its value times log2(e) (a NaN or +inf there poisons the row).
__device__ __forceinline__ float apply_array_mask(const Params& p, int b, const RowRef& ref, int j, float x) {
  const int64_t off = int64_t(b) * p.ms[0] + int64_t(ref.h) * p.ms[1] +
      int64_t(ref.i) * p.ms[2] + int64_t(j) * p.ms[3];
  if (p.mask == qsdpa::kMaskBool) {
    return static_cast<const uint8_t*>(p.mask_ptr)[off] ? x : neg_inf();
  }
  return x + static_cast<const float*>(p.mask_ptr)[off] * qsdpa::log2e();
}

// The key range [k_begin, k_end) of this block's split, cut at the last key
// any row of the tile can see under the causal mask.
__device__ __forceinline__ void split_range(
    const Params& p, int split, int last_row, int& k_begin, int& k_end) {
  k_begin = split * p.keys_per_split;
  k_end = min(p.Lk, k_begin + p.keys_per_split);
  if (p.mask == qsdpa::kMaskCausal) {
    k_end = min(k_end, qsdpa::causal_limit(p.Lq, p.Lk, fast_div(p.div_G, last_row)));
  }
}

// The final normalisation of one row of query head h (attention_math.h's
// finalize_row, with the call's sink of that head).
__device__ __forceinline__ qsdpa::Finalized finalize_row(const Params& p, int h, float m, float l) {
  const float s2 = p.sinks ? p.sinks[int64_t(h) * p.sink_stride] * qsdpa::log2e() : 0.0f;
  return qsdpa::finalize_row(m, l, p.sinks != nullptr, s2);
}

// An output element v (not normalised) times its row's finalize_row mult
// (attention_math.h's scaled_output): a row that sees no key is exactly
// zero, also where v is NaN (its masked keys still met the MMA and the
// accumulation with weight 0, and a NaN value there, a cache slot nobody
// attends, is 0 * NaN).
using qsdpa::scaled_output;

// Shared memory of the generic kernel's block epilogue for RT rows (the
// tensor-core kernel has its own, MmaDecode::MmaEpilogue). The output rows
// are padded (one float after every 32, and a row stride of 4 mod 32
// banks), which the first tensor-core kernel's layout needed; the generic
// kernel's lanes write consecutive columns of one row and need none.
constexpr int kORow = kMaxHeadDim + kMaxHeadDim / 32 + 28; // 292 = 4 (mod 32)
__device__ __forceinline__ int oidx(int r, int d) {
  return r * kORow + d + d / 32;
}

template <int RT>
struct EpilogueSmem {
  float m[4][RT]; // each warp's running max per row
  float l[4][RT]; // each warp's sum per row
  float M[RT]; // the block's max per row
  float L[RT]; // the block's sum per row
  float o[RT * kORow]; // the block's output rows (not normalised), oidx(r, d)
};

// Step 1 (after every warp wrote its m and l): the block's max and sum per
// row. S: either kernel's epilogue memory (float m[4][RT], l[4][RT], M[RT],
// L[RT]).
template <typename S>
__device__ __forceinline__ void epilogue_reduce_stats(S& s) {
  constexpr int RT = int(sizeof(S::M) / sizeof(float));
  __syncthreads();
  if (threadIdx.x < RT) {
    const int r = threadIdx.x;
    float M = neg_inf();
    for (int w = 0; w < 4; ++w) {
      M = mma_detail::fmax_nan(M, s.m[w][r]); // NaN: a warp's row is poisoned
    }
    float L = 0.0f;
    if (M != neg_inf()) {
      for (int w = 0; w < 4; ++w) {
        L += s.l[w][r] * qsdpa::rescale(s.m[w][r], M);
      }
    }
    s.M[r] = M;
    s.L[r] = L;
  }
  __syncthreads();
}

// The factor that brings warp w's row r to the block's max (S as for
// epilogue_reduce_stats, after it).
template <typename S>
__device__ __forceinline__ float epilogue_factor(const S& s, int w, int r) {
  return qsdpa::rescale(s.m[w][r], s.M[r]);
}

// Element d of output row out_row, v not yet normalised (mult, lse:
// finalize_row's), and once per row its lse.
__device__ __forceinline__ void store_output(const Params& p, int64_t out_row, int d, float v, float mult, float lse) {
  store_from_float(p.out, out_row * p.D + d, scaled_output(v, mult), p.out_type);
  if (d == 0 && p.lse) {
    p.lse[out_row] = lse;
  }
}

// Element d of a block's partial of output row out_row in slot `split`,
// and once per row the block's row max M and sum L.
__device__ __forceinline__ void store_partial(const Params& p, int split, int64_t out_row, int d, float v, float M, float L) {
  const int64_t prow = split * (int64_t(p.B) * p.Hq * p.Lq) + out_row;
  p.part_o[prow * p.D + d] = v;
  if (d == 0) {
    p.part_ml[prow * 2] = M;
    p.part_ml[prow * 2 + 1] = L;
  }
}

// What store_result needs of a block's result row (query head h, the
// block's row max M and sum L): with one split finalize_row's mult and lse,
// else M and L. Worked out once per row where a loop stores many elements.
struct ResultPair {
  float a, b;
};

__device__ __forceinline__ ResultPair result_pair(const Params& p, int h, float M, float L) {
  if (p.n_splits == 1) {
    const qsdpa::Finalized f = finalize_row(p, h, M, L);
    return {f.mult, f.lse};
  }
  return {M, L};
}

// Element d of one of a block's result rows, v not normalised: the output
// when the call has one split, else the block's partial in slot `split`
// (a, b: the row's result_pair).
__device__ __forceinline__ void store_result(
    const Params& p, int split, int64_t out_row, int d, float v, float a, float b) {
  if (p.n_splits == 1) {
    store_output(p, out_row, d, v, a, b);
  } else {
    store_partial(p, split, out_row, d, v, a, b);
  }
}

// Step 3 (after the warps summed their outputs into s.o): write the rows.
template <int RT>
__device__ __forceinline__ void epilogue_write(
    const Params& p, const EpilogueSmem<RT>& s, int b, int kvh, int r0, int nr, int split) {
  const int D = p.D;
  for (int idx = threadIdx.x; idx < nr * D; idx += blockDim.x) {
    const int r = idx / D;
    const int d = idx - r * D;
    const RowRef ref = row_ref(p, b, kvh, r0 + r);
    const ResultPair rp = result_pair(p, ref.h, s.M[r], s.L[r]);
    store_result(p, split, ref.out_row, d, s.o[oidx(r, d)], rp.a, rp.b);
  }
}

} // namespace mlx_qsdpa::cuda
