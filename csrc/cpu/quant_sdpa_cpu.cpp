// Copyright © 2026 mlx-qsdpa contributors.
//
// The fused CPU kernel.
//
// Work is cut into items (batch, kv head, block of query rows, range of
// keys). An item decodes its keys in blocks of kKeyBlock rows into float32
// tiles (K and V, dequantized once and shared by every query head of the
// GQA group and every query position), then runs an online softmax in
// float32 over row tiles of kRowTile query rows. Items that cover only a part
// of the keys write an unnormalised partial output with its running max and
// sum; a second pass merges them exactly (the LSE merge). Scores live in
// base-2 units (queries are pre-multiplied by scale * log2(e)) so that the
// exponentials are exp2.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "backend.h"
#include "cpu/thread_pool.h"
#include "mlx_qsdpa/formats.h"

namespace mlx_qsdpa {

namespace cpu {

namespace {

constexpr int kKeyBlock = 64; // keys decoded per tile
constexpr int kRowTile = 4; // query rows sharing each loaded K/V value
constexpr int kRowBlock = 64; // query rows per work item at most
constexpr int kLanes = 16; // accumulator width of the dot products
constexpr int kMinKeysPerSplit = 4 * kKeyBlock;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Strides = std::array<int64_t, 4>;

Strides strides_of(const mx::array& a) {
  const auto& s = a.strides();
  return {s[0], s[1], s[2], s[3]};
}

using qsdpa::ElemType;

// One quantized tensor (packed words, scales, biases) as strided views.
struct QuantView {
  const uint32_t* w;
  Strides ws;
  const void* scales;
  Strides ss;
  const void* biases; // nullptr for the fp modes
  Strides bs;
  int group_size;
};

// Raw storage of the affine scale/bias dtypes, widened with the shared
// decoders of formats.h (bit operations, no library calls in the hot loop).
struct HalfBits {
  uint16_t bits;
};
struct BF16Bits {
  uint16_t bits;
};
inline float to_float(float x) {
  return x;
}
inline float to_float(HalfBits x) {
  return qsdpa::half_bits_to_float(x.bits);
}
inline float to_float(BF16Bits x) {
  return qsdpa::bf16_bits_to_float(x.bits);
}

// 16-lane vectors (GCC/Clang vector extensions: AVX-512 registers on x86
// with -march=native, pairs or quads of registers elsewhere).
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));

// Codes of elements [kBase, kBase + 16) of a run of 32 elements whose BITS
// packed words are the first lanes of `w` (at most 8: BITS <= 8). Word and shift of each lane come
// from formats.h (element_word / element_shift), so the layout is defined
// once; they are compile-time constants, so this is two lane permutations,
// shifts and a mask, without a scalar extraction per element.
template <int BITS, int kBase, size_t... L>
inline u32x16 unpack16(u32x8 w, std::index_sequence<L...>) {
  constexpr u32x16 sh = {uint32_t(qsdpa::element_shift(kBase + int(L), BITS))...};
  u32x16 v = __builtin_shufflevector(w, w, qsdpa::element_word(kBase + int(L), BITS)...) >> sh;
  if constexpr (BITS == 3 || BITS == 5 || BITS == 6) {
    // Elements straddling two words take their high bits from the next word.
    u32x16 hi = __builtin_shufflevector(w, w, (qsdpa::element_word(kBase + int(L), BITS) + 1)...);
    v |= (hi << 1) << (31 - sh);
  }
  return v & uint32_t((1u << BITS) - 1u);
}

// Decoded values (before the scale) of every code of the fp element types,
// tabulated once from formats.h.
template <int MODE>
const float* code_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      t[i] = qsdpa::decode_code<MODE>(i);
    }
    return t;
  }();
  return table.data();
}

// Decodes keys [j0, j0 + nk) of (batch b, kv head h) into dst[nk][D].
using DecodeFn = void (*)(const QuantView&, int, int, int, int, int, float*);

