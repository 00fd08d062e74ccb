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
// key range, which it walks in chunks of 64 or 128 keys (TPW below), each
// warp its one or two 16-key tiles of a chunk. A warp copies its keys' part
// (packed K rows, packed V rows, their scales and biases: contiguous byte
// ranges) into its own ring of NS shared-memory stages with 16-byte
// cp.async, waits for its own copies and meets its lanes at a warp barrier,
// so warps never wait for each other inside the loop. Copies advance running
// pointers, so a step costs one 64-bit add per stream, not an address
// computation per copy.
//
// Layout (keys and head dim on the M side, query rows on N = 8):
//   S^T = K Q^T  (m16n8k16: A = K, 16 keys x 16 head-dim slots; B = Q^T).
//       Lane (g, t) holds keys g and g + 8 and, of each 16-slot chunk, the
//       slots 2t, 2t+1, 2t+8, 2t+9. A dot product does not care which
//       head-dim element sits in which slot as long as Q uses the same
//       order, so lane t takes the t-th quarter of each key row (one
//       shared-memory vector load) and Q's fragments follow that order.
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
// Codes become fp16/bf16 exactly (affine codes < 256 by their magic form,
// fp4 e2m1 codes by bit placement, others through float). V codes, and K
// codes of the non-affine formats, are then scaled (and biased) by
// formats.h's definition before the MMA, so the products see the values
// mx.dequantize gives in the cache dtype. Affine K codes go into the MMA in
// their exact magic form and the group's scale and bias are applied to its
// partial dot product in fp32 (kScaleAfter below): the same dot product,
// without rounding K to T. The online softmax keeps a lazy max (kLazyMax).
#pragma once

#include <type_traits>

#include "common.cuh"
#include "debug_timeline.cuh"
#include "ptx.cuh"
#include "split_merge.cuh"

// Measurement knobs (run_gpu.sh variants: QSDPA_VARIANTS="-DQSDPA_MMA_RING_BUDGET=73728
// -DQSDPA_MMA_MIN_BLOCKS=3"; cuda/README.md says why): a block's ring budget in bytes, which
// sets the stages (NS, at most QSDPA_MMA_MAX_STAGES) and the tiles per warp (TPW), and the
// blocks of the one-tile-row kernels (D <= 128) that __launch_bounds__ must fit per SM (their
// register cap). The defaults are the measured kernels'.
#ifndef QSDPA_MMA_RING_BUDGET
#define QSDPA_MMA_RING_BUDGET 57344
#endif
#ifndef QSDPA_MMA_MIN_BLOCKS
#define QSDPA_MMA_MIN_BLOCKS 4
#endif
#ifndef QSDPA_MMA_MAX_STAGES
#define QSDPA_MMA_MAX_STAGES 4
#endif

namespace mlx_qsdpa::cuda {

namespace mma_detail {

// Two floats rounded to a T pair (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// a * b of two T pairs, elementwise, one rounding each.
template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
}

// lo + hi of a T pair, in fp32.
template <typename T>
__device__ __forceinline__ float pair_sum(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&x));
    return f.x + f.y;
  } else {
    return __uint_as_float(x << 16) + __uint_as_float(x & 0xffff0000u);
  }
}

// BYTES bytes of shared memory at p (aligned to min(BYTES, 16)) as words; 2
// bytes land in the low half of out[0].
template <int BYTES, int N>
__device__ __forceinline__ void load_shared(const unsigned char* p, uint32_t (&out)[N]) {
  static_assert(N * 4 >= BYTES, "buffer too small");
  if constexpr (BYTES >= 16) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      out[4 * i] = v.x;
      out[4 * i + 1] = v.y;
      out[4 * i + 2] = v.z;
      out[4 * i + 3] = v.w;
    }
  } else if constexpr (BYTES == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  } else if constexpr (BYTES == 4) {
    out[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    static_assert(BYTES == 2, "unsupported run size");
    out[0] = *reinterpret_cast<const uint16_t*>(p);
  }
}

// An affine code as float without an int->float conversion instruction
// (those run at a quarter rate): 2^23 + code is a float whose low mantissa
// bits are the code. Equal to formats.h's decode_code<kAffine>(code).
template <int MODE>
__device__ __forceinline__ float code_value(uint32_t code) {
  if constexpr (MODE == qsdpa::kAffine) {
    return __uint_as_float(code | 0x4b000000u) - 8388608.0f;
  } else {
    return qsdpa::decode_code<MODE>(code);
  }
}

} // namespace mma_detail

template <typename T, int MODE, int BITS, int GS, int D, int NT>
struct MmaDecode {
  static_assert(D == 64 || D == 128 || D == 256, "head dims of the MMA kernel");
  static_assert(BITS == 2 || BITS == 4 || BITS == 8, "code widths of the MMA kernel");
  static_assert(GS <= D && D % GS == 0, "whole groups per row");
  static_assert(NT == 1 || NT == 2, "row tiles of 8");

  static constexpr bool kAffine = MODE == qsdpa::kAffine;
  static constexpr int RT = 8 * NT; // query rows per block
  static constexpr int NCH = D / 16; // k-chunks of S^T = m-tiles of O^T
  static constexpr int RB = D * BITS / 8; // bytes of a packed key row
  static constexpr int NG = D / GS; // groups per key row
  static constexpr int SB = kAffine ? int(sizeof(T)) : 1; // bytes per scale
  static constexpr int SRB = NG * SB; // scale bytes per key row
  static constexpr bool kIsHalf = std::is_same_v<T, __half>;
  // fp16 holds 1024 + code exactly for every code; bf16 (8 significant bits)
  // 128 + code only below 128, so 8-bit affine codes go through float for
  // bf16.
  static constexpr bool kHalfMagic = kAffine && (kIsHalf || BITS <= 4);
  // The online softmax's lazy max (log2 units): weights up to 2^8 in T.
  static constexpr float kLazyMax = 8.0f;
  // K side, scale after the MMA: where the codes' magic form M + code can go
  // into the MMA as is and a lane's quarter of a group is whole words, the
  // k-chunks of S^T = K Q^T stay inside one group, each group gets its own
  // accumulators, and its scale and bias are applied to the partial dot
  // product in fp32: s * (acc - sum(M q)) + b * sum(q) over the group, with
  // each element's magic M (fp16 x fp16 products are exact in fp32). Saves
  // the fp16 subtract and multiply-add of every code pair. Otherwise codes
  // are dequantized into T before the MMA.
  static constexpr bool kScaleAfter = kHalfMagic && GS * BITS >= 128;
  static constexpr int kNScaleArrays = kAffine ? 4 : 2;
  // Bytes of a ring stage of `keys` keys: K rows, V rows, scale arrays.
  static constexpr int kRingBudget = QSDPA_MMA_RING_BUDGET; // bytes per block
  static constexpr int stage_bytes(int keys) {
    return 2 * keys * RB + kNScaleArrays * keys * SRB;
  }
  // Tiles of 16 keys per warp and chunk step: two (more independent work per
  // warp, one vote and one barrier per 128 keys) for the one-tile-row
  // kernels of the affine formats with the scale after the MMA and groups
  // of 64 or more, head dims up to 128, where three 128-key stages fit the
  // ring's budget: there they fit the registers without spilling in the
  // loop (measured on the H200 for 4-bit gs64: 128K keys 57.3 -> 53.2 us).
  // Elsewhere one: two tiles spill (16-row tiles, the float decode of the fp
  // formats: mxfp4 went 76 -> 84 us at 32K), or leave a ring of two stages
  // and three blocks per SM (8-bit codes: 32K 33.6 -> 38.5 us).
  static constexpr int TPW =
      kScaleAfter && GS >= 64 && D <= 128 && NT == 1 && 3 * stage_bytes(128) <= kRingBudget ? 2 : 1;
  static constexpr int CKW = 16 * TPW; // keys per warp and step: TPW tiles of 16
  static constexpr int CK = 4 * CKW; // keys per chunk: the four warps' steps, side by side
  static constexpr int KS = kScaleAfter ? GS : D; // K span: a lane takes a quarter of each
  static constexpr int NKS = D / KS; // K spans per key row
  static constexpr int CPS = KS / 16; // k-chunks per span
  static constexpr int RK = KS / 4; // K elements of a lane per span and key
  static constexpr int KQ = RK * BITS / 8; // their bytes
  static constexpr int RV = D / 8; // V elements of a lane per key
  static constexpr int VB = RB / 8; // their bytes
  static constexpr int KW = KQ / 4;
  static constexpr int VW = VB >= 4 ? VB / 4 : 1;
  static constexpr int EW = 32 / BITS; // elements per word
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
  static constexpr uint32_t kPairMask = kMask | (kMask << 16);

