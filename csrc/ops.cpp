// Copyright © 2026 mlx-qsdpa contributors.
//
// The quant_sdpa op: argument validation, input preparation and the choice
// between the fused primitive and the dequantize fallback.
#include <atomic>
#include <cmath>

#include "mlx/ops.h"

#include "backend.h"
#include "errors.h"
#include "mlx_qsdpa/quant_sdpa.h"
#include "primitive.h"
#include "quantize.h"

#ifndef MLX_QSDPA_VERSION
#define MLX_QSDPA_VERSION "0.0.0"
#endif
#ifndef MLX_QSDPA_MLX_VERSION
#define MLX_QSDPA_MLX_VERSION "unknown"
#endif

namespace mlx_qsdpa {

namespace {

constexpr const char* kTag = "[quant_sdpa] ";

// Messages are built with std::to_string, not iostreams: on the GPU
// machine's toolchain an ostringstream in this library crashed inside the
// locale facets (a second copy of libstdc++'s locale code), while plain
// string arithmetic does not touch them.
std::string shape_str(const mx::Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(s[i]);
  }
  out += s.size() == 1 ? ",)" : ")";
  return out;
}

std::string dtype_str(mx::Dtype t) {
  switch (t.val()) {
    case mx::Dtype::Val::bool_:
      return "bool";
    case mx::Dtype::Val::uint8:
      return "uint8";
    case mx::Dtype::Val::uint16:
      return "uint16";
    case mx::Dtype::Val::uint32:
      return "uint32";
    case mx::Dtype::Val::uint64:
      return "uint64";
    case mx::Dtype::Val::int8:
      return "int8";
    case mx::Dtype::Val::int16:
      return "int16";
    case mx::Dtype::Val::int32:
      return "int32";
    case mx::Dtype::Val::int64:
      return "int64";
    case mx::Dtype::Val::float16:
      return "float16";
    case mx::Dtype::Val::float32:
      return "float32";
    case mx::Dtype::Val::float64:
      return "float64";
    case mx::Dtype::Val::bfloat16:
      return "bfloat16";
    case mx::Dtype::Val::complex64:
      return "complex64";
  }
  return "unknown";
}

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument(kTag + msg);
}

[[noreturn]] void fail_type(const std::string& msg) {
  throw type_error(kTag + msg);
}


// The mode string's QuantMode (formats.h's table); false for an unknown one.
bool find_mode(const std::string& name, qsdpa::QuantMode& mode) {
  for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
    if (name == r.mode_name) {
      mode = static_cast<qsdpa::QuantMode>(r.mode);
      return true;
    }
  }
  return false;
}

// "1, 2, 3" from the bits (or group sizes) of a list.
std::string join_ints(const std::vector<int>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(v[i]);
  }
  return out;
}

std::vector<int> group_sizes_of(int mask) {
  std::vector<int> out;
  qsdpa::for_each_group_size(mask, [&](int g) { out.push_back(g); });
  return out;
}

// The modes of the format table, in table order, without repeats.
std::vector<std::string> mode_names() {
  std::vector<std::string> names;
  for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
    if (names.empty() || names.back() != r.mode_name) {
      names.push_back(r.mode_name);
    }
  }
  return names;
}

qsdpa::QuantMode parse_mode(const char* tag, const std::string& mode, const std::string& arg) {
  qsdpa::QuantMode m;
  if (find_mode(mode, m)) {
    return m;
  }
  std::string allowed;
  for (const auto& name : mode_names()) {
    allowed += (allowed.empty() ? "'" : ", '") + name + "'";
  }
  throw std::invalid_argument(tag + arg + " must be one of " + allowed + "; got '" + mode + "'.");
}

// "allowed: mode='affine' with bits in {1, 2, ...} and group_size in {32,
// 64, 128}; mode='mxfp4' with bits=4, group_size=32; ...", from the table.
std::string allowed_formats() {
  std::string out = "allowed: ";
  bool first = true;
  for (const auto& name : mode_names()) {
    std::vector<int> bits;
    int groups = 0;
    bool same_groups = true;
    for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
      if (name == r.mode_name) {
        same_groups = same_groups && (bits.empty() || groups == r.group_sizes);
        bits.push_back(r.bits);
        groups = r.group_sizes;
      }
    }
    out += (first ? "" : "; ") + std::string("mode='") + name + "'";
    first = false;
    if (bits.size() == 1) {
      auto gs = group_sizes_of(groups);
      out += " with bits=" + std::to_string(bits[0]) +
          (gs.size() == 1 ? ", group_size=" + std::to_string(gs[0])
                          : ", group_size in {" + join_ints(gs) + "}");
    } else if (same_groups) {
      out += " with bits in {" + join_ints(bits) + "} and group_size in {" +
          join_ints(group_sizes_of(groups)) + "}";
    } else {
      for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
        if (name == r.mode_name) {
          out += " bits=" + std::to_string(r.bits) + " (group_size in {" +
              join_ints(group_sizes_of(r.group_sizes)) + "})";
        }
      }
    }
  }
  return out;
}