template <int MODE, int BITS, typename ST>
void decode_block(
    const QuantView& qv,
    int b,
    int h,
    int j0,
    int nk,
    int D,
    float* dst) {
  // A step covers 16 elements: they share one scale (every group size is a
  // multiple of 16), and the 32-element run holding them fills exactly
  // BITS words.
  const int gs = qv.group_size;
  const int words_per_row = D * BITS / 32;
  const float* table = MODE == qsdpa::kAffine ? nullptr : code_table<MODE>();
  // Each packed row is copied into a zero-padded local buffer first: then
  // a whole 8-word vector can be loaded at any run without reading past the
  // end of the cache, and strided rows are handled by the same copy.
  alignas(64) uint32_t row_buf[256 * 8 / 32 + 8] = {};
  for (int j = 0; j < nk; ++j) {
    const int64_t key = j0 + j;
    const uint32_t* w = qv.w + b * qv.ws[0] + h * qv.ws[1] + key * qv.ws[2];
    if (qv.ws[3] == 1) {
      std::memcpy(row_buf, w, sizeof(uint32_t) * words_per_row);
    } else {
      for (int t = 0; t < words_per_row; ++t) {
        row_buf[t] = w[t * qv.ws[3]];
      }
    }
    const ST* sp = static_cast<const ST*>(qv.scales) + b * qv.ss[0] +
        h * qv.ss[1] + key * qv.ss[2];
    const ST* bp = nullptr;
    if constexpr (MODE == qsdpa::kAffine) {
      bp = static_cast<const ST*>(qv.biases) + b * qv.bs[0] + h * qv.bs[1] +
          key * qv.bs[2];
    }
    float* out = dst + static_cast<int64_t>(j) * D;
    for (int g = 0; g < D / gs; ++g) {
      float scale, bias = 0.0f;
      if constexpr (MODE == qsdpa::kAffine) {
        scale = to_float(sp[g * qv.ss[3]]);
        bias = to_float(bp[g * qv.bs[3]]);
      } else {
        scale = qsdpa::decode_fp_scale<MODE>(sp[g * qv.ss[3]]);
      }
      for (int e0 = g * gs; e0 < (g + 1) * gs; e0 += 16) {
        // The 32-element run holding e0 (BITS words), and which half.
        u32x8 words;
        std::memcpy(&words, row_buf + (e0 / 32) * BITS, sizeof(words));
        const u32x16 codes = (e0 % 32)
            ? unpack16<BITS, 16>(words, std::make_index_sequence<16>())
            : unpack16<BITS, 0>(words, std::make_index_sequence<16>());
        f32x16 vals;
        if constexpr (MODE == qsdpa::kAffine) {
          vals = __builtin_convertvector(codes, f32x16) * scale + bias;
        } else {
          for (int l = 0; l < 16; ++l) {
            vals[l] = table[codes[l]] * scale;
          }
        }
        std::memcpy(out + e0, &vals, sizeof(vals));
      }
    }
  }
}

template <int MODE, int BITS>
DecodeFn pick_decoder_for_scale(ElemType st) {
  if constexpr (MODE == qsdpa::kAffine) {
    switch (st) {
      case qsdpa::kElemFloat32:
        return decode_block<MODE, BITS, float>;
      case qsdpa::kElemFloat16:
        return decode_block<MODE, BITS, HalfBits>;
      default:
        return decode_block<MODE, BITS, BF16Bits>;
    }
  } else {
    return decode_block<MODE, BITS, uint8_t>;
  }
}

DecodeFn pick_decoder(qsdpa::QuantMode mode, int bits, ElemType st) {
  switch (mode) {
    case qsdpa::kMxfp4:
      return pick_decoder_for_scale<qsdpa::kMxfp4, 4>(st);
    case qsdpa::kMxfp8:
      return pick_decoder_for_scale<qsdpa::kMxfp8, 8>(st);
    case qsdpa::kNvfp4:
      return pick_decoder_for_scale<qsdpa::kNvfp4, 4>(st);
    default:
      break;
  }
  switch (bits) {
    case 1:
      return pick_decoder_for_scale<qsdpa::kAffine, 1>(st);
    case 2:
      return pick_decoder_for_scale<qsdpa::kAffine, 2>(st);
    case 3:
      return pick_decoder_for_scale<qsdpa::kAffine, 3>(st);
    case 4:
      return pick_decoder_for_scale<qsdpa::kAffine, 4>(st);
    case 5:
      return pick_decoder_for_scale<qsdpa::kAffine, 5>(st);
    case 6:
      return pick_decoder_for_scale<qsdpa::kAffine, 6>(st);
    default:
      return pick_decoder_for_scale<qsdpa::kAffine, 8>(st);
  }
}

