// Copyright © 2026 mlx-qsdpa contributors.
//
// The tensor-core decode kernel: fp16/bf16 queries, 2/4/8-bit codes (affine,
// mxfp4, nvfp4, mxfp8), head dims 64, 128 and 256.
//
// Why tensor cores in a memory-bound kernel: with GQA every decoded K/V
// element meets G * Lq query rows. On CUDA cores that is G * Lq fused
// multiply-adds per element for QK and again for PV, plus the shuffles of
// the dot-product reductions, which at G = 4 already cost as much time as
// reading the cache. mma.sync m16n8k16 does them for free next to the
// decode, so the kernel keeps up with HBM.
//
// Layout (FlashAttention-2 style, one warp per 16-key tile): the 16 query
// rows of the block are the M side of both products, S = Q K^T and O = P V,
// so the S accumulators are already the A operand of P V.
//   QK: B operand = K^T (k = head dim, n = 8 keys). Thread (g, t) (g = lane
//       / 4, t = lane % 4) needs 4 k-slots of one key per 16-wide chunk; the
//       dot product does not care which head-dim element sits in which
//       k-slot as long as Q uses the same order, so thread t takes the t-th
//       quarter of the key row (one contiguous vector load) and Q's
//       fragments are loaded in the matching permuted order.
//   PV: B operand = V (k = 16 keys, n = 8 head-dim columns). Thread (g, t)
//       holds keys 2t, 2t+1, 2t+8, 2t+9 at column g; column g of n-tile j is
//       element j of the g-th eighth of the row (again one contiguous load
//       per key), so output column n of n-tile j is d = n * D/8 + j.
// Codes become fp16/bf16 exactly (codes < 256), then the group scale and
// bias of formats.h's definition are applied before the MMA, so the products
// see the same K/V values that mx.dequantize gives in the cache dtype.
//
// Each warp keeps its own online softmax over its tiles (tiles w, w+4, ...
// of the block's key range); the block merges the four at the end. The
// next tile's packed words and scales are loaded before the current tile is
// used, so a warp always has a tile in flight.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace mlx_qsdpa::cuda {

namespace mma_detail {

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

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

// BYTES bytes (a power of two, at least 2) at p into words (the low half of
// out[0] for 2 bytes), with the widest aligned vector loads.
template <int BYTES, int N>
__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t (&out)[N]) {
  static_assert(N * 4 >= BYTES, "buffer too small");
  if constexpr (BYTES >= 16) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      out[4 * i] = v.x;
      out[4 * i + 1] = v.y;
      out[4 * i + 2] = v.z;
      out[4 * i + 3] = v.w;
    }
  } else if constexpr (BYTES == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    out[0] = v.x;
    out[1] = v.y;
  } else if constexpr (BYTES == 4) {
    out[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    static_assert(BYTES == 2, "unsupported run size");
    out[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  }
}

// An affine code as float without an int->float conversion instruction
// (those run at a quarter rate): 2^23 + code is a float whose low mantissa
// bits are the code. Equal to formats.h's decode_code<kAffine>(code).
__device__ __forceinline__ float affine_code_to_float(uint32_t code) {
  return __uint_as_float(code | 0x4b000000u) - 8388608.0f;
}

template <int MODE>
__device__ __forceinline__ float code_value(uint32_t code) {
  if constexpr (MODE == qsdpa::kAffine) {
    return affine_code_to_float(code);
  } else {
    return qsdpa::decode_code<MODE>(code);
  }
}

} // namespace mma_detail

template <typename T, int MODE, int BITS, int GS, int D>
struct MmaDecode {
  static_assert(D == 64 || D == 128 || D == 256, "head dims of the MMA kernel");
  static_assert(BITS == 2 || BITS == 4 || BITS == 8, "code widths of the MMA kernel");

