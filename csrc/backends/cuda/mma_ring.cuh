// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core kernel's copies of its keys into shared memory. Each warp
// streams its own keys through its own ring of S::kStages stages: warp w
// takes keys [c C + w W, c C + (w + 1) W) of the split in step c (C =
// S::kChunkKeys, W = S::kWarpKeys), copies them itself (16-byte cp.async)
// and waits for its own copies only, so that the warps never wait for each
// other inside the loop (a block barrier per chunk was a large share of
// the stall samples). A stage: the step's K rows, V rows, then the scale
// arrays (K scales, [K biases,] V scales[, V biases]), each row-major and
// dense. The walk through the ring (the waits, the next step's copies into
// the stage just read) is the loop of MmaDecode::run (decode_mma.cuh).
#pragma once

#include "common.cuh"
#include "mma_shape.cuh"
#include "ptx.cuh"

namespace mlx_qsdpa::cuda {

template <typename S>
struct MmaRing {
  // ---- A stage ----
  static constexpr int kValueRowsAt = S::kWarpKeys * S::kRowBytes; // byte offset of the V rows
  static constexpr int kScalesAt = 2 * S::kWarpKeys * S::kRowBytes; // of the scale arrays
  static constexpr int kScaleArrayBytes = S::kWarpKeys * S::kScaleRowBytes;
  // The scale arrays, in stage order.
  static constexpr int kKeyScales = 0;
  static constexpr int kKeyBiases = 1;
  static constexpr int kValueScales = S::F::kHasBias ? 2 : 1;
  static constexpr int kValueBiases = 3;
  static_assert(S::kStageBytes == kScalesAt + S::kScaleArrays * kScaleArrayBytes, "stage layout");

  // ---- The copy plan of a step, by the warp's lanes ----
  // Lane l's 16-byte units of packed K and V rows are rows row0 + i *
  // kRowStep (row0 = l / kUnitsPerRow), column l % kUnitsPerRow; the scale
  // arrays, consecutive in the stage, are kScaleUnitsPerLane units u = l +
  // 32 k of theirs (array u / kUnitsPerScaleArray), so that a lane keeps
  // one running pointer per unit instead of one per array.
  static constexpr int kUnitsPerRow = S::kRowBytes / 16; // of a packed row
  static constexpr int kRowStep = 32 / kUnitsPerRow; // rows between a lane's units
  static constexpr int kRowUnitsPerLane = (S::kWarpKeys + kRowStep - 1) / kRowStep;
  static constexpr int kUnitsPerScaleArray = kScaleArrayBytes / 16;
  static constexpr int kScaleUnits = S::kScaleArrays * kUnitsPerScaleArray;
  static constexpr int kScaleUnitsPerLane = (kScaleUnits + 31) / 32;
  static_assert(32 % kUnitsPerRow == 0 && kUnitsPerScaleArray * 16 == kScaleArrayBytes, "copy plan");
  static_assert(S::kWarpRingBytes % 16 == 0, "stages 16-byte aligned");

  // The copies of one lane: its warp copies step c of its keys into a stage
  // of its ring, steps in order. Running pointers advance by a chunk each
  // time, so a step costs one 64-bit add per stream, not an address
  // computation per copy.
  struct Copier {
    const unsigned char* kc; // the next step's K row row0, at this lane's column
    const unsigned char* vc;
    int64_t krow, vrow; // bytes between key rows
    const unsigned char* sc[kScaleUnitsPerLane]; // the next step's scale units of this lane
    int row0; // the lane's first row in a step
    int left; // keys of the split from the warp's next step to copy on
  };

  static __device__ __forceinline__ const unsigned char* byte_ptr(const void* p, int64_t elems, int esz) {
    return static_cast<const unsigned char*>(p) + elems * esz;
  }

  static __device__ __forceinline__ Copier copier(const Params& p, int b, int kvh, int k_begin, int k_end) {
    Copier cp;
    const int lane = threadIdx.x % 32;
    const int64_t first = int64_t(k_begin) + (threadIdx.x / 32) * S::kWarpKeys; // the warp's first key
    cp.row0 = lane / kUnitsPerRow;
    const int col = (lane % kUnitsPerRow) * 16;
    cp.krow = p.k.ws[2] * 4;
    cp.vrow = p.v.ws[2] * 4;
    cp.kc = byte_ptr(p.k.w, int64_t(b) * p.k.ws[0] + int64_t(kvh) * p.k.ws[1], 4) + (first + cp.row0) * cp.krow + col;
    cp.vc = byte_ptr(p.v.w, int64_t(b) * p.v.ws[0] + int64_t(kvh) * p.v.ws[1], 4) + (first + cp.row0) * cp.vrow + col;
#pragma unroll
    for (int k = 0; k < kScaleUnitsPerLane; ++k) {
      const int u = min(lane + k * 32, kScaleUnits - 1); // lanes past the last unit copy none
      const int a = u / kUnitsPerScaleArray;
      const bool bias = S::F::kHasBias && (a == kKeyBiases || a == kValueBiases);
      const QuantTensor& x = a == kKeyScales || (bias && a == kKeyBiases) ? p.k : p.v;
      const void* base = bias ? x.biases : x.scales;
      const int64_t off =
          bias ? int64_t(b) * x.bs[0] + int64_t(kvh) * x.bs[1] : int64_t(b) * x.ss[0] + int64_t(kvh) * x.ss[1];
      cp.sc[k] = byte_ptr(base, off, S::F::kScaleBytes) + first * S::kScaleRowBytes + (u % kUnitsPerScaleArray) * 16;
    }
    cp.left = k_end - int(first);
    return cp;
  }

