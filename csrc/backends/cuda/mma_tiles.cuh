// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core kernel's MMAs over one 16-key tile of a ring stage:
// S^T = K Q^T (k_scores, or k_scores_scale_after for affine K codes that go
// into the MMA in their magic form) and O^T += V^T P^T (v_accumulate), the
// codes decoded into T as they are read from the stage (MmaFormat). The
// fragment layouts are at the top of decode_mma.cuh.
#pragma once

#include "mma_query.cuh"
#include "mma_ring.cuh"
#include "mma_shape.cuh"
#include "ptx.cuh"

namespace mlx_qsdpa::cuda {

namespace mma_detail {

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

} // namespace mma_detail

template <typename S>
struct MmaTiles {
  using F = typename S::F;
  using T = typename S::T;
  using Ring = MmaRing<S>;
  using PairScale = typename F::PairScale;
  using QueryOperands = typename MmaQuery<S>::Operands;
  static constexpr int NT = S::kRowTiles;
  static constexpr int kCodesPerWord = F::kCodesPerWord;

  // MMA accumulators of the row tiles, zeroed.
  static __device__ __forceinline__ void zero_tiles(float (&x)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        x[nt][e] = 0.0f;
      }
    }
  }

  // ---- Scales of a stage ----

  // A raw scale (or bias) of key row `key` (of the stage), group `grp`.
  static __device__ __forceinline__ uint32_t scale_raw(const unsigned char* st, int array, int key, int grp) {
    const unsigned char* a = st + Ring::kScalesAt + array * Ring::kScaleArrayBytes;
    if constexpr (F::kScaleBytes == 2) {
      return reinterpret_cast<const uint16_t*>(a)[key * S::kGroups + grp];
    } else {
      return a[key * S::kGroups + grp];
    }
  }

  // The PairScale of keys key_lo, key_hi, group grp (scale array sa, bias
  // array ba).
  static __device__ __forceinline__ PairScale pair_scale(
      const unsigned char* st, int sa, int ba, int key_lo, int key_hi, int grp) {
    const uint32_t rs0 = scale_raw(st, sa, key_lo, grp);
    const uint32_t rs1 = scale_raw(st, sa, key_hi, grp);
    return F::pair_scale(rs0, rs1, [&](int h) { return scale_raw(st, ba, h == 0 ? key_lo : key_hi, grp); });
  }

  // The PairScales of a lane's two fragment row pairs (h = 0, 1: keys key0
  // + 8h and key0 + 8h + step), groups grp0 .. grp0 + NGX - 1.
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
  // magic path with at most two groups per row: both keys' elements of a
  // group lie in one 4-byte (one group) or 8-byte (two groups) run, read at
  // once, and the pair is that word or one byte permutation of the two
  // (instead of two 2-byte reads and a permutation per array).
  static constexpr bool kAdjacentScaleRuns = F::kHalfMagic && S::kGroups <= 2;
  template <int NGX>
  static __device__ __forceinline__ void adjacent_pair_scales(
      const unsigned char* st, int sa, int ba, int key0, int grp0, PairScale (&ps)[2][NGX]) {
    static_assert(NGX == 1 && F::kScaleBytes == 2, "one group per pair, T scales");
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = key0 + 8 * h;
      uint32_t sw[2], bw[2];
      const unsigned char* scales = st + Ring::kScalesAt + sa * Ring::kScaleArrayBytes + key * S::kScaleRowBytes;
      const unsigned char* biases = st + Ring::kScalesAt + ba * Ring::kScaleArrayBytes + key * S::kScaleRowBytes;
      mma_detail::load_shared<2 * S::kScaleRowBytes>(scales, sw);
      mma_detail::load_shared<2 * S::kScaleRowBytes>(biases, bw);
      PairScale& x = ps[h][0];
      if constexpr (S::kGroups == 1) {
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

  // ---- S^T = K Q^T ----

  // k_scores' MMAs over the head dim: even and odd k-chunks into s and s2.
  template <bool FP4, int NGK>
  static __device__ __forceinline__ void k_chunks(
      const uint32_t (&kw)[2][S::kLaneSpanWords],
      const PairScale (&ks)[2][NGK],
      const QueryOperands& q,
      float (&s)[NT][4],
      float (&s2)[NT][4]) {
#pragma unroll
    for (int c = 0; c < S::kDimChunks; ++c) {
      uint32_t a[4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int lo = S::pair_lo(2 * c + j);
        const int sh = qsdpa::element_shift(lo % kCodesPerWord, S::kBits);
        const int gi = NGK > 1 ? lo / S::kGroupSize : 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[2 * j + h] = F::template dequant_pair<FP4>(kw[h][lo / kCodesPerWord], sh, ks[h][gi]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_detail::mma_16816<T>(c % 2 == 0 ? s[nt] : s2[nt], a, q.b[nt][c][0], q.b[nt][c][1]);
      }
    }
  }

  // S^T = K Q^T over the 16 keys from lk0 of stage st, codes dequantized
  // into T before the MMA. Two accumulator chains (even and odd k-chunks),
  // summed at the end: each MMA waits for the previous one of its chain only.
  static __device__ __forceinline__ void k_scores(
      const unsigned char* st, int lk0, int g, int t, const QueryOperands& q, float (&s)[NT][4]) {
    float s2[NT][4];
    zero_tiles(s);
    zero_tiles(s2);
    uint32_t kw[2][S::kLaneSpanWords];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mma_detail::load_shared<S::kLaneSpanBytes>(st + (lk0 + g + 8 * h) * S::kRowBytes + t * S::kLaneSpanBytes, kw[h]);
    }
    // Groups of lane t's quarter: one unless the quarter spans several.
    constexpr int NGK = S::kLaneSpan >= S::kGroupSize ? S::kLaneSpan / S::kGroupSize : 1;
    PairScale ks[2][NGK];
    pair_scales(st, Ring::kKeyScales, Ring::kKeyBiases, lk0 + g, 0, (S::kLaneSpan * t) / S::kGroupSize, ks);
    if constexpr (F::kFp4) {
      if (all_exact(ks)) {
        k_chunks<true>(kw, ks, q, s, s2);
      } else {
        k_chunks<false>(kw, ks, q, s, s2);
      }
    } else {
      k_chunks<false>(kw, ks, q, s, s2);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] += s2[nt][e];
      }
    }
  }

  // The same with the scale after the MMA (S::kScaleAfter): the codes'
  // exact magic form M + c goes into the MMA, one accumulator per group,
  // which starts at -sum(M q) (M: each element's magic) and so ends at
  // sum(c q); then per key (rows g, g + 8) and query row, in fp32,
  //   S = sum over groups of  s * acc + b * qsum.
  static __device__ __forceinline__ void k_scores_scale_after(
      const unsigned char* st, int lk0, int g, int t, const QueryOperands& q, float (&s)[NT][4]) {
    // Scales and biases of the two keys, every group (one vector load each).
    constexpr int SW = (S::kScaleRowBytes + 3) / 4;
    uint32_t ksw[2][SW], kbw[2][SW];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = lk0 + g + 8 * h;
      const unsigned char* scales =
          st + Ring::kScalesAt + Ring::kKeyScales * Ring::kScaleArrayBytes + key * S::kScaleRowBytes;
      const unsigned char* biases =
          st + Ring::kScalesAt + Ring::kKeyBiases * Ring::kScaleArrayBytes + key * S::kScaleRowBytes;
      mma_detail::load_shared<S::kScaleRowBytes>(scales, ksw[h]);
      mma_detail::load_shared<S::kScaleRowBytes>(biases, kbw[h]);
    }
    zero_tiles(s);