  static constexpr int NCH = D / 16; // k-chunks of Q K^T
  static constexpr int RK = D / 4; // K run: elements per thread per key
  static constexpr int RV = D / 8; // V run: elements per thread per key = PV n-tiles
  static constexpr int EW = 32 / BITS; // elements per 32-bit word
  static constexpr int EH = 16 / BITS; // elements per 16-bit half word
  static constexpr int KB = RK * BITS / 8; // bytes of a K run
  static constexpr int VB = RV * BITS / 8; // bytes of a V run
  static constexpr int KW = KB / 4;
  static constexpr int VW = VB >= 4 ? VB / 4 : 1;
  static constexpr int NGK = RK >= GS ? RK / GS : 1; // groups in a K run
  static constexpr int NGV = RV >= GS ? RV / GS : 1; // groups in a V run
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
  static constexpr uint32_t kPairMask = kMask | (kMask << 16);
  // fp16 holds 1024 + code exactly for every code; bf16 (8 significant bits)
  // only below 128, so 8-bit affine codes go through float for bf16.
  static constexpr bool kHalfMagic = MODE == qsdpa::kAffine &&
      (std::is_same_v<T, __half> || BITS <= 4);

  // The pair trick below reads element k and element k + EW/2 of a word as
  // the low and high halves: formats.h's layout must put them 16 bits apart.
  static_assert(qsdpa::element_shift(EW / 2, BITS) == 16, "pair layout");
  static_assert(KB >= 4 && VB >= 2, "run sizes");

  // One 16-key tile's packed words and raw scales/biases.
  struct Raw {
    uint32_t k[2][KW]; // keys 8 nt + g, the t-th quarter of the row
    uint32_t ks[2][NGK], kb[2][NGK];
    uint32_t v[4][VW]; // keys 2t, 2t+1, 2t+8, 2t+9, the g-th eighth of the row
    uint32_t vs[4][NGV], vb[4][NGV];
  };

  // Group of element e of a run that starts at element `start`.
  static __device__ __forceinline__ int group_of(int start, int e) {
    return (start + e) / GS;
  }

  // ---- the shared-memory ring of tiles in flight ----
  //
  // Each warp streams its tiles through NS stages of shared memory with
  // cp.async: the copies of NS - 1 tiles are in flight while one is decoded,
  // without holding registers (a register double buffer left too few bytes
  // in flight to cover HBM latency). Each thread copies exactly the bytes it
  // later reads itself, so no barrier is needed between copy and use. Scales
  // and biases (2 or 1 bytes) travel as the aligned 4-byte word that holds
  // them (cp.async moves 4, 8 or 16 bytes), with their byte offsets kept.
  static constexpr int KBP = KB; // >= 4
  static constexpr int VBP = VB >= 4 ? VB : 4;
  static constexpr int NSC = 2 * NGK * (MODE == qsdpa::kAffine ? 2 : 1) +
      4 * NGV * (MODE == qsdpa::kAffine ? 2 : 1); // scale words per thread
  static_assert(NSC <= 16, "scale byte offsets must fit one word");
  struct Stage {
    uint32_t k[2][32][KBP / 4];
    uint32_t v[4][32][VBP / 4];
    uint32_t sc[NSC][32];
    uint32_t shifts[32];
  };
  static constexpr int kStageBytes = int(sizeof(Stage));
  static constexpr int NS = kStageBytes <= 4096 ? 4 : 3;
  static constexpr int kRingBytes = 4 * NS * kStageBytes; // 4 warps
  static constexpr int kSmemBytes =
      kRingBytes > int(sizeof(EpilogueSmem<kMmaRows>)) ? kRingBytes : int(sizeof(EpilogueSmem<kMmaRows>));