  // The pair trick reads element k and element k + EW/2 of a word as the
  // low and high halves: formats.h's layout must put them 16 bits apart.
  static_assert(qsdpa::element_shift(EW / 2, BITS) == 16, "pair layout");
  static_assert(RB >= 16 && KQ >= 4 && VB >= 2, "run sizes");
  static_assert(RK % 8 == 0 && EW % 4 == 0, "a lane's query run: whole 16-byte loads, pairs in the same word half");
  static_assert(!kScaleAfter || (KQ % 4 == 0 && NKS == NG), "scale after: whole words per group quarter");
  static_assert(SRB <= 16 && (CKW * SRB) % 16 == 0, "scale rows");
  static_assert(CK % kKeysPerBlockStep == 0, "whole block steps per chunk");

  // Each warp streams its own keys through its own ring of NS stages: warp
  // w takes keys [c CK + w CKW, c CK + (w + 1) CKW) of the split in step c,
  // copies them itself (16-byte cp.async) and waits for its own copies only,
  // so that the warps never wait for each other inside the loop (a block
  // barrier per chunk was ~11% of the stall samples at 128K keys). A stage:
  // the step's K rows, V rows, then the scale arrays (K scales, [K biases,]
  // V scales[, V biases]), each row-major and dense.
  static constexpr int kOffV = CKW * RB;
  static constexpr int kOffS = 2 * CKW * RB;
  static constexpr int kScaleArrayBytes = CKW * SRB;
  static constexpr int kStageBytes = stage_bytes(CKW);
  // Enough steps in flight to cover HBM latency, in about 56 KB per block:
  // as many stages as the four warps' rings fit in the budget, 2 to
  // QSDPA_MMA_MAX_STAGES.
  static constexpr int NS = kRingBudget / (4 * kStageBytes) >= QSDPA_MMA_MAX_STAGES
      ? QSDPA_MMA_MAX_STAGES
      : (kRingBudget / (4 * kStageBytes) >= 2 ? kRingBudget / (4 * kStageBytes) : 2);
  static constexpr int kWarpRingBytes = NS * kStageBytes;
  static constexpr int kRingBytes = 4 * kWarpRingBytes;