// ---------------------------------------------------------------------------
// Float helpers of the softmax loop.
// ---------------------------------------------------------------------------

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, f32x16 v) {
  std::memcpy(p, &v, sizeof(v));
}

// Sum of the 16 lanes as a tree (halving the vector), not a serial chain.
inline float hsum(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// 2^x for the 16 lanes of x <= 0 (scores minus their running max): lanes at
// or below -126 (and -inf, masked keys) give exactly 0. Truncation (which
// rounds up for x <= 0) splits x = n + f with f in (-1, 0]; 2^f is a degree-6
// Taylor series of e^y, y = (f + 1/2) ln 2 in (-0.35, 0.35] (truncation error
// ~1.2e-7), times 2^-1/2.
inline f32x16 exp2_nonpos(f32x16 x) {
  const i32x16 live = x > -126.0f; // -1 where the result is not 0
  const f32x16 xc = x > -126.0f ? x : f32x16{} - 126.0f;
  const i32x16 n = __builtin_convertvector(xc, i32x16);
  const f32x16 y = (xc - __builtin_convertvector(n, f32x16) + 0.5f) * kLn2;
  f32x16 p = y * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const i32x16 two_n = (n + 127) << 23;
  f32x16 two_nf;
  std::memcpy(&two_nf, &two_n, sizeof(two_nf));
  const f32x16 r = p * two_nf * 0.70710678118654752f;
  i32x16 ri;
  std::memcpy(&ri, &r, sizeof(ri));
  ri &= live;
  f32x16 out;
  std::memcpy(&out, &ri, sizeof(out));
  return out;
}

inline f32x16 max16(f32x16 a, f32x16 b) {
  return a > b ? a : b;
}

inline float hmax(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) {
    m = std::max(m, v[i]);
  }
  return m;
}

static_assert(kRowTile == 4, "dot_tile and pv_tile are written for 4 rows");

// S[t][j] = dot(Q[t], K[j]) for t < 4, j < nk. Two keys per step share the
// query loads; 8 accumulators stay in registers.
inline void dot_tile(const float* Q, const float* K, int nk, int D, float* S) {
  const float *q0 = Q, *q1 = Q + D, *q2 = Q + 2 * D, *q3 = Q + 3 * D;
  int j = 0;
  for (; j + 2 <= nk; j += 2) {
    const float* ka = K + static_cast<int64_t>(j) * D;
    const float* kb = ka + D;
    f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    for (int d = 0; d < D; d += kLanes) {
      const f32x16 x = load16(ka + d), y = load16(kb + d);
      const f32x16 r0 = load16(q0 + d), r1 = load16(q1 + d), r2 = load16(q2 + d), r3 = load16(q3 + d);
      a0 += r0 * x, a1 += r1 * x, a2 += r2 * x, a3 += r3 * x;
      b0 += r0 * y, b1 += r1 * y, b2 += r2 * y, b3 += r3 * y;
    }
    S[j] = hsum(a0), S[kKeyBlock + j] = hsum(a1), S[2 * kKeyBlock + j] = hsum(a2),
    S[3 * kKeyBlock + j] = hsum(a3);
    S[j + 1] = hsum(b0), S[kKeyBlock + j + 1] = hsum(b1), S[2 * kKeyBlock + j + 1] = hsum(b2),
    S[3 * kKeyBlock + j + 1] = hsum(b3);
  }
  for (; j < nk; ++j) {
    const float* ka = K + static_cast<int64_t>(j) * D;
    f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int d = 0; d < D; d += kLanes) {
      const f32x16 x = load16(ka + d);
      a0 += load16(q0 + d) * x, a1 += load16(q1 + d) * x;
      a2 += load16(q2 + d) * x, a3 += load16(q3 + d) * x;
    }
    S[j] = hsum(a0), S[kKeyBlock + j] = hsum(a1), S[2 * kKeyBlock + j] = hsum(a2),
    S[3 * kKeyBlock + j] = hsum(a3);
  }
}