  static __device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  }

  template <int BYTES>
  static __device__ __forceinline__ void cp_async(void* dst, const void* src) {
    if constexpr (BYTES == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(BYTES)
                   : "memory");
    }
  }

  // BYTES (a multiple of 4, or 2) from global p into shared dst.
  template <int BYTES>
  static __device__ __forceinline__ void copy_run(uint32_t* dst, const uint8_t* p) {
    if constexpr (BYTES >= 16) {
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) {
        cp_async<16>(dst + 4 * i, p + 16 * i);
      }
    } else if constexpr (BYTES == 2) {
      // A half word: the aligned word holding it (the reader shifts).
      cp_async<4>(dst, reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(3)));
    } else {
      cp_async<BYTES>(dst, p);
    }
  }

  // Copies the words and raw scales of the tile at key0 into `st`.
  static __device__ __forceinline__ void issue_tile(
      const Params& p, int b, int kvh, int key0, int k_last, int g, int t, int lane, Stage& st) {
    const QuantTensor& K = p.k;
    const QuantTensor& V = p.v;
    constexpr bool affine = MODE == qsdpa::kAffine;
    uint32_t shifts = 0;
    int si = 0;
    auto scale_word = [&](const void* base, int64_t idx, int type) {
      const int esz = type == kF32 ? 4 : (type == kU8 ? 1 : 2);
      const uintptr_t a = reinterpret_cast<uintptr_t>(base) + uintptr_t(idx * esz);
      cp_async<4>(&st.sc[si][lane], reinterpret_cast<const void*>(a & ~uintptr_t(3)));
      shifts |= uint32_t(a & 3u) << (2 * si);
      ++si;
    };
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int key = min(key0 + 8 * nt + g, k_last);
      const int64_t row = int64_t(b) * K.ws[0] + int64_t(kvh) * K.ws[1] + int64_t(key) * K.ws[2];
      copy_run<KB>(st.k[nt][lane], reinterpret_cast<const uint8_t*>(K.w + row) + KB * t);
      const int64_t srow = int64_t(b) * K.ss[0] + int64_t(kvh) * K.ss[1] + int64_t(key) * K.ss[2];
      const int64_t brow = int64_t(b) * K.bs[0] + int64_t(kvh) * K.bs[1] + int64_t(key) * K.bs[2];
#pragma unroll
      for (int gi = 0; gi < NGK; ++gi) {
        const int grp = group_of(RK * t, gi * GS);
        scale_word(K.scales, srow + grp * K.ss[3], K.scale_type);
        if constexpr (affine) {
          scale_word(K.biases, brow + grp * K.bs[3], K.scale_type);
        }
      }
    }
#pragma unroll
    for (int kp = 0; kp < 4; ++kp) {
      const int key = min(key0 + 2 * t + (kp & 1) + 8 * (kp >> 1), k_last);
      const int64_t row = int64_t(b) * V.ws[0] + int64_t(kvh) * V.ws[1] + int64_t(key) * V.ws[2];
      copy_run<VB>(st.v[kp][lane], reinterpret_cast<const uint8_t*>(V.w + row) + VB * g);
      const int64_t srow = int64_t(b) * V.ss[0] + int64_t(kvh) * V.ss[1] + int64_t(key) * V.ss[2];
      const int64_t brow = int64_t(b) * V.bs[0] + int64_t(kvh) * V.bs[1] + int64_t(key) * V.bs[2];
#pragma unroll
      for (int gi = 0; gi < NGV; ++gi) {
        const int grp = group_of(RV * g, gi * GS);
        scale_word(V.scales, srow + grp * V.ss[3], V.scale_type);
        if constexpr (affine) {
          scale_word(V.biases, brow + grp * V.bs[3], V.scale_type);
        }
      }
    }
    st.shifts[lane] = shifts; // an ordinary store: read back by this thread only
  }

  // The raw value (bits of its element type) of a copied scale word.
  static __device__ __forceinline__ uint32_t scale_raw(uint32_t word, uint32_t shifts, int si, int type) {
    const uint32_t v = word >> (8 * ((shifts >> (2 * si)) & 3u));
    return type == kF32 ? word : (type == kU8 ? (v & 0xffu) : (v & 0xffffu));
  }

  // The tile of `st` as registers (the layout the decode below reads).
  static __device__ __forceinline__ void read_tile(
      const Params& p, const Stage& st, int g, int lane, Raw& raw) {
    constexpr bool affine = MODE == qsdpa::kAffine;
    const uint32_t shifts = st.shifts[lane];
    int si = 0;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int w = 0; w < KW; ++w) {
        raw.k[nt][w] = st.k[nt][lane][w];
      }
#pragma unroll
      for (int gi = 0; gi < NGK; ++gi) {
        raw.ks[nt][gi] = scale_raw(st.sc[si][lane], shifts, si, p.k.scale_type);
        ++si;
        if constexpr (affine) {
          raw.kb[nt][gi] = scale_raw(st.sc[si][lane], shifts, si, p.k.scale_type);
          ++si;
        } else {
          raw.kb[nt][gi] = 0u;
        }
      }
    }