  // The block epilogue's shared memory (over the ring, once it is drained).
  // A warp writes its slice's rows 2t, 2t+1 from lanes (g, t) at columns
  // RV g + 2j (+1): one float of padding after every RV columns and a row
  // stride of 8 (mod 32) banks per two rows put the 32 lanes of every
  // store on 32 banks (the plain D + 4 stride put them on 4: 8-way
  // conflicts, ~0.6 us of every call's epilogue, 2026-11-29 timeline). The
  // reads, consecutive columns, see at most 2-way conflicts.
  static constexpr int kORowMma = D + 20; // >= D + D / RV, and 2 kORowMma = 8 (mod 32)
  static_assert((2 * kORowMma) % 32 == 8 && kORowMma >= D + D / RV, "epilogue row stride");
  static __device__ __forceinline__ int o_index(int r, int d) {
    return r * kORowMma + d + d / RV;
  }
  // A warp's slice of the epilogue: its rows' max and sum and its output
  // rows, not rescaled (the store pass brings each warp to the block's max
  // as it sums); warp 0's slice also holds the rows' output row and head.
  // Each slice lies over its own warp's ring where it fits, so a warp
  // writes it as soon as its own copies have landed, and one block barrier
  // ends the epilogue's shared-memory work (four did: ~0.8 us of every
  // call, 2026-11-29e timeline).
  struct WarpSlice {
    float m[RT], l[RT];
    int64_t out_row[RT];
    int head[RT];
    float o[RT * kORowMma];
  };
  static constexpr bool kSliceInRing = int(sizeof(WarpSlice)) <= kWarpRingBytes;
  static constexpr int kSliceStride = kSliceInRing ? kWarpRingBytes : (int(sizeof(WarpSlice)) + 15) / 16 * 16;
  static_assert(kWarpRingBytes % 16 == 0, "slices 16-byte aligned");
  static __device__ __forceinline__ WarpSlice& slice(unsigned char* smem, int w) {
    return *reinterpret_cast<WarpSlice*>(smem + w * kSliceStride);
  }
  static constexpr int kMainSmemBytes = kRingBytes > 4 * kSliceStride ? kRingBytes : 4 * kSliceStride;
  // Row r's block max M and sum L, and the factor that brings each warp's
  // slice to M (0 for a warp that saw no key of the row).
  struct RowStats {
    float M, L, f[4];
  };
  static __device__ __forceinline__ RowStats row_stats(unsigned char* smem, int r) {
    RowStats st;
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
      st.f[w] = m[w] == neg_inf() ? 0.0f : exp2f(m[w] - st.M);
      st.L = st.L + __fmul_rn(slice(smem, w).l[r], st.f[w]);
    }
    return st;
  }
  // Element k of a row summed over the four slices, each brought to the
  // row's max. The products are rounded before the sum (no fused
  // multiply-add), as when each warp wrote its rows already rescaled.
  static __device__ __forceinline__ float row_value(unsigned char* smem, const RowStats& st, int k) {
    float v = __fmul_rn(slice(smem, 0).o[k], st.f[0]);
#pragma unroll
    for (int w = 1; w < 4; ++w) {
      v = v + __fmul_rn(slice(smem, w).o[k], st.f[w]);
    }
    return v;
  }
  static_assert(int(sizeof(MergeSmem)) <= kMainSmemBytes, "merge over the epilogue");
  // The query positions of a thread's accumulator rows (run() says why),
  // 16 bytes per thread past the rest, for the kernels of two row tiles.
  static constexpr bool kRowPosShared = NT == 2;
  static constexpr int kRowPosOffset = (kMainSmemBytes + 15) / 16 * 16;
  static constexpr int kSmemBytes = kRowPosShared ? kRowPosOffset + kThreads * 16 : kMainSmemBytes;

  // Scale arrays within a stage.
  static constexpr int kKS = 0;
  static constexpr int kKB = 1;
  static constexpr int kVS = kAffine ? 2 : 1;
  static constexpr int kVB = 3;

  // A step's copies, by the warp's lanes: lane l's 16-byte units of packed
  // K and V rows are rows row0 + i * kRowStep (row0 = l / UPR), column
  // l % UPR; the scale arrays, consecutive in the stage, are NSU units u =
  // l + 32 k of theirs (array u / US, unit u % US), so that a lane keeps one
  // running pointer per unit instead of one per array.
  static constexpr int UPR = RB / 16; // 16-byte units per packed row
  static constexpr int kRowStep = 32 / UPR; // rows between a lane's units
  static constexpr int NKU = (CKW + kRowStep - 1) / kRowStep; // units per lane
  static constexpr int US = kScaleArrayBytes / 16; // units per scale array
  static constexpr int kScaleUnits = kNScaleArrays * US;
  static constexpr int NSU = (kScaleUnits + 31) / 32; // scale units per lane
  static_assert(32 % UPR == 0 && US * 16 == kScaleArrayBytes, "copy plan");

  // The copies of one lane: its warp copies step c of its keys into a stage
  // of its ring, steps in order. Running pointers advance by a chunk each
  // time, so a step costs one 64-bit add per stream, not an address
  // computation per copy.
  struct Copier {
    const unsigned char* kc; // the next step's K row row0, at this lane's column
    const unsigned char* vc;
    int64_t krow, vrow; // bytes between key rows
    const unsigned char* sc[NSU]; // the next step's scale units of this lane
    int row0; // the lane's first row in a step
    int left; // keys of the split from the warp's next step to copy on
  };

  static __device__ __forceinline__ const unsigned char* byte_ptr(const void* p, int64_t elems, int esz) {
    return static_cast<const unsigned char*>(p) + elems * esz;
  }

  static __device__ __forceinline__ Copier copier(const Params& p, int b, int kvh, int k_begin, int k_end) {
    Copier cp;
    const int lane = threadIdx.x % 32;
    const int64_t first = int64_t(k_begin) + (threadIdx.x / 32) * CKW; // the warp's first key
    cp.row0 = lane / UPR;
    const int col = (lane % UPR) * 16;
    cp.krow = p.k.ws[2] * 4;
    cp.vrow = p.v.ws[2] * 4;
    cp.kc = byte_ptr(p.k.w, int64_t(b) * p.k.ws[0] + int64_t(kvh) * p.k.ws[1], 4) + (first + cp.row0) * cp.krow + col;
    cp.vc = byte_ptr(p.v.w, int64_t(b) * p.v.ws[0] + int64_t(kvh) * p.v.ws[1], 4) + (first + cp.row0) * cp.vrow + col;
#pragma unroll
    for (int k = 0; k < NSU; ++k) {
      const int u = min(lane + k * 32, kScaleUnits - 1); // lanes past the last unit copy none
      const int a = u / US;
      const bool bias = kAffine && (a == kKB || a == kVB);
      const QuantTensor& x = a == kKS || (bias && a == kKB) ? p.k : p.v;
      const void* base = bias ? x.biases : x.scales;
      const int64_t off =
          bias ? int64_t(b) * x.bs[0] + int64_t(kvh) * x.bs[1] : int64_t(b) * x.ss[0] + int64_t(kvh) * x.ss[1];
      cp.sc[k] = byte_ptr(base, off, SB) + first * SRB + (u % US) * 16;
    }
    cp.left = k_end - int(first);
    return cp;
  }

  // The warp's steps: chunks in which it has keys (before its first copy).
  static __device__ __forceinline__ int warp_steps(const Copier& cp) {
    return cp.left > 0 ? (cp.left + CK - 1) / CK : 0;
  }

  // The warp copies the next step of its keys into a stage (steps in
  // order, each once); dst: the lane's first byte in it (stage + 16 lane;
  // the lane's units are 512 bytes apart, constant offsets from dst). Keys
  // past the split's end are zero-filled without reading them (their scores
  // are masked; zero codes and scales decode to finite zeros); their copies
  // point at the step's first row instead, which is valid memory (a step
  // has at least one key).
  static __device__ __forceinline__ void issue_chunk(Copier& cp, unsigned char* dst) {
    const int valid = cp.left; // keys of the warp from this step on
    cp.left -= CK;
    if (valid >= CKW) {
      if (cp.krow == RB && cp.vrow == RB) {
        // Dense rows (mx.quantize's and mlx-lm's caches): the rows' offsets
        // are constants, folded into the copies' addresses.
#pragma unroll
        for (int i = 0; i < NKU; ++i) {
          if (CKW % kRowStep == 0 || cp.row0 + i * kRowStep < CKW) {
            const int so = i * 32 * 16;
            mma_detail::cp_async16(dst + so, cp.kc + i * kRowStep * RB, 16);
            mma_detail::cp_async16(dst + kOffV + so, cp.vc + i * kRowStep * RB, 16);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < NKU; ++i) {
          if (CKW % kRowStep == 0 || cp.row0 + i * kRowStep < CKW) {
            const int so = i * 32 * 16;
            mma_detail::cp_async16(dst + so, cp.kc + int64_t(i * kRowStep) * cp.krow, 16);
            mma_detail::cp_async16(dst + kOffV + so, cp.vc + int64_t(i * kRowStep) * cp.vrow, 16);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < NSU; ++k) {
        const int u = threadIdx.x % 32 + k * 32;
        if (kScaleUnits % 32 == 0 || u < kScaleUnits) {
          mma_detail::cp_async16(dst + kOffS + k * 32 * 16, cp.sc[k], 16);
        }
      }
    } else {
      // The split's last step for this warp.
#pragma unroll
      for (int i = 0; i < NKU; ++i) {
        const int row = cp.row0 + i * kRowStep;
        if (CKW % kRowStep == 0 || row < CKW) {
          const bool ok = row < valid;
          const int64_t r = ok ? int64_t(i * kRowStep) : -int64_t(cp.row0);
          const int so = i * 32 * 16;
          mma_detail::cp_async16(dst + so, cp.kc + r * cp.krow, ok ? 16 : 0);
          mma_detail::cp_async16(dst + kOffV + so, cp.vc + r * cp.vrow, ok ? 16 : 0);
        }
      }
#pragma unroll
      for (int k = 0; k < NSU; ++k) {
        const int u = threadIdx.x % 32 + k * 32;
        if (kScaleUnits % 32 == 0 || u < kScaleUnits) {
          // A unit holds the scales of 16 / SRB keys: the last one of the
          // split may hold some past its end.
          const int n = min(max(valid * SRB - (u % US) * 16, 0), 16);
          const unsigned char* src = n > 0 ? cp.sc[k] : cp.sc[k] - (u % US) * 16;
          mma_detail::cp_async16(dst + kOffS + k * 32 * 16, src, n);
        }
      }
    }
    cp.kc += CK * cp.krow;
    cp.vc += CK * cp.vrow;
#pragma unroll
    for (int k = 0; k < NSU; ++k) {
      cp.sc[k] += CK * SRB;
    }
  }

  // A raw scale (or bias) of key row `key` (of the stage), group `grp`.
  static __device__ __forceinline__ uint32_t scale_raw(const unsigned char* st, int array, int key, int grp) {
    const unsigned char* a = st + kOffS + array * kScaleArrayBytes;
    if constexpr (SB == 2) {
      return reinterpret_cast<const uint16_t*>(a)[key * NG + grp];
    } else {
      return a[key * NG + grp];
    }
  }

  static __device__ __forceinline__ float scale_float(uint32_t raw) {
    if constexpr (!kAffine) {
      return qsdpa::decode_fp_scale<MODE>(raw);
    } else if constexpr (std::is_same_v<T, __half>) {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
    } else {
      return __uint_as_float(raw << 16);
    }
  }

  // Scale and bias of two elements (lo, hi halves of a pair register), in
  // the form dequant_pair takes: T pairs for the half-magic path, floats
  // otherwise.
  struct PairScale {
    uint32_t s2, b2;
    float s0, b0, s1, b1;
    bool exact; // fp4: both scales exact in T (s2 holds them), so fp4_pair's path applies
  };

  // fp4 codes (mxfp4, nvfp4) decode without float (fp4_pair) where the
  // group's scales are exact in T: positive normal T numbers (e8m0 and e4m3
  // scales have at most 4 significant bits; others take the float path).
  static constexpr bool kFp4 = MODE == qsdpa::kMxfp4 || MODE == qsdpa::kNvfp4;
  static __device__ __forceinline__ bool exact_in_t(float x) {
    return kIsHalf ? (x >= 6.103515625e-05f && x <= 65504.0f) : (x >= 1.17549435e-38f && x <= 3.38953139e38f);
  }

  static __device__ __forceinline__ PairScale pair_scale(
      const unsigned char* st, int sa, int ba, int key_lo, int key_hi, int grp) {
    PairScale ps;
    ps.exact = false;
    const uint32_t rs0 = scale_raw(st, sa, key_lo, grp);
    const uint32_t rs1 = scale_raw(st, sa, key_hi, grp);
    if constexpr (kHalfMagic) {
      // Raw T bits straight into the pair (affine scales are T here).
      const uint32_t rb0 = scale_raw(st, ba, key_lo, grp);
      const uint32_t rb1 = scale_raw(st, ba, key_hi, grp);
      ps.s2 = rs0 | (rs1 << 16);
      ps.b2 = rb0 | (rb1 << 16);
      ps.s0 = ps.s1 = ps.b0 = ps.b1 = 0.0f;
    } else {
      ps.s2 = ps.b2 = 0u;
      ps.s0 = scale_float(rs0);
      ps.s1 = scale_float(rs1);
      if constexpr (kFp4) {
        ps.s2 = mma_detail::pack2<T>(ps.s0, ps.s1);
        ps.exact = exact_in_t(ps.s0) && exact_in_t(ps.s1);
      }
      if constexpr (kAffine) {
        ps.b0 = scale_float(scale_raw(st, ba, key_lo, grp));
        ps.b1 = scale_float(scale_raw(st, ba, key_hi, grp));
      } else {
        ps.b0 = ps.b1 = 0.0f;
      }
    }
    return ps;
  }

  // Magic pairs. A code whose bits sit inside T's mantissa, lowest bit at
  // bit p, reads as the T value 2^(MANT - p) + code once the exponent of
  // 2^(MANT - p) is ORed in: the mantissa's bit p weighs 1 there. So a pair
  // at bit p < 16 of a word (hi code 16 bits above) becomes a T pair with
  // one LOP3 where it fits under the mantissa's top, p + BITS <= MANT, and
  // with a shift first otherwise (integer instructions issue at
  // half rate; the decode is most of them).
  static constexpr int kMant = kIsHalf ? 10 : 7; // T's explicit mantissa bits
  // Where a pair does not fit in place, it is shifted by a whole byte where
  // that makes it fit (the pairs at bits 8 and 12 of a 4-bit word share one
  // shift to bits 0 and 4 in fp16), to bit 0 otherwise.
  static __host__ __device__ constexpr int magic_pos(int shift) {
    return shift + BITS <= kMant ? shift : (shift % 8 + BITS <= kMant ? shift % 8 : 0);
  }
  // The T pair (M, M), M = 2^(MANT - p), and M as a float.
  static __host__ __device__ constexpr uint32_t magic_bits(int p) {
    return (kIsHalf ? uint32_t(25 - p) << 10 : uint32_t(134 - p) << 7) * 0x10001u;
  }
  static __host__ __device__ constexpr float magic_value(int p) {
    return float(1 << (kMant - p));
  }

  // The PairScales of a lane's two fragment row pairs (h = 0, 1: keys key0 + 8h
  // and key0 + 8h + step), groups grp0 .. grp0 + NGX - 1.
  template <int NGX>
  static __device__ __forceinline__ void pair_scales(
      const unsigned char* st, int sa, int ba, int key0, int step, int grp0, PairScale (&ps)[2][NGX]) {
    if constexpr (kAdjacentScaleRuns) {
      if (step == 1) {
        adjacent_pair_scales(st, sa, ba, key0, grp0, ps);
        return;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int gi = 0; gi < NGX; ++gi) {
        ps[h][gi] = pair_scale(st, sa, ba, key0 + 8 * h, key0 + 8 * h + step, grp0 + gi);
      }
    }
  }

  // The same for adjacent keys (step 1, key0 even; the V side) on the
  // half-magic path with at most two groups per row: both keys' elements of
  // a group lie in one 4-byte (one group) or 8-byte (two groups) run, read
  // at once, and the pair is that word or one byte permutation of the two
  // (instead of two 2-byte reads and a permutation per array).
  static constexpr bool kAdjacentScaleRuns = kHalfMagic && NG <= 2;
  template <int NGX>
  static __device__ __forceinline__ void adjacent_pair_scales(
      const unsigned char* st, int sa, int ba, int key0, int grp0, PairScale (&ps)[2][NGX]) {
    static_assert(NGX == 1 && SB == 2, "one group per pair, T scales");
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = key0 + 8 * h;
      uint32_t sw[2], bw[2];
      mma_detail::load_shared<2 * SRB>(st + kOffS + sa * kScaleArrayBytes + key * SRB, sw);
      mma_detail::load_shared<2 * SRB>(st + kOffS + ba * kScaleArrayBytes + key * SRB, bw);
      PairScale& x = ps[h][0];
      if constexpr (NG == 1) {
        x.s2 = sw[0];
        x.b2 = bw[0];
      } else {
        // Words (key, groups 0 and 1) and (key + 1, groups 0 and 1).
        const uint32_t sel = grp0 % 2 ? 0x7632u : 0x5410u;
        x.s2 = __byte_perm(sw[0], sw[1], sel);
        x.b2 = __byte_perm(bw[0], bw[1], sel);
      }
      x.s0 = x.s1 = x.b0 = x.b1 = 0.0f;
      x.exact = false;
    }
  }

  // The code pair at bit `shift` (< 16) of x as the T pair (M + lo, M + hi),
  // exact, M = magic_value(magic_pos(shift)).
  static __device__ __forceinline__ uint32_t magic_pair(uint32_t x, int shift) {
    const int p = magic_pos(shift);
    return mma_detail::and_or(x >> (shift - p), kPairMask << p, magic_bits(p));
  }

  // An fp4 e2m1 code pair (lo code at bit `shift` < 16 of x, hi code 16 bits
  // above) as the exact T pair, without float: each code's exponent bits go
  // to T's lowest exponent bits, its mantissa bit to T's highest mantissa
  // bit, its sign to T's sign. That T number is the e2m1 value times
  // 2^(2 - bias of T) for all 16 codes (the exponent-zero codes land on T's
  // subnormals as e2m1's own do), so one multiply by 2^(bias - 2) makes it
  // formats.h's fp4_e2m1_to_float exactly (tests/cuda checks all 16 codes).
  static constexpr int kFp4MagBit = kIsHalf ? 9 : 6; // T's highest mantissa bit
  static constexpr uint32_t kFp4Unscale = kIsHalf ? 0x74007400u : 0x7e807e80u; // 2^14, 2^126
  static __device__ __forceinline__ uint32_t shift_left(uint32_t x, int n) {
    return n >= 0 ? x << n : x >> -n;
  }
  static __device__ __forceinline__ uint32_t fp4_pair(uint32_t x, int shift) {
    const uint32_t mag = shift_left(x, kFp4MagBit - shift) & ((7u << kFp4MagBit) * 0x10001u);
    const uint32_t y = mma_detail::and_or(shift_left(x, 12 - shift), 0x80008000u, mag);
    return mma_detail::mul2<T>(y, kFp4Unscale);
  }

  // The code pair at bit `shift` of x (lo code in bits [shift, shift +
  // BITS), hi code 16 bits above) as a dequantized T pair. FP4: fp4_pair's
  // path, for scales exact in T (PairScale::exact).
  template <bool FP4 = false>
  static __device__ __forceinline__ uint32_t dequant_pair(uint32_t x, int shift, const PairScale& ps) {
    if constexpr (FP4) {
      // One rounding of the exact product, as the float path's.
      return mma_detail::mul2<T>(fp4_pair(x, shift), ps.s2);
    } else if constexpr (kHalfMagic) {
      // T(magic + code) - T(magic) is the exact code; one fused
      // multiply-add in T applies scale and bias (one rounding, as
      // mx.dequantize in the cache dtype).
      const uint32_t magic = magic_bits(magic_pos(shift));
      const uint32_t y = magic_pair(x, shift);
      if constexpr (kIsHalf) {
        const __half2 c = __hsub2(*reinterpret_cast<const __half2*>(&y), *reinterpret_cast<const __half2*>(&magic));
        const __half2 r =
            __hfma2(c, *reinterpret_cast<const __half2*>(&ps.s2), *reinterpret_cast<const __half2*>(&ps.b2));
        return *reinterpret_cast<const uint32_t*>(&r);
      } else {
        const __nv_bfloat162 c = __hsub2(
            *reinterpret_cast<const __nv_bfloat162*>(&y), *reinterpret_cast<const __nv_bfloat162*>(&magic));
        const __nv_bfloat162 r = __hfma2(
            c, *reinterpret_cast<const __nv_bfloat162*>(&ps.s2), *reinterpret_cast<const __nv_bfloat162*>(&ps.b2));
        return *reinterpret_cast<const uint32_t*>(&r);
      }
    } else {
      const uint32_t codes = x >> shift;
      const float lo = mma_detail::code_value<MODE>(codes & kMask);
      const float hi = mma_detail::code_value<MODE>((codes >> 16) & kMask);
      return mma_detail::pack2<T>(fmaf(lo, ps.s0, ps.b0), fmaf(hi, ps.s1, ps.b1));
    }
  }

  // Element lo of pair P of a lane's K quarter (hi = lo + EW/2).
  static __host__ __device__ constexpr int pair_lo(int P) {
    return (P / (EW / 2)) * EW + P % (EW / 2);
  }

  // MMA accumulators of the NT row tiles, zeroed.
  static __device__ __forceinline__ void zero_tiles(float (&x)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        x[nt][e] = 0.0f;
      }
    }
  }

  // Whether every lane's scales of the tile are exact in T (a warp-uniform
  // choice of fp4_pair's path).
  template <int NGX>
  static __device__ __forceinline__ bool all_exact(const PairScale (&ps)[2][NGX]) {
    bool exact = true;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int gi = 0; gi < NGX; ++gi) {
        exact = exact && ps[h][gi].exact;
      }
    }
    return !__any_sync(0xffffffffu, !exact);
  }

  // k_scores' MMAs over the head dim: even and odd k-chunks into s and s2.
  template <bool FP4, int NGK>
  static __device__ __forceinline__ void k_chunks(
      const uint32_t (&kw)[2][KW],
      const PairScale (&ks)[2][NGK],
      const uint32_t (&qb)[NT][NCH][2],
      float (&s)[NT][4],
      float (&s2)[NT][4]) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      uint32_t a[4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int lo = pair_lo(2 * c + j);
        const int sh = qsdpa::element_shift(lo % EW, BITS);
        const int gi = NGK > 1 ? lo / GS : 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[2 * j + h] = dequant_pair<FP4>(kw[h][lo / EW], sh, ks[h][gi]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_detail::mma_16816<T>(c % 2 == 0 ? s[nt] : s2[nt], a, qb[nt][c][0], qb[nt][c][1]);
      }
    }
  }

  // S^T = K Q^T over the 16 keys from lk0 of stage st, codes dequantized
  // into T before the MMA. Two accumulator chains (even and odd k-chunks),
  // summed at the end: each MMA waits for the previous one of its chain only.
  static __device__ __forceinline__ void k_scores(
      const unsigned char* st, int lk0, int g, int t, const uint32_t (&qb)[NT][NCH][2], float (&s)[NT][4]) {
    float s2[NT][4];
    zero_tiles(s);
    zero_tiles(s2);
    uint32_t kw[2][KW];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mma_detail::load_shared<KQ>(st + (lk0 + g + 8 * h) * RB + t * KQ, kw[h]);
    }
    // Groups of lane t's quarter: one unless the quarter spans several.
    constexpr int NGK = RK >= GS ? RK / GS : 1;
    PairScale ks[2][NGK];
    pair_scales(st, kKS, kKB, lk0 + g, 0, (RK * t) / GS, ks);
    if constexpr (kFp4) {
      if (all_exact(ks)) {
        k_chunks<true>(kw, ks, qb, s, s2);
      } else {
        k_chunks<false>(kw, ks, qb, s, s2);
      }
    } else {
      k_chunks<false>(kw, ks, qb, s, s2);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] += s2[nt][e];
      }
    }
  }

  // The same with the scale after the MMA (kScaleAfter): the codes' exact
  // magic form M + c goes into the MMA, one accumulator per group, which
  // starts at nmsum = -sum M q (M: each element's magic) and so ends at
  // sum c q; then per key (rows g, g + 8) and query row, in fp32,
  //   S = sum over groups of  s * acc + b * qsum.
  static __device__ __forceinline__ void k_scores_scale_after(
      const unsigned char* st,
      int lk0,
      int g,
      int t,
      const uint32_t (&qb)[NT][NCH][2],
      const float (&qsum)[NT][NKS][2],
      const float (&nmsum)[NT][NKS][2],
      float (&s)[NT][4]) {
    // Scales and biases of the two keys, every group (one vector load each).
    constexpr int SW = (SRB + 3) / 4;
    uint32_t ksw[2][SW], kbw[2][SW];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = lk0 + g + 8 * h;
      mma_detail::load_shared<SRB>(st + kOffS + kKS * kScaleArrayBytes + key * SRB, ksw[h]);
      mma_detail::load_shared<SRB>(st + kOffS + kKB * kScaleArrayBytes + key * SRB, kbw[h]);
    }
    zero_tiles(s);
