// Copyright © 2026 mlx-qsdpa contributors.
//
// A standalone check of one CPU kernel variant (csrc/backends/cpu/kernel.cpp built
// for one target), without MLX or Python: it cross-compiles for any
// architecture and runs under qemu-user (tools/check_arm64.sh builds the
// arm64 NEON variant with it). Random codes, scales and biases of every
// format are attended by the variant and by a float64 reference that
// decodes them with formats.h's scalar functions (the format definitions
// the Python oracle holds against mx.dequantize). The last line of output
// is "N passed, M failed".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/kernel.h"
#include "mlx_qsdpa/formats.h"

#ifndef QSDPA_CPU_VARIANT
#error "build with the QSDPA_CPU_VARIANT of the kernel.cpp it is linked with"
#endif

namespace {

using mlx_qsdpa::cpu::Item;
using mlx_qsdpa::cpu::ItemResult;
using mlx_qsdpa::cpu::Problem;
using mlx_qsdpa::QuantTensor;
using mlx_qsdpa::cpu::RowRef;

struct Format {
  int mode, bits, gs;
  int scale_type; // ElemType of the scales
};

struct Shape {
  int B, Hq, Hkv, Lq, Lk, D;
  int mask; // MaskCode
  int word_stride; // stride of the packed words' last axis (1, or 2 for a strided view)
};

struct Tensor {
  std::vector<uint32_t> words; // [B, Hkv, Lk, words * word_stride]
  std::vector<uint16_t> s16, b16; // float16 / bfloat16 scales and biases
  std::vector<float> s32, b32;
  std::vector<uint8_t> s8; // fp modes' scale codes
  std::vector<double> values; // decoded [B, Hkv, Lk, D]
};

uint16_t random_half(std::mt19937& rng) {
  // |x| in [2^-4, 2^2), random sign: exponent field 11..16.
  uint32_t e = 11 + rng() % 6, m = rng() % 1024, s = rng() % 2;
  return uint16_t((s << 15) | (e << 10) | m);
}

uint16_t random_bf16(std::mt19937& rng) {
  uint32_t e = 123 + rng() % 6, m = rng() % 128, s = rng() % 2;
  return uint16_t((s << 15) | (e << 7) | m);
}

double decode_scale(const Format& f, const Tensor& t, size_t i, bool bias) {
  if (!qsdpa::mode_float_scales(f.mode)) {
    return f.mode == qsdpa::kNvfp4 ? qsdpa::fp8_e4m3_to_float(t.s8[i]) : qsdpa::e8m0_to_float(t.s8[i]);
  }
  switch (f.scale_type) {
    case qsdpa::kElemFloat32:
      return bias ? t.b32[i] : t.s32[i];
    case qsdpa::kElemFloat16:
      return qsdpa::half_bits_to_float(bias ? t.b16[i] : t.s16[i]);
    default:
      return qsdpa::bf16_bits_to_float(bias ? t.b16[i] : t.s16[i]);
  }
}

uint32_t element(const uint32_t* row, int i, int bits) {
  switch (bits) {
    case 1: return qsdpa::unpack_element<1>(row, i);
    case 2: return qsdpa::unpack_element<2>(row, i);
    case 3: return qsdpa::unpack_element<3>(row, i);
    case 4: return qsdpa::unpack_element<4>(row, i);
    case 5: return qsdpa::unpack_element<5>(row, i);
    case 6: return qsdpa::unpack_element<6>(row, i);
    default: return qsdpa::unpack_element<8>(row, i);
  }
}

double decode_element(const Format& f, uint32_t code) {
  switch (f.mode) {
    case qsdpa::kAffine: return qsdpa::decode_code<qsdpa::kAffine, 8>(code);
    case qsdpa::kMxfp8: return qsdpa::decode_code<qsdpa::kMxfp8, 8>(code);
    case qsdpa::kTurbo: return qsdpa::gaussian_code_to_float(code, f.bits);
    default: return qsdpa::decode_code<qsdpa::kMxfp4, 4>(code);
  }
}

Tensor make_tensor(const Format& f, const Shape& s, std::mt19937& rng) {
  Tensor t;
  const int words = s.D * f.bits / 32, groups = s.D / f.gs;
  const size_t rows = size_t(s.B) * s.Hkv * s.Lk;
  t.words.resize(rows * words * s.word_stride);
  for (auto& w : t.words) {
    w = rng();
    if (f.bits == 8 && f.mode == qsdpa::kMxfp8) {
      // No NaN codes (0x7f / 0xff): the Python tests cover those.
      for (int k = 0; k < 4; ++k) {
        if (((w >> (8 * k)) & 0x7f) == 0x7f) {
          w ^= 1u << (8 * k);
        }
      }
    }
  }
  const size_t ns = rows * groups;
  if (!qsdpa::mode_float_scales(f.mode)) {
    t.s8.resize(ns);
    for (auto& c : t.s8) {
      c = f.mode == qsdpa::kNvfp4 ? uint8_t(0x28 + rng() % 24) : uint8_t(120 + rng() % 10);
    }
  } else if (f.scale_type == qsdpa::kElemFloat32) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (size_t i = 0; i < ns; ++i) {
      t.s32.push_back(u(rng) * 0.2f);
      t.b32.push_back(u(rng));
    }
  } else {
    for (size_t i = 0; i < ns; ++i) {
      bool half = f.scale_type == qsdpa::kElemFloat16;
      t.s16.push_back(half ? random_half(rng) : random_bf16(rng));
      t.b16.push_back(half ? random_half(rng) : random_bf16(rng));
    }
  }
  t.values.resize(rows * s.D);
  std::vector<uint32_t> row(words);
  for (size_t r = 0; r < rows; ++r) {
    for (int w = 0; w < words; ++w) {
      row[w] = t.words[(r * words + w) * s.word_stride];
    }
    for (int d = 0; d < s.D; ++d) {
      const size_t g = r * groups + d / f.gs;
      const double scale = decode_scale(f, t, g, false);
      const double bias = f.mode == qsdpa::kAffine ? decode_scale(f, t, g, true) : 0.0;
      t.values[r * s.D + d] = scale * decode_element(f, element(row.data(), d, f.bits)) + bias;
    }
  }
  return t;
}