// O[t] += sum_j P[t][j] * V[j] for t < 4; the 4 output chunks stay in
// registers over the whole key block.
inline void pv_tile(const float* P, const float* V, int nk, int D, float* O) {
  for (int d = 0; d < D; d += kLanes) {
    f32x16 o0 = load16(O + d), o1 = load16(O + D + d), o2 = load16(O + 2 * D + d),
           o3 = load16(O + 3 * D + d);
    for (int j = 0; j < nk; ++j) {
      const f32x16 v = load16(V + static_cast<int64_t>(j) * D + d);
      o0 += P[j] * v, o1 += P[kKeyBlock + j] * v;
      o2 += P[2 * kKeyBlock + j] * v, o3 += P[3 * kKeyBlock + j] * v;
    }
    store16(O + d, o0), store16(O + D + d, o1), store16(O + 2 * D + d, o2),
        store16(O + 3 * D + d, o3);
  }
}

inline float load_elem(const void* p, int64_t i, ElemType t) {
  switch (t) {
    case qsdpa::kElemFloat32:
      return static_cast<const float*>(p)[i];
    case qsdpa::kElemFloat16:
      return qsdpa::half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case qsdpa::kElemBFloat16:
      return qsdpa::bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const uint8_t*>(p)[i];
  }
}

inline void store_elem(void* p, int64_t i, float x, ElemType t) {
  switch (t) {
    case qsdpa::kElemFloat32:
      static_cast<float*>(p)[i] = x;
      break;
    case qsdpa::kElemFloat16:
      static_cast<mx::float16_t*>(p)[i] = mx::float16_t(x);
      break;
    default:
      static_cast<mx::bfloat16_t*>(p)[i] = mx::bfloat16_t(x);
      break;
  }
}

// ---------------------------------------------------------------------------
// The problem, the work split and one work item.
// ---------------------------------------------------------------------------

struct Problem {
  int B, Hq, Hkv, Lq, Lk, D, G;
  float q_mult; // scale * log2(e)
  const void* q;
  ElemType q_type;
  Strides qs;
  QuantView k, v;
  DecodeFn decode_k, decode_v;
  MaskKind mask;
  const void* mask_ptr;
  Strides ms;
  const float* sinks;
  void* out; // row contiguous [B, Hq, Lq, D]
  ElemType out_type;
  float* lse; // [B, Hq, Lq] or nullptr

  // Split of the work.
  int rows; // G * Lq query rows per (batch, kv head); row r = (i = r / G, g = r % G)
  int row_block; // rows per item
  int n_row_blocks;
  int keys_per_split; // a multiple of kKeyBlock
  int n_splits;
};

// Where row r of (b, kvh) lives.
struct RowRef {
  int h; // query head
  int i; // query position
  int limit; // keys [0, limit) are visible (causal); Lk otherwise
};

inline RowRef row_ref(const Problem& p, int kvh, int r) {
  RowRef ref;
  ref.i = r / p.G;
  ref.h = kvh * p.G + r % p.G;
  ref.limit = p.Lk;
  if (p.mask == MaskKind::Causal) {
    ref.limit = std::clamp(p.Lk - p.Lq + ref.i + 1, 0, p.Lk);
  }
  return ref;
}