#pragma unroll
    for (int sp = 0; sp < NKS; ++sp) {
      uint32_t kw[2][KW];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mma_detail::load_shared<KQ>(st + (lk0 + g + 8 * h) * RB + sp * (KS * BITS / 8) + t * KQ, kw[h]);
      }
      // The accumulators start at -sum(M q), so that they end at sum(c q).
      float acc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          acc[nt][e4] = nmsum[nt][sp][e4 & 1];
        }
      }
#pragma unroll
      for (int cc = 0; cc < CPS; ++cc) {
        uint32_t a[4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int lo = pair_lo(2 * cc + j);
          const int sh = qsdpa::element_shift(lo % EW, BITS);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            a[2 * j + h] = magic_pair(kw[h][lo / EW], sh);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma_detail::mma_16816<T>(acc[nt], a, qb[nt][sp * CPS + cc][0], qb[nt][sp * CPS + cc][1]);
        }
      }
      float sc[2], bi[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sc[h] = scale_float((ksw[h][sp / 2] >> (16 * (sp % 2))) & 0xffffu);
        bi[h] = scale_float((kbw[h][sp / 2] >> (16 * (sp % 2))) & 0xffffu);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          s[nt][e4] = fmaf(sc[e4 >> 1], acc[nt][e4], fmaf(bi[e4 >> 1], qsum[nt][sp][e4 & 1], s[nt][e4]));
        }
      }
    }
  }

  // f(score, tile, row tile, accumulator) for each of a warp's scores.
  template <typename F>
  static __device__ __forceinline__ void each_score(float (&s)[TPW][NT][4], F&& f) {
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          f(s[u][nt][e4], u, nt, e4);
        }
      }
    }
  }

  // O^T += V^T P^T over the 16 keys from lk0 of stage st.
  static __device__ __forceinline__ void v_accumulate(
      const unsigned char* st, int lk0, int g, int t, const uint32_t (&pb)[NT][2], float (&o)[NCH][NT][4]) {
    // Keys 2t, 2t+1 (pair h = 0) and 2t+8, 2t+9 (h = 1), the g-th
    // eighth of each row.
    uint32_t vw[4][VW];
#pragma unroll
    for (int kp = 0; kp < 4; ++kp) {
      const int key = lk0 + 2 * t + (kp & 1) + 8 * (kp >> 1);
      mma_detail::load_shared<VB>(st + kOffV + key * RB + g * VB, vw[kp]);
    }
    constexpr int NGV = RV >= GS ? RV / GS : 1;
    PairScale vs[2][NGV];
    pair_scales(st, kVS, kVB, lk0 + 2 * t, 1, (RV * g) / GS, vs);
    if constexpr (kFp4) {
      if (all_exact(vs)) {
        v_tiles<true>(vw, vs, pb, o);
      } else {
        v_tiles<false>(vw, vs, pb, o);
      }
    } else {
      v_tiles<false>(vw, vs, pb, o);
    }
  }

  // v_accumulate's MMAs: m-tile j of O^T per pair of head-dim rows.
  template <bool FP4, int NGV>
  static __device__ __forceinline__ void v_tiles(
      const uint32_t (&vw)[4][VW], const PairScale (&vs)[2][NGV], const uint32_t (&pb)[NT][2], float (&o)[NCH][NT][4]) {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      const int e0 = 2 * j; // elements e0 (head-dim row g) and e0 + 1 (row g + 8)
      const int wv = e0 / EW;
      const int sh = qsdpa::element_shift(e0 % EW, BITS);
      const int gi = NGV > 1 ? e0 / GS : 0;
      // Up to 4 bits, both elements lie in one byte, which goes to the
      // bottom of each half (so that they are at bits 0 and BITS of the
      // half, where magic_pair needs no shift); 8-bit elements take
      // the 16-bit half holding both.
      constexpr bool kByte = BITS <= 4;
      const int byte = sh / 8;
      const uint32_t sel = kByte ? uint32_t(byte * 0x11 + (byte + 4) * 0x1100) : (sh >= 16 ? 0x7632u : 0x5410u);
      const int s0 = kByte ? sh % 8 : sh % 16;
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Key A's elements in the low half, key B's in the high half.
        const uint32_t both = __byte_perm(vw[2 * h][wv], vw[2 * h + 1][wv], sel);
        a[2 * h] = dequant_pair<FP4>(both, s0, vs[h][gi]);
        a[2 * h + 1] = dequant_pair<FP4>(both, s0 + BITS, vs[h][gi]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_detail::mma_16816<T>(o[j][nt], a, pb[nt][0], pb[nt][1]);
      }
    }
  }

  static __device__ void run(const Params& p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    QSDPA_TL_MARKS;
    QSDPA_TL_MARK(kStart);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int split = blockIdx.x;
    const TileRef tile = tile_ref<RT>(p);
    const int kvh = tile.kvh;
    const int r0 = tile.r0;
    const int b = blockIdx.z;
    const int nr = min(RT, p.rows - r0);

    int k_begin, k_end;
    split_range(p, split, r0 + nr - 1, k_begin, k_end);

    // Q^T as B operands: query row nt * 8 + g, the slots of lane t's K
    // quarter (see the top). A lane's slots of a K span are one run of RK
    // elements; where the layout allows (a dense last axis and rows at
    // 16-byte boundaries, as mx arrays usually are) it is read with 16-byte
    // loads, element by element otherwise. The query loads go out first:
    // issued after the first steps' copies, they waited behind every block's
    // copies (the kernel's top stall at 128K keys, 2026-11-29). The copies go
    // out next, before the loaded words are unpacked: unpacked first, the
    // copies waited for the queries' round trip (a block's first keys came
    // a query round trip late).
    uint32_t qb[NT][NCH][2];
    const uint16_t* qp = static_cast<const uint16_t*>(p.q);
    const bool q_vec = p.qs[3] == 1 && (p.qs[0] | p.qs[1] | p.qs[2]) % 8 == 0 &&
        reinterpret_cast<uintptr_t>(p.q) % 16 == 0;
    uint4 q_words[NT][NKS][RK / 8]; // the 16-byte path's loads, unpacked below
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = nt * 8 + g;
      const bool ok = r < nr;
      const RowRef ref = row_ref(p, b, kvh, r0 + min(r, nr - 1));
      const int64_t base = int64_t(b) * p.qs[0] + int64_t(ref.h) * p.qs[1] + int64_t(ref.i) * p.qs[2];
      if (q_vec) {
#pragma unroll
        for (int sp = 0; sp < NKS; ++sp) {
          const uint4* src = reinterpret_cast<const uint4*>(qp + base + KS * sp + RK * t);
#pragma unroll
          for (int v = 0; v < RK / 8; ++v) {
            q_words[nt][sp][v] = ok ? src[v] : uint4{0u, 0u, 0u, 0u};
          }
        }
      } else {
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int lo = KS * (c / CPS) + RK * t + pair_lo(2 * (c % CPS) + j);
            const int hi = lo + EW / 2;
            qb[nt][c][j] = ok ? uint32_t(qp[base + lo * p.qs[3]]) | (uint32_t(qp[base + hi * p.qs[3]]) << 16) : 0u;
          }
        }
      }
    }

    // Then the first steps' copies.
    Copier cp = copier(p, b, kvh, k_begin, k_end);
    const int n_steps = warp_steps(cp);
    // The warp's ring, and this lane's first copy unit in it.
    unsigned char* const ring = smem_raw + warp * kWarpRingBytes;
    unsigned char* const ring_unit = ring + lane * 16;