QuantTensor view(const Format& f, const Shape& s, const Tensor& t) {
  QuantTensor v{};
  const int64_t words = s.D * f.bits / 32, groups = s.D / f.gs;
  v.w = t.words.data();
  v.ws[3] = s.word_stride;
  v.ws[2] = words * s.word_stride;
  v.ws[1] = v.ws[2] * s.Lk;
  v.ws[0] = v.ws[1] * s.Hkv;
  v.ss[3] = 1;
  v.ss[2] = groups;
  v.ss[1] = groups * s.Lk;
  v.ss[0] = v.ss[1] * s.Hkv;
  for (int i = 0; i < 4; ++i) {
    v.bs[i] = v.ss[i];
  }
  const bool biased = qsdpa::mode_has_bias(f.mode);
  if (!qsdpa::mode_float_scales(f.mode)) {
    v.scales = t.s8.data();
  } else if (f.scale_type == qsdpa::kElemFloat32) {
    v.scales = t.s32.data();
    v.biases = biased ? t.b32.data() : nullptr;
  } else {
    v.scales = t.s16.data();
    v.biases = biased ? t.b16.data() : nullptr;
  }
  v.scale_type = qsdpa::mode_float_scales(f.mode) ? f.scale_type : qsdpa::kElemUint8;
  return v;
}

