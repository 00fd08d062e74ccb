// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core decode kernel: fp16/bf16 queries, 2/4/8-bit codes (affine,
// mxfp4, nvfp4, mxfp8), head dims 64, 128 and 256, a cache whose key rows
// are dense and 16-byte aligned (what mx.quantize and mlx-lm's
// QuantizedKVCache give, prefix views included). Other layouts take the
// generic kernel (decode_simt.cu).
//
// Why tensor cores in a memory-bound kernel: with GQA every decoded K/V
// element meets G * Lq query rows; on CUDA cores those multiply-adds and the
// dot products' shuffles cost as much time as reading the cache.
//
// Streaming: a block (4 warps) owns one (batch, kv head, row tile) and one
// key range, which it walks in chunks of 64 or 128 keys
// (MmaShape::kChunkKeys), each warp its one or two 16-key tiles of a chunk.
// A warp copies its keys' part (packed K rows, packed V rows, their scales
// and biases: contiguous byte ranges) into its own ring of shared-memory
// stages with 16-byte cp.async, waits for its own copies and meets its
// lanes at a warp barrier, so warps never wait for each other inside the
// loop (mma_ring.cuh).
//
// Layout (keys and head dim on the M side, query rows on N = 8):
//   S^T = K Q^T  (m16n8k16: A = K, 16 keys x 16 head-dim slots; B = Q^T).
//       Lane (g, t) holds keys g and g + 8 and, of each 16-slot chunk, the
//       slots 2t, 2t+1, 2t+8, 2t+9. A dot product does not care which
//       head-dim element sits in which slot as long as Q uses the same
//       order, so lane t takes the t-th quarter of each key row (one
//       shared-memory vector load) and Q's fragments follow that order
//       (mma_query.cuh).
//   O^T = V^T P^T (A = V^T, 16 head-dim rows x 16 keys; B = P^T). Lane (g, t)
//       holds head-dim rows g and g + 8 of every m-tile j and keys 2t, 2t+1,
//       2t+8, 2t+9; head-dim row g of m-tile j is element 2j of the g-th
//       eighth of the V row, row g + 8 is element 2j + 1 (one vector load
//       per key again), so output element d = D/8 * g + 2j (+1).
//   P^T: S^T's accumulators hold (key g, query rows 2t, 2t+1); movmatrix
//       transposes each 8x8 half into the B layout (query row g, keys 2t,
//       2t+1) in registers.
// Half the MMAs and accumulators of a rows-on-M layout (which pads 4 query
// rows to 16), so more warps fit per SM.
//
// Codes become fp16/bf16 exactly (mma_decode.cuh). V codes, and K codes of
// the non-affine formats, are then scaled (and biased) by formats.h's
// definition before the MMA, so the products see the values mx.dequantize
// gives in the cache dtype. Affine K codes go into the MMA in their exact
// magic form and the group's scale and bias are applied to its partial dot
// product in fp32 (MmaShape::kScaleAfter, mma_tiles.cuh): the same dot
// product, without rounding K to T. The online softmax keeps a lazy max
// (mma_softmax.cuh); the block epilogue merges the warps and writes the
// result or the split's partial (mma_epilogue.cuh).
#pragma once

#include "common.cuh"
#include "mma_decode.cuh"
#include "mma_epilogue.cuh"
#include "mma_query.cuh"
#include "mma_ring.cuh"
#include "mma_shape.cuh"
#include "mma_softmax.cuh"
#include "mma_tiles.cuh"
#include "split_merge.cuh"

namespace mlx_qsdpa::cuda {

template <typename T, int MODE, int BITS, int GS, int D, int ROW_TILES>
struct MmaDecode {
  using Shape = MmaShape<MmaFormat<T, MODE, BITS>, GS, D, ROW_TILES>;
  using Ring = MmaRing<Shape>;
  using Query = MmaQuery<Shape>;
  using Tiles = MmaTiles<Shape>;
  using Softmax = MmaSoftmax<Shape>;
  using Epilogue = MmaEpilogue<Shape>;
  static constexpr int NT = ROW_TILES;
  static constexpr int TPW = Shape::kTilesPerWarp;
  static constexpr int NCH = Shape::kDimChunks;
  static constexpr int kStages = Shape::kStages;

  // Shared memory: the warps' rings, the epilogue's slices over them once
  // they are drained, the split merge's flag over those; and, for the
  // kernels of two row tiles, the threads' row positions past the rest
  // (MmaSoftmax::Masks), 16 bytes per thread.
  static constexpr int kMainSmemBytes = Shape::kRingBytes > Epilogue::kBytes ? Shape::kRingBytes : Epilogue::kBytes;
  static_assert(int(sizeof(MergeSmem)) <= kMainSmemBytes, "merge over the epilogue");
  static constexpr int kRowPosOffset = (kMainSmemBytes + 15) / 16 * 16;
  static constexpr int kSmemBytes = Softmax::kPositionsShared ? kRowPosOffset + kThreads * 16 : kMainSmemBytes;

