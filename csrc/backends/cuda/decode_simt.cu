// Copyright © 2026 mlx-qsdpa contributors.
//
// The generic decode kernel: float32 arithmetic on CUDA cores, every format
// of formats.h (keys and values each their own), any head dim up to 256,
// any strides (the last axis of the packed words too). One instantiation
// per key format; values of another format are decoded by their run-time
// description (decode_element_any), so the pairs of formats cost no
// instantiations. It serves float32 queries (whose accuracy the tensor
// cores' fp16/bf16 operands would not keep) and every call the tensor-core
// kernel (decode_mma.cuh) does not take.
//
// A block of 4 warps handles up to kSimtRows query rows of one (batch, kv
// head) over one key range; warp w takes keys w, w + 4, ... of the range.
// Lane l holds head-dim elements d = l + 32 e (e < 8): a warp's word loads
// of one key row are contiguous, and every query row of the GQA group uses
// each decoded element (K and V are read once per kv head). Each warp keeps
// its own online softmax; the block merges the four at the end.
#include "common.cuh"
#include "split_merge.cuh"

namespace mlx_qsdpa::cuda {

namespace {

// Head-dim elements per lane: a row of up to kMaxHeadDim elements, the
// largest D the host sends here (gpu_kernel_supports; wider rows take the
// dequantize fallback).
constexpr int kMaxE = kMaxHeadDim / 32;
static_assert(kMaxE * 32 == kMaxHeadDim, "whole elements per lane");

// Packed words with a stride between consecutive words (formats.h's
// unpack_element indexes any such "pointer").
struct StridedWords {
  const uint32_t* p;
  int64_t s;
  __device__ __forceinline__ uint32_t operator[](int i) const {
    return p[i * s];
  }
};

// The codes of a format of at most kMaxTableBits bits as a table of floats
// in shared memory (code q at [q]): the codebook formats' levels, and every
// small format decoded at run time. Lanes that read different entries
// read different banks, so a lookup costs one shared-memory load where the
// codebook's selects would cost one per level.
constexpr int kMaxTableBits = 4;
struct CodeTables {
  float k[1 << kMaxTableBits];
  float v[1 << kMaxTableBits];
};

// Fills the tables of the keys' and values' formats (threads 0 .. 15 of the
// block; the caller's block barrier publishes them).
__device__ __forceinline__ void fill_code_tables(const Params& p, CodeTables& tables) {
  const int q = threadIdx.x;
  if (q < (1 << kMaxTableBits)) {
    tables.k[q] = p.k.bits <= kMaxTableBits ? decode_code(p.k.mode, p.k.bits, uint32_t(q)) : 0.0f;
    tables.v[q] = p.v.bits <= kMaxTableBits ? decode_code(p.v.mode, p.v.bits, uint32_t(q)) : 0.0f;
  }
}

// Element d of one key row of `t` (format MODE, BITS), decoded (scale and
// bias applied); `codes`: the format's code table.
template <int MODE, int BITS>
__device__ __forceinline__ float decode_element(
    const QuantTensor& t,
    const StridedWords& row,
    const uint8_t* scale_row,
    const uint8_t* bias_row,
    const float* codes,
    int d,
    int group_size) {
  const uint32_t code = qsdpa::unpack_element<BITS>(row, d);
  const int g = d / group_size;
  const float scale = decode_scale<MODE>(load_raw(scale_row, g * t.ss[3], t.scale_type), t.scale_type);
  float value;
  if constexpr (qsdpa::mode_code_kind(MODE) == qsdpa::kCodeGaussian) {
    value = codes[code];
  } else {
    value = qsdpa::decode_code<MODE, BITS>(code);
  }
  if constexpr (qsdpa::mode_has_bias(MODE)) {
    const float bias = raw_to_float(load_raw(bias_row, g * t.bs[3], t.scale_type), t.scale_type);
    return fmaf(value, scale, bias);
  } else {
    return value * scale;
  }
}

// The same for t's own format, known at run time only: the values of a call
// whose keys have another format (a warp-uniform branch per choice, one
// instantiation per key format instead of one per pair of formats).
__device__ __forceinline__ float decode_element_any(
    const QuantTensor& t,
    const StridedWords& row,
    const uint8_t* scale_row,
    const uint8_t* bias_row,
    const float* codes,
    int d) {
  const int bits = t.bits;
  const int w = qsdpa::element_word(d, bits), sh = qsdpa::element_shift(d, bits);
  uint32_t code = row[w] >> sh;
  if (sh + bits > 32) {
    code |= row[w + 1] << (32 - sh);
  }
  code &= (1u << bits) - 1u;
  const int g = d / t.group_size;
  const float scale = decode_scale(t.mode, load_raw(scale_row, g * t.ss[3], t.scale_type), t.scale_type);
  const float value = bits <= kMaxTableBits ? codes[code] : decode_code(t.mode, bits, code);
  if (bias_row != nullptr) {
    return fmaf(value, scale, raw_to_float(load_raw(bias_row, g * t.bs[3], t.scale_type), t.scale_type));
  }
  return value * scale;
}

// Pointers to key j's row of packed words, scales and biases.
struct KeyRow {
  StridedWords w;
  const uint8_t* scales;
  const uint8_t* biases;
};

__device__ __forceinline__ int elem_bytes(int type) {
  return type == qsdpa::kElemFloat32 ? 4 : (type == qsdpa::kElemUint8 ? 1 : 2);
}

__device__ __forceinline__ KeyRow key_row(const QuantTensor& t, int b, int kvh, int j) {
  KeyRow r;
  r.w.p = t.w + int64_t(b) * t.ws[0] + int64_t(kvh) * t.ws[1] + int64_t(j) * t.ws[2];
  r.w.s = t.ws[3];
  const int es = elem_bytes(t.scale_type);
  r.scales = static_cast<const uint8_t*>(t.scales) +
      (int64_t(b) * t.ss[0] + int64_t(kvh) * t.ss[1] + int64_t(j) * t.ss[2]) * es;
  r.biases = t.biases == nullptr
      ? nullptr
      : static_cast<const uint8_t*>(t.biases) +
          (int64_t(b) * t.bs[0] + int64_t(kvh) * t.bs[1] + int64_t(j) * t.bs[2]) * es;
  return r;
}

template <int MODE, int BITS>
__device__ __forceinline__ void decode_row(
    const QuantTensor& t, const KeyRow& row, const float* codes, int lane, int D, float (&x)[kMaxE]) {
#pragma unroll
  for (int e = 0; e < kMaxE; ++e) {
    const int d = lane + 32 * e;
    x[e] = d < D ? decode_element<MODE, BITS>(t, row.w, row.scales, row.biases, codes, d, t.group_size) : 0.0f;
  }
}

__device__ __forceinline__ void decode_row_any(
    const QuantTensor& t, const KeyRow& row, const float* codes, int lane, int D, float (&x)[kMaxE]) {
#pragma unroll
  for (int e = 0; e < kMaxE; ++e) {
    const int d = lane + 32 * e;
    x[e] = d < D ? decode_element_any(t, row.w, row.scales, row.biases, codes, d) : 0.0f;
  }
}

// The kernel's shared memory: the block epilogue's (which the split merge
// reuses) and the code tables. Dynamic (the launch passes kSimtSmemBytes),
// as the tensor-core kernel's, which lets the CPU simulator (tests/cuda)
// run this kernel unchanged too.
struct SimtSmem {
  EpilogueSmem<kSimtRows> epilogue;
  CodeTables codes;
};
constexpr int kSimtSmemBytes = int(sizeof(SimtSmem));

template <int MODE, int BITS>
__global__ void __launch_bounds__(kThreads) qsdpa_decode_simt(const __grid_constant__ Params p) {
  constexpr int RT = kSimtRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SimtSmem& shared = *reinterpret_cast<SimtSmem*>(smem_raw);
  EpilogueSmem<RT>& smem = shared.epilogue;
  fill_code_tables(p, shared.codes);
  // The values' format: the keys' (the instantiation's), or another one
  // decoded by its run-time description (the same for the whole call).
  const bool v_same_format = p.v.mode == MODE && p.v.bits == BITS;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int split = blockIdx.x;
  const TileRef tile = tile_ref<RT>(p);
  const int kvh = tile.kvh;
  const int r0 = tile.r0;
  const int b = blockIdx.z;
  const int nr = min(RT, p.rows - r0);
  const int D = p.D;

  // The tile's query rows, pre-scaled into base-2 units.
  float q[RT][kMaxE];
  RowRef refs[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    refs[r] = row_ref(p, b, kvh, r0 + min(r, nr - 1));
    const int64_t base = int64_t(b) * p.qs[0] + int64_t(refs[r].h) * p.qs[1] + int64_t(refs[r].i) * p.qs[2];
#pragma unroll
    for (int e = 0; e < kMaxE; ++e) {
      const int d = lane + 32 * e;
      q[r][e] = (r < nr && d < D) ? load_as_float(p.q, base + d * p.qs[3], p.q_type) * p.scale_log2 : 0.0f;
    }
  }

  float o[RT][kMaxE];
  float m[RT], l[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    m[r] = neg_inf();
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kMaxE; ++e) {
      o[r][e] = 0.0f;
    }
  }