// One case: the variant over every (b, kv head) with all keys in one item,
// against float64 attention. Returns the largest relative error.
double run_case(const Format& f, const Shape& s, uint32_t seed, std::string& why) {
  std::mt19937 rng(seed);
  const Tensor k = make_tensor(f, s, rng), v = make_tensor(f, s, rng);
  std::normal_distribution<float> normal;
  std::vector<float> q(size_t(s.B) * s.Hq * s.Lq * s.D);
  for (auto& x : q) {
    x = normal(rng);
  }
  std::vector<float> mask;
  if (s.mask == qsdpa::kMaskAdditive) {
    mask.resize(size_t(s.Lq) * s.Lk);
    for (auto& x : mask) {
      x = rng() % 7 == 0 ? -INFINITY : normal(rng);
    }
  }
  const float scale = 1.0f / std::sqrt(float(s.D));

  Problem p{};
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Lq = s.Lq, p.Lk = s.Lk, p.D = s.D, p.G = s.Hq / s.Hkv;
  p.scale_log2 = scale * qsdpa::log2e();
  p.q = q.data();
  p.q_type = qsdpa::kElemFloat32;
  p.qs[3] = 1, p.qs[2] = s.D, p.qs[1] = int64_t(s.D) * s.Lq, p.qs[0] = p.qs[1] * s.Hq;
  p.k = view(f, s, k);
  p.v = view(f, s, v);
  for (mlx_qsdpa::QuantTensor* t : {&p.k, &p.v}) {
    t->mode = f.mode, t->bits = f.bits, t->group_size = f.gs;
  }
  p.mask = s.mask;
  p.mask_ptr = mask.data();
  p.ms[3] = 1, p.ms[2] = s.Lk; // [Lq, Lk] broadcast over B and heads

  const mlx_qsdpa::cpu::Variant& var = mlx_qsdpa::cpu::QSDPA_CPU_VARIANT;
  const int rows = p.G * s.Lq;
  std::vector<char> scratch(var.scratch_bytes(p, rows) + 64);
  void* work = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
  std::vector<float> o(size_t(rows) * s.D), m(rows), l(rows);
  double worst = 0.0;
  for (int b = 0; b < s.B; ++b) {
    for (int kvh = 0; kvh < s.Hkv; ++kvh) {
      const Item it = {b, kvh, 0, rows, 0, s.Lk};
      var.run_item(p, it, work, ItemResult{o.data(), m.data(), l.data()});
      for (int r = 0; r < rows; ++r) {
        const RowRef ref = mlx_qsdpa::cpu::row_ref(p, kvh, r);
        // float64 attention of this row.
        std::vector<double> sc(s.Lk);
        double mx = -INFINITY;
        for (int j = 0; j < s.Lk; ++j) {
          double dot = 0.0;
          for (int d = 0; d < s.D; ++d) {
            dot += double(q[((size_t(b) * s.Hq + ref.h) * s.Lq + ref.i) * s.D + d]) *
                k.values[((size_t(b) * s.Hkv + kvh) * s.Lk + j) * s.D + d];
          }
          sc[j] = dot * scale;
          if (j >= ref.limit) {
            sc[j] = -INFINITY;
          }
          if (!mask.empty()) {
            sc[j] += mask[size_t(ref.i) * s.Lk + j];
          }
          mx = std::max(mx, sc[j]);
        }
        double sum = 0.0, amax = 0.0, err = 0.0;
        std::vector<double> out(s.D, 0.0);
        for (int j = 0; j < s.Lk && mx > -INFINITY; ++j) {
          const double e = std::exp(sc[j] - mx);
          sum += e;
          for (int d = 0; d < s.D; ++d) {
            out[d] += e * v.values[((size_t(b) * s.Hkv + kvh) * s.Lk + j) * s.D + d];
          }
        }
        for (int d = 0; d < s.D; ++d) {
          const double want = sum > 0 ? out[d] / sum : 0.0;
          const double got = l[r] > 0 ? o[size_t(r) * s.D + d] / l[r] : 0.0;
          amax = std::max(amax, std::fabs(want));
          err = std::max(err, std::fabs(got - want));
        }
        const double lse_want = sum > 0 ? mx + std::log(sum) : -INFINITY;
        const double lse_got = l[r] > 0 ? (m[r] + std::log2(l[r])) * 0.6931471805599453 : -INFINITY;
        const double lse_err = sum > 0 ? std::fabs(lse_got - lse_want) / std::max(1.0, std::fabs(lse_want))
                                       : (lse_got == -INFINITY ? 0.0 : 1.0);
        worst = std::max({worst, amax > 0 ? err / amax : err, lse_err});
        if (!(worst < 1e-4) && why.empty()) {
          why = "b" + std::to_string(b) + " kvh" + std::to_string(kvh) + " row" + std::to_string(r);
        }
      }
    }
  }
  return worst;
}

} // namespace