  // This block's (batch, kv head, row tile) and key range, and the lane's place.
  static __device__ __forceinline__ MmaBlock block(const Params& p) {
    MmaBlock k;
    k.warp = threadIdx.x / 32;
    k.lane = threadIdx.x % 32;
    k.g = k.lane / 4;
    k.t = k.lane % 4;
    k.split = blockIdx.x;
    const TileRef tile = tile_ref<Shape::kRows>(p);
    k.kvh = tile.kvh;
    k.r0 = tile.r0;
    k.b = blockIdx.z;
    k.nr = min(Shape::kRows, p.rows - k.r0);
    split_range(p, k.split, k.r0 + k.nr - 1, k.k_begin, k.k_end);
    return k;
  }

  static __device__ void run(const Params& p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const MmaBlock k = block(p);
    // The query loads go out first, then the first steps' copies, then the
    // query words are unpacked (mma_query.cuh says why).
    typename Query::Operands q;
    typename Query::Loads q_loads;
    Query::load(p, k, q_loads, q);
    typename Ring::Copier cp = Ring::copier(p, k.b, k.kvh, k.k_begin, k.k_end);
    const int n_steps = Ring::warp_steps(cp);
    // The warp's ring, and this lane's first copy unit in it.
    unsigned char* const ring = smem_raw + k.warp * Shape::kWarpRingBytes;
    unsigned char* const ring_unit = ring + k.lane * 16;
#pragma unroll
    for (int c = 0; c < kStages - 1; ++c) {
      if (c < n_steps) {
        Ring::issue_step(cp, ring_unit + c * Shape::kStageBytes);
      }
      mma_detail::cp_async_commit();
    }
    Query::unpack(q_loads, q);
    if constexpr (Shape::kScaleAfter) {
      Query::span_sums(k.t, q);
    }
    const typename Softmax::Masks masks =
        Softmax::masks(p, k, reinterpret_cast<uint4*>(smem_raw + kRowPosOffset) + threadIdx.x);
    float o[NCH][NT][4];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      Tiles::zero_tiles(o[j]);
    }
    typename Softmax::Rows rows = Softmax::start();
    // Stage of step c: rd; the stage of step c - 1 (free once the warp is
    // past it) takes step c + kStages - 1.
    int rd = 0;
    for (int c = 0; c < n_steps; ++c) {
      // Step c has landed once at most kStages - 2 newer groups pend; the
      // warp barrier makes every lane's copies visible to the warp and
      // orders its reads of step c - 1's stage before the copies into it.
      mma_detail::cp_async_wait<kStages - 2>();
      __syncwarp();
      const int wr = rd == 0 ? kStages - 1 : rd - 1;
      if (c + kStages - 1 < n_steps) {
        Ring::issue_step(cp, ring_unit + wr * Shape::kStageBytes);
      }
      mma_detail::cp_async_commit();
      const unsigned char* st = ring + rd * Shape::kStageBytes;
      rd = rd == kStages - 1 ? 0 : rd + 1;
      const int key0 = k.k_begin + c * Shape::kChunkKeys + Shape::kWarpKeys * k.warp; // the step's first key (< k_end)
      step(p, k, q, masks, st, key0, rows, o);
    }
    Epilogue::finish(p, k, rows, o, smem_raw);
  }

  // One step of the warp: its tiles of stage st (keys from key0).
  static __device__ __forceinline__ void step(
      const Params& p,
      const MmaBlock& k,
      const typename Query::Operands& q,
      const typename Softmax::Masks& masks,
      const unsigned char* st,
      int key0,
      typename Softmax::Rows& rows,
      float (&o)[NCH][NT][4]) {
    // S^T = K Q^T over the warp's tiles (independent: their MMAs and
    // decodes interleave).
    float s[TPW][NT][4];
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
      if constexpr (Shape::kScaleAfter) {
        Tiles::k_scores_scale_after(st, 16 * u, k.g, k.t, q, s[u]);
      } else {
        Tiles::k_scores(st, 16 * u, k.g, k.t, q, s[u]);
      }
    }
    Softmax::scores(p, k, masks, rows, key0, s);
    if (Softmax::over_limit(rows, s)) {
      Softmax::raise_max(rows, s, o);
    }
    uint32_t pb[TPW][NT][2];
    Softmax::weights(rows, s, pb);
    // O^T += V^T P^T.
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
      Tiles::v_accumulate(st, 16 * u, k.g, k.t, pb[u], o);
    }
  }
};

// The register cap of __launch_bounds__: MmaShape::kMinBlocksPerSm blocks
// of 4 warps per SM at the least.
template <typename T, int MODE, int BITS, int GS, int D, int ROW_TILES>
__global__ void __launch_bounds__(kThreads, MmaShape<MmaFormat<T, MODE, BITS>, GS, D, ROW_TILES>::kMinBlocksPerSm)
    qsdpa_decode_mma(const __grid_constant__ Params p) {
  MmaDecode<T, MODE, BITS, GS, D, ROW_TILES>::run(p);
}

// The kernel of one format of the table and group size, {nullptr, 0} where
// the table has no such group size or the groups are longer than a row.
template <typename T, int MODE, int BITS, int GS, int D, int ROW_TILES>
KernelRef mma_kernel_ref() {
  if constexpr (GS > D || !qsdpa::format_supported(MODE, BITS, GS)) {
    return KernelRef{nullptr, 0};
  } else {
    return KernelRef{
        reinterpret_cast<const void*>(&qsdpa_decode_mma<T, MODE, BITS, GS, D, ROW_TILES>),
        MmaDecode<T, MODE, BITS, GS, D, ROW_TILES>::kSmemBytes};
  }
}

} // namespace mlx_qsdpa::cuda