#pragma unroll
    for (int c = 0; c < NS - 1; ++c) {
      if (c < n_steps) {
        issue_chunk(cp, ring_unit + c * kStageBytes);
      }
      mma_detail::cp_async_commit();
    }

    if (q_vec) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int sp = 0; sp < NKS; ++sp) {
          uint32_t w[RK / 2]; // the run's elements, two per word
#pragma unroll
          for (int v = 0; v < RK / 8; ++v) {
            w[4 * v] = q_words[nt][sp][v].x;
            w[4 * v + 1] = q_words[nt][sp][v].y;
            w[4 * v + 2] = q_words[nt][sp][v].z;
            w[4 * v + 3] = q_words[nt][sp][v].w;
          }
#pragma unroll
          for (int cc = 0; cc < CPS; ++cc) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              // Elements lo and hi = lo + EW / 2 of the run: the same half
              // of their words (EW / 2 is even).
              const int lo = pair_lo(2 * cc + j);
              const int hi = lo + EW / 2;
              qb[nt][sp * CPS + cc][j] = __byte_perm(w[lo / 2], w[hi / 2], lo % 2 ? 0x7632u : 0x5410u);
            }
          }
        }
      }
    }

    // Scale after the MMA: each accumulator row's sum of the queries over
    // each K span (= group), and the sum of M q with each element's magic M
    // (the MMA's products are (M + c) q), from the T values the MMA sees.
    float qsum[NT][NKS][2], nmsum[NT][NKS][2]; // nmsum: -sum M q (summed negative)
    if constexpr (kScaleAfter) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int sp = 0; sp < NKS; ++sp) {
          float x = 0.0f, y = 0.0f; // row nt * 8 + g, this lane's slots
#pragma unroll
          for (int cc = 0; cc < CPS; ++cc) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const float q2 = mma_detail::pair_sum<T>(qb[nt][sp * CPS + cc][j]);
              const int sh = qsdpa::element_shift(pair_lo(2 * cc + j) % EW, BITS);
              x += q2;
              y = fmaf(-magic_value(magic_pos(sh)), q2, y); // negative: no negation in the loop
            }
          }