#pragma unroll
    for (int kp = 0; kp < 4; ++kp) {
#pragma unroll
      for (int w = 0; w < VW; ++w) {
        raw.v[kp][w] = st.v[kp][lane][w];
      }
      if constexpr (VB == 2) {
        // The run of thread g is the (g & 1) half of the word copied (rows
        // start on word boundaries, runs at 2 g bytes).
        raw.v[kp][0] = (g & 1) ? (raw.v[kp][0] >> 16) : (raw.v[kp][0] & 0xffffu);
      }
#pragma unroll
      for (int gi = 0; gi < NGV; ++gi) {
        raw.vs[kp][gi] = scale_raw(st.sc[si][lane], shifts, si, p.v.scale_type);
        ++si;
        if constexpr (affine) {
          raw.vb[kp][gi] = scale_raw(st.sc[si][lane], shifts, si, p.v.scale_type);
          ++si;
        } else {
          raw.vb[kp][gi] = 0u;
        }
      }
    }
  }

  // A code pair (lo code in bits [0, BITS), hi code in [16, 16 + BITS)) as a
  // dequantized T pair: the scales/biases of lo and hi are (s0, b0), (s1, b1).
  static __device__ __forceinline__ uint32_t dequant_pair(
      uint32_t codes, float s0, float b0, float s1, float b1, uint32_t s2h, uint32_t b2h) {
    if constexpr (kHalfMagic) {
      // T(magic + code) - T(magic) is the exact code; one fused
      // multiply-add in T applies scale and bias.
      constexpr uint32_t magic = std::is_same_v<T, __half> ? 0x64006400u : 0x43004300u;
      if constexpr (std::is_same_v<T, __half>) {
        const uint32_t x = codes | magic;
        const __half2 c = __hsub2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&magic));
        const __half2 r = __hfma2(c, *reinterpret_cast<const __half2*>(&s2h), *reinterpret_cast<const __half2*>(&b2h));
        return *reinterpret_cast<const uint32_t*>(&r);
      } else {
        const uint32_t x = codes | magic;
        const __nv_bfloat162 c = __hsub2(
            *reinterpret_cast<const __nv_bfloat162*>(&x), *reinterpret_cast<const __nv_bfloat162*>(&magic));
        const __nv_bfloat162 r = __hfma2(
            c, *reinterpret_cast<const __nv_bfloat162*>(&s2h), *reinterpret_cast<const __nv_bfloat162*>(&b2h));
        return *reinterpret_cast<const uint32_t*>(&r);
      }
    } else {
      const float lo = mma_detail::code_value<MODE>(codes & kMask);
      const float hi = mma_detail::code_value<MODE>((codes >> 16) & kMask);
      return mma_detail::pack2<T>(fmaf(lo, s0, b0), fmaf(hi, s1, b1));
    }
  }

  // A scale/bias pair in T (for the half-magic path).
  static __device__ __forceinline__ uint32_t t_pair(float a, float b) {
    return mma_detail::pack2<T>(a, b);
  }

  static __device__ __forceinline__ uint32_t t_pair_raw(uint32_t ra, uint32_t rb, int type) {
    if (std::is_same_v<T, __half> && type == kF16) {
      return (ra & 0xffffu) | (rb << 16);
    }
    if (std::is_same_v<T, __nv_bfloat16> && type == kBF16) {
      return (ra & 0xffffu) | (rb << 16);
    }
    return t_pair(raw_to_float(ra, type), raw_to_float(rb, type));
  }

  static __device__ __forceinline__ float scale_value(uint32_t raw, int type) {
    return decode_scale<MODE>(raw, type);
  }

  static __device__ void run(const Params& p) {
    constexpr int RT = kMmaRows;
    extern __shared__ __align__(16) unsigned char dyn_smem[];
    Stage* ring = reinterpret_cast<Stage*>(dyn_smem) + (threadIdx.x / 32) * NS;
    EpilogueSmem<RT>& smem = *reinterpret_cast<EpilogueSmem<RT>*>(dyn_smem); // after the loop

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int split = blockIdx.x;
    const int kvh = blockIdx.y % p.Hkv;
    const int r0 = (blockIdx.y / p.Hkv) * RT;
    const int b = blockIdx.z;
    const int nr = min(RT, p.rows - r0);

    // This thread's two rows: g and g + 8 of the tile.
    bool row_ok[2];
    RowRef refs[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = g + 8 * rh;
      row_ok[rh] = r < nr;
      refs[rh] = row_ref(p, b, kvh, r0 + min(r, nr - 1));
    }

    // Q as A fragments, in the k-slot order of the K runs (see the top).
    uint32_t qa[NCH][4];
    {
      const uint16_t* qp = static_cast<const uint16_t*>(p.q);
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int P = 2 * c + j;
          const int lo = RK * t + (P / (EW / 2)) * EW + P % (EW / 2);
          const int hi = lo + EW / 2;
#pragma unroll
          for (int rh = 0; rh < 2; ++rh) {
            uint32_t v = 0;
            if (row_ok[rh]) {
              const int64_t base = int64_t(b) * p.qs[0] + int64_t(refs[rh].h) * p.qs[1] + int64_t(refs[rh].i) * p.qs[2];
              v = uint32_t(qp[base + lo * p.qs[3]]) | (uint32_t(qp[base + hi * p.qs[3]]) << 16);
            }
            qa[c][2 * j + rh] = v;
          }
        }
      }
    }

    float o[RV][4];
