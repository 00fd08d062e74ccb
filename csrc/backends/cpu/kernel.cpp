// Copyright © 2026 mlx-qsdpa contributors.
//
// The CPU kernel's compute, compiled once per instruction set into one
// library (kernel.h says why everything here is private to the build). CMake
// defines QSDPA_CPU_VARIANT (the Variant object this build defines) and
// QSDPA_CPU_VARIANT_NAME, and passes the target's -march flags; the vector
// width follows from the target: 16 floats with AVX-512, 8 with AVX2, 4 with
// SSE4 or NEON.
//
// Per block of keys, an item takes one of two paths.
//
// Items of few query rows (decoding: the rows of a GQA group at one or a few
// positions) take the fused path: the block's key words are transposed
// (keys along the vector lanes; one 32-bit word holds 4 to 32 elements, so
// this moves little) and its value rows kept in "value order"; then, per
// tile of up to 8 query rows, each vector of codes goes from the words to
// the FMAs in registers, and a group's scale and bias are applied once per
// group (the scores as s * (q . c) + b * sum(q), the outputs as (p * s) . c
// plus sum(p * b)), with the masks and the online softmax between the two.
//
// Items of many rows (prefill) decode each block once into float tiles,
// Kt[D][kb] (keys along the lanes) and Vf[kb][D], which every tile of 4 rows
// then reads: S = Q Kt register-blocked with the scores of W keys per
// accumulator (no horizontal sums), the masks, the online softmax, then
// O += P Vf, register-blocked over D.
//
// Scores are in base-2 units (queries are pre-multiplied by scale * log2 e),
// so the exponentials are exp2. A block's staged or decoded K and V serve
// every query row of the item.
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__F16C__) || defined(__AVX2__) || defined(__SSSE3__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define QSDPA_FUNC static inline
#define QSDPA_HOST_FUNC static inline
#include "mlx_qsdpa/formats.h"

#include "backends/cpu/kernel.h"

#if !defined(QSDPA_CPU_VARIANT) || !defined(QSDPA_CPU_VARIANT_NS)
#error "QSDPA_CPU_VARIANT and QSDPA_CPU_VARIANT_NS must name this build's Variant and namespace"
#endif

namespace mlx_qsdpa::cpu {

// The build's own namespace names its functions after the variant in the
// library's symbols (tests/test_cpu_isa.py reads them).
namespace QSDPA_CPU_VARIANT_NS {
namespace {

#if defined(__AVX512F__)
constexpr int W = 16; // floats per vector register
constexpr int kQkVecs = 2; // key vectors per score tile
constexpr int kPvVecs = 2; // head-dim vectors per output tile
#elif defined(__AVX2__)
constexpr int W = 8;
constexpr int kQkVecs = 2;
constexpr int kPvVecs = 2;
#elif defined(__aarch64__)
constexpr int W = 4; // 32 NEON registers: larger tiles
constexpr int kQkVecs = 4;
constexpr int kPvVecs = 4;
#else
constexpr int W = 4;
constexpr int kQkVecs = 2;
constexpr int kPvVecs = 2;
#endif
constexpr int kRowTile = 4; // query rows per tile of the float-tile path
constexpr int kMaxKeyBlock = 64;
// The fused path (items of at most kFusedMaxRows rows: decoding) runs on
// targets with FMA and three-operand arithmetic (AVX2, AVX-512, NEON): with
// SSE's two-operand code the compiler keeps more codes live than its 16
// registers hold. Its tiles have up to kFusedRows rows and kChains
// accumulators (rows x vectors): enough independent FMA chains to cover the
// FMA latency.
#if defined(__AVX2__) || defined(__aarch64__)
constexpr int kFusedMaxRows = 16;
#else
constexpr int kFusedMaxRows = 0;
#endif
constexpr int kChains = 8;
constexpr int kFusedRows = 8;
// The fused path's key block: kChains vectors of keys, whatever D (it keeps
// no decoded tile); a constant, so that the offsets of its loops are too.
constexpr int kFusedKb = kChains * W;
// Whether the fused loops read their query and probability operands as
// vectors stored already broadcast: AVX2 has no broadcast operand in its
// FMAs, and a separate broadcast costs an instruction per FMA pair.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool kSplatOperands = true;
#else
constexpr bool kSplatOperands = false;
#endif
constexpr int kOperandFloats = kSplatOperands ? W : 1; // floats per operand

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

constexpr float kInf = __builtin_inff();
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vu loadu(const uint32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) {
  std::memcpy(p, &v, sizeof(v));
}
inline vf splat(float x) {
  // x - 0 is x for every x, so this compiles to a bare broadcast (0 + x is
  // not: 0 + -0 is +0, and the addition would stay).
  return x - vf{};
}
inline vu select(vi mask, vu a, vu b) {
  return (vu(mask) & a) | (~vu(mask) & b);
}
template <int... I>
inline vu interleave_lo(vu a, vu b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, (I / 2 + (I % 2) * W)...);
}
template <int... I>
inline vu interleave_hi(vu a, vu b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, (W / 2 + I / 2 + (I % 2) * W)...);
}
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) {
    s += v[i];
  }
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) {
    m = v[i] > m ? v[i] : m;
  }
  return m;
}
constexpr int imin(int a, int b) {
  return a < b ? a : b;
}
constexpr int imax(int a, int b) {
  return a > b ? a : b;
}

// 2^x for lanes x <= 0 (scores minus their running maximum); lanes at or
// below -126, and -inf (masked keys), give exactly 0. Truncation (which
// rounds up for x <= 0) splits x = n + f with f in (-1, 0]; 2^f is a
// degree-6 Taylor series of e^y, y = (f + 1/2) ln 2 in (-0.35, 0.35]
// (truncation error ~1.2e-7), times 2^-1/2.
inline vf exp2_nonpos(vf x) {
  const vi live = x > -126.0f;
  const vf xc = x > -126.0f ? x : splat(-126.0f);
  const vi n = __builtin_convertvector(xc, vi);
  const vf y = (xc - __builtin_convertvector(n, vf) + 0.5f) * kLn2;
  vf p = y * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const vf two_n = vf((n + 127) << 23);
  const vf r = p * two_n * 0.70710678118654752f;
  return vf(vi(r) & live);
}

// ---------------------------------------------------------------------------
// Decoding: element codes to values (formats.h defines each format; these
// are its vector forms, checked code by code by tests/test_decode_codes.py).
// ---------------------------------------------------------------------------

// The five encodings of a scale: the affine scales' float dtypes and the fp
// modes' 8-bit codes.
enum ScaleKind : int { kScaleF32, kScaleF16, kScaleBF16, kScaleE8M0, kScaleE4M3 };

// float16 bits to float: the instruction where the target has one.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 x;
  std::memcpy(&x, &h, sizeof(x));
  return x;
#else
  return qsdpa::half_bits_to_float(h);
#endif
}

template <int SK>
constexpr int64_t scale_bytes() {
  return SK == kScaleF32 ? 4 : (SK == kScaleF16 || SK == kScaleBF16) ? 2 : 1;
}