void check_rank4(const mx::array& a, const char* name, const char* layout) {
  if (a.ndim() != 4) {
    fail(
        std::string(name) + " must have 4 dimensions " + layout + "; got shape " +
        shape_str(a.shape()) + ".");
  }
}

// Checks one quantized tensor triple (packed words, scales, biases) against
// the expected [B, Hkv, Lk, D] geometry.
void check_quantized(
    const char* what, // "key" or "value"
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantFormat& c,
    int B,
    int D) {
  std::string wname = std::string(what) + "s";
  std::string sname = std::string(what) + "_scales";
  std::string bname = std::string(what) + "_biases";
  check_rank4(w, wname.c_str(), "[B, Hkv, Lk, D * bits / 32]");
  if (w.dtype() != mx::uint32) {
    fail_type(
        wname + " must be uint32 (the packed words mx.quantize returns); got " +
        dtype_str(w.dtype()) + ".");
  }
  if (w.shape(0) != B) {
    fail(
        wname + " has batch size " + std::to_string(w.shape(0)) +
        " but queries have " + std::to_string(B) + ".");
  }
  int packed = qsdpa::packed_words(D, c.bits);
  if (w.shape(3) != packed) {
    fail(
        wname + " last dimension must be D * bits / 32 = " + std::to_string(D) +
        " * " + std::to_string(c.bits) + " / 32 = " + std::to_string(packed) +
        " packed words; got shape " + shape_str(w.shape()) +
        " (do bits/group_size/mode match the ones used by mx.quantize?).");
  }
  check_rank4(scales, sname.c_str(), "[B, Hkv, Lk, D / group_size]");
  mx::Shape sshape = w.shape();
  sshape[3] = D / c.group_size;
  if (scales.shape() != sshape) {
    fail(
        sname + " must have shape " + shape_str(sshape) + " for " + wname +
        " of shape " + shape_str(w.shape()) + " and group_size " +
        std::to_string(c.group_size) + "; got " + shape_str(scales.shape()) +
        ".");
  }
  const std::string mode = qsdpa::mode_name(c.mode);
  if (qsdpa::mode_float_scales(c.mode) && !is_float_type(scales.dtype())) {
    fail_type(
        sname + " must be float16, bfloat16 or float32 for mode '" + mode + "'; got " +
        dtype_str(scales.dtype()) + ".");
  }
  if (qsdpa::mode_has_bias(c.mode)) {
    if (!biases) {
      fail(bname + " is required for mode '" + mode + "' (mx.quantize returns it).");
    }
    if (biases->shape() != sshape) {
      fail(
          bname + " must have the shape of " + sname + " " + shape_str(sshape) +
          "; got " + shape_str(biases->shape()) + ".");
    }
    if (biases->dtype() != scales.dtype()) {
      fail_type(
          bname + " must have the dtype of " + sname + " (" +
          dtype_str(scales.dtype()) + "); got " + dtype_str(biases->dtype()) +
          ".");
    }
  } else {
    if (!qsdpa::mode_float_scales(c.mode) && scales.dtype() != mx::uint8) {
      fail_type(
          sname + " must be uint8 (the 8-bit scale codes mx.quantize returns for "
                  "the fp modes); got " +
          dtype_str(scales.dtype()) + ".");
    }
    if (biases) {
      const std::string which = qsdpa::mode_float_scales(c.mode) ? "mode '" + mode + "'" : "the fp modes";
      fail(bname + " must be None for " + which + " (mode '" + mode + "' has no bias).");
    }
  }
}

} // namespace

bool is_supported_format(const std::string& mode, int bits, int group_size) {
  qsdpa::QuantMode m;
  return find_mode(mode, m) && qsdpa::format_supported(m, bits, group_size);
}

namespace {
// Tests only (set_dequantized_fallback): every call through the fallback.
std::atomic<bool> g_dequantized_fallback{false};
} // namespace

void set_dequantized_fallback(bool on) {
  g_dequantized_fallback.store(on, std::memory_order_relaxed);
}

const char* version() {
  return MLX_QSDPA_VERSION;
}

const char* mlx_build_version() {
  return MLX_QSDPA_MLX_VERSION;
}

