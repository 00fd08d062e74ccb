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

#include "call.h"

namespace mlx_qsdpa::cpu {

// Everything about one call that the compute variants read: the call
// itself (call.h), as the primitive describes it.
using Problem = Call;

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
  const qsdpa::RowPos pos = qsdpa::row_position(kvh, r, p.G);
  RowRef ref;
  ref.h = pos.h;
  ref.i = pos.i;
  ref.limit = p.mask == qsdpa::kMaskCausal ? qsdpa::causal_limit(p.Lq, p.Lk, pos.i) : p.Lk;
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