template <int SK>
inline float scale_at(const void* p, int64_t i) {
  if constexpr (SK == kScaleF32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (SK == kScaleF16) {
    return half_to_float(static_cast<const uint16_t*>(p)[i]);
  } else if constexpr (SK == kScaleBF16) {
    return qsdpa::bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  } else if constexpr (SK == kScaleE8M0) {
    return qsdpa::e8m0_to_float(static_cast<const uint8_t*>(p)[i]);
  } else {
    return qsdpa::fp8_e4m3_to_float(static_cast<const uint8_t*>(p)[i]);
  }
}

// Levels [FIRST, FIRST + W) of the Gaussian codebook of BITS bits, as a
// vector (lanes past the last level repeat it).
template <int BITS, int FIRST, int... L>
inline vf gaussian_levels(std::integer_sequence<int, L...>) {
  return vf{qsdpa::gaussian_code_to_float(uint32_t(imin(FIRST + L, (1 << BITS) - 1)), BITS)...};
}

// Levels [FIRST, FIRST + N) of the Gaussian codebook of BITS bits picked by
// the low log2(N) bits of each code: a tree of N - 1 lane selects, one bit
// per level of the tree, for targets without a variable register permute
// (lane-by-lane table reads go through the stack).
template <int BITS, int FIRST, int N>
inline vf gaussian_select(vu c) {
  if constexpr (N == 1) {
    return splat(qsdpa::gaussian_code_to_float(uint32_t(FIRST), BITS));
  } else {
    const vi upper = vi((c & uint32_t(N / 2)) != 0u);
    return vf(select(upper, vu(gaussian_select<BITS, FIRST + N / 2, N / 2>(c)),
                     vu(gaussian_select<BITS, FIRST, N / 2>(c))));
  }
}

#if (defined(__SSSE3__) || defined(__aarch64__)) && !defined(__AVX2__)
// The same for 4-lane targets with a byte table lookup (pshufb, tbl): each
// table register holds 4 levels; a code's low two bits pick its float's
// bytes in every table, its higher bits the table (a blend per bit).
template <int BITS, int FIRST>
inline vu gaussian_table() {
  return vu(gaussian_levels<BITS, FIRST>(std::make_integer_sequence<int, W>()));
}

inline vu byte_lookup(vu table, vu idx) {
#if defined(__aarch64__)
  return vu(vqtbl1q_u8(uint8x16_t(table), uint8x16_t(idx)));
#else
  return vu(_mm_shuffle_epi8(__m128i(table), __m128i(idx)));
#endif
}

template <int BITS>
inline vf gaussian_bytes(vu c) {
  // Byte indices 4 * (c & 3) + {0, 1, 2, 3} of each lane's float.
  const vu low = (c & 3u) << 2u;
  const vu idx = byte_lookup(low, vu{0x00000000u, 0x04040404u, 0x08080808u, 0x0c0c0c0cu}) + 0x03020100u;
  const vu t0 = byte_lookup(gaussian_table<BITS, 0>(), idx);
  if constexpr (BITS == 2) {
    return vf(t0);
  } else {
    const vi b2 = vi((c & 4u) != 0u);
    const vu t1 = select(b2, byte_lookup(gaussian_table<BITS, 4>(), idx), t0);
    if constexpr (BITS == 3) {
      return vf(t1);
    } else {
      const vu t2 = select(b2, byte_lookup(gaussian_table<BITS, 12>(), idx),
                           byte_lookup(gaussian_table<BITS, 8>(), idx));
      return vf(select(vi((c & 8u) != 0u), t2, t1));
    }
  }
}
#endif

// Values of W element codes (before the scale), as formats.h's decode_code.
template <int MODE, int BITS>
inline vf decode_codes(vu c) {
  if constexpr (qsdpa::mode_code_kind(MODE) == qsdpa::kCodeUnsigned) {
    return __builtin_convertvector(vi(c), vf);
  } else if constexpr (qsdpa::mode_code_kind(MODE) == qsdpa::kCodeGaussian) {
    // A permute of a register holding the levels (it reads the low bits of
    // each index): every code at once where they fit one register, else
    // the two halves and a blend on the code's top bit.
    constexpr auto kLanes = std::make_integer_sequence<int, W>();
#if defined(__AVX512F__)
    return vf(_mm512_permutexvar_ps(__m512i(c), __m512(gaussian_levels<BITS, 0>(kLanes))));
#elif defined(__AVX2__)
    const vf lo = vf(_mm256_permutevar8x32_ps(__m256(gaussian_levels<BITS, 0>(kLanes)), __m256i(c)));
    if constexpr (BITS <= 3) {
      return lo;
    } else {
      const vf hi = vf(_mm256_permutevar8x32_ps(__m256(gaussian_levels<BITS, 8>(kLanes)), __m256i(c)));
      return vf(_mm256_blendv_ps(__m256(lo), __m256(hi), __m256(vu(c << 28))));
    }
#elif defined(__SSSE3__) || defined(__aarch64__)
    return gaussian_bytes<BITS>(c);
#else
    return gaussian_select<BITS, 0, (1 << BITS)>(c);
#endif
  } else if constexpr (qsdpa::mode_code_kind(MODE) == qsdpa::kCodeFp8E4M3) {
    // e4m3: exponent and mantissa moved into a float's fields with the bias
    // raised from 7 to 127; exponent 0 is the subnormal m * 2^-9, and
    // 0x7f/0xff are NaN.
    const vu em = c & 0x7fu;
    const vu normal = (em << 20) + (120u << 23);
    const vu sub = vu(__builtin_convertvector(vi(em), vf) * 0.001953125f);
    vu mag = select(em < 8u, sub, normal);
    mag = select(em == 0x7fu, vu{} + 0x7fc00000u, mag);
    return vf(mag | ((c & 0x80u) << 24));
  } else {
#if defined(__AVX512F__)
    // e2m1 has 16 codes: one permute of a register holding every value (it
    // reads the low 4 bits of each index).
    const __m512 table = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f,
                                        -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
    return vf(_mm512_permutexvar_ps(__m512i(c), table));
#elif defined(__AVX2__)
    // The 8 magnitudes by one permute (it reads the low 3 bits of each
    // index), the sign bit moved in place.
    const __m256 table = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const vf mag = vf(_mm256_permutevar8x32_ps(table, __m256i(c)));
    return vf(vu(mag) | ((c & 8u) << 28));
#else
    // e2m1: the same with the bias raised from 1 to 127; exponent 0 is the
    // subnormal m * 0.5 (codes 0 and 1 are 0 and 0.5).
    const vu em = c & 7u;
    const vu normal = (em << 22) + (126u << 23);
    const vu sub = vu(__builtin_convertvector(vi(em), vf) * 0.5f);
    const vu mag = select(em < 2u, sub, normal);
    return vf(mag | ((c & 8u) << 28));
#endif
  }
}

// Words loaded for a run of 32 elements: its BITS words rounded up to a
// power of two and to at least W, read in one load, so that the lane
// permutations of unpack_run take a register of the output's width or
// wider (a narrower source went through the stack). A row's last runs,
// whose load would pass the row's end, are read from a zero-padded copy
// (decode_values).
template <int BITS>
constexpr int kRunLoadWords = imax(BITS <= 1 ? 1 : BITS <= 2 ? 2 : BITS <= 4 ? 4 : 8, W);

template <int BITS>
inline auto load_run(const uint32_t* p) {
  constexpr int n = kRunLoadWords<BITS>;
  typedef uint32_t run_t __attribute__((vector_size(4 * n)));
  run_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Codes of elements [BASE, BASE + W) of a run of 32 elements whose packed
// words are the lanes of `w` (load_run). Word and shift of each lane come
// from formats.h (element_word / element_shift) as compile-time constants:
// a lane permutation, shifts and a mask.
template <int BITS, int BASE, typename RunVec, int... L>
inline vu unpack_run(RunVec w, std::integer_sequence<int, L...>) {
  constexpr vu sh = {uint32_t(qsdpa::element_shift(BASE + L, BITS))...};
  vu v = __builtin_shufflevector(w, w, qsdpa::element_word(BASE + L, BITS)...) >> sh;
  if constexpr (BITS == 3 || BITS == 5 || BITS == 6) {
    // Elements straddling two words take their high bits from the next word.
    const vu hi = __builtin_shufflevector(w, w, (qsdpa::element_word(BASE + L, BITS) + 1)...);
    v |= (hi << 1) << (31 - sh);
  }
  return v & uint32_t((1u << BITS) - 1u);
}

// ---------------------------------------------------------------------------
// The per-thread scratch of an item.
// ---------------------------------------------------------------------------

// Keys per block: a multiple of the score tile's width, smaller for large
// head dims so that a block's decoded K and V stay in the L2 cache.
inline int key_block(int D) {
  constexpr int unit = kQkVecs * W;
  int kb = (8192 / D) / unit * unit;
  return imin(kMaxKeyBlock > unit ? kMaxKeyBlock : unit, imax(kb, unit));
}

inline size_t round64(size_t n) {
  return (n + 63) / 64 * 64;
}

// Elements per lane of the value order: a word's, or a 3-bit pack's.
constexpr int permuted_elems(int bits) {
  return bits == 3 ? 8 : 32 / bits;
}

// Whether an item of `rows` query rows takes the fused path: few rows per
// decoded key, so decoding each code vector straight into the FMAs costs
// less than a float tile's round trip through memory.
inline bool fused_item(int rows) {
  return rows <= kFusedMaxRows;
}

struct Layout {
  int kb;
  size_t q, qf, o, refs, qsum, kt, vtile, s, st, bt, stmp, wt, row, tail, vs, vb, vw, vst, vbt, ps,
      total; // byte offsets
};

Layout layout(const Problem& p, int max_rows, bool fused) {
  Layout L;
  const size_t D = p.D;
  const size_t ng = p.D / imin(p.k.group_size, p.v.group_size); // groups of the finer format
  const int bits = imax(p.k.bits, p.v.bits); // the wider row
  // The fused path reads kChains vectors of keys at once and keeps no
  // decoded tile, so its block is kChains * W keys whatever D.
  L.kb = fused ? kFusedKb : key_block(p.D);
  const size_t kb = L.kb;
  // Rows padded to whole fused tiles (the padding rows hold zeros).
  const size_t rows = (max_rows + kFusedRows - 1) / kFusedRows * kFusedRows;
  const size_t tile_rows = imax(kRowTile, kFusedRows);
  const size_t chunks = p.D / (W * permuted_elems(p.v.bits));
  size_t at = 0;
  auto take = [&](size_t bytes) {
    size_t o = at;
    at += round64(bytes);
    return o;
  };
  auto fused_only = [&](size_t bytes) { return take(fused ? bytes : 0); };
  auto tiles_only = [&](size_t bytes) { return take(fused ? 0 : bytes); };
  L.q = take(sizeof(float) * rows * D);
  L.qf = fused_only(sizeof(float) * kOperandFloats * rows * D);
  L.o = take(sizeof(float) * rows * D);
  L.refs = take(sizeof(RowRef) * max_rows);
  L.qsum = fused_only(sizeof(float) * rows * ng);
  L.kt = tiles_only(sizeof(float) * D * kb);
  L.vtile = take(sizeof(float) * kb * D); // the fused path's values outside the value order
  L.s = take(sizeof(float) * tile_rows * kb);
  L.st = take(sizeof(float) * ng * kb);
  L.bt = take(sizeof(float) * ng * kb);
  L.stmp = take(sizeof(float) * ng * kb);
  L.wt = take(sizeof(uint32_t) * (p.D * p.k.bits / 32) * kb);
  L.row = take(sizeof(uint32_t) * (D * bits / 32 + 8)); // + room for 8-byte reads
  L.tail = take(sizeof(uint32_t) * 40); // < 2 loads of kRunLoadWords, + padding
  L.vs = take(sizeof(float) * ng);
  L.vb = take(sizeof(float) * ng);
  L.vw = fused_only(sizeof(vu) * kb * chunks);
  L.vst = fused_only(sizeof(float) * ng * kb);
  L.vbt = fused_only(sizeof(float) * ng * kb);
  L.ps = fused_only(sizeof(float) * kOperandFloats * kFusedRows * ng * kb);
  L.total = at;
  return L;
}

struct Scratch {
  int kb;
  float* q;
  float* o; // the rows' outputs in value order (values_permuted)
  RowRef* refs; // where each row of the item lives
  float* qf; // [tile][d][row of the tile]: the queries as the fused path reads them
  float* qsum; // [tile][key group][row of the tile]: sums of the queries
  float* kt;
  float* vtile; // [key][d]: the decoded values (float-tile path)
  float* s;
  float* st;
  float* bt;
  float* stmp; // a block's scales before their transpose (stage_scales)
  uint32_t* wt;
  uint32_t* row;
  uint32_t* tail; // a value row's last runs, zero-padded
  float* vs;
  float* vb;
  vu* vw; // [key][chunk]: the value rows' chunks of packed words (value order)
  float* vst; // [value group][key]: the value scales
  float* vbt; // [value group][key]: the value biases
  float* ps; // [value group][row][key]: probability times value scale
};

Scratch carve(const Layout& L, void* base) {
  char* c = static_cast<char*>(base);
  Scratch s;
  s.kb = L.kb;
  s.q = reinterpret_cast<float*>(c + L.q);
  s.o = reinterpret_cast<float*>(c + L.o);
  s.refs = reinterpret_cast<RowRef*>(c + L.refs);
  s.qf = reinterpret_cast<float*>(c + L.qf);
  s.qsum = reinterpret_cast<float*>(c + L.qsum);
  s.kt = reinterpret_cast<float*>(c + L.kt);
  s.vtile = reinterpret_cast<float*>(c + L.vtile);
  s.s = reinterpret_cast<float*>(c + L.s);
  s.st = reinterpret_cast<float*>(c + L.st);
  s.bt = reinterpret_cast<float*>(c + L.bt);
  s.stmp = reinterpret_cast<float*>(c + L.stmp);
  s.wt = reinterpret_cast<uint32_t*>(c + L.wt);
  s.row = reinterpret_cast<uint32_t*>(c + L.row);
  s.tail = reinterpret_cast<uint32_t*>(c + L.tail);
  s.vs = reinterpret_cast<float*>(c + L.vs);
  s.vb = reinterpret_cast<float*>(c + L.vb);
  s.vw = reinterpret_cast<vu*>(c + L.vw);
  s.vst = reinterpret_cast<float*>(c + L.vst);
  s.vbt = reinterpret_cast<float*>(c + L.vbt);
  s.ps = reinterpret_cast<float*>(c + L.ps);
  return s;
}

// The packed row of key `key`, contiguous: the cache itself when its last
// axis is contiguous, else a copy in `buf`.
inline const uint32_t* packed_row(const QuantTensor& qv, int b, int h, int64_t key, int words, uint32_t* buf) {
  const uint32_t* w = qv.w + b * qv.ws[0] + h * qv.ws[1] + key * qv.ws[2];
  if (qv.ws[3] == 1) {
    return w;
  }
  for (int t = 0; t < words; ++t) {
    buf[t] = w[t * qv.ws[3]];
  }
  return buf;
}

// ---------------------------------------------------------------------------
// Key decoding: Kt[d * kb + j] = value of element d of key j0 + j.
// ---------------------------------------------------------------------------

// dst[i * dst_stride + j] = src[j * src_stride + i] for a W x W block of
// words, in registers: the shuffles of a vector transpose (unpack, then
// shuffles of pairs, then of halves on AVX2; two-source permutes of
// interleaving rounds otherwise).
inline void transpose_block(const uint32_t* src, int64_t src_stride, uint32_t* dst, int dst_stride) {
  vu r[W];
  for (int j = 0; j < W; ++j) {
    r[j] = loadu(src + j * src_stride);
  }
#if defined(__AVX2__) && !defined(__AVX512F__)
  vu t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * k + 1] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 2; ++k) {
    for (int h = 0; h < 2; ++h) {
      const vu a = t[4 * k + h], b = t[4 * k + h + 2];
      u[4 * k + 2 * h] = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * k + 2 * h + 1] = __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
#else
  // log2(W) rounds of interleaving row i with row i + W/2 (lows into row
  // 2i, highs into row 2i + 1) transpose the block.
  for (int round = 1; round < W; round *= 2) {
    vu n[W];
    for (int i = 0; i < W / 2; ++i) {
      n[2 * i] = interleave_lo(r[i], r[i + W / 2], std::make_integer_sequence<int, W>());
      n[2 * i + 1] = interleave_hi(r[i], r[i + W / 2], std::make_integer_sequence<int, W>());
    }
    for (int i = 0; i < W; ++i) {
      r[i] = n[i];
    }
  }
#endif
  for (int i = 0; i < W; ++i) {
    std::memcpy(dst + i * dst_stride, &r[i], sizeof(vu));
  }
}

// The codes of elements BASE + L of a run of 32 elements whose BITS packed
// words (each a vector of W keys) are `w`: per element a shift of its word,
// or two for one that straddles two words (formats.h's element_word and
// element_shift, compile-time constants).
template <int BITS, int E>
inline vu run_element(const vu* w) {
  constexpr int word = qsdpa::element_word(E, BITS), sh = qsdpa::element_shift(E, BITS);
  vu v = w[word] >> uint32_t(sh);
  if constexpr (sh + BITS > 32) {
    v |= w[word + 1] << uint32_t(32 - sh);
  }
  return v & uint32_t((1u << BITS) - 1u);
}

template <int MODE, int BITS, int... E>
inline void decode_key_run(const vu* w, vf s, vf bias, float* kt, int kb, std::integer_sequence<int, E...>) {
  ((store(kt + E * kb, qsdpa::mode_has_bias(MODE) ? decode_codes<MODE, BITS>(run_element<BITS, E>(w)) * s + bias
                                                  : decode_codes<MODE, BITS>(run_element<BITS, E>(w)) * s)),
   ...);
}

// Dst[g * kb + j] = the scale (or bias) of group g of key j for the nk keys
// of a block, from element `at` of `base` (key 0's group 0; keys ks apart,
// groups gst apart), and 0 for keys nk..kb. A block laid out [key][group]
// is converted as one run (float16 with vector instructions) and then
// transposed.
template <int SK>
void stage_scales(const void* base, int64_t at, int64_t ks, int64_t gst, int nk, int ng, int kb, float* tmp,
                  float* dst) {
  int j = 0; // keys staged
#if defined(__F16C__)
  if constexpr (SK == kScaleF16) {
    if (gst == 1 && ks == ng && ng <= 2) {
      // One or two groups: converted and de-interleaved in registers.
      const uint16_t* h = static_cast<const uint16_t*>(base) + at;
      for (; j + 8 <= nk; j += 8) {
        __m128i x[2];
        std::memcpy(x, h + j * ng, sizeof(x[0]) * ng);
        const __m256 a = _mm256_cvtph_ps(x[0]);
        if (ng == 1) {
          std::memcpy(dst + j, &a, sizeof(a));
          continue;
        }
        const __m256 b = _mm256_cvtph_ps(x[1]);
        // a = s0 t0 s1 t1 s2 t2 s3 t3, b = s4 t4 ... (s: group 0, t: group 1).
        const __m256 lo = _mm256_shuffle_ps(a, b, 0x88); // s0 s1 s4 s5 | s2 s3 s6 s7
        const __m256 hi = _mm256_shuffle_ps(a, b, 0xdd);
        const __m256 g0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(lo), 0xd8));
        const __m256 g1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(hi), 0xd8));
        std::memcpy(dst + j, &g0, sizeof(g0));
        std::memcpy(dst + kb + j, &g1, sizeof(g1));
      }
    } else if (gst == 1 && ks == ng) {
      // Converted as one run, then transposed.
      const uint16_t* h = static_cast<const uint16_t*>(base) + at;
      const int n = nk * ng;
      int i = 0;
      for (; i + 8 <= n; i += 8) {
        __m128i x;
        std::memcpy(&x, h + i, sizeof(x));
        const __m256 f = _mm256_cvtph_ps(x);
        std::memcpy(tmp + i, &f, sizeof(f));
      }
      for (; i < n; ++i) {
        tmp[i] = half_to_float(h[i]);
      }
      for (int g = 0; g < ng; ++g) {
        for (int jj = 0; jj < nk; ++jj) {
          dst[g * kb + jj] = tmp[jj * ng + g];
        }
      }
      j = nk;
    }
  }