bool is_float_type(mx::Dtype t) {
  return t == mx::float16 || t == mx::bfloat16 || t == mx::float32;
}

QuantFormat parse_format(
    const char* tag, const std::string& prefix, const std::string& mode, int bits, int group_size) {
  QuantFormat f{};
  f.mode = parse_mode(tag, mode, prefix + "mode");
  f.bits = bits;
  f.group_size = group_size;
  if (!qsdpa::format_supported(f.mode, bits, group_size)) {
    const std::string what = prefix.empty() ? "format" : "value format";
    throw std::invalid_argument(
        tag + std::string("unsupported ") + what + " (" + prefix + "mode='" + mode + "', " + prefix +
        "bits=" + std::to_string(bits) + ", " + prefix + "group_size=" +
        std::to_string(group_size) + "); " + allowed_formats() + ".");
  }
  return f;
}

namespace {

std::vector<mx::array> quant_sdpa_impl(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const QuantSDPAOptions& o,
    mx::StreamOrDevice s) {
  const std::string& mask_mode = o.mask_mode;
  const std::optional<mx::array>& mask_arr = o.mask_arr;
  const std::optional<mx::array>& sinks = o.sinks;
  QuantSDPAConfig c;
  c.scale = scale;
  c.k = parse_format(kTag, "", o.mode, o.bits, o.group_size);
  c.v = o.value_mode || o.value_bits || o.value_group_size
      ? parse_format(kTag, "value_", o.value_mode.value_or(o.mode), o.value_bits.value_or(o.bits),
                     o.value_group_size.value_or(o.group_size))
      : c.k;
  c.has_sinks = sinks.has_value();
  c.return_lse = o.return_lse;
  if (!std::isfinite(scale)) {
    fail("scale must be a finite float; got " + std::to_string(scale) + ".");
  }

  // Queries.
  check_rank4(queries, "queries", "[B, Hq, Lq, D]");
  if (!is_float_type(queries.dtype())) {
    fail_type(
        "queries must be float16, bfloat16 or float32; got " +
        dtype_str(queries.dtype()) + ".");
  }
  int B = queries.shape(0);
  int Hq = queries.shape(1);
  int Lq = queries.shape(2);
  int D = queries.shape(3);
  for (const QuantFormat* f : {&c.k, &c.v}) {
    if (D <= 0 || D % f->group_size != 0) {
      fail(
          "the head dimension D (last axis of queries) must be a positive "
          "multiple of " + std::string(f == &c.k ? "group_size=" : "value_group_size=") +
          std::to_string(f->group_size) + "; got D=" + std::to_string(D) + ".");
    }
  }

  // Keys and values.
  check_quantized("key", keys, key_scales, key_biases, c.k, B, D);
  check_quantized("value", values, value_scales, value_biases, c.v, B, D);
  int Hkv = keys.shape(1);
  int Lk = keys.shape(2);
  if (values.shape(1) != Hkv || values.shape(2) != Lk) {
    fail(
        "keys and values must have the same [B, Hkv, Lk]; got keys " +
        shape_str(keys.shape()) + " and values " + shape_str(values.shape()) +
        ".");
  }
  if (Hkv <= 0 || Hq % Hkv != 0) {
    fail(
        "the number of query heads (" + std::to_string(Hq) +
        ") must be a multiple of the number of key/value heads (" +
        std::to_string(Hkv) + ").");
  }

  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {queries, keys, key_scales};
  if (c.k.has_biases()) {
    inputs.push_back(*key_biases);
  }
  inputs.push_back(values);
  inputs.push_back(value_scales);
  if (c.v.has_biases()) {
    inputs.push_back(*value_biases);
  }

  // Mask.
  if (mask_mode.empty()) {
    if (mask_arr) {
      fail("mask_arr was given but mask_mode is '' (use mask_mode='array').");
    }
    c.mask = qsdpa::kMaskNone;
  } else if (mask_mode == "causal") {
    if (mask_arr) {
      fail("mask_mode 'causal' takes no mask array.");
    }
    c.mask = qsdpa::kMaskCausal;
  } else if (mask_mode == "array") {
    if (!mask_arr) {
      fail("mask_mode 'array' needs a mask array.");
    }
    const auto& m = *mask_arr;
    if (m.dtype() != mx::bool_ && !is_float_type(m.dtype())) {
      fail_type(
          "mask must be None, 'causal', a bool array (True = attend) or an "
          "additive float16/bfloat16/float32 array; got an array of dtype " +
          dtype_str(m.dtype()) + ".");
    }
    mx::Shape target = {B, Hq, Lq, Lk};
    bool ok = m.ndim() <= 4;
    for (int i = 1; ok && i <= static_cast<int>(m.ndim()); ++i) {
      int md = m.shape(-i);
      ok = md == 1 || md == target[4 - i];
    }
    if (!ok) {
      fail(
          "mask of shape " + shape_str(m.shape()) +
          " does not broadcast to [B, Hq, Lq, Lk] = " + shape_str(target) + ".");
    }
    c.mask = m.dtype() == mx::bool_ ? qsdpa::kMaskBool : qsdpa::kMaskAdditive;
    auto mm = c.mask == qsdpa::kMaskAdditive ? mx::astype(m, mx::float32, stream) : m;
    // A strided view with zero strides on broadcast axes: no copy.
    inputs.push_back(mx::broadcast_to(mm, target, stream));
  } else {
    fail(
        "mask must be None, 'causal' or an array; got mask mode '" + mask_mode +
        "'.");
  }

  // Sinks.
  if (sinks) {
    if (sinks->ndim() != 1 || sinks->shape(0) != Hq) {
      fail(
          "sinks must have shape [Hq] = (" + std::to_string(Hq) + ",); got " +
          shape_str(sinks->shape()) + ".");
    }
    if (!is_float_type(sinks->dtype())) {
      fail_type(
          "sinks must be float16, bfloat16 or float32; got " +
          dtype_str(sinks->dtype()) + ".");
    }
    inputs.push_back(mx::astype(*sinks, mx::float32, stream));
  }

  if (g_dequantized_fallback.load(std::memory_order_relaxed) ||
      (stream.device == mx::Device::gpu && !gpu_kernel_supports(c, CallShape{B, Hq, Hkv, Lq, Lk, D}))) {
    return dequantized_attention(c, inputs, stream);
  }

  std::vector<mx::Shape> shapes = {queries.shape()};
  std::vector<mx::Dtype> dtypes = {queries.dtype()};
  if (c.return_lse) {
    shapes.push_back({B, Hq, Lq});
    dtypes.push_back(mx::float32);
  }
  return mx::array::make_arrays(
      std::move(shapes),
      std::move(dtypes),
      std::make_shared<QuantSDPA>(stream, c),
      std::move(inputs));
}

} // namespace