#pragma unroll
    for (int sp = 0; sp < S::kSpans; ++sp) {
      float acc[NT][4];
      span_mma(st, lk0, g, t, sp, q, acc);
      float sc[2], bi[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sc[h] = F::scale_value((ksw[h][sp / 2] >> (16 * (sp % 2))) & 0xffffu);
        bi[h] = F::scale_value((kbw[h][sp / 2] >> (16 * (sp % 2))) & 0xffffu);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          s[nt][e4] = fmaf(sc[e4 >> 1], acc[nt][e4], fmaf(bi[e4 >> 1], q.sum[nt][sp][e4 & 1], s[nt][e4]));
        }
      }
    }
  }

  // k_scores_scale_after's MMAs of span sp: sum(c q) over the span of keys
  // lk0 + g (+ 8), into acc.
  static __device__ __forceinline__ void span_mma(
      const unsigned char* st, int lk0, int g, int t, int sp, const QueryOperands& q, float (&acc)[NT][4]) {
    uint32_t kw[2][S::kLaneSpanWords];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mma_detail::load_shared<S::kLaneSpanBytes>(
          st + (lk0 + g + 8 * h) * S::kRowBytes + sp * (S::kSpan * S::kBits / 8) + t * S::kLaneSpanBytes, kw[h]);
    }
    // The accumulators start at -sum(M q), so that they end at sum(c q).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        acc[nt][e4] = q.neg_magic_sum[nt][sp][e4 & 1];
      }
    }
