// Copyright © 2026 mlx-qsdpa contributors.
//
// Quantizing and dequantizing K/V in every format of formats.h's table, with
// an optional randomized Hadamard rotation, built from MLX ops (so they run
// on every device MLX runs on, lazily, with no loop over the cache here).
// mx::quantize formats are passed to MLX; the codebook format ("turbo") is
// encoded here and decoded by formats.h's gaussian_code_to_float.
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "mlx/ops.h"

#include "errors.h"
#include "quantize.h"

namespace mlx_qsdpa {

namespace {

constexpr const char* kTag = "[quantize] ";

[[noreturn]] void fail(const char* tag, const std::string& msg) {
  throw std::invalid_argument(tag + msg);
}

// SplitMix64: the generator of the rotation's signs (seedable, tiny, and
// easy to reproduce outside this library).
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<float> rotation_data(int D, int seed) {
  std::vector<float> r(static_cast<size_t>(D) * D, 0.0f);
  uint64_t state = static_cast<uint64_t>(static_cast<uint32_t>(seed));
  std::vector<float> sign(D);
  for (int j = 0; j < D; ++j) {
    sign[j] = (splitmix64(state) >> 63) ? -1.0f : 1.0f;
  }
  // Power-of-two blocks along the diagonal, largest first: D's binary digits.
  int start = 0;
  for (int b = 1 << 30; b > 0; b >>= 1) {
    if (!(D & b)) {
      continue;
    }
    const float norm = 1.0f / std::sqrt(static_cast<float>(b));
    for (int i = 0; i < b; ++i) {
      for (int j = 0; j < b; ++j) {
        const bool neg = __builtin_popcount(static_cast<unsigned>(i & j)) & 1;
        r[static_cast<size_t>(start + i) * D + start + j] = (neg ? -norm : norm) * sign[start + j];
      }
    }
    start += b;
  }
  return r;
}

} // namespace

Rotation parse_rotation(const std::optional<std::string>& rotation, const char* tag) {
  if (!rotation || rotation->empty()) {
    return Rotation::kNone;
  }
  if (*rotation == "hadamard") {
    return Rotation::kHadamard;
  }
  fail(tag, "rotation must be None or 'hadamard'; got '" + *rotation + "'.");
}

mx::array rotation_matrix(int D, int seed) {
  if (D <= 0) {
    fail("[rotation_matrix] ", "D must be positive; got " + std::to_string(D) + ".");
  }
  // A model's layers share one (D, seed): build each matrix once. The array
  // holds host data until it is first used, on any device.
  static std::mutex lock;
  static std::vector<std::pair<std::pair<int, int>, mx::array>> cache;
  std::lock_guard<std::mutex> guard(lock);
  for (const auto& [key, m] : cache) {
    if (key.first == D && key.second == seed) {
      return m;
    }
  }
  const std::vector<float> data = rotation_data(D, seed);
  mx::array m(data.begin(), mx::Shape{D, D}, mx::float32);
  if (cache.size() < 64) {
    cache.push_back({{D, seed}, m});
  }
  return m;
}

mx::array rotate(const mx::array& x, int seed, bool inverse, mx::StreamOrDevice s) {
  const int D = x.shape(-1);
  mx::array r = rotation_matrix(D, seed);
  // Rows: x R^T rotates, y R undoes it.
  mx::array m = inverse ? r : mx::transpose(r, s);
  return mx::astype(mx::matmul(mx::astype(x, mx::float32, s), m, s), x.dtype(), s);
}

namespace {

// The codebook of `bits` (formats.h) as a float32 array, ascending, and the
// midpoints between its neighbours (the encoder's decision boundaries).
mx::array codebook(int bits) {
  std::vector<float> c(1u << bits);
  for (uint32_t q = 0; q < c.size(); ++q) {
    c[q] = qsdpa::gaussian_code_to_float(q, bits);
  }
  return mx::array(c.begin(), mx::Shape{static_cast<int>(c.size())}, mx::float32);
}

mx::array boundaries(int bits) {
  std::vector<float> t((1u << bits) - 1);
  for (uint32_t q = 0; q < t.size(); ++q) {
    t[q] = 0.5f * (qsdpa::gaussian_code_to_float(q, bits) + qsdpa::gaussian_code_to_float(q + 1, bits));
  }
  return mx::array(t.begin(), mx::Shape{static_cast<int>(t.size())}, mx::float32);
}

// Packs codes [..., D] (uint32, < 2^bits) into MLX's bit stream [..., D * bits
// / 32] (formats.h: element i at bits [i * bits, (i + 1) * bits) of the row).
mx::array pack_codes(const mx::array& codes, int bits, mx::StreamOrDevice s) {
  const int pe = qsdpa::pack_elems(bits), pb = qsdpa::pack_bytes(bits);
  mx::Shape shape = codes.shape();
  const int D = shape.back();
  shape.back() = D / pe;
  shape.push_back(pe);
  std::vector<uint32_t> shifts(pe);
  for (int k = 0; k < pe; ++k) {
    shifts[k] = static_cast<uint32_t>(k * bits);
  }
  mx::array sh(shifts.begin(), mx::Shape{pe}, mx::uint32);
  // Disjoint bit fields: their sum is their or.
  mx::array packs = mx::sum(mx::left_shift(mx::reshape(codes, shape, s), sh, s), -1, false, s);
  if (pb == 4) {
    return packs;
  }
  // Packs of pb < 4 bytes: their bytes, little-endian, seen as words.
  std::vector<uint32_t> byte_shifts(pb);
  for (int k = 0; k < pb; ++k) {
    byte_shifts[k] = static_cast<uint32_t>(8 * k);
  }
  mx::array bsh(byte_shifts.begin(), mx::Shape{pb}, mx::uint32);
  mx::array bytes = mx::astype(
      mx::right_shift(mx::expand_dims(packs, -1, s), bsh, s), mx::uint8, s);
  mx::Shape flat = codes.shape();
  flat.back() = D / pe * pb;
  return mx::view(mx::reshape(bytes, flat, s), mx::uint32, s);
}

// The turbo encoding of x [..., D] in groups of gs: per group the codes of
// x / rms(x) by the codebook's boundaries, then the scale that fits those
// codes best (least squares: <x, c> / <c, c>).
std::vector<mx::array> quantize_turbo(const mx::array& x, int group_size, int bits, mx::StreamOrDevice s) {
  mx::Shape gshape = x.shape();
  const int D = gshape.back();
  gshape.back() = D / group_size;
  gshape.push_back(group_size);
  mx::array xg = mx::reshape(mx::astype(x, mx::float32, s), gshape, s);
  mx::array rms = mx::sqrt(mx::mean(mx::square(xg, s), -1, true, s), s);
  mx::array u = mx::divide(xg, mx::where(mx::greater(rms, mx::array(0.0f), s), rms, mx::array(1.0f), s), s);
  // Binary search over the sorted boundaries, one bit of the code per step.
  mx::array t = boundaries(bits);
  mx::array code = mx::zeros(u.shape(), mx::uint32, s);
  for (int step = 1 << (bits - 1); step > 0; step >>= 1) {
    mx::array cand = mx::add(code, mx::array(static_cast<uint32_t>(step)), s);
    mx::array above = mx::greater(u, mx::take(t, mx::subtract(cand, mx::array(1u), s), s), s);
    code = mx::where(above, cand, code, s);
  }
  mx::array c = mx::take(codebook(bits), code, s);
  mx::array cc = mx::sum(mx::square(c, s), -1, true, s);
  mx::array scale = mx::divide(mx::sum(mx::multiply(xg, c, s), -1, true, s), cc, s);
  scale = mx::squeeze(scale, -1, s);
  mx::array packed = pack_codes(mx::reshape(code, x.shape(), s), bits, s);
  return {packed, mx::astype(scale, x.dtype(), s)};
}

mx::array dequantize_turbo(
    const mx::array& w, const mx::array& scales, int group_size, int bits, mx::Dtype dtype, mx::StreamOrDevice s) {
  // MLX's affine unpacking with scale 1 and bias 0 gives the codes.
  mx::array ones = mx::ones(scales.shape(), mx::float32, s);
  mx::array codes = mx::dequantize(
      w, ones, mx::zeros(scales.shape(), mx::float32, s), group_size, bits, "affine", std::nullopt,
      mx::float32, s);
  mx::array vals = mx::take(codebook(bits), mx::astype(codes, mx::uint32, s), s);
  mx::Shape gshape = vals.shape();
  const int D = gshape.back();
  gshape.back() = D / group_size;
  gshape.push_back(group_size);
  vals = mx::multiply(mx::reshape(vals, gshape, s), mx::expand_dims(mx::astype(scales, mx::float32, s), -1, s), s);
  return mx::astype(mx::reshape(vals, codes.shape(), s), dtype, s);
}

// The codes of packed words [..., W] of a width that fills whole words (1,
// 2, 4, 8 bits), as uint32 [..., W * 32 / bits]: element k of a word at bit
// k * bits (formats.h's layout).
mx::array unpack_word_codes(const mx::array& w, int bits, mx::StreamOrDevice s) {
  const int per_word = 32 / bits;
  std::vector<uint32_t> shifts(per_word);
  for (int k = 0; k < per_word; ++k) {
    shifts[k] = static_cast<uint32_t>(k * bits);
  }
  mx::array sh(shifts.begin(), mx::Shape{per_word}, mx::uint32);
  mx::array codes = mx::bitwise_and(
      mx::right_shift(mx::expand_dims(w, -1, s), sh, s), mx::array((1u << bits) - 1u), s);
  mx::Shape shape = w.shape();
  shape.back() *= per_word;
  return mx::reshape(codes, shape, s);
}

// Affine values scale * code + bias from codes [..., D] (float32 math).
mx::array affine_values(
    const mx::array& codes, const mx::array& scales, const mx::array& biases, int group_size, mx::Dtype dtype,
    mx::StreamOrDevice s) {
  mx::Shape gshape = codes.shape();
  const int D = gshape.back();
  gshape.back() = D / group_size;
  gshape.push_back(group_size);
  auto per_group = [&](const mx::array& a) { return mx::expand_dims(mx::astype(a, mx::float32, s), -1, s); };
  mx::array x = mx::add(
      mx::multiply(mx::astype(mx::reshape(codes, gshape, s), mx::float32, s), per_group(scales), s),
      per_group(biases), s);
  return mx::astype(mx::reshape(x, codes.shape(), s), dtype, s);
}

} // namespace

mx::array dequantize_tensor(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantFormat& f,
    mx::Dtype dtype,
    mx::StreamOrDevice s) {
  if (qsdpa::mode_code_kind(f.mode) == qsdpa::kCodeGaussian) {
    return dequantize_turbo(w, scales, f.group_size, f.bits, dtype, s);
  }
  if (f.mode == qsdpa::kAffine && f.bits == 1 && biases) {
    // MLX's CUDA backend has no 1-bit dequantize kernel: 1-bit affine
    // unpacks with MLX ops on every device.
    return affine_values(unpack_word_codes(w, 1, s), scales, *biases, f.group_size, dtype, s);
  }
  return mx::dequantize(w, scales, biases, f.group_size, f.bits, qsdpa::mode_name(f.mode), std::nullopt, dtype, s);
}

std::vector<mx::array> quantize(
    const mx::array& x,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<std::string>& rotation,
    int rotation_seed,
    mx::StreamOrDevice s) {
  const QuantFormat f = parse_format(kTag, "", mode, bits, group_size);
  const Rotation rot = parse_rotation(rotation, kTag);
  if (!is_float_type(x.dtype())) {
    throw type_error(std::string(kTag) + "x must be float16, bfloat16 or float32.");
  }
  if (x.ndim() < 1 || x.shape(-1) % group_size != 0) {
    fail(kTag, "the last axis of x must be a multiple of group_size=" + std::to_string(group_size) + ".");
  }
  const mx::array xr = rot == Rotation::kHadamard ? rotate(x, rotation_seed, false, s) : x;
  if (qsdpa::mode_code_kind(f.mode) == qsdpa::kCodeGaussian) {
    return quantize_turbo(xr, group_size, bits, s);
  }
  return mx::quantize(xr, group_size, bits, mode, std::nullopt, s);
}

mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<std::string>& rotation,
    int rotation_seed,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s) {
  const char* tag = "[dequantize] ";
  const QuantFormat f = parse_format(tag, "", mode, bits, group_size);
  const Rotation rot = parse_rotation(rotation, tag);
  if (w.dtype() != mx::uint32) {
    throw type_error(std::string(tag) + "w must be uint32 (packed words).");
  }
  if (f.has_biases() != biases.has_value()) {
    fail(tag, std::string("biases ") + (f.has_biases() ? "are required" : "must be None") + " for mode '" +
             mode + "'.");
  }
  const mx::Dtype out = dtype.value_or(qsdpa::mode_float_scales(f.mode) ? scales.dtype() : mx::bfloat16);
  mx::array x = dequantize_tensor(w, scales, biases, f, rot == Rotation::kNone ? out : mx::float32, s);
  return rot == Rotation::kHadamard ? mx::astype(rotate(x, rotation_seed, true, s), out, s) : x;
}

} // namespace mlx_qsdpa