  // The warp's steps: chunks in which it has keys (before its first copy).
  static __device__ __forceinline__ int warp_steps(const Copier& cp) {
    return cp.left > 0 ? (cp.left + S::kChunkKeys - 1) / S::kChunkKeys : 0;
  }

  // The warp copies the next step of its keys into a stage (steps in
  // order, each once); dst: the lane's first byte in it (stage + 16 lane;
  // the lane's units are 512 bytes apart, constant offsets from dst).
  static __device__ __forceinline__ void issue_step(Copier& cp, unsigned char* dst) {
    const int valid = cp.left; // keys of the warp from this step on
    cp.left -= S::kChunkKeys;
    if (valid >= S::kWarpKeys) {
      if (cp.krow == S::kRowBytes && cp.vrow == S::kRowBytes) {
        copy_dense_rows(cp, dst);
      } else {
        copy_rows(cp, dst);
      }
      copy_scales(cp, dst);
    } else {
      copy_last_step(cp, dst, valid);
    }
    cp.kc += S::kChunkKeys * cp.krow;
    cp.vc += S::kChunkKeys * cp.vrow;
#pragma unroll
    for (int k = 0; k < kScaleUnitsPerLane; ++k) {
      cp.sc[k] += S::kChunkKeys * S::kScaleRowBytes;
    }
  }

  // Dense rows (mx.quantize's and mlx-lm's caches): the rows' offsets are
  // constants, folded into the copies' addresses.
  static __device__ __forceinline__ void copy_dense_rows(const Copier& cp, unsigned char* dst) {
#pragma unroll
    for (int i = 0; i < kRowUnitsPerLane; ++i) {
      if (S::kWarpKeys % kRowStep == 0 || cp.row0 + i * kRowStep < S::kWarpKeys) {
        const int so = i * 32 * 16;
        mma_detail::cp_async16(dst + so, cp.kc + i * kRowStep * S::kRowBytes, 16);
        mma_detail::cp_async16(dst + kValueRowsAt + so, cp.vc + i * kRowStep * S::kRowBytes, 16);
      }
    }
  }

  static __device__ __forceinline__ void copy_rows(const Copier& cp, unsigned char* dst) {
#pragma unroll
    for (int i = 0; i < kRowUnitsPerLane; ++i) {
      if (S::kWarpKeys % kRowStep == 0 || cp.row0 + i * kRowStep < S::kWarpKeys) {
        const int so = i * 32 * 16;
        mma_detail::cp_async16(dst + so, cp.kc + int64_t(i * kRowStep) * cp.krow, 16);
        mma_detail::cp_async16(dst + kValueRowsAt + so, cp.vc + int64_t(i * kRowStep) * cp.vrow, 16);
      }
    }
  }

  static __device__ __forceinline__ void copy_scales(const Copier& cp, unsigned char* dst) {
#pragma unroll
    for (int k = 0; k < kScaleUnitsPerLane; ++k) {
      const int u = threadIdx.x % 32 + k * 32;
      if (kScaleUnits % 32 == 0 || u < kScaleUnits) {
        mma_detail::cp_async16(dst + kScalesAt + k * 32 * 16, cp.sc[k], 16);
      }
    }
  }

  // The split's last step for this warp, `valid` (< kWarpKeys) keys. Keys
  // past the split's end are zero-filled without reading them (their
  // scores are masked; zero codes and scales decode to finite zeros);
  // their copies point at the step's first row instead, which is valid
  // memory (a step has at least one key).
  static __device__ __forceinline__ void copy_last_step(const Copier& cp, unsigned char* dst, int valid) {
#pragma unroll
    for (int i = 0; i < kRowUnitsPerLane; ++i) {
      const int row = cp.row0 + i * kRowStep;
      if (S::kWarpKeys % kRowStep == 0 || row < S::kWarpKeys) {
        const bool ok = row < valid;
        const int64_t r = ok ? int64_t(i * kRowStep) : -int64_t(cp.row0);
        const int so = i * 32 * 16;
        mma_detail::cp_async16(dst + so, cp.kc + r * cp.krow, ok ? 16 : 0);
        mma_detail::cp_async16(dst + kValueRowsAt + so, cp.vc + r * cp.vrow, ok ? 16 : 0);
      }
    }
#pragma unroll
    for (int k = 0; k < kScaleUnitsPerLane; ++k) {
      const int u = threadIdx.x % 32 + k * 32;
      if (kScaleUnits % 32 == 0 || u < kScaleUnits) {
        // A unit holds the scales of 16 / kScaleRowBytes keys: the last one
        // of the split may hold some past its end.
        const int n = min(max(valid * S::kScaleRowBytes - (u % kUnitsPerScaleArray) * 16, 0), 16);
        const unsigned char* src = n > 0 ? cp.sc[k] : cp.sc[k] - (u % kUnitsPerScaleArray) * 16;
        mma_detail::cp_async16(dst + kScalesAt + k * 32 * 16, src, n);
      }
    }
  }
};

} // namespace mlx_qsdpa::cuda