#pragma unroll
    for (int j = 0; j < RV; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        o[j][e] = 0.0f;
      }
    }
    float m[2] = {neg_inf(), neg_inf()};
    float l[2] = {0.0f, 0.0f};

    int k_begin, k_end;
    split_range(p, split, r0 + nr - 1, k_begin, k_end);
    const int k_last = k_end - 1;
    const bool array_masked = p.mask_type == kMaskBool || p.mask_type == kMaskAdditive;

    // This warp's tiles start at key k_begin + 16 warp + 64 i.
    const int first = k_begin + 16 * warp;
    const int n_tiles = first < k_end ? (k_end - first + 63) / 64 : 0;
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) {
      if (i < n_tiles) {
        issue_tile(p, b, kvh, first + 64 * i, k_last, g, t, lane, ring[i]);
      }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int i = 0; i < n_tiles; ++i) {
      const int key0 = first + 64 * i;
      if (i + NS - 1 < n_tiles) {
        issue_tile(p, b, kvh, key0 + 64 * (NS - 1), k_last, g, t, lane, ring[(i + NS - 1) % NS]);
      }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
      // Tile i's group is complete once at most NS - 1 newer ones pend.
      asm volatile("cp.async.wait_group %0;\n" ::"n"(NS - 1) : "memory");
      Raw cur;
      read_tile(p, ring[i % NS], g, lane, cur);

      // ---- S = Q K^T over this tile's 16 keys ----
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = 0.0f;
        }
        float ksc[NGK], kbi[NGK];
        uint32_t ks2[NGK], kb2[NGK];