#endif
  (void)tmp;
  for (; j < nk; ++j) {
    for (int g = 0; g < ng; ++g) {
      dst[g * kb + j] = scale_at<SK>(base, at + j * ks + g * gst);
    }
  }
  for (int g = 0; g < ng; ++g) {
    for (int jj = nk; jj < kb; ++jj) {
      dst[g * kb + jj] = 0.0f;
    }
  }
}

// The block's key scales and biases, transposed to St[g * kb + j] and
// Bt[g * kb + j] (0 for padding keys, so that their decoded values are 0),
// and its packed words, transposed to Wt[u * kb + j] (word u of key j0 + j).
template <int MODE, int BITS, int SK>
void stage_keys(const Problem& p, int b, int h, int j0, int nk, const Scratch& sc) {
  const QuantTensor& qv = p.k;
  const int D = p.D, gs = qv.group_size, ng = D / gs, kb = sc.kb;
  const int words = D * BITS / 32;
  // Local copies: the stores below (memcpy, char-typed) may alias anything,
  // and would make every use of sc's fields a reload.
  float* const st = sc.st;
  float* const bt = sc.bt;
  uint32_t* const wt = sc.wt;

  const int64_t s0 = b * qv.ss[0] + h * qv.ss[1] + j0 * qv.ss[2];
  stage_scales<SK>(qv.scales, s0, qv.ss[2], qv.ss[3], nk, ng, kb, sc.stmp, st);
  if constexpr (qsdpa::mode_has_bias(MODE)) {
    const int64_t b0 = b * qv.bs[0] + h * qv.bs[1] + j0 * qv.bs[2];
    stage_scales<SK>(qv.biases, b0, qv.bs[2], qv.bs[3], nk, ng, kb, sc.stmp, bt);
  } else {
    std::memset(bt, 0, sizeof(float) * ng * kb);
  }

  // The block's packed words, transposed to [word][key]: W x W blocks of W
  // whole keys where the rows are contiguous, the rest word by word.
  const int block_words = qv.ws[3] == 1 ? words / W * W : 0;
  for (int j = 0; j < kb; ++j) {
    if (j >= nk) {
      for (int u = 0; u < words; ++u) {
        wt[u * kb + j] = 0;
      }
      continue;
    }
    const uint32_t* row = packed_row(qv, b, h, j0 + j, words, sc.row);
    int u0 = 0;
    if (block_words > 0 && j % W == 0 && j + W <= nk) {
      for (; u0 < block_words; u0 += W) {
        transpose_block(row + u0, qv.ws[2], wt + u0 * kb + j, kb);
      }
      for (int jj = j; jj < j + W; ++jj) {
        const uint32_t* r = row + (jj - j) * qv.ws[2];
        for (int u = u0; u < words; ++u) {
          wt[u * kb + jj] = r[u];
        }
      }
      j += W - 1;
      continue;
    }
    for (int u = u0; u < words; ++u) {
      wt[u * kb + j] = row[u];
    }
  }
}

