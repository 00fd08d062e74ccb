// Copyright © 2026 mlx-qsdpa contributors.
//
// The seam between the CPU kernel's host code (quant_sdpa_cpu.cpp: MLX,
// threads, finalize and merge) and its compute variants (kernel.cpp, compiled
// once per instruction set: x86-64-v2, -v3 and -v4, arm64 NEON, or generic).
//
// This header is plain data on raw pointers, with no MLX and no standard
// library templates: kernel.cpp is compiled with different -march flags
// into one library, and any inline or template function that two of its
// builds (or the host code) shared would be emitted once per build as a
// weak symbol, of which the linker keeps one, possibly an AVX-512 copy that
// the x86-64-v2 code then calls. Everything a variant needs is therefore
// defined in this header as `static` (one private copy per build) or inside
// the variant's own namespace.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlx_qsdpa::cpu {

// How keys are hidden from a query row (primitive.h's MaskKind, as an int so
// that this header does not need MLX).
enum MaskCode : int { kMaskNone = 0, kMaskCausal = 1, kMaskBool = 2, kMaskAdditive = 3 };

// One quantized tensor (packed words, scales, biases) as strided views of
// [B, Hkv, Lk, *].
struct QuantView {
  const uint32_t* w;
  int64_t ws[4];
  const void* scales;
  int64_t ss[4];
  const void* biases; // nullptr for the fp modes
  int64_t bs[4];
  int scale_type; // formats.h ElemType of the scales
};

// Everything about one call that the compute variants read.
struct Problem {
  int B, Hq, Hkv, Lq, Lk, D, G;
  int mode, bits, group_size; // formats.h QuantMode, element bits, group size
  float q_mult; // scale * log2(e): scores are kept in base-2 units
  const void* q;
  int q_type; // formats.h ElemType
  int64_t qs[4];
  QuantView k, v;
  int mask; // MaskCode
  const void* mask_ptr; // bool or float32, broadcast to [B, Hq, Lq, Lk]
  int64_t ms[4];
};

// One unit of work: rows [r0, r0 + nr) of (batch b, kv head kvh) against keys
// [k0, k1). Row r of a kv head is query position r / G of query head
// kvh * G + r % G.
struct Item {
  int b, kvh, r0, nr, k0, k1;
};

// What an item leaves: per row its unnormalised output o[r * D + d], the
// running maximum m[r] of its scores (base-2 units; -inf when the row saw no
// key, NaN when a visible score was NaN or +inf) and the sum l[r] of
// 2^(score - m) over its keys.
struct ItemResult {
  float* o;
  float* m;
  float* l;
};

// A compute variant. `scratch_bytes(p, max_rows)` is the per-thread scratch
// that run_item needs for items of at most `max_rows` rows; the host hands
// each thread a 64-byte aligned block of that size.
struct Variant {
  const char* name;
  size_t (*scratch_bytes)(const Problem& p, int max_rows);
  void (*run_item)(const Problem& p, const Item& item, void* scratch, const ItemResult& out);
};

// Where row r of a kv head lives.
struct RowRef {
  int h; // query head
  int i; // query position
  int limit; // keys [0, limit) are visible by position (causal), else Lk
};

static inline RowRef row_ref(const Problem& p, int kvh, int r) {
  RowRef ref;
  ref.i = r / p.G;
  ref.h = kvh * p.G + r % p.G;
  ref.limit = p.Lk;
  if (p.mask == kMaskCausal) {
    int lim = p.Lk - p.Lq + ref.i + 1;
    ref.limit = lim < 0 ? 0 : (lim > p.Lk ? p.Lk : lim);
  }
  return ref;
}

// The variants compiled into this library, best first (defined by the
// variant builds, listed by variants.cpp).
extern const Variant kVariantX86V4;
extern const Variant kVariantX86V3;
extern const Variant kVariantX86V2;
extern const Variant kVariantArm64Neon;
extern const Variant kVariantGeneric;
extern const Variant kVariantNative;

} // namespace mlx_qsdpa::cpu
