// Copyright © 2026 mlx-qsdpa contributors.
//
// The sizes of one tensor-core kernel: its format (MmaFormat), group size,
// head dim and row tiles, and what follows from them: how a lane's share of
// a key row meets the MMA's fragments, how many keys a warp takes per step,
// and the ring of shared-memory stages its copies go through. Every other
// part of the kernel (mma_ring.cuh, mma_query.cuh, mma_tiles.cuh,
// mma_softmax.cuh, mma_epilogue.cuh) reads its sizes here.
#pragma once

#include "mma_decode.cuh"
#include "params.h"

namespace mlx_qsdpa::cuda {

template <typename Format, int GS, int D, int ROW_TILES>
struct MmaShape {
  using F = Format;
  using T = typename Format::T;
  static constexpr int kBits = F::kBits;
  static constexpr int kGroupSize = GS;
  static constexpr int kHeadDim = D;
  static constexpr int kRowTiles = ROW_TILES;
  static_assert(D == 64 || D == 128 || D == 256, "head dims of the MMA kernel");
  static_assert(GS <= D && D % GS == 0, "whole groups per row");
  static_assert(ROW_TILES == 1 || ROW_TILES == 2, "row tiles of 8");

  // ---- The block: query rows on the MMA's N side, in tiles of 8 ----
  static constexpr int kRows = 8 * ROW_TILES; // query rows per block
  // 16-wide chunks of the head dim: the k-chunks of S^T = K Q^T, the
  // m-tiles of O^T = V^T P^T.
  static constexpr int kDimChunks = D / 16;

  // ---- A key's row in the cache ----
  static constexpr int kRowBytes = D * kBits / 8; // packed K (or V) row
  static constexpr int kGroups = D / GS; // groups per row
  static constexpr int kScaleRowBytes = kGroups * F::kScaleBytes; // a row's scales (or biases)
  static constexpr int kScaleArrays = F::kHasBias ? 4 : 2; // K scales[, K biases], V scales[, V biases]

  // ---- K side ----
  // Scale after the MMA: where the codes' magic form M + code can go into
  // the MMA as is and a lane's quarter of a group is whole words, the
  // k-chunks of S^T = K Q^T stay inside one group, each group gets its own
  // accumulators, and its scale and bias are applied to the partial dot
  // product in fp32: s * (acc - sum(M q)) + b * sum(q) over the group, with
  // each element's magic M (fp16 x fp16 products are exact in fp32). Saves
  // the fp16 subtract and multiply-add of every code pair. Otherwise codes
  // are dequantized into T before the MMA.
  static constexpr bool kScaleAfter = F::kHalfMagic && GS * kBits >= 128;
  // A span: the K elements of a key row one accumulator chain covers (a
  // group with the scale after the MMA, the row otherwise); a lane takes a
  // quarter of each span (the top of decode_mma.cuh says why).
  static constexpr int kSpan = kScaleAfter ? GS : D;
  static constexpr int kSpans = D / kSpan; // per key row
  static constexpr int kChunksPerSpan = kSpan / 16; // k-chunks
  static constexpr int kLaneSpan = kSpan / 4; // a lane's K elements per span and key
  static constexpr int kLaneSpanBytes = kLaneSpan * kBits / 8;
  static constexpr int kLaneSpanWords = kLaneSpanBytes / 4;

  // ---- V side ----
  static constexpr int kLaneValues = D / 8; // a lane's V elements per key: an eighth of the row
  static constexpr int kLaneValueBytes = kRowBytes / 8;
  static constexpr int kLaneValueWords = kLaneValueBytes >= 4 ? kLaneValueBytes / 4 : 1;

  // Element lo of pair P of a lane's run of a K span; its partner hi = lo +
  // kCodesPerWord / 2 sits 16 bits above it in the same word, so that one
  // word gives a whole A register (a T pair). K-chunk c takes pairs 2c
  // (slots 2t, 2t+1) and 2c + 1 (slots 2t+8, 2t+9); the queries' B
  // fragments follow the same order.
  static __host__ __device__ constexpr int pair_lo(int P) {
    constexpr int kHalfWord = F::kCodesPerWord / 2;
    return (P / kHalfWord) * F::kCodesPerWord + P % kHalfWord;
  }