#pragma unroll
    for (int cc = 0; cc < S::kChunksPerSpan; ++cc) {
      uint32_t a[4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int lo = S::pair_lo(2 * cc + j);
        const int sh = qsdpa::element_shift(lo % kCodesPerWord, S::kBits);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[2 * j + h] = F::magic_pair(kw[h][lo / kCodesPerWord], sh);
        }
      }
      const int c = sp * S::kChunksPerSpan + cc;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_detail::mma_16816<T>(acc[nt], a, q.b[nt][c][0], q.b[nt][c][1]);
      }
    }
  }

  // ---- O^T += V^T P^T ----

  // O^T += V^T P^T over the 16 keys from lk0 of stage st.
  static __device__ __forceinline__ void v_accumulate(
      const unsigned char* st, int lk0, int g, int t, const uint32_t (&pb)[NT][2], float (&o)[S::kDimChunks][NT][4]) {
    // Keys 2t, 2t+1 (pair h = 0) and 2t+8, 2t+9 (h = 1), the g-th
    // eighth of each row.
    uint32_t vw[4][S::kLaneValueWords];
#pragma unroll
    for (int kp = 0; kp < 4; ++kp) {
      const int key = lk0 + 2 * t + (kp & 1) + 8 * (kp >> 1);
      const unsigned char* run = st + Ring::kValueRowsAt + key * S::kRowBytes + g * S::kLaneValueBytes;
      mma_detail::load_shared<S::kLaneValueBytes>(run, vw[kp]);
    }
    constexpr int NGV = S::kLaneValues >= S::kGroupSize ? S::kLaneValues / S::kGroupSize : 1;
    PairScale vs[2][NGV];
    pair_scales(st, Ring::kValueScales, Ring::kValueBiases, lk0 + 2 * t, 1, (S::kLaneValues * g) / S::kGroupSize, vs);
    if constexpr (F::kFp4) {
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
      const uint32_t (&vw)[4][S::kLaneValueWords],
      const PairScale (&vs)[2][NGV],
      const uint32_t (&pb)[NT][2],
      float (&o)[S::kDimChunks][NT][4]) {
#pragma unroll
    for (int j = 0; j < S::kDimChunks; ++j) {
      const int e0 = 2 * j; // elements e0 (head-dim row g) and e0 + 1 (row g + 8)
      const int wv = e0 / kCodesPerWord;
      const int sh = qsdpa::element_shift(e0 % kCodesPerWord, S::kBits);
      const int gi = NGV > 1 ? e0 / S::kGroupSize : 0;
      // Up to 4 bits, both elements lie in one byte, which goes to the
      // bottom of each half (so that they are at bits 0 and BITS of the
      // half, where magic_pair needs no shift); 8-bit elements take
      // the 16-bit half holding both.
      constexpr bool kByte = S::kBits <= 4;
      const int byte = sh / 8;
      const uint32_t sel = kByte ? uint32_t(byte * 0x11 + (byte + 4) * 0x1100) : (sh >= 16 ? 0x7632u : 0x5410u);
      const int s0 = kByte ? sh % 8 : sh % 16;
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Key A's elements in the low half, key B's in the high half.
        const uint32_t both = __byte_perm(vw[2 * h][wv], vw[2 * h + 1][wv], sel);
        a[2 * h] = F::template dequant_pair<FP4>(both, s0, vs[h][gi]);
        a[2 * h + 1] = F::template dequant_pair<FP4>(both, s0 + S::kBits, vs[h][gi]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_detail::mma_16816<T>(o[j][nt], a, pb[nt][0], pb[nt][1]);
      }
    }
  }
};

} // namespace mlx_qsdpa::cuda
