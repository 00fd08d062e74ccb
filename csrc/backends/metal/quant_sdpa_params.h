// Copyright © 2026 mlx-qsdpa contributors.
//
// The interface between the Metal kernels and the code that launches them:
// buffer and function-constant indices, the parameter structs passed with
// set_bytes, and the geometry both sides must agree on. Included by the
// kernels (MSL), by the host plan (C++, csrc/backends/metal/dispatch_plan.cpp) and by
// the simulator, so every number here exists once.
//
// Layout rule for the structs: 64-bit members first, then 32-bit ones, so
// that MSL and C++ lay them out identically (checked by static_asserts in
// dispatch_plan.cpp).
#pragma once

#include "mlx_qsdpa/formats.h"

#if !defined(__METAL_VERSION__)
#include <cstdint>
#endif

namespace qsdpa {

// ---------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------
enum DecodeGeometry : int {
  kSimdWidth = 32,
  // Simdgroups of a decode threadgroup (256 threads).
  kSimdgroups = 8,
  kThreadsPerGroup = kSimdgroups * kSimdWidth,
  // Query rows a simdgroup keeps in registers (q, running max/sum, output).
  kRowsPerSimdgroup = 4,
  // Query rows one threadgroup covers; more rows take more threadgroups.
  kRowsPerThreadgroup = kSimdgroups * kRowsPerSimdgroup,
  // The decoded K and V tiles hold kTileElems floats each (8 KiB).
  kTileElems = 2048,
  // Rows of partial results exchanged when key splits of a threadgroup
  // merge (at most kSimdgroups / 2 splits hand over kRowsPerSimdgroup rows
  // each, per row group; see quant_sdpa_decode.h).
  kMergeRows = (kSimdgroups / 2) * kRowsPerSimdgroup,
  // Simdgroups (rows) of a merge threadgroup.
  kMergeSimdgroups = 8,
};

// Keys decoded per tile for head dim D (both tiles fit in 16 KiB).
QSDPA_FUNC QSDPA_CONSTEXPR int keys_per_tile(int D) {
  return kTileElems / D;
}

// Floats of threadgroup memory a decode threadgroup needs: the K and V
// tiles, later reused for the exchange of partial results between key
// splits (kMergeRows output rows, then their max and sum).
QSDPA_FUNC QSDPA_CONSTEXPR int decode_threadgroup_floats(int D) {
  return (2 * keys_per_tile(D) * D > kMergeRows * (D + 2))
      ? 2 * keys_per_tile(D) * D
      : kMergeRows * (D + 2);
}

// Element types of queries/outputs and of float scales/biases: formats.h's
// ElemType (kElemFloat32, kElemFloat16, kElemBFloat16).

// ---------------------------------------------------------------------------
// Function constants (values set per pipeline by the host).
// ---------------------------------------------------------------------------
enum FunctionConstantIndex : int {
  kFcQueryType = 0, // int, ElemType of queries and output
  kFcKeyScaleType = 1, // int, ElemType of the float key scales and biases
  kFcValueScaleType = 2, // int, ElemType of the float value scales and biases
  kFcKeyGroupSize = 3, // int
  kFcKeyHasBiases = 4, // bool, the keys' mode has biases (affine)
  kFcCausal = 5, // bool
  kFcBoolMask = 6, // bool
  kFcFloatMask = 7, // bool, additive float32 mask
  kFcHasSinks = 8, // bool
  kFcWriteLse = 9, // bool, this launch writes lse
  kFcWriteFinal = 10, // bool, 1-pass: normalised output
  kFcWritePartials = 11, // bool, 2-pass pass 1: partial output, max, sum
  // The values' format. A decode kernel is compiled for the keys' format
  // (a row of formats.h's table); the values' decoder is picked by these
  // constants, so mixed K/V formats need no kernel per pair.
  kFcValueMode = 12, // int, QuantMode
  kFcValueBits = 13, // int
  kFcValueGroupSize = 14, // int
  kFcValueHasBiases = 15, // bool, the values' mode has biases (affine)
};

// ---------------------------------------------------------------------------
// Buffers of the decode kernel (1-pass, or pass 1 of 2).
// ---------------------------------------------------------------------------
enum DecodeBufferIndex : int {
  kDecodeQueries = 0,
  kDecodeKeys = 1,
  kDecodeKeyScales = 2,
  kDecodeKeyBiases = 3,
  kDecodeValues = 4,
  kDecodeValueScales = 5,
  kDecodeValueBiases = 6,
  kDecodeBoolMask = 7,
  kDecodeFloatMask = 8,
  kDecodeSinks = 9,
  kDecodeOut = 10,
  kDecodeLse = 11,
  kDecodePartialOut = 12,
  kDecodePartialStats = 13,
  kDecodeParams = 14,
};

// Strides are in elements of each array (uint32 words for the packed K/V,
// scale elements for scales and biases), for the axes [B, H, L, last].
struct DecodeParams {
  int64_t q_strides[4];
  int64_t k_strides[4];
  int64_t k_scale_strides[4];
  int64_t k_bias_strides[4];
  int64_t v_strides[4];
  int64_t v_scale_strides[4];
  int64_t v_bias_strides[4];
  int64_t mask_strides[4];
  int B;
  int Hq;
  int Hkv;
  int Lq;
  int Lk;
  int G; // Hq / Hkv
  int rows; // G * Lq query rows per (batch, kv head); row r = (i = r / G, g = r % G)
  int row_blocks; // threadgroups along the rows: ceil(rows / kRowsPerThreadgroup)
  int keys_per_block; // keys a threadgroup covers
  int blocks; // key blocks (1 for the 1-pass kernel)
  float scale_log2; // scale * log2(e): scores are kept in base 2
  int sink_stride; // elements between consecutive sinks
};

// ---------------------------------------------------------------------------
// Buffers of the merge kernel (pass 2 of 2).
// ---------------------------------------------------------------------------
enum MergeBufferIndex : int {
  kMergePartialOut = 0,
  kMergePartialStats = 1,
  kMergeSinks = 2,
  kMergeOut = 3,
  kMergeLse = 4,
  kMergeParams = 5,
};

// Partial results of pass 1, for output row R = (b * Hq + h) * Lq + i:
//   partial_out[R][block][D]    unnormalised output (float32)
//   partial_stats[R][block][2]  running max (base 2) and sum
struct MergeParams {
  int rows; // B * Hq * Lq
  int Hq;
  int Lq;
  int D;
  int blocks;
  int sink_stride; // elements between consecutive sinks
};

} // namespace qsdpa