// Per-thread scratch, reused across items and calls.
struct Scratch {
  std::vector<float> kf, vf, q, o, m, l, s;
  std::vector<int> limit;
  void ensure(int D, int rows_padded) {
    kf.resize(static_cast<size_t>(kKeyBlock) * D);
    vf.resize(static_cast<size_t>(kKeyBlock) * D);
    q.resize(static_cast<size_t>(rows_padded) * D);
    o.resize(static_cast<size_t>(rows_padded) * D);
    m.resize(rows_padded);
    l.resize(rows_padded);
    limit.resize(rows_padded);
    s.resize(kRowTile * kKeyBlock);
  }
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// Normalises one row (adding the sink) and writes out and lse.
void finalize_row(const Problem& p, int b, const RowRef& ref, const float* o, float m, float l) {
  if (p.sinks) {
    float s2 = p.sinks[ref.h] * kLog2e;
    float mm = std::max(m, s2);
    float c = (m == kNegInf) ? 0.0f : std::exp2(m - mm);
    l = l * c + std::exp2(s2 - mm);
    m = mm;
    // o is rescaled below through `c`.
    const float inv = 1.0f / l;
    int64_t base = ((static_cast<int64_t>(b) * p.Hq + ref.h) * p.Lq + ref.i) * p.D;
    for (int d = 0; d < p.D; ++d) {
      store_elem(p.out, base + d, o[d] * c * inv, p.out_type);
    }
    if (p.lse) {
      p.lse[(static_cast<int64_t>(b) * p.Hq + ref.h) * p.Lq + ref.i] =
          (m + std::log2(l)) * kLn2;
    }
    return;
  }
  int64_t base = ((static_cast<int64_t>(b) * p.Hq + ref.h) * p.Lq + ref.i) * p.D;
  const bool empty = !(l > 0.0f);
  const float inv = empty ? 0.0f : 1.0f / l;
  for (int d = 0; d < p.D; ++d) {
    store_elem(p.out, base + d, empty ? 0.0f : o[d] * inv, p.out_type);
  }
  if (p.lse) {
    p.lse[(static_cast<int64_t>(b) * p.Hq + ref.h) * p.Lq + ref.i] =
        empty ? kNegInf : (m + std::log2(l)) * kLn2;
  }
}

// Partial results of split items: o [rows][D], then m [rows], l [rows].
struct Partials {
  std::vector<float> data;
  int64_t item_stride = 0;
};

void run_item(const Problem& p, int item, Partials& partials) {
  const int sp = item % p.n_splits;
  int rest = item / p.n_splits;
  const int rb = rest % p.n_row_blocks;
  rest /= p.n_row_blocks;
  const int kvh = rest % p.Hkv;
  const int b = rest / p.Hkv;

  const int r0 = rb * p.row_block;
  const int nr = std::min(p.row_block, p.rows - r0);
  const int nr_pad = (nr + kRowTile - 1) / kRowTile * kRowTile;
  const int D = p.D;
  const int k0 = sp * p.keys_per_split;
  const int k1 = std::min(p.Lk, k0 + p.keys_per_split);

  Scratch& sc = thread_scratch();
  sc.ensure(D, nr_pad);
  float* Q = sc.q.data();
  float* O = sc.o.data();
  int key_end = 0; // the last visible key of any row, + 1
  for (int r = 0; r < nr_pad; ++r) {
    float* qr = Q + static_cast<int64_t>(r) * D;
    std::fill(O + static_cast<int64_t>(r) * D, O + static_cast<int64_t>(r + 1) * D, 0.0f);
    sc.m[r] = kNegInf;
    sc.l[r] = 0.0f;
    if (r < nr) {
      RowRef ref = row_ref(p, kvh, r0 + r);
      sc.limit[r] = ref.limit;
      key_end = std::max(key_end, ref.limit);
      int64_t qb = b * p.qs[0] + ref.h * p.qs[1] + ref.i * p.qs[2];
      for (int d = 0; d < D; ++d) {
        qr[d] = load_elem(p.q, qb + d * p.qs[3], p.q_type) * p.q_mult;
      }
    } else {
      sc.limit[r] = 0; // padding row: sees nothing
      std::fill(qr, qr + D, 0.0f);
    }
  }

  const int kend = std::min(k1, key_end);
  float* S = sc.s.data();
  for (int j0 = k0; j0 < kend; j0 += kKeyBlock) {
    const int nk = std::min(kKeyBlock, kend - j0);
    p.decode_k(p.k, b, kvh, j0, nk, D, sc.kf.data());
    p.decode_v(p.v, b, kvh, j0, nk, D, sc.vf.data());
    for (int t0 = 0; t0 < nr_pad; t0 += kRowTile) {
      int tile_limit = 0;
      for (int t = 0; t < kRowTile; ++t) {
        tile_limit = std::max(tile_limit, sc.limit[t0 + t]);
      }
      if (tile_limit <= j0) {
        continue; // every row of the tile is causally masked here
      }
      dot_tile(Q + static_cast<int64_t>(t0) * D, sc.kf.data(), nk, D, S);
      bool any = false;
      for (int t = 0; t < kRowTile; ++t) {
        float* st = S + t * kKeyBlock;
        const int r = t0 + t;
        const int lim = sc.limit[r] - j0; // keys j < lim visible
        for (int j = std::max(lim, 0); j < nk; ++j) {
          st[j] = kNegInf;
        }
        if ((p.mask == MaskKind::Bool || p.mask == MaskKind::Additive) && r < nr) {
          RowRef ref = row_ref(p, kvh, r0 + r);
          int64_t mb = b * p.ms[0] + ref.h * p.ms[1] + ref.i * p.ms[2];
          if (p.mask == MaskKind::Bool) {
            const bool* mp = static_cast<const bool*>(p.mask_ptr) + mb;
            for (int j = 0; j < nk; ++j) {
              if (!mp[(j0 + j) * p.ms[3]]) {
                st[j] = kNegInf;
              }
            }
          } else {
            const float* mp = static_cast<const float*>(p.mask_ptr) + mb;
            for (int j = 0; j < nk; ++j) {
              st[j] += mp[(j0 + j) * p.ms[3]] * kLog2e;
            }
          }
        }
        // Keys past nk of a short last block are -inf (probability 0), so
        // the row is always processed as whole 16-lane vectors.
        for (int j = nk; j < kKeyBlock; ++j) {
          st[j] = kNegInf;
        }
        f32x16 vmax = load16(st);
        for (int j = 16; j < kKeyBlock; j += 16) {
          vmax = max16(vmax, load16(st + j));
        }
        const float bm = hmax(vmax);
        const float m_new = std::max(sc.m[r], bm);
        if (m_new == kNegInf || std::isnan(m_new)) {
          // Nothing visible yet (or a NaN additive mask, which stays
          // excluded): probabilities are zero, state unchanged.
          std::fill(st, st + kKeyBlock, 0.0f);
          continue;
        }
        const float corr = sc.m[r] == kNegInf ? 0.0f : std::exp2(sc.m[r] - m_new);
        f32x16 vsum = {};
        for (int j = 0; j < kKeyBlock; j += 16) {
          const f32x16 e = exp2_nonpos(load16(st + j) - m_new);
          store16(st + j, e);
          vsum += e;
        }
        const float sum = hsum(vsum);
        sc.l[r] = sc.l[r] * corr + sum;
        sc.m[r] = m_new;
        if (corr != 1.0f) {
          float* orow = O + static_cast<int64_t>(r) * D;
          for (int d = 0; d < D; ++d) {
            orow[d] *= corr;
          }
        }
        any = true;
      }
      if (any) {
        pv_tile(S, sc.vf.data(), nk, D, O + static_cast<int64_t>(t0) * D);
      }
    }
  }

  if (p.n_splits == 1) {
    for (int r = 0; r < nr; ++r) {
      finalize_row(p, b, row_ref(p, kvh, r0 + r), O + static_cast<int64_t>(r) * D, sc.m[r], sc.l[r]);
    }
    return;
  }
  float* dst = partials.data.data() + item * partials.item_stride;
  std::memcpy(dst, O, sizeof(float) * nr * D);
  std::memcpy(dst + static_cast<int64_t>(p.row_block) * D, sc.m.data(), sizeof(float) * nr);
  std::memcpy(dst + static_cast<int64_t>(p.row_block) * (D + 1), sc.l.data(), sizeof(float) * nr);
}

// Exact merge of the split partials of one (b, kvh, row block).
void merge_rows(const Problem& p, int group, const Partials& partials) {
  const int rb = group % p.n_row_blocks;
  const int kvh = (group / p.n_row_blocks) % p.Hkv;
  const int b = group / (p.n_row_blocks * p.Hkv);
  const int r0 = rb * p.row_block;
  const int nr = std::min(p.row_block, p.rows - r0);
  const int D = p.D;
  std::vector<float> o(D);
  for (int r = 0; r < nr; ++r) {
    float m = kNegInf;
    for (int sp = 0; sp < p.n_splits; ++sp) {
      const float* src = partials.data.data() + (static_cast<int64_t>(group) * p.n_splits + sp) * partials.item_stride;
      m = std::max(m, src[static_cast<int64_t>(p.row_block) * D + r]);
    }
    std::fill(o.begin(), o.end(), 0.0f);
    float l = 0.0f;
    if (m != kNegInf) {
      for (int sp = 0; sp < p.n_splits; ++sp) {
        const float* src = partials.data.data() + (static_cast<int64_t>(group) * p.n_splits + sp) * partials.item_stride;
        const float ms = src[static_cast<int64_t>(p.row_block) * D + r];
        if (ms == kNegInf) {
          continue;
        }
        const float c = std::exp2(ms - m);
        l += src[static_cast<int64_t>(p.row_block) * (D + 1) + r] * c;
        const float* os = src + static_cast<int64_t>(r) * D;
        for (int d = 0; d < D; ++d) {
          o[d] += os[d] * c;
        }
      }
    }
    finalize_row(p, b, row_ref(p, kvh, r0 + r), o.data(), m, l);
  }
}

void run(Problem p) {
  ThreadPool& pool = ThreadPool::instance();
  p.rows = p.G * p.Lq;
  p.row_block = std::min(p.rows, kRowBlock);
  p.n_row_blocks = p.rows == 0 ? 0 : (p.rows + p.row_block - 1) / p.row_block;
  const int base_items = p.B * p.Hkv * p.n_row_blocks;
  if (base_items == 0) {
    return;
  }
  // Split the keys until there are a few items per thread, keeping at least
  // kMinKeysPerSplit keys per item.
  const int want = 4 * pool.size();
  int n_splits = std::max(1, (want + base_items - 1) / base_items);
  n_splits = std::min(n_splits, std::max(1, (p.Lk + kMinKeysPerSplit - 1) / kMinKeysPerSplit));
  int kps = (p.Lk + n_splits - 1) / n_splits;
  kps = std::max(kKeyBlock, (kps + kKeyBlock - 1) / kKeyBlock * kKeyBlock);
  p.keys_per_split = kps;
  p.n_splits = std::max(1, (p.Lk + kps - 1) / kps);

  Partials partials;
  if (p.n_splits > 1) {
    partials.item_stride = static_cast<int64_t>(p.row_block) * (p.D + 2);
    partials.data.resize(static_cast<size_t>(base_items) * p.n_splits * partials.item_stride);
  }
  pool.parallel_for(base_items * p.n_splits, [&](int item) { run_item(p, item, partials); });
  if (p.n_splits > 1) {
    pool.parallel_for(base_items, [&](int g) { merge_rows(p, g, partials); });
  }
}

QuantView quant_view(const mx::array& w, const mx::array& s, const mx::array* b, int gs) {
  QuantView v;
  v.w = w.data<uint32_t>();
  v.ws = strides_of(w);
  v.scales = s.data<void>();
  v.ss = strides_of(s);
  v.biases = b ? b->data<void>() : nullptr;
  v.bs = b ? strides_of(*b) : Strides{0, 0, 0, 0};
  v.group_size = gs;
  return v;
}

} // namespace
} // namespace cpu