// With a rotation, the call runs in rotated coordinates: the queries rotated
// as the keys were, the output rotated back (the lse is the same in both).
std::vector<mx::array> quant_sdpa(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const QuantSDPAOptions& o,
    mx::StreamOrDevice s) {
  // Queries that are not [B, Hq, Lq, D] floats: the unrotated call reports
  // what is wrong with them.
  const bool rotated = parse_rotation(o.rotation, kTag) != Rotation::kNone && queries.ndim() == 4 &&
      is_float_type(queries.dtype());
  auto outs = quant_sdpa_impl(
      rotated ? rotate(queries, o.rotation_seed, false, s) : queries, keys, key_scales, key_biases, values,
      value_scales, value_biases, scale, o, s);
  if (rotated) {
    outs[0] = rotate(outs[0], o.rotation_seed, true, s);
  }
  return outs;
}

namespace {

QuantSDPAOptions options_of(
    const std::string& mask_mode,
    const std::optional<mx::array>& mask_arr,
    const std::optional<mx::array>& sinks,
    int group_size,
    int bits,
    const std::string& mode,
    bool return_lse) {
  QuantSDPAOptions o;
  o.mask_mode = mask_mode;
  o.mask_arr = mask_arr;
  o.sinks = sinks;
  o.group_size = group_size;
  o.bits = bits;
  o.mode = mode;
  o.return_lse = return_lse;
  return o;
}

} // namespace

mx::array quant_sdpa(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const std::string& mask_mode,
    const std::optional<mx::array>& mask_arr,
    const std::optional<mx::array>& sinks,
    int group_size,
    int bits,
    const std::string& mode,
    mx::StreamOrDevice s) {
  return quant_sdpa(
      queries, keys, key_scales, key_biases, values, value_scales, value_biases, scale,
      options_of(mask_mode, mask_arr, sinks, group_size, bits, mode, false), s)[0];
}

std::pair<mx::array, mx::array> quant_sdpa_with_lse(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const std::string& mask_mode,
    const std::optional<mx::array>& mask_arr,
    const std::optional<mx::array>& sinks,
    int group_size,
    int bits,
    const std::string& mode,
    mx::StreamOrDevice s) {
  auto outs = quant_sdpa(
      queries, keys, key_scales, key_biases, values, value_scales, value_biases, scale,
      options_of(mask_mode, mask_arr, sinks, group_size, bits, mode, true), s);
  return {outs[0], outs[1]};
}

} // namespace mlx_qsdpa