#pragma unroll
        for (int gi = 0; gi < NGK; ++gi) {
          ksc[gi] = scale_value(cur.ks[nt][gi], p.k.scale_type);
          kbi[gi] = MODE == qsdpa::kAffine ? raw_to_float(cur.kb[nt][gi], p.k.scale_type) : 0.0f;
          if constexpr (kHalfMagic) {
            ks2[gi] = t_pair_raw(cur.ks[nt][gi], cur.ks[nt][gi], p.k.scale_type);
            kb2[gi] = t_pair_raw(cur.kb[nt][gi], cur.kb[nt][gi], p.k.scale_type);
          } else {
            ks2[gi] = kb2[gi] = 0u;
          }
        }
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          uint32_t kf[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int P = 2 * c + j;
            const int wi = P / (EW / 2);
            const int sh = qsdpa::element_shift(P % (EW / 2), BITS);
            const int gi = (wi * EW) / GS < NGK ? (wi * EW) / GS : NGK - 1;
            const uint32_t codes = (cur.k[nt][wi] >> sh) & kPairMask;
            kf[j] = dequant_pair(codes, ksc[gi], kbi[gi], ksc[gi], kbi[gi], ks2[gi], kb2[gi]);
          }
          mma_detail::mma_16816<T>(s[nt], qa[c], kf[0], kf[1]);
        }
      }

      // ---- masks and the online softmax (rows g and g + 8) ----
      float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rh = e / 2;
          const int key = key0 + 8 * nt + 2 * t + (e & 1);
          float sc = s[nt][e] * p.scale_log2;
          if (key >= k_end || (p.mask_type == kMaskCausal && key > refs[rh].causal_limit)) {
            sc = neg_inf();
          } else if (array_masked && row_ok[rh]) {
            sc += array_mask(p, b, refs[rh], key);
          }
          if (sc != sc) {
            sc = neg_inf();
          }
          s[nt][e] = sc;
          mx[rh] = fmaxf(mx[rh], sc);
        }
      }
      float corr[2];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        mx[rh] = fmaxf(mx[rh], __shfl_xor_sync(0xffffffffu, mx[rh], 1));
        mx[rh] = fmaxf(mx[rh], __shfl_xor_sync(0xffffffffu, mx[rh], 2));
        const float m_new = fmaxf(m[rh], mx[rh]);
        const float base = m_new == neg_inf() ? 0.0f : m_new;
        corr[rh] = exp2f(m[rh] - base); // 0 while m is -inf, 1 if unchanged
        m[rh] = m_new;
        l[rh] *= corr[rh];
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rh = e / 2;
          const float base = m[rh] == neg_inf() ? 0.0f : m[rh];
          s[nt][e] = exp2f(s[nt][e] - base);
          l[rh] += s[nt][e];
        }
      }
      if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
        for (int j = 0; j < RV; ++j) {
          o[j][0] *= corr[0];
          o[j][1] *= corr[0];
          o[j][2] *= corr[1];
          o[j][3] *= corr[1];
        }
      }
      const uint32_t pa[4] = {
          mma_detail::pack2<T>(s[0][0], s[0][1]),
          mma_detail::pack2<T>(s[0][2], s[0][3]),
          mma_detail::pack2<T>(s[1][0], s[1][1]),
          mma_detail::pack2<T>(s[1][2], s[1][3]),
      };

      // ---- O += P V ----
      float vsc[4][NGV], vbi[4][NGV];
      uint32_t vs2[2][NGV], vb2[2][NGV];
#pragma unroll
      for (int gi = 0; gi < NGV; ++gi) {
#pragma unroll
        for (int kp = 0; kp < 4; ++kp) {
          vsc[kp][gi] = scale_value(cur.vs[kp][gi], p.v.scale_type);
          vbi[kp][gi] = MODE == qsdpa::kAffine ? raw_to_float(cur.vb[kp][gi], p.v.scale_type) : 0.0f;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if constexpr (kHalfMagic) {
            vs2[h][gi] = t_pair_raw(cur.vs[2 * h][gi], cur.vs[2 * h + 1][gi], p.v.scale_type);
            vb2[h][gi] = t_pair_raw(cur.vb[2 * h][gi], cur.vb[2 * h + 1][gi], p.v.scale_type);
          } else {
            vs2[h][gi] = vb2[h][gi] = 0u;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < RV; ++j) {
        const int wv = (j * BITS) / 32; // word of element j in the run
        const bool high = ((j * BITS) / 16) % 2 == 1; // which half of it
        const int sh = qsdpa::element_shift(j % EH, BITS);
        const int gi = j / GS < NGV ? j / GS : NGV - 1;
        uint32_t vf[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Element j of key 2t (+8h) in the low half, of key 2t+1 (+8h) in
          // the high half.
          const uint32_t both = __byte_perm(cur.v[2 * h][wv], cur.v[2 * h + 1][wv], high ? 0x7632 : 0x5410);
          const uint32_t codes = (both >> sh) & kPairMask;
          vf[h] = dequant_pair(
              codes, vsc[2 * h][gi], vbi[2 * h][gi], vsc[2 * h + 1][gi], vbi[2 * h + 1][gi], vs2[h][gi],
              vb2[h][gi]);
        }
        mma_detail::mma_16816<T>(o[j], pa, vf[0], vf[1]);
      }

    }
    // The ring is reused by the epilogue: no copy may still be landing.
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();

    // ---- merge the four warps ----
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 1);
      l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 2);
    }
    if (t == 0) {
      smem.m[warp][g] = m[0];
      smem.l[warp][g] = l[0];
      smem.m[warp][g + 8] = m[1];
      smem.l[warp][g + 8] = l[1];
    }
    epilogue_reduce_stats<RT>(smem);
    const float f0 = epilogue_factor<RT>(smem, warp, g);
    const float f1 = epilogue_factor<RT>(smem, warp, g + 8);
    for (int w = 0; w < 4; ++w) {
      if (warp == w) {
#pragma unroll
        for (int j = 0; j < RV; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = g + 8 * (e / 2);
            const int d = RV * (2 * t + (e & 1)) + j;
            const float val = o[j][e] * (e < 2 ? f0 : f1);
            smem.o[oidx(r, d)] = w == 0 ? val : smem.o[oidx(r, d)] + val;
          }
        }
      }
      __syncthreads();
    }
    epilogue_write<RT>(p, smem, b, kvh, r0, nr, split);
  }
};

} // namespace mlx_qsdpa::cuda