void eval_cpu_kernel(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream) {
  InputSlots in(c);
  const auto& q = inputs[in.q];
  auto& out = outputs[0];

  cpu::Problem p{};
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.Lq = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = inputs[in.k].shape(1);
  p.Lk = inputs[in.k].shape(2);
  p.G = p.Hq / p.Hkv;
  p.q_mult = c.scale * cpu::kLog2e;
  p.q = q.data<void>();
  p.q_type = elem_type(q.dtype());
  p.qs = cpu::strides_of(q);
  const mx::array* kb = in.k_biases >= 0 ? &inputs[in.k_biases] : nullptr;
  const mx::array* vb = in.v_biases >= 0 ? &inputs[in.v_biases] : nullptr;
  p.k = cpu::quant_view(inputs[in.k], inputs[in.k_scales], kb, c.group_size);
  p.v = cpu::quant_view(inputs[in.v], inputs[in.v_scales], vb, c.group_size);
  p.decode_k = cpu::pick_decoder(c.mode, c.bits, elem_type(inputs[in.k_scales].dtype()));
  p.decode_v = cpu::pick_decoder(c.mode, c.bits, elem_type(inputs[in.v_scales].dtype()));
  p.mask = c.mask;
  if (in.mask >= 0) {
    p.mask_ptr = inputs[in.mask].data<void>();
    p.ms = cpu::strides_of(inputs[in.mask]);
  }
  p.sinks = in.sinks >= 0 ? inputs[in.sinks].data<float>() : nullptr;
  p.out = out.data<void>();
  p.out_type = elem_type(out.dtype());
  p.lse = c.return_lse ? outputs[1].data<float>() : nullptr;

  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& o : outputs) {
    encoder.set_output_array(o);
  }
  // The inputs stay alive until the task ran: the lambda holds them.
  encoder.dispatch([p, keep = inputs]() { cpu::run(p); });
}

} // namespace mlx_qsdpa