#pragma unroll
          for (int lanes = 1; lanes <= 2; lanes *= 2) {
            x += __shfl_xor_sync(0xffffffffu, x, lanes);
            y += __shfl_xor_sync(0xffffffffu, y, lanes);
          }
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            qsum[nt][sp][e] = __shfl_sync(0xffffffffu, x, 4 * (2 * t + e));
            nmsum[nt][sp][e] = __shfl_sync(0xffffffffu, y, 4 * (2 * t + e));
          }
        }
      }
    }

    // The query position of each of this lane's accumulator rows (nt * 8 +
    // 2t + e), for the masked steps: the rest of a row's reference follows
    // from it without row_ref's division by G (lane_row). In registers with
    // one row tile (two ints). With two, four more registers over the loop
    // made ptxas spill its hot state (132 bytes, 22 local loads and stores
    // per step; the whole references, three ints and a flag per row, did
    // the same), so the positions wait in the thread's own 16 bytes of
    // shared memory, loaded on masked steps only.
    int crow_i[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        crow_i[nt][e] = row_ref(p, b, kvh, r0 + min(nt * 8 + 2 * t + e, nr - 1)).i;
      }
    }
    uint4* const row_pos = reinterpret_cast<uint4*>(smem_raw + kRowPosOffset) + threadIdx.x; // kRowPosShared only
    if constexpr (kRowPosShared) {
      static_assert(NT == 2, "four positions per thread");
      *row_pos = uint4{uint32_t(crow_i[0][0]), uint32_t(crow_i[0][1]), uint32_t(crow_i[1][0]), uint32_t(crow_i[1][1])};
    }
    // row_ref of accumulator row (nt, e), from its query position i.
    const auto lane_row = [&](int nt, int e, int i) {
      return row_ref_at(p, b, kvh, r0 + min(nt * 8 + 2 * t + e, nr - 1), i);
    };
    const bool causal = p.mask == qsdpa::kMaskCausal;
    const bool array_masked = p.mask == qsdpa::kMaskBool || p.mask == qsdpa::kMaskAdditive;
    // The first key the causal mask hides for some row of the block.
    const int causal_from = row_ref(p, b, kvh, r0).causal_limit + 1;

    float o[NCH][NT][4];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      zero_tiles(o[j]);
    }
    // Per row of this lane: the exponent's base (the reference max m, or 0
    // while m is -inf), the lazy max's limit on a score over the base
    // (kLazyMax, or -inf while m is -inf), and the lane's share of the
    // denominator. m itself is not kept: it is -inf where lim is and base
    // elsewhere (ref_max), one register per row less in the loop.
    float base[NT][2], lim[NT][2], l[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        lim[nt][e] = neg_inf();
        base[nt][e] = l[nt][e] = 0.0f;
      }
    }
    const auto ref_max = [&](int nt, int e) { return lim[nt][e] == neg_inf() ? neg_inf() : base[nt][e]; };


    // Stage of step c: rd; the stage of step c - 1 (free once the warp is
    // past it) takes step c + NS - 1.
    int rd = 0;
    for (int c = 0; c < n_steps; ++c) {
      // Step c has landed once at most NS - 2 newer groups pend; the warp
      // barrier makes every lane's copies visible to the warp and orders
      // its reads of step c - 1's stage before the copies into it.
      mma_detail::cp_async_wait<NS - 2>();
      __syncwarp();
      if (c == 0) {
        QSDPA_TL_MARK(kFirstKeys); // timeline builds only (debug_timeline.cuh)
      }
      const int wr = rd == 0 ? NS - 1 : rd - 1;
      if (c + NS - 1 < n_steps) {
        issue_chunk(cp, ring_unit + wr * kStageBytes);
      }
      mma_detail::cp_async_commit();
      const unsigned char* st = ring + rd * kStageBytes;
      rd = rd == NS - 1 ? 0 : rd + 1;
      const int key0 = k_begin + c * CK + CKW * warp; // the step's first key (< k_end)

      // ---- S^T = K Q^T over this warp's tiles (independent: their MMAs
      // and decodes interleave) ----
      float s[TPW][NT][4];
#pragma unroll
      for (int u = 0; u < TPW; ++u) {
        if constexpr (kScaleAfter) {
          k_scores_scale_after(st, 16 * u, g, t, qb, qsum, nmsum, s[u]);
        } else {
          k_scores(st, 16 * u, g, t, qb, s[u]);
        }
      }

      // ---- masks and the online softmax (query rows 2t, 2t + 1) ----
      const bool tail = key0 + 16 * TPW > k_end;
      const bool causal_here = causal && key0 + 16 * TPW - 1 >= causal_from;
      // Scores in log2 units over their row's base (one fused multiply-add
      // where no mask applies); masks in a warp-uniform branch: most steps
      // see none.
      // Each kind of masked step takes a path of its own, which computes
      // only what it needs: a tail step (a split's last for its warp, one
      // in ~10 of a warp's steps at 32K keys) no row reference (every row
      // sees the keys before k_end, and all of this step's where no causal
      // step is here), a causal step the rows' limits, an array mask their
      // whole references (lane_row). A row sees the keys up to `last`.
      const auto masked_scores = [&](auto rows_here, auto array_here) {
        int pos[NT][2];
        if constexpr (decltype(rows_here)::value) {
          if constexpr (kRowPosShared) {
            const uint4 v = *row_pos;
            pos[0][0] = int(v.x);
            pos[0][1] = int(v.y);
            pos[1][0] = int(v.z);
            pos[1][1] = int(v.w);
          } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              pos[nt][0] = crow_i[nt][0];
              pos[nt][1] = crow_i[nt][1];
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = nt * 8 + 2 * t + e;
            RowRef ref{};
            int last = k_end - 1;
            if constexpr (decltype(rows_here)::value) {
              ref = lane_row(nt, e, pos[nt][e]);
              if (causal_here) {
                last = min(last, ref.causal_limit);
              }
            }
#pragma unroll
            for (int u = 0; u < TPW; ++u) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                float& x = s[u][nt][2 * h + e];
                const int key = key0 + 16 * u + g + 8 * h;
                x *= p.scale_log2;
                if (key > last) {
                  x = neg_inf();
                } else if (decltype(array_here)::value && r < nr) {
                  x = apply_array_mask(p, b, ref, key, x);
                }
                x -= base[nt][e];
              }
            }
          }
        }
      };
      if (array_masked) {
        masked_scores(std::true_type{}, std::true_type{});
      } else if (causal_here) {
        masked_scores(std::true_type{}, std::false_type{});
      } else if (tail) {
        masked_scores(std::false_type{}, std::false_type{});
      } else {
        each_score(s, [&](float& x, int, int nt, int e4) { x = fmaf(x, p.scale_log2, -base[nt][e4 & 1]); });
      }
      // A lazy max: p = 2^(s - base) with base the row's reference max (0
      // while it has seen no key), which moves only when a score exceeds it
      // by more than kLazyMax; then O and l are rescaled, and the step's
      // scores shifted to the new base. So p <= 2^kLazyMax
      // (exact enough in T, far from its overflow), and a step whose scores
      // stay under their rows' thresholds (nearly all, once the first steps
      // have set the max) costs one vote instead of a max reduction across
      // the row's lanes (three shuffles). A NaN or +inf score also fails
      // the test, so the slow path alone sees them: its max keeps the NaN
      // (fmax_nan) and turns +inf into NaN, which poisons the row
      // (common.cuh). A poisoned row's scores over its NaN base are NaN,
      // so it takes the slow path on every later step, and stays NaN.
      bool over = false;
      each_score(s, [&](float& x, int, int nt, int e4) { over |= !(x <= lim[nt][e4 & 1]); });
      if (__any_sync(0xffffffffu, over)) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float corr[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float mx = neg_inf();
#pragma unroll
            for (int u = 0; u < TPW; ++u) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                mx = mma_detail::fmax_nan(mx, s[u][nt][2 * h + e]);
              }
            }
            mx = mma_detail::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = mma_detail::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = mma_detail::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_old = ref_max(nt, e);
            const float m_max = mma_detail::fmax_nan(m_old, mx + base[nt][e]);
            const float m_new = m_max == pos_inf() ? qsdpa::quiet_nan() : m_max; // NaN: poisoned
            const float b_new = m_new == neg_inf() ? 0.0f : m_new;
            corr[e] = mma_detail::exp2_fast(m_old - b_new); // 0 while m is -inf, 1 if unchanged
            const float shift = base[nt][e] - b_new;