namespace mlx_qsdpa::cuda {

// Register cap: MINB blocks of 4 warps per SM at the least. A warp's tile
// is a chain of dependent steps (MMA, shuffles, exp2, MMA), so HBM is kept
// busy only with several warps per scheduler: 3 blocks for D <= 128 (no
// spills), 2 for D = 256 (whose 64 accumulators per thread need the room).
template <typename T, int MODE, int BITS, int GS, int D, int MINB = (D <= 128 ? 3 : 2)>
__global__ void __launch_bounds__(kThreads, MINB) qsdpa_decode_mma(const __grid_constant__ Params p) {
  MmaDecode<T, MODE, BITS, GS, D>::run(p);
}

// The kernels of one (query type, head dim), by format; {nullptr, 0} where
// none. The dynamic shared memory each needs comes with it.
template <typename T, int D>
KernelRef mma_kernel_for(int mode, int bits, int group_size) {
#define QSDPA_MMA(M, BITS, GS) \
  KernelRef{reinterpret_cast<const void*>(&qsdpa_decode_mma<T, M, BITS, GS, D>), MmaDecode<T, M, BITS, GS, D>::kSmemBytes}
  switch (mode) {
    case qsdpa::kMxfp4:
      return QSDPA_MMA(qsdpa::kMxfp4, 4, 32);
    case qsdpa::kNvfp4:
      return QSDPA_MMA(qsdpa::kNvfp4, 4, 16);
    case qsdpa::kMxfp8:
      return QSDPA_MMA(qsdpa::kMxfp8, 8, 32);
    default:
      break;
  }
#define QSDPA_MMA_GS(BITS)                       \
  switch (group_size) {                          \
    case 32:                                     \
      return QSDPA_MMA(qsdpa::kAffine, BITS, 32);  \
    case 64:                                     \
      return QSDPA_MMA(qsdpa::kAffine, BITS, 64);  \
    case 128:                                    \
      return QSDPA_MMA(qsdpa::kAffine, BITS, 128); \
    default:                                     \
      return KernelRef{nullptr, 0};              \
  }
  switch (bits) {
    case 2:
      QSDPA_MMA_GS(2)
    case 4:
      QSDPA_MMA_GS(4)
    case 8:
      QSDPA_MMA_GS(8)
    default:
      return KernelRef{nullptr, 0};
  }
#undef QSDPA_MMA_GS
#undef QSDPA_MMA
}

// One translation unit per (query type, head dim) so that the build runs
// them in parallel; each defines one of these.
KernelRef mma_kernel_f16_d64(int mode, int bits, int group_size);
KernelRef mma_kernel_f16_d128(int mode, int bits, int group_size);
KernelRef mma_kernel_f16_d256(int mode, int bits, int group_size);
KernelRef mma_kernel_bf16_d64(int mode, int bits, int group_size);
KernelRef mma_kernel_bf16_d128(int mode, int bits, int group_size);
KernelRef mma_kernel_bf16_d256(int mode, int bits, int group_size);
// A variant for tuning: fp16, affine 4-bit, group 64, D 128, capped at the
// registers of 2 blocks per SM (QSDPA_CUDA_MINB=2).
KernelRef mma_kernel_f16_d128_a4g64_minb2();

} // namespace mlx_qsdpa::cuda