int main() {
  const std::vector<Format> formats = {
      {qsdpa::kAffine, 1, 32, qsdpa::kElemFloat32}, {qsdpa::kAffine, 2, 64, qsdpa::kElemFloat16},
      {qsdpa::kAffine, 3, 32, qsdpa::kElemBFloat16}, {qsdpa::kAffine, 3, 128, qsdpa::kElemFloat16},
      {qsdpa::kAffine, 4, 32, qsdpa::kElemFloat16}, {qsdpa::kAffine, 4, 64, qsdpa::kElemBFloat16},
      {qsdpa::kAffine, 4, 128, qsdpa::kElemFloat32}, {qsdpa::kAffine, 5, 32, qsdpa::kElemFloat16},
      {qsdpa::kAffine, 5, 64, qsdpa::kElemFloat32}, {qsdpa::kAffine, 6, 64, qsdpa::kElemBFloat16},
      {qsdpa::kAffine, 8, 32, qsdpa::kElemFloat16}, {qsdpa::kAffine, 8, 128, qsdpa::kElemBFloat16},
      {qsdpa::kMxfp4, 4, 32, 0}, {qsdpa::kMxfp8, 8, 32, 0}, {qsdpa::kNvfp4, 4, 16, 0},
      {qsdpa::kTurbo, 2, 32, qsdpa::kElemFloat16}, {qsdpa::kTurbo, 3, 32, qsdpa::kElemFloat16},
      {qsdpa::kTurbo, 3, 64, qsdpa::kElemBFloat16}, {qsdpa::kTurbo, 4, 128, qsdpa::kElemFloat32},
  };
  const std::vector<Shape> shapes = {
      {1, 4, 1, 1, 200, 128, qsdpa::kMaskNone, 1},
      {2, 5, 1, 3, 37, 64, qsdpa::kMaskCausal, 1},
      {1, 8, 2, 1, 130, 256, qsdpa::kMaskAdditive, 2},
      {1, 2, 2, 2, 1, 128, qsdpa::kMaskNone, 1},
      {1, 2, 1, 4, 70, 576, qsdpa::kMaskCausal, 1},
  };
  int passed = 0, failed = 0;
  uint32_t seed = 1;
  for (const Format& f : formats) {
    std::vector<Shape> all = shapes;
    if (f.gs == 16) {
      all.push_back({1, 3, 1, 2, 45, 80, qsdpa::kMaskCausal, 1}); // odd multiple of 16
      all.push_back({1, 1, 1, 1, 9, 16, qsdpa::kMaskNone, 2});
    }
    for (const Shape& s : all) {
      if (s.D % f.gs != 0) {
        continue;
      }
      std::string why;
      const double err = run_case(f, s, seed++, why);
      const bool ok = err < 1e-4;
      (ok ? passed : failed) += 1;
      if (!ok) {
        std::printf("FAIL mode %d bits %d gs %d D %d Lq %d Lk %d mask %d: rel err %.3g at %s\n", f.mode,
                    f.bits, f.gs, s.D, s.Lq, s.Lk, s.mask, err, why.c_str());
      }
    }
  }
  std::printf("%s: %d passed, %d failed\n", mlx_qsdpa::cpu::QSDPA_CPU_VARIANT.name, passed, failed);
  return failed == 0 ? 0 : 1;
}