  // ---- The stream: a warp's steps through its ring of stages ----
  // The four warps' rings' share of a block's shared memory (bytes): it
  // sets the stages and the tiles per warp below, and with them how many
  // blocks fit an SM.
  static constexpr int kRingBudget = 56 * 1024;
  // Bytes of a ring stage of `keys` keys: K rows, V rows, scale arrays.
  static constexpr int stage_bytes(int keys) {
    return 2 * keys * kRowBytes + kScaleArrays * keys * kScaleRowBytes;
  }
  // Tiles of 16 keys per warp and step: two (more independent work per
  // warp, one vote and one barrier per 128 keys) for the one-tile-row
  // kernels of the affine formats with the scale after the MMA and groups
  // of 64 or more, head dims up to 128, where three 128-key stages fit the
  // ring's budget: there they fit the registers without spilling in the
  // loop, and ran faster. Elsewhere one: two tiles spill (16-row tiles, the
  // float decode of the fp formats), or leave a ring of two stages and
  // three blocks per SM (8-bit codes); both ran slower.
  static constexpr int kTilesPerWarp =
      kScaleAfter && GS >= 64 && D <= 128 && ROW_TILES == 1 && 3 * stage_bytes(128) <= kRingBudget ? 2 : 1;
  static constexpr int kWarpKeys = 16 * kTilesPerWarp; // keys per warp and step
  static constexpr int kChunkKeys = 4 * kWarpKeys; // keys per chunk: the four warps' steps, side by side
  static constexpr int kStageBytes = stage_bytes(kWarpKeys);
  // Enough steps in flight to cover the memory's latency: as many stages as
  // the four warps' rings fit in the budget, 2 to kMaxStages.
  static constexpr int kMaxStages = 4;
  static constexpr int kStagesInBudget = kRingBudget / (4 * kStageBytes);
  static constexpr int kStages =
      kStagesInBudget >= kMaxStages ? kMaxStages : (kStagesInBudget >= 2 ? kStagesInBudget : 2);
  static constexpr int kWarpRingBytes = kStages * kStageBytes;
  static constexpr int kRingBytes = 4 * kWarpRingBytes;

  // The blocks of 4 warps per SM that __launch_bounds__ must fit (the
  // register cap): two at D = 256, three with 16-row tiles, else four.
  static constexpr int kMinBlocksPerSm = D == 256 ? 2 : (ROW_TILES == 1 ? 4 : 3);

  static_assert(kRowBytes >= 16 && kLaneSpanBytes >= 4 && kLaneValueBytes >= 2, "run sizes");
  static_assert(kLaneSpan % 8 == 0 && F::kCodesPerWord % 4 == 0,
                "a lane's query run: whole 16-byte loads, pairs in the same word half");
  static_assert(!kScaleAfter || (kLaneSpanBytes % 4 == 0 && kSpans == kGroups),
                "scale after: whole words per group quarter");
  static_assert(kScaleRowBytes <= 16 && (kWarpKeys * kScaleRowBytes) % 16 == 0, "scale rows");
  static_assert(kChunkKeys % kKeysPerBlockStep == 0, "whole block steps per chunk");
};

// Where a block and a lane of the kernel sit: the block's (batch, kv head,
// row tile) and key range, the lane's warp and fragment coordinates (g, t).
struct MmaBlock {
  int b; // batch
  int kvh; // kv head
  int r0; // the tile's first row (of the kv head's G * Lq rows)
  int nr; // rows of the tile, at most 8 * row tiles
  int split; // the key range's slot in the split-K partials
  int k_begin, k_end; // the key range
  int warp, lane;
  int g, t; // lane / 4, lane % 4: the MMA fragments' row group and column pair
};

} // namespace mlx_qsdpa::cuda