#pragma unroll
            for (int u = 0; u < TPW; ++u) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                s[u][nt][2 * h + e] += shift;
              }
            }
            base[nt][e] = b_new;
            lim[nt][e] = m_new == neg_inf() ? neg_inf() : kLazyMax;
            l[nt][e] *= corr[e];
          }
#pragma unroll
          for (int j = 0; j < NCH; ++j) {
            o[j][nt][0] *= corr[0];
            o[j][nt][1] *= corr[1];
            o[j][nt][2] *= corr[0];
            o[j][nt][3] *= corr[1];
          }
        }
      }
      uint32_t pb[TPW][NT][2];
#pragma unroll
      for (int u = 0; u < TPW; ++u) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p0 = mma_detail::exp2_fast(s[u][nt][e]);
            const float p1 = mma_detail::exp2_fast(s[u][nt][2 + e]);
            l[nt][e] += p0 + p1;
            s[u][nt][e] = p0;
            s[u][nt][2 + e] = p1;
          }
          pb[u][nt][0] = mma_detail::transpose8x8(mma_detail::pack2<T>(s[u][nt][0], s[u][nt][1]));
          pb[u][nt][1] = mma_detail::transpose8x8(mma_detail::pack2<T>(s[u][nt][2], s[u][nt][3]));
        }
      }

      // ---- O^T += V^T P^T ----