  int k_begin, k_end;
  split_range(p, split, r0 + nr - 1, k_begin, k_end);
  __syncthreads(); // the code tables
  for (int j = k_begin + warp; j < k_end; j += 4) {
    float x[kMaxE];
    decode_row<MODE, BITS>(p.k, key_row(p.k, b, kvh, j), shared.codes.k, lane, D, x);
    float s[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      float acc = 0.0f;
#pragma unroll
      for (int e = 0; e < kMaxE; ++e) {
        acc = fmaf(q[r][e], x[e], acc);
      }
      s[r] = acc;
    }
    // Butterfly sums: every lane ends with the same (bitwise) total, so the
    // branches below are uniform across the warp.
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        s[r] += __shfl_xor_sync(0xffffffffu, s[r], off);
      }
    }
    float pr[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      float sc = s[r];
      if (r >= nr || (p.mask == qsdpa::kMaskCausal && j > refs[r].causal_limit)) {
        sc = neg_inf();
      } else if (p.mask == qsdpa::kMaskBool || p.mask == qsdpa::kMaskAdditive) {
        sc = apply_array_mask(p, b, refs[r], j, sc);
      }
      // A new max, or (every comparison with a NaN being false) a NaN or
      // +inf score or a poisoned row, whose max running_max makes or keeps
      // NaN (common.cuh).
      if (!(sc <= m[r])) {
        const float m_new = qsdpa::running_max(m[r], sc);
        const float c = qsdpa::rescale(m[r], m_new); // 0 while m is -inf
        l[r] *= c;
#pragma unroll
        for (int e = 0; e < kMaxE; ++e) {
          o[r][e] *= c;
        }
        m[r] = m_new;
      }
      pr[r] = sc == neg_inf() ? 0.0f : exp2f(sc - m[r]);
      l[r] += pr[r];
    }
    if (v_same_format) {
      decode_row<MODE, BITS>(p.v, key_row(p.v, b, kvh, j), shared.codes.v, lane, D, x);
    } else {
      decode_row_any(p.v, key_row(p.v, b, kvh, j), shared.codes.v, lane, D, x);
    }
#pragma unroll
    for (int r = 0; r < RT; ++r) {
#pragma unroll
      for (int e = 0; e < kMaxE; ++e) {
        o[r][e] = fmaf(pr[r], x[e], o[r][e]);
      }
    }
  }

  // Merge the four warps.
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      smem.m[warp][r] = m[r];
      smem.l[warp][r] = l[r];
    }
  }
  epilogue_reduce_stats(smem);
  for (int w = 0; w < 4; ++w) {
    if (warp == w) {
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const float f = epilogue_factor(smem, w, r);
#pragma unroll
        for (int e = 0; e < kMaxE; ++e) {
          const int d = lane + 32 * e;
          if (d < D) {
            smem.o[oidx(r, d)] = (w == 0 ? 0.0f : smem.o[oidx(r, d)]) + o[r][e] * f;
          }
        }
      }
    }
    __syncthreads();
  }
  epilogue_write<RT>(p, smem, b, kvh, r0, nr, split);
  if (p.n_splits > 1) {
    static_assert(sizeof(MergeSmem) <= sizeof(smem), "merge over the epilogue");
    merge_splits(p, b, kvh, r0, nr, *reinterpret_cast<MergeSmem*>(&smem));
  }
}

} // namespace

KernelRef simt_kernel(int mode, int bits) {
  KernelRef ref{nullptr, 0};
  qsdpa::dispatch_format(mode, bits, [&](auto fmt) {
    constexpr int MODE = decltype(fmt)::mode;
    constexpr int BITS = decltype(fmt)::bits;
    ref = KernelRef{reinterpret_cast<const void*>(&qsdpa_decode_simt<MODE, BITS>), kSimtSmemBytes};
  });
  return ref;
}

} // namespace mlx_qsdpa::cuda