template <int MODE, int BITS, int SK>
void decode_keys(const Problem& p, int b, int h, int j0, int nk, const Scratch& sc) {
  constexpr int E = 32 / BITS; // elements per word
  // 1, 2, 4, 8 bits: each word holds whole elements; 3, 5, 6 bits: runs of
  // 32 elements in BITS words, some elements straddling two words.
  constexpr bool kWholeWords = E * BITS == 32;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int D = p.D, gs = p.k.group_size, kb = sc.kb;
  const int gshift = __builtin_ctz(gs); // group sizes are powers of two
  const int words = D * BITS / 32;
  // Local copies (see stage_keys).
  float* const kt = sc.kt;
  const float* const st = sc.st;
  const float* const bt = sc.bt;
  const uint32_t* const wt = sc.wt;
  stage_keys<MODE, BITS, SK>(p, b, h, j0, nk, sc);

  if constexpr (kWholeWords) {
    // Each word vector (one word of W keys) yields E element vectors, all of
    // one group (every group size is a multiple of 32 / BITS).
    for (int u = 0; u < words; ++u) {
      const int e0 = u * E;
      const int g0 = e0 >> gshift;
      for (int jv = 0; jv < kb; jv += W) {
        const vu wv = loadu(wt + u * kb + jv);
        const vf s0 = load(st + g0 * kb + jv), b0 = load(bt + g0 * kb + jv);
#pragma GCC unroll 32
        for (int k = 0; k < E; ++k) {
          const vf val = decode_codes<MODE, BITS>((wv >> uint32_t(k * BITS)) & kMask);
          vf out = val * s0;
          if constexpr (qsdpa::mode_has_bias(MODE)) {
            out += b0;
          }
          store(kt + (e0 + k) * kb + jv, out);
        }
      }
    }
  } else {
    // Each run of 32 elements (BITS word vectors of W keys) lies in one
    // group: the formats with these widths have groups of 32 or more.
    for (int r = 0; r < D / 32; ++r) {
      const int g0 = (r * 32) >> gshift;
      for (int jv = 0; jv < kb; jv += W) {
        vu w[BITS];
        for (int k = 0; k < BITS; ++k) {
          w[k] = loadu(wt + (r * BITS + k) * kb + jv);
        }
        decode_key_run<MODE, BITS>(w, load(st + g0 * kb + jv), load(bt + g0 * kb + jv), kt + r * 32 * kb + jv, kb,
                                   std::make_integer_sequence<int, 32>());
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Value decoding: Vf[j * D + d] = value of element d of key j0 + j.
// ---------------------------------------------------------------------------

template <int MODE, int BITS, int BASE, typename RunVec>
inline void decode_run_part(RunVec words, float s, float bias, float* out) {
  const vu codes = unpack_run<BITS, BASE>(words, std::make_integer_sequence<int, W>());
  vf val = decode_codes<MODE, BITS>(codes) * s;
  if constexpr (qsdpa::mode_has_bias(MODE)) {
    val += bias;
  }
  store(out + BASE, val);
}

// The W-element parts of the first N elements (32, or 16 for the last run
// of a row whose D is an odd multiple of 16) of a run of 32 elements from
// element e0. Every group size is a power of two of at least 16, so a part
// lies in one group: group (e0 + base) >> gshift.
template <int MODE, int BITS, int N, typename RunVec, int... P>
inline void decode_run(RunVec run, int e0, int gshift, const float* vs, const float* vb,
                       float* out, std::integer_sequence<int, P...>) {
  ((P * W < N ? decode_run_part<MODE, BITS, P * W>(run, vs[(e0 + P * W) >> gshift],
                                                   vb[(e0 + P * W) >> gshift], out)
              : void()),
   ...);
}

typedef uint8_t u8xw __attribute__((vector_size(W)));

// Whether W consecutive elements (from a multiple of W) load straight into
// their lanes: they lie in one word (a broadcast of it, then per-lane
// shifts), or are bytes (a zero-extending load). Otherwise they are cut from
// a run of 32 elements (decode_run).
template <int BITS>
constexpr bool kDirectParts = BITS == 8 || (32 % (BITS * W) == 0) || (BITS == 4 && W == 16);

// Codes of elements [e, e + W) of a packed row (e a multiple of W), for the
// formats of kDirectParts. For elements narrower than a byte, `e % (32 /
// BITS)` is the compile-time P * W: the part of the word they are in.
template <int BITS, int P, int... L>
inline vu direct_codes(const uint32_t* row, int e, std::integer_sequence<int, L...>) {
  if constexpr (BITS == 8) {
    u8xw bytes;
    std::memcpy(&bytes, reinterpret_cast<const uint8_t*>(row) + e, sizeof(bytes));
    return __builtin_convertvector(bytes, vu);
  } else if constexpr (BITS == 4 && W == 16) {
    // 8 bytes hold the 16 elements: each byte into two lanes, zero-extended,
    // then the high nibble of the odd lanes shifted down.
    typedef uint8_t u8x8 __attribute__((vector_size(8)));
    u8x8 bytes;
    std::memcpy(&bytes, reinterpret_cast<const uint8_t*>(row) + e / 2, sizeof(bytes));
    const u8xw twice = __builtin_shufflevector(bytes, bytes, (L / 2)...);
    constexpr vu sh = {uint32_t((L % 2) * 4)...};
    return (__builtin_convertvector(twice, vu) >> sh) & 15u;
  } else {
    constexpr vu sh = {uint32_t((P * W + L) * BITS)...};
    return ((row[e * BITS / 32] - vu{}) >> sh) & uint32_t((1u << BITS) - 1u);
  }
}

// Parts of W elements that one step of the direct loop decodes: the W-wide
// parts of one word for elements narrower than a byte, else one.
template <int BITS>
constexpr int kStepParts = (BITS == 8 || W * BITS >= 32) ? 1 : 32 / (W * BITS);

template <int MODE, int BITS, int... P>
inline void decode_direct_step(const uint32_t* row, int e, vf s, vf bias, float* out,
                               std::integer_sequence<int, P...>) {
  constexpr auto kLanes = std::make_integer_sequence<int, W>();
  ((store(out + e + P * W,
          qsdpa::mode_has_bias(MODE)
              ? decode_codes<MODE, BITS>(direct_codes<BITS, P>(row, e, kLanes)) * s + bias
              : decode_codes<MODE, BITS>(direct_codes<BITS, P>(row, e, kLanes)) * s)),
   ...);
}

// Value rows of 1, 2, 4 or 8-bit elements whose words fill whole vectors
// are decoded in "value order": a vector of W words yields, per element
// position k of a word, the W elements k of those words with one shift and
// mask: no lane permutation, no per-lane shifts. Element e of chunk c (W
// words, W * 32/BITS elements) sits at position k * W + l of the chunk,
// where l = word in the chunk and k = element in the word. The outputs are
// accumulated in the same order and put back in place once per item
// (unpermute_rows).
//
// With AVX2, 3-bit rows whose D is a multiple of 64 take the same order
// with MLX's 3-byte packs of 8 elements in place of words: a byte shuffle
// puts pack l of a chunk of 8 packs in lane l, and element k of every pack
// is one shift and mask (decode_pack_chunk).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool kPackedThreeBit = true;
#else
constexpr bool kPackedThreeBit = false;
#endif

inline bool values_permuted(const Problem& p) {
  const int bits = p.v.bits;
  const int words = p.D * bits / 32;
  if (bits == 3) {
    return kPackedThreeBit && p.D % (8 * W) == 0;
  }
  return (bits == 1 || bits == 2 || bits == 4 || bits == 8) && words % W == 0;
}

inline void unpermute_rows(const float* src, int rows, int D, int bits, float* dst) {
  const int e = permuted_elems(bits), chunk = W * e;
  for (int r = 0; r < rows; ++r) {
    const float* s = src + static_cast<int64_t>(r) * D;
    float* d = dst + static_cast<int64_t>(r) * D;
    for (int c = 0; c < D; c += chunk) {
      for (int k = 0; k < e; ++k) {
        for (int l = 0; l < W; ++l) {
          d[c + l * e + k] = s[c + k * W + l];
        }
      }
    }
  }
}

template <int MODE, int BITS, int... K>
inline void decode_value_chunk(vu words, vf s, vf bias, float* out, std::integer_sequence<int, K...>) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  ((store(out + K * W, qsdpa::mode_has_bias(MODE)
                           ? decode_codes<MODE, BITS>((words >> uint32_t(K * BITS)) & kMask) * s + bias
                           : decode_codes<MODE, BITS>((words >> uint32_t(K * BITS)) & kMask) * s)),
   ...);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// The 8 packs of 3 bytes (24 bits, 8 elements each) of a chunk of 64
// elements, pack l in lane l, from 32 bytes loaded at the chunk's start
// (SKIP = 0) or 8 bytes before it (SKIP = 2 words, for a chunk that ends
// its row: the load then stays inside the row).
template <int SKIP>
inline vu three_bit_packs(const unsigned char* load_at) {
  __m256i raw;
  std::memcpy(&raw, load_at, sizeof(raw));
  // Words SKIP..SKIP+3 in the low half, SKIP+3..SKIP+6 in the high half:
  // each half then holds its 4 packs in its first 12 bytes.
  raw = _mm256_permutevar8x32_epi32(
      raw, _mm256_setr_epi32(SKIP, SKIP + 1, SKIP + 2, SKIP + 3, SKIP + 3, SKIP + 4, SKIP + 5, imin(SKIP + 6, 7)));
  const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  return vu(_mm256_shuffle_epi8(raw, spread));
}

template <int MODE, int... K>
inline void decode_pack_chunk(vu packs, vf s, vf bias, float* out, std::integer_sequence<int, K...>) {
  ((store(out + K * W, qsdpa::mode_has_bias(MODE) ? decode_codes<MODE, 3>((packs >> uint32_t(3 * K)) & 7u) * s + bias
                                                  : decode_codes<MODE, 3>((packs >> uint32_t(3 * K)) & 7u) * s)),
   ...);
}
#endif

// Chunk c of a value row in the value order: lane l holds word c * W + l,
// or (3-bit rows with AVX2) pack c * W + l of 3 bytes.
template <int BITS>
inline vu value_chunk(const uint32_t* row, int words, int c) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (BITS == 3) {
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(row);
    const int at = c * 24; // the chunk's first byte
    if (at + 32 <= words * 4) {
      return three_bit_packs<0>(bytes + at);
    }
    if (at >= 8) {
      return three_bit_packs<2>(bytes + at - 8);
    }
    // A row of one chunk (D = 64): its 24 bytes, zero-padded.
    unsigned char pad[32] = {};
    std::memcpy(pad, bytes, 24);
    return three_bit_packs<0>(pad);
  }
#endif
  (void)words;
  return loadu(row + c * W);
}

template <int MODE, int BITS, int SK>
void decode_values(const Problem& p, int b, int h, int j0, int nk, const Scratch& sc) {
  const QuantTensor& qv = p.v;
  const int D = p.D, gs = qv.group_size, ng = D / gs, gshift = __builtin_ctz(gs);
  // Local copies (see decode_keys).
  float* const vf_rows = sc.vtile;
  float* const vs = sc.vs;
  float* const vb = sc.vb;
  uint32_t* const tail = sc.tail;
  const int words = D * BITS / 32;
  const int full = D / 32 * 32; // elements in whole runs of 32
  const bool permuted = values_permuted(p);
  constexpr auto kParts = std::make_integer_sequence<int, 32 / W>();
  // The run path: runs whose load stays inside the row read the row; the
  // others (and a last half run of 16 elements) read a zero-padded copy of
  // the row's end, made first so that its stores have retired when it is
  // read. Where that split falls depends on D alone.
  constexpr int kLoad = kRunLoadWords<BITS>;
  int direct = 0; // runs read from the row
  while ((direct + 1) * 32 <= full && direct * BITS + kLoad <= words) {
    ++direct;
  }
  const int copied = words - direct * BITS;
  for (int t = copied; t < copied + kLoad; ++t) {
    tail[t] = 0;
  }
  for (int j = 0; j < nk; ++j) {
    const int64_t key = j0 + j;
    const uint32_t* row = packed_row(qv, b, h, key, words, sc.row);
    const int64_t s0 = b * qv.ss[0] + h * qv.ss[1] + key * qv.ss[2];
    const int64_t b0 = b * qv.bs[0] + h * qv.bs[1] + key * qv.bs[2];
    for (int g = 0; g < ng; ++g) {
      vs[g] = scale_at<SK>(qv.scales, s0 + g * qv.ss[3]);
      vb[g] = qsdpa::mode_has_bias(MODE) ? scale_at<SK>(qv.biases, b0 + g * qv.bs[3]) : 0.0f;
    }
    float* out = vf_rows + static_cast<int64_t>(j) * D;
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (BITS == 3) {
      if (permuted) {
        for (int e0 = 0; e0 < D; e0 += 64) {
          const vu packs = value_chunk<3>(row, words, e0 / 64);
          vf sv, bv;
          if (64 <= gs) {
            sv = splat(vs[e0 >> gshift]);
            bv = splat(vb[e0 >> gshift]);
          } else {
            // Groups of 32: packs 0-3 in one, 4-7 in the next.
            for (int l = 0; l < W; ++l) {
              sv[l] = vs[(e0 + 8 * l) >> gshift];
              bv[l] = vb[(e0 + 8 * l) >> gshift];
            }
          }
          decode_pack_chunk<MODE>(packs, sv, bv, out + e0, std::make_integer_sequence<int, 8>());
        }
        continue;
      }
    }
#endif
    if constexpr (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8) {
      if (permuted) {
        constexpr int E = 32 / BITS;
        for (int c = 0; c < words; c += W) {
          const int e0 = c * E; // first element of the chunk
          vf sv, bv;
          if (W * E <= gs) {
            sv = splat(vs[e0 >> gshift]);
            bv = splat(vb[e0 >> gshift]);
          } else {
            // Several groups in the chunk: lane l holds group (c + l) * E / gs.
            for (int l = 0; l < W; ++l) {
              sv[l] = vs[((c + l) * E) >> gshift];
              bv[l] = vb[((c + l) * E) >> gshift];
            }
          }
          decode_value_chunk<MODE, BITS>(loadu(row + c), sv, bv, out + e0,
                                         std::make_integer_sequence<int, E>());
        }
        continue;
      }
    }
    if constexpr (kDirectParts<BITS>) {
      constexpr int kStep = kStepParts<BITS> * W; // elements per step
      for (int g = 0; g < ng; ++g) {
        const vf s = splat(vs[g]), bias = splat(vb[g]);
        for (int e = g * gs; e < (g + 1) * gs; e += kStep) {
          decode_direct_step<MODE, BITS>(row, e, s, bias, out,
                                         std::make_integer_sequence<int, kStepParts<BITS>>());
        }
      }
      continue;
    }
    for (int t = 0; t < copied; ++t) {
      tail[t] = row[direct * BITS + t];
    }
    for (int r = 0; r < direct; ++r) {
      decode_run<MODE, BITS, 32>(load_run<BITS>(row + r * BITS), r * 32, gshift, vs, vb,
                                 out + r * 32, kParts);
    }
    for (int e0 = direct * 32; e0 < full; e0 += 32) {
      decode_run<MODE, BITS, 32>(load_run<BITS>(tail + (e0 / 32 - direct) * BITS), e0, gshift,
                                 vs, vb, out + e0, kParts);
    }
    if (full < D) {
      decode_run<MODE, BITS, 16>(load_run<BITS>(tail + (full / 32 - direct) * BITS), full,
                                 gshift, vs, vb, out + full, kParts);
    }
  }
}

// ---------------------------------------------------------------------------
// The score and output tiles.
// ---------------------------------------------------------------------------

// S[r * kb + j] = sum_d Q[r * D + d] * Kt[d * kb + j] for NR rows, all kb
// keys; the accumulators hold kQkVecs * W keys of each row.
template <int NR>
void score_tile(const float* Q, int D, const float* Kt, int kb, float* S) {
  for (int j = 0; j < kb; j += kQkVecs * W) {
    vf acc[NR][kQkVecs] = {};
    for (int d = 0; d < D; ++d) {
      const float* kr = Kt + static_cast<int64_t>(d) * kb + j;
      vf kv[kQkVecs];
      for (int v = 0; v < kQkVecs; ++v) {
        kv[v] = load(kr + v * W);
      }
      for (int r = 0; r < NR; ++r) {
        const vf qb = splat(Q[r * D + d]);
        for (int v = 0; v < kQkVecs; ++v) {
          acc[r][v] += qb * kv[v];
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int v = 0; v < kQkVecs; ++v) {
        store(S + r * kb + j + v * W, acc[r][v]);
      }
    }
  }
}

// O[r * D + d] += sum_{j < nk} P[r * kb + j] * Vf[j * D + d] for NR rows and
// the NV * W dims from d0; the accumulators stay in registers over the keys.
template <int NR, int NV>
inline void output_cols(const float* P, int kb, const float* Vf, int nk, int D, float* O, int d0) {
  vf acc[NR][NV];
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = load(O + r * D + d0 + v * W);
    }
  }
  for (int j = 0; j < nk; ++j) {
    const float* vr = Vf + static_cast<int64_t>(j) * D + d0;
    vf vv[NV];
    for (int v = 0; v < NV; ++v) {
      vv[v] = load(vr + v * W);
    }
    for (int r = 0; r < NR; ++r) {
      const vf pb = splat(P[r * kb + j]);
      for (int v = 0; v < NV; ++v) {
        acc[r][v] += pb * vv[v];
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < NV; ++v) {
      store(O + r * D + d0 + v * W, acc[r][v]);
    }
  }
}

template <int NR>
void output_tile(const float* P, int kb, const float* Vf, int nk, int D, float* O) {
  int d = 0;
  for (; d + kPvVecs * W <= D; d += kPvVecs * W) {
    output_cols<NR, kPvVecs>(P, kb, Vf, nk, D, O, d);
  }
  for (; d < D; d += W) {
    output_cols<NR, 1>(P, kb, Vf, nk, D, O, d);
  }
}

using ScoreFn = void (*)(const float*, int, const float*, int, float*);
using OutputFn = void (*)(const float*, int, const float*, int, int, float*);
constexpr ScoreFn kScoreTiles[kRowTile + 1] = {
    nullptr, score_tile<1>, score_tile<2>, score_tile<3>, score_tile<4>};
constexpr OutputFn kOutputTiles[kRowTile + 1] = {
    nullptr, output_tile<1>, output_tile<2>, output_tile<3>, output_tile<4>};

// ---------------------------------------------------------------------------
// The fused path: scores and outputs straight from the codes.
// ---------------------------------------------------------------------------
//
// With few query rows per decoded key (decoding), writing the decoded K and V
// to float tiles and reading them back costs more than the FMAs that use
// them. Here each vector of codes goes from the packed words to the FMAs in
// registers, and a group's scale and bias are applied once per group:
//   score_j = sum_g s_jg * (sum_{d in g} q_d c_jd) + b_jg * (sum_{d in g} q_d)
//   o_d    += sum_j (p_j s_jg) c_jd + sum_j p_j b_jg       (g: the group of d)
// where c is an element's code value before its scale (decode_codes). A tile
// is NR query rows times kChains / NR vectors of keys (scores) or of value
// elements (outputs): enough independent accumulators to hide the FMA
// latency, with every accumulator, code and operand in registers.

// Rows of the fused tile that holds n rows: 1, 2, 4 or 8 (rows past n are
// zero queries with zero probabilities), and its index in the kernel tables.
inline int fused_tile_rows(int n) {
  return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8;
}
inline int fused_tile_index(int rows) {
  return rows == 1 ? 0 : rows == 2 ? 1 : rows == 4 ? 2 : 3;
}

// Elements per unit of a key row: a word where elements fill words, else a
// run of 32 elements (BITS words). A unit lies in one group.
template <int BITS>
constexpr int kKeyUnit = 32 % BITS == 0 ? 32 / BITS : 32;

// Element E of a unit into the NR rows' accumulators, for KV vectors of W
// keys (wt: the unit's first transposed word, word rows kb apart).
template <int MODE, int BITS, int NR, int KV, int E>
inline vf key_codes(const uint32_t* wt, int kb, int v) {
  constexpr int word = qsdpa::element_word(E, BITS), sh = qsdpa::element_shift(E, BITS);
  vu c = loadu(wt + word * kb + v * W) >> uint32_t(sh);
  if constexpr (sh + BITS > 32) {
    c |= loadu(wt + (word + 1) * kb + v * W) << uint32_t(32 - sh);
  }
  if constexpr (sh + BITS != 32) {
    c &= (1u << BITS) - 1u;
  }
  return decode_codes<MODE, BITS>(c);
}

// Element E of a unit into the NR rows' accumulators, for KV vectors of W
// keys (wt: the unit's first transposed word, word rows kb apart). Few rows:
// their queries stay in registers and one code vector is live at a time;
// many rows: the KV codes stay, and one query at a time (either way a
// handful of registers beside the accumulators).
template <int MODE, int BITS, int NR, int KV, int E>
inline void score_element(const uint32_t* wt, int kb, const float* q, vf (&acc)[NR][KV]) {
  auto query = [&](int r) {
    return kSplatOperands ? load(q + (E * kFusedRows + r) * W) : splat(q[E * kFusedRows + r]);
  };
  if constexpr (NR < KV) {
    vf qb[NR];
    for (int r = 0; r < NR; ++r) {
      qb[r] = query(r);
    }
    for (int v = 0; v < KV; ++v) {
      const vf code = key_codes<MODE, BITS, NR, KV, E>(wt, kb, v);
      for (int r = 0; r < NR; ++r) {
        acc[r][v] += qb[r] * code;
      }
    }
  } else {
    vf code[KV];
    for (int v = 0; v < KV; ++v) {
      code[v] = key_codes<MODE, BITS, NR, KV, E>(wt, kb, v);
    }
    for (int r = 0; r < NR; ++r) {
      const vf qb = query(r);
      for (int v = 0; v < KV; ++v) {
        acc[r][v] += qb * code[v];
      }
    }
  }
}

template <int MODE, int BITS, int NR, int KV, int... E>
inline void score_unit(const uint32_t* wt, int kb, const float* q, vf (&acc)[NR][KV],
                       std::integer_sequence<int, E...>) {
  (score_element<MODE, BITS, NR, KV, E>(wt, kb, q, acc), ...);
}

// Accumulators of a fused tile for a format: kChains where the decode of a
// code vector takes a shift, a mask and a conversion (affine 4 and 8 bits:
// their words hold whole elements in few units), half as many where it
// takes more registers (tables, straddling elements, long units), so that
// every accumulator, code and operand still fits the registers.
template <int MODE, int BITS>
constexpr int kFormatChains =
    qsdpa::mode_code_kind(MODE) == qsdpa::kCodeUnsigned && (BITS == 4 || BITS == 8) ? kChains : kChains / 2;

template <int MODE, int BITS, int NR>
constexpr int kTileVectors = imax(1, kFormatChains<MODE, BITS> / NR);

// S[r * kb + j] = the score of row r and key j of the block stage_keys
// left, for NR rows and all kb keys. The tile's queries are Q[d *
// kFusedRows + r], their group sums qsum[g * kFusedRows + r] (every offset
// of the unrolled loops is then a constant).
template <int MODE, int BITS, int NR>
void fused_scores(const float* Q, const float* qsum, int D, int gs, const Scratch& sc, float* S) {
  constexpr int KV = kTileVectors<MODE, BITS, NR>;
  constexpr int kUnit = kKeyUnit<BITS>, kUnitWords = kUnit * BITS / 32;
  constexpr int kb = kFusedKb;
  const int ng = D / gs, units = gs / kUnit;
  const uint32_t* const wt = sc.wt;
  const float* const st = sc.st;
  const float* const bt = sc.bt;
  for (int j = 0; j < kb; j += KV * W) {
    for (int g = 0; g < ng; ++g) {
      vf acc[NR][KV] = {};
      for (int u = g * units; u < (g + 1) * units; ++u) {
        score_unit<MODE, BITS, NR, KV>(wt + u * kUnitWords * kb + j, kb, Q + u * kUnit * kFusedRows * kOperandFloats, acc,
                                       std::make_integer_sequence<int, kUnit>());
      }
      // Unrolled: a loop indexing acc would keep it in memory.
#pragma GCC unroll 8
      for (int v = 0; v < KV; ++v) {
        const vf s = load(st + g * kb + j + v * W);
        const vf b = load(bt + g * kb + j + v * W);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          float* out = S + r * kb + j + v * W;
          vf x = acc[r][v] * s;
          if constexpr (qsdpa::mode_has_bias(MODE)) {
            x += splat(qsum[g * kFusedRows + r]) * b;
          }
          store(out, g == 0 ? x : load(out) + x);
        }
      }
    }
  }
}

// Whether fused_output exists for BITS-bit values: the widths of the value
// order, where the target has the fused path.
template <int BITS>
constexpr bool kFusedValues =
    kFusedMaxRows > 0 && (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8 || (BITS == 3 && kPackedThreeBit));

// Whether fused_output reads the value rows in place: rows whose words are
// contiguous, and whose chunks are W words (3-bit packs are shuffled into
// their lanes first).
inline bool values_in_place(const Problem& p) {
  return p.v.ws[3] == 1 && p.v.bits != 3;
}

// A block's values for fused_output: unless values_in_place, each row's
// chunks (value_chunk) to Vw[j * chunks + c]; the scales and biases
// transposed to Vst / Vbt[g * kb + j] (0 for padding keys).
template <int MODE, int BITS, int SK>
void stage_values(const Problem& p, int b, int h, int j0, int nk, const Scratch& sc) {
  constexpr int E = permuted_elems(BITS);
  const QuantTensor& qv = p.v;
  const int D = p.D, ng = D / qv.group_size, kb = sc.kb;
  const int words = D * BITS / 32, chunks = D / (W * E);
  vu* const vw = sc.vw; // a local copy (see stage_keys)
  if (!values_in_place(p)) {
    for (int j = 0; j < nk; ++j) {
      const uint32_t* row = packed_row(qv, b, h, j0 + j, words, sc.row);
      for (int c = 0; c < chunks; ++c) {
        vw[j * chunks + c] = value_chunk<BITS>(row, words, c);
      }
    }
  }
  const int64_t s0 = b * qv.ss[0] + h * qv.ss[1] + j0 * qv.ss[2];
  stage_scales<SK>(qv.scales, s0, qv.ss[2], qv.ss[3], nk, ng, kb, sc.stmp, sc.vst);
  if constexpr (qsdpa::mode_has_bias(MODE)) {
    const int64_t b0 = b * qv.bs[0] + h * qv.bs[1] + j0 * qv.bs[2];
    stage_scales<SK>(qv.biases, b0, qv.bs[2], qv.bs[3], nk, ng, kb, sc.stmp, sc.vbt);
  }
}

// O[r * D + i] (value order) += the block's values weighted by the NR rows'
// probabilities times scales: elements K0, K0 + 1, ... of every lane of chunk
// c (of group g), kTileVectors / NR elements at a time.
template <int MODE, int BITS, int NR, int K0>
inline void output_lane_elems(const Scratch& sc, const uint32_t* rows, int64_t stride, int c, int g, int nk, int D,
                              float* O) {
  constexpr int E = permuted_elems(BITS);
  constexpr int KK = imin(kTileVectors<MODE, BITS, NR>, E);
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  constexpr int kb = kFusedKb;
  float* const out = O + c * W * E + K0 * W;
  const uint32_t* const chunk = rows + c * W;
  const float* const ps = sc.ps + g * kFusedRows * kb * kOperandFloats;
  vf acc[NR][KK];
  for (int r = 0; r < NR; ++r) {
    for (int k = 0; k < KK; ++k) {
      acc[r][k] = load(out + r * D + k * W);
    }
  }
  // As in score_element: few rows hold their operands, many rows the codes.
  auto code = [&](vu w, int k) {
    vu x = w >> uint32_t((K0 + k) * BITS);
    if ((K0 + k + 1) * BITS != 32) {
      x &= kMask;
    }
    return decode_codes<MODE, BITS>(x);
  };
  auto operand = [&](int r, int j) {
    return kSplatOperands ? load(ps + (r * kb + j) * W) : splat(ps[r * kb + j]);
  };
  for (int j = 0; j < nk; ++j) {
    const vu w = loadu(chunk + j * stride);
    if constexpr (NR < KK) {
      vf pv[NR];
      for (int r = 0; r < NR; ++r) {
        pv[r] = operand(r, j);
      }
      for (int k = 0; k < KK; ++k) {
        const vf c = code(w, k);
        for (int r = 0; r < NR; ++r) {
          acc[r][k] += pv[r] * c;
        }
      }
    } else {
      vf c[KK];
      for (int k = 0; k < KK; ++k) {
        c[k] = code(w, k);
      }
      for (int r = 0; r < NR; ++r) {
        const vf pv = operand(r, j);
        for (int k = 0; k < KK; ++k) {
          acc[r][k] += pv * c[k];
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int k = 0; k < KK; ++k) {
      store(out + r * D + k * W, acc[r][k]);
    }
  }
  if constexpr (K0 + KK < E) {
    output_lane_elems<MODE, BITS, NR, K0 + KK>(sc, rows, stride, c, g, nk, D, O);
  }
}

// O[r * D + i] (value order) += sum_j P[r * kb + j] * value j, element i,
// for NR rows over the nk keys of the block stage_values left, whose chunks
// each lie in one group. Value row j's words start at rows + j * stride.
template <int MODE, int BITS, int NR>
void fused_output(const float* P, const uint32_t* rows, int64_t stride, int nk, int D, int gs, const Scratch& sc,
                  float* O) {
  constexpr int E = permuted_elems(BITS);
  constexpr int kb = kFusedKb;
  const int ng = D / gs, gshift = __builtin_ctz(gs), chunks = D / (W * E);
  float* const ps = sc.ps;
  const float* const vst = sc.vst;
  const float* const vbt = sc.vbt;
  // The probabilities times the value scales, per group.
  for (int r = 0; r < NR; ++r) {
    for (int g = 0; g < ng; ++g) {
      for (int j = 0; j < kb; j += W) {
        const vf x = load(P + r * kb + j) * load(vst + g * kb + j);
        if constexpr (kSplatOperands) {
          for (int l = 0; l < W; ++l) {
            store(ps + ((g * kFusedRows + r) * kb + j + l) * W, splat(x[l]));
          }
        } else {
          store(ps + (g * kFusedRows + r) * kb + j, x);
        }
      }
    }
  }
  for (int c = 0; c < chunks; ++c) {
    output_lane_elems<MODE, BITS, NR, 0>(sc, rows, stride, c, (c * W * E) >> gshift, nk, D, O);
  }
  if constexpr (qsdpa::mode_has_bias(MODE)) {
    // sum_j p_j b_jg per row and group, added to the group's elements.
    for (int r = 0; r < NR; ++r) {
      for (int g = 0; g < ng; ++g) {
        vf acc = {};
        for (int j = 0; j < kb; j += W) {
          acc += load(P + r * kb + j) * load(vbt + g * kb + j);
        }
        const vf bias = splat(hsum(acc));
        for (int i = g * gs; i < (g + 1) * gs; i += W) {
          store(O + r * D + i, load(O + r * D + i) + bias);
        }
      }
    }
  }
}

using DecodeFn = void (*)(const Problem&, int, int, int, int, const Scratch&);
using FusedScoreFn = void (*)(const float*, const float*, int, int, const Scratch&, float*);
using FusedOutputFn = void (*)(const float*, const uint32_t*, int64_t, int, int, int, const Scratch&, float*);

// The masks of one row's kb scores: keys at or past `visible` (the causal
// limit or the block's end, relative to j0) and the mask array's entries.
void mask_row(const Problem& p, int b, const RowRef& ref, int j0, int visible, int kb, float* s) {
  for (int j = imax(visible, 0); j < kb; ++j) {
    s[j] = -kInf;
  }
  const int n = imin(visible, kb);
  if (p.mask == qsdpa::kMaskBool || p.mask == qsdpa::kMaskAdditive) {
    const int64_t base = b * p.ms[0] + ref.h * p.ms[1] + ref.i * p.ms[2] + j0 * p.ms[3];
    if (p.mask == qsdpa::kMaskBool) {
      const bool* mp = static_cast<const bool*>(p.mask_ptr) + base;
      for (int j = 0; j < n; ++j) {
        if (!mp[j * p.ms[3]]) {
          s[j] = -kInf;
        }
      }
    } else {
      const float* mp = static_cast<const float*>(p.mask_ptr) + base;
      for (int j = 0; j < n; ++j) {
        s[j] += mp[j * p.ms[3]] * kLog2e;
      }
    }
  }
}

// The online softmax step of one row over a block's scores: turns s into
// probabilities 2^(s - m) (zeros where the row takes nothing from this
// block) and updates m, l and the row's output. A NaN or +inf score makes
// the row NaN, as in MLX's softmax: m becomes NaN and stays so. Returns
// whether the row takes anything from this block.
bool softmax_row(float* s, int kb, float& m, float& l, float* o, int D) {
  if (m != m) {
    std::memset(s, 0, sizeof(float) * kb);
    return false;
  }
  vf vmax = splat(-kInf);
  vi bad = {};
  for (int j = 0; j < kb; j += W) {
    const vf x = load(s + j);
    bad |= (x != x) | (x == kInf);
    vmax = x > vmax ? x : vmax;
  }
  bool any_bad = false;
  for (int i = 0; i < W; ++i) {
    any_bad |= bad[i] != 0;
  }
  const float bm = hmax(vmax);
  const float m_new = bm > m ? bm : m;
  if (any_bad || m_new == -kInf) {
    if (any_bad) {
      m = __builtin_nanf("");
      l = __builtin_nanf("");
    }
    std::memset(s, 0, sizeof(float) * kb);
    return false;
  }
  const float corr = m == -kInf ? 0.0f : __builtin_exp2f(m - m_new);
  vf vsum = {};
  for (int j = 0; j < kb; j += W) {
    const vf e = exp2_nonpos(load(s + j) - m_new);
    store(s + j, e);
    vsum += e;
  }
  l = l * corr + hsum(vsum);
  m = m_new;
  if (corr != 1.0f) {
    const vf c = splat(corr);
    for (int d = 0; d < D; d += W) {
      store(o + d, load(o + d) * c);
    }
  }
  return true;
}

inline float load_query(const void* q, int64_t i, int type) {
  switch (type) {
    case qsdpa::kElemFloat32:
      return static_cast<const float*>(q)[i];
    case qsdpa::kElemFloat16:
      return half_to_float(static_cast<const uint16_t*>(q)[i]);
    default:
      return qsdpa::bf16_bits_to_float(static_cast<const uint16_t*>(q)[i]);
  }
}

// The functions of a call's key and value formats (chosen per call: keys and
// values of different formats cost no more kernels than the table's rows).
struct Kernels {
  DecodeFn decode_keys, decode_values, stage_keys, stage_values;
  FusedScoreFn scores[4]; // per fused tile (fused_tile_index)
  FusedOutputFn outputs[4]; // per fused tile; null outside the value order
};

// The masks and the online softmax of rows [t0, t0 + nt) over the block's
// scores in sc.s (row t at sc.s + t * kb), which become probabilities.
// Returns whether any row takes something from the block.
bool softmax_rows(const Problem& p, const Item& it, const Scratch& sc, const ItemResult& out, float* o,
                  int t0, int nt, int j0, int nk) {
  bool any = false;
  for (int t = 0; t < nt; ++t) {
    const int r = t0 + t;
    float* st = sc.s + t * sc.kb;
    const RowRef& ref = sc.refs[r];
    mask_row(p, it.b, ref, j0, imin(nk, ref.limit - j0), sc.kb, st);
    any |= softmax_row(st, sc.kb, out.m[r], out.l[r], o + static_cast<int64_t>(r) * p.D, p.D);
  }
  return any;
}

// Whether rows [t0, t0 + nt) need the block at j0: some row sees a key of
// it and is not NaN already.
bool tile_live(const Scratch& sc, const ItemResult& out, int t0, int nt, int j0) {
  bool live = false;
  for (int t = 0; t < nt; ++t) {
    live |= sc.refs[t0 + t].limit > j0 && out.m[t0 + t] == out.m[t0 + t];
  }
  return live;
}

// One block of keys through float tiles: K and V decoded once, then every
// tile of kRowTile rows.
void tile_block(const Problem& p, const Item& it, const Scratch& sc, const ItemResult& out, float* o,
                const Kernels& kn, int j0, int nk) {
  const int D = p.D, kb = sc.kb;
  kn.decode_keys(p, it.b, it.kvh, j0, nk, sc);
  kn.decode_values(p, it.b, it.kvh, j0, nk, sc);
  for (int t0 = 0; t0 < it.nr; t0 += kRowTile) {
    const int nt = imin(kRowTile, it.nr - t0);
    if (!tile_live(sc, out, t0, nt, j0)) {
      continue; // every row of the tile is masked here, or already NaN
    }
    kScoreTiles[nt](sc.q + static_cast<int64_t>(t0) * D, D, sc.kt, kb, sc.s);
    if (softmax_rows(p, it, sc, out, o, t0, nt, j0, nk)) {
      kOutputTiles[nt](sc.s, kb, sc.vtile, nk, D, o + static_cast<int64_t>(t0) * D);
    }
  }
}

// One block of keys through the fused path: the keys' words and the values'
// chunks staged once, then every tile of up to kFusedRows rows decodes them
// straight into its FMAs. Values outside the value order are decoded to a
// float tile once.
void fused_block(const Problem& p, const Item& it, const Scratch& sc, const ItemResult& out, float* o,
                 const Kernels& kn, int j0, int nk, bool permuted) {
  const int D = p.D, kb = sc.kb, ngk = D / p.k.group_size;
  // Values in the value order whose chunks each lie in one group take the
  // fused loop; the others (chunks across groups would need per-lane
  // scales per key and row) a float tile decoded once.
  const bool fused_values = permuted && W * permuted_elems(p.v.bits) <= p.v.group_size && kn.stage_values;
  kn.stage_keys(p, it.b, it.kvh, j0, nk, sc);
  (fused_values ? kn.stage_values : kn.decode_values)(p, it.b, it.kvh, j0, nk, sc);
  // The value rows: in the cache, or staged (stage_values).
  const QuantTensor& qv = p.v;
  const bool in_place = values_in_place(p);
  const uint32_t* const vrows = in_place ? qv.w + it.b * qv.ws[0] + it.kvh * qv.ws[1] + j0 * qv.ws[2]
                                         : reinterpret_cast<const uint32_t*>(sc.vw);
  const int64_t vstride = in_place ? qv.ws[2] : D / permuted_elems(qv.bits);
  for (int t0 = 0; t0 < it.nr; t0 += kFusedRows) {
    const int nt = imin(kFusedRows, it.nr - t0), rows = fused_tile_rows(nt);
    if (!tile_live(sc, out, t0, nt, j0)) {
      continue;
    }
    const int tile = fused_tile_index(rows);
    kn.scores[tile](sc.qf + static_cast<int64_t>(t0) * D * kOperandFloats, sc.qsum + t0 * ngk, D, p.k.group_size,
                    sc, sc.s);
    const bool any = softmax_rows(p, it, sc, out, o, t0, nt, j0, nk);
    std::memset(sc.s + nt * kb, 0, sizeof(float) * (rows - nt) * kb); // the padding rows
    if (!any) {
      continue;
    }
    if (fused_values) {
      kn.outputs[tile](sc.s, vrows, vstride, nk, D, p.v.group_size, sc, o + static_cast<int64_t>(t0) * D);
    } else {
      for (int t = 0; t < nt; t += kRowTile) {
        kOutputTiles[imin(kRowTile, nt - t)](sc.s + t * kb, kb, sc.vtile, nk, D, o + static_cast<int64_t>(t0 + t) * D);
      }
    }
  }
}

// The queries of `rows` rows (Q[r * D + d]) as fused_scores reads them:
// Qf[((tile * D + d) * kFusedRows + r % kFusedRows) * kOperandFloats] (as
// many copies as kOperandFloats), and their sums per key group at
// qsum[(tile * ng + g) * kFusedRows + r % kFusedRows].
void fused_queries(const float* Q, int rows, int D, int gs, const Scratch& sc) {
  const int ng = D / gs;
  for (int r = 0; r < rows; ++r) {
    const int64_t tile = r / kFusedRows, t = r % kFusedRows;
    const float* qr = Q + static_cast<int64_t>(r) * D;
    for (int d = 0; d < D; ++d) {
      float* at = sc.qf + ((tile * D + d) * kFusedRows + t) * kOperandFloats;
      if constexpr (kSplatOperands) {
        store(at, splat(qr[d]));
      } else {
        *at = qr[d];
      }
    }
    for (int g = 0; g < ng; ++g) {
      float sum = 0.0f;
      for (int d = g * gs; d < (g + 1) * gs; ++d) {
        sum += qr[d];
      }
      sc.qsum[(tile * ng + g) * kFusedRows + t] = sum;
    }
  }
}

void run_item_with(const Problem& p, const Item& it, void* scratch, const ItemResult& out, const Kernels& kn) {
  const bool fused = fused_item(it.nr);
  const Scratch sc = carve(layout(p, it.nr, fused), scratch);
  const int D = p.D, kb = sc.kb, nr = it.nr;
  const bool permuted = values_permuted(p);
  float* const o = permuted ? sc.o : out.o; // the outputs, in value order

  int key_end = 0; // the last key any row sees, + 1
  for (int r = 0; r < nr; ++r) {
    const RowRef ref = row_ref(p, it.kvh, it.r0 + r);
    sc.refs[r] = ref;
    key_end = imax(key_end, ref.limit);
    const int64_t qb = it.b * p.qs[0] + ref.h * p.qs[1] + ref.i * p.qs[2];
    float* qr = sc.q + static_cast<int64_t>(r) * D;
    bool finite = true;
    for (int d = 0; d < D; ++d) {
      const float x = load_query(p.q, qb + d * p.qs[3], p.q_type);
      finite &= x - x == 0.0f;
      qr[d] = x * p.scale_log2;
    }
    std::memset(o + static_cast<int64_t>(r) * D, 0, sizeof(float) * D);
    // A non-finite query makes every score it meets NaN or infinite: the
    // row is NaN (as in MLX) unless it sees no key at all.
    out.m[r] = finite || ref.limit <= it.k0 ? -kInf : __builtin_nanf("");
    out.l[r] = finite || ref.limit <= it.k0 ? 0.0f : __builtin_nanf("");
  }
  if (fused) {
    // Padding rows of the last tile: zero queries; zero outputs where the
    // outputs are the scratch's.
    const int padded = (nr + kFusedRows - 1) / kFusedRows * kFusedRows;
    std::memset(sc.q + static_cast<int64_t>(nr) * D, 0, sizeof(float) * (padded - nr) * D);
    if (permuted) {
      std::memset(o + static_cast<int64_t>(nr) * D, 0, sizeof(float) * (padded - nr) * D);
    }
    fused_queries(sc.q, padded, D, p.k.group_size, sc);
  }

  const int kend = imin(it.k1, key_end);
  for (int j0 = it.k0; j0 < kend; j0 += kb) {
    const int nk = imin(kb, kend - j0);
    if (fused) {
      fused_block(p, it, sc, out, o, kn, j0, nk, permuted);
    } else {
      tile_block(p, it, sc, out, o, kn, j0, nk);
    }
  }
  if (permuted) {
    unpermute_rows(o, nr, D, p.v.bits, out.o);
  }
}

// ---------------------------------------------------------------------------
// The kernels of each format, and the variant's entry points.
// ---------------------------------------------------------------------------

// The scale kind of a tensor of mode MODE whose float scales (if any) have
// dtype scale_type, as a template argument of F.
template <int MODE, typename F>
void with_scale_kind(int scale_type, F&& f) {
  constexpr int kScales = qsdpa::mode_scale_kind(MODE);
  if constexpr (kScales == qsdpa::kScaleFloat || kScales == qsdpa::kScaleNorm) {
    switch (scale_type) {
      case qsdpa::kElemFloat32:
        return f(std::integral_constant<int, kScaleF32>());
      case qsdpa::kElemFloat16:
        return f(std::integral_constant<int, kScaleF16>());
      default:
        return f(std::integral_constant<int, kScaleBF16>());
    }
  } else if constexpr (kScales == qsdpa::kScaleFp8E4M3) {
    return f(std::integral_constant<int, kScaleE4M3>());
  } else {
    static_assert(kScales == qsdpa::kScaleE8M0);
    return f(std::integral_constant<int, kScaleE8M0>());
  }
}

template <int MODE, int BITS>
void pick_keys(int scale_type, Kernels& kn) {
  with_scale_kind<MODE>(scale_type, [&](auto sk) {
    kn.decode_keys = decode_keys<MODE, BITS, decltype(sk)::value>;
    kn.stage_keys = stage_keys<MODE, BITS, decltype(sk)::value>;
  });
  if constexpr (kFusedMaxRows > 0) {
    kn.scores[0] = fused_scores<MODE, BITS, 1>;
    kn.scores[1] = fused_scores<MODE, BITS, 2>;
    kn.scores[2] = fused_scores<MODE, BITS, 4>;
    kn.scores[3] = fused_scores<MODE, BITS, 8>;
  }
}

template <int MODE, int BITS>
void pick_values(int scale_type, Kernels& kn) {
  with_scale_kind<MODE>(scale_type, [&](auto sk) {
    kn.decode_values = decode_values<MODE, BITS, decltype(sk)::value>;
    if constexpr (kFusedValues<BITS>) {
      kn.stage_values = stage_values<MODE, BITS, decltype(sk)::value>;
    }
  });
  if constexpr (kFusedValues<BITS>) {
    kn.outputs[0] = fused_output<MODE, BITS, 1>;
    kn.outputs[1] = fused_output<MODE, BITS, 2>;
    kn.outputs[2] = fused_output<MODE, BITS, 4>;
    kn.outputs[3] = fused_output<MODE, BITS, 8>;
  }
}

// The kernels of the keys' and the values' formats (the op validated each
// against the table).
Kernels pick_kernels(const Problem& p) {
  Kernels kn{};
  qsdpa::dispatch_format(p.k.mode, p.k.bits, [&](auto fmt) {
    pick_keys<decltype(fmt)::mode, decltype(fmt)::bits>(p.k.scale_type, kn);
  });
  qsdpa::dispatch_format(p.v.mode, p.v.bits, [&](auto fmt) {
    pick_values<decltype(fmt)::mode, decltype(fmt)::bits>(p.v.scale_type, kn);
  });
  return kn;
}

size_t scratch_bytes(const Problem& p, int max_rows) {
  const size_t tiles = layout(p, max_rows, false).total;
  const size_t fused = layout(p, imin(max_rows, kFusedMaxRows), true).total;
  return tiles > fused ? tiles : fused;
}

void run_item(const Problem& p, const Item& it, void* scratch, const ItemResult& out) {
  run_item_with(p, it, scratch, out, pick_kernels(p));
}

} // namespace
} // namespace QSDPA_CPU_VARIANT_NS

extern const Variant QSDPA_CPU_VARIANT = {
    QSDPA_CPU_VARIANT_NAME, QSDPA_CPU_VARIANT_NS::scratch_bytes, QSDPA_CPU_VARIANT_NS::run_item};

} // namespace mlx_qsdpa::cpu