#pragma unroll
      for (int u = 0; u < TPW; ++u) {
        v_accumulate(st, 16 * u, g, t, pb[u], o);
      }
    }
    QSDPA_TL_MARK(kStreamed);

    // ---- merge the four warps ----
    // Each warp writes its rows' (m, l) and its output rows, as they are,
    // into its slice; after one barrier a single pass brings each warp's
    // rows to the block's max while summing them and writes the rows out.
    // A slice lies over its warp's own ring: once the warp's copies have
    // landed and its lanes are past the loop, nothing else touches it.
    mma_detail::cp_async_wait_all();
    if constexpr (kSliceInRing) {
      __syncwarp();
    } else {
      __syncthreads(); // the slices overlap other warps' rings
    }
    WarpSlice& ws = slice(smem_raw, warp);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = l[nt][e];
        x += __shfl_xor_sync(0xffffffffu, x, 4);
        x += __shfl_xor_sync(0xffffffffu, x, 8);
        x += __shfl_xor_sync(0xffffffffu, x, 16);
        if (g == 0) {
          ws.m[nt * 8 + 2 * t + e] = ref_max(nt, e);
          ws.l[nt * 8 + 2 * t + e] = x;
        }
      }
    }
    if (threadIdx.x < RT) { // warp 0, into its own slice
      const RowRef ref = row_ref(p, b, kvh, r0 + min(int(threadIdx.x), nr - 1));
      ws.out_row[threadIdx.x] = ref.out_row;
      ws.head[threadIdx.x] = ref.h;
    }
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          const int r = nt * 8 + 2 * t + (e4 & 1);
          const int d = RV * g + 2 * j + (e4 >> 1);
          ws.o[o_index(r, d)] = o[j][nt][e4];
        }
      }
    }
    __syncthreads();
    // One barrier: the warps joined, and the rows' statistics and sums come
    // with the stores below (the timeline's three points coincide).
    QSDPA_TL_MARK(kJoined);
    QSDPA_TL_MARK(kReduced);
    QSDPA_TL_MARK(kSummed);
    // Warp w writes rows w, w + 4, ..: each lane works out the row's
    // statistics (and, with one split, its normalisation) once, then reads
    // its columns of the four slices before it stores any of them (the
    // stores go through generic pointers, which the compiler must assume
    // may alias shared memory: a read after a store would wait for it).
    const WarpSlice& s0 = slice(smem_raw, 0);
    constexpr int kCols = (D + 31) / 32; // a lane's columns of a row
#pragma unroll 1
    for (int r = warp; r < nr; r += 4) {
      const RowStats st = row_stats(smem_raw, r);
      const ResultPair rp = result_pair(p, s0.head[r], st.M, st.L);
      const int64_t out_row = s0.out_row[r];
      float v[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        v[c] = d < D ? row_value(smem_raw, st, o_index(r, d)) : 0.0f;
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
          store_result(p, split, out_row, d, v[c], rp.a, rp.b);
        }
      }
    }
    QSDPA_TL_MARK(kPartial);
    if (p.n_splits > 1) {
      merge_splits<D, NT>(p, b, kvh, r0, nr, *reinterpret_cast<MergeSmem*>(smem_raw));
    }
    QSDPA_TL_PRINT_BLOCK(k_end - k_begin);
  }
};

// Register cap: MINB blocks of 4 warps per SM at the least.
template <typename T, int MODE, int BITS, int GS, int D, int NT>
__global__ void __launch_bounds__(kThreads, (D == 256 ? 2 : (NT == 1 ? QSDPA_MMA_MIN_BLOCKS : 3)))
    qsdpa_decode_mma(const __grid_constant__ Params p) {
  MmaDecode<T, MODE, BITS, GS, D, NT>::run(p);
}

template <typename T, int MODE, int BITS, int GS, int D, int NT>
KernelRef mma_kernel_ref() {
  if constexpr (GS > D) {
    return KernelRef{nullptr, 0};
  } else {
    return KernelRef{
        reinterpret_cast<const void*>(&qsdpa_decode_mma<T, MODE, BITS, GS, D, NT>),
        MmaDecode<T, MODE, BITS, GS, D, NT>::kSmemBytes};
  }
}

} // namespace mlx_qsdpa::cuda
