// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core kernel's block epilogue: the four warps' rows (each warp
// saw a quarter of the block's keys) merged into the block's result rows,
// written as the final output (one split) or as the block's split-K
// partial (split_merge.cuh merges those).
//
// Each warp writes its rows' (m, l) and its output rows, as they are, into
// its slice of shared memory; after one barrier a single pass brings each
// warp's rows to the block's max while summing them and writes the rows
// out. A slice lies over its warp's own ring where it fits, so a warp writes
// it as soon as its own copies have landed, and one block barrier ends the
// epilogue's shared-memory work (a barrier per phase cost a measurable
// share of every call).
#pragma once

#include "common.cuh"
#include "mlx_qsdpa/attention_math.h"
#include "mma_shape.cuh"
#include "mma_softmax.cuh"
#include "ptx.cuh"
#include "split_merge.cuh"

namespace mlx_qsdpa::cuda {

template <typename S>
struct MmaEpilogue {
  static constexpr int D = S::kHeadDim;
  static constexpr int NT = S::kRowTiles;
  static constexpr int RT = S::kRows;
  using Softmax = MmaSoftmax<S>;

  // A warp writes its slice's rows 2t, 2t+1 from lanes (g, t) at columns
  // kLaneValues g + 2j (+1): one float of padding after every kLaneValues
  // columns and a row stride of 8 (mod 32) banks per two rows put the 32
  // lanes of every store on 32 banks (the plain D + 4 stride put them on 4:
  // 8-way conflicts). The reads, consecutive columns, see at most 2-way
  // conflicts.
  static constexpr int kORow = D + 20; // >= D + D / kLaneValues, and 2 kORow = 8 (mod 32)
  static_assert((2 * kORow) % 32 == 8 && kORow >= D + D / S::kLaneValues, "epilogue row stride");
  static __device__ __forceinline__ int o_index(int r, int d) {
    return r * kORow + d + d / S::kLaneValues;
  }

  // A warp's slice: its rows' max and sum and its output rows, not
  // rescaled (the store pass brings each warp to the block's max as it
  // sums); warp 0's slice also holds the rows' output row and head.
  struct WarpSlice {
    float m[RT], l[RT];
    int64_t out_row[RT];
    int head[RT];
    float o[RT * kORow];
  };
  static constexpr bool kSliceInRing = int(sizeof(WarpSlice)) <= S::kWarpRingBytes;
  static constexpr int kSliceStride = kSliceInRing ? S::kWarpRingBytes : (int(sizeof(WarpSlice)) + 15) / 16 * 16;
  static constexpr int kBytes = 4 * kSliceStride;
  static __device__ __forceinline__ WarpSlice& slice(unsigned char* smem, int w) {
    return *reinterpret_cast<WarpSlice*>(smem + w * kSliceStride);
  }

  // Row r's block max M and sum L, and the factor that brings each warp's
  // slice to M (0 for a warp that saw no key of the row).
  struct BlockRow {
    float M, L, f[4];
  };
  static __device__ __forceinline__ BlockRow block_row(unsigned char* smem, int r) {
    BlockRow st;
    float m[4];
    st.M = neg_inf();
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      m[w] = slice(smem, w).m[r];
      st.M = mma_detail::fmax_nan(st.M, m[w]); // NaN: a warp's row is poisoned
    }
    st.L = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      st.f[w] = qsdpa::rescale(m[w], st.M);
      st.L = st.L + __fmul_rn(slice(smem, w).l[r], st.f[w]);
    }
    return st;
  }

  // Element k of a row summed over the four slices, each brought to the
  // row's max. The products are rounded before the sum (no fused
  // multiply-add), as when each warp wrote its rows already rescaled.
  static __device__ __forceinline__ float row_value(unsigned char* smem, const BlockRow& st, int k) {
    float v = __fmul_rn(slice(smem, 0).o[k], st.f[0]);
#pragma unroll
    for (int w = 1; w < 4; ++w) {
      v = v + __fmul_rn(slice(smem, w).o[k], st.f[w]);
    }
    return v;
  }

  // The warp's rows into its slice (every lane past the loop, its copies
  // landed), and warp 0's the rows' output rows and heads.
  static __device__ __forceinline__ void write_slice(
      const Params& p,
      const MmaBlock& k,
      const typename Softmax::Rows& rows,
      const float (&o)[S::kDimChunks][NT][4],
      unsigned char* smem) {
    WarpSlice& ws = slice(smem, k.warp);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = rows.l[nt][e];
        x += __shfl_xor_sync(0xffffffffu, x, 4);
        x += __shfl_xor_sync(0xffffffffu, x, 8);
        x += __shfl_xor_sync(0xffffffffu, x, 16);
        if (k.g == 0) {
          ws.m[nt * 8 + 2 * k.t + e] = Softmax::ref_max(rows, nt, e);
          ws.l[nt * 8 + 2 * k.t + e] = x;
        }
      }
    }
    if (threadIdx.x < RT) { // warp 0, into its own slice
      const RowRef ref = row_ref(p, k.b, k.kvh, k.r0 + min(int(threadIdx.x), k.nr - 1));
      ws.out_row[threadIdx.x] = ref.out_row;
      ws.head[threadIdx.x] = ref.h;
    }
#pragma unroll
    for (int j = 0; j < S::kDimChunks; ++j) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          const int r = nt * 8 + 2 * k.t + (e4 & 1);
          const int d = S::kLaneValues * k.g + 2 * j + (e4 >> 1);
          ws.o[o_index(r, d)] = o[j][nt][e4];
        }
      }
    }
  }

  // After the barrier: warp w writes rows w, w + 4, ..: each lane works out
  // the row's statistics (and, with one split, its normalisation) once,
  // then reads its columns of the four slices before it stores any of them
  // (the stores go through generic pointers, which the compiler must assume
  // may alias shared memory: a read after a store would wait for it).
  static __device__ __forceinline__ void store_rows(const Params& p, const MmaBlock& k, unsigned char* smem) {
    const WarpSlice& s0 = slice(smem, 0);
    constexpr int kCols = (D + 31) / 32; // a lane's columns of a row
#pragma unroll 1
    for (int r = k.warp; r < k.nr; r += 4) {
      const BlockRow st = block_row(smem, r);
      const ResultPair rp = result_pair(p, s0.head[r], st.M, st.L);
      const int64_t out_row = s0.out_row[r];
      float v[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = k.lane + 32 * c;
        v[c] = d < D ? row_value(smem, st, o_index(r, d)) : 0.0f;
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = k.lane + 32 * c;
        if (d < D) {
          store_result(p, k.split, out_row, d, v[c], rp.a, rp.b);
        }
      }
    }
  }

  // The block's result rows from the warps' rows and output rows o (once
  // the warps are past their loops), then its share of the split merge.
  static __device__ __forceinline__ void finish(
      const Params& p,
      const MmaBlock& k,
      const typename Softmax::Rows& rows,
      const float (&o)[S::kDimChunks][NT][4],
      unsigned char* smem) {
    mma_detail::cp_async_wait_all();
    if constexpr (kSliceInRing) {
      __syncwarp();
    } else {
      __syncthreads(); // the slices overlap other warps' rings
    }
    write_slice(p, k, rows, o, smem);
    __syncthreads();
    store_rows(p, k, smem);
    if (p.n_splits > 1) {
      merge_splits<D, NT>(p, k.b, k.kvh, k.r0, k.nr, *reinterpret_cast<MergeSmem*>(smem));
    }
  }
};

} // namespace mlx_qsdpa::cuda
