// Copyright © 2026 mlx-qsdpa contributors.
#include "backends/metal/dispatch_plan.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <stdexcept>

#include "quant_sdpa_params.h"

namespace mlx_qsdpa::metal_plan {

// The parameter structs are shared with MSL: their layout must be the one
// the Metal compiler gives them (64-bit members first, no padding).
static_assert(sizeof(qsdpa::DecodeParams) == 8 * 4 * 8 + 12 * 4, "DecodeParams layout");
static_assert(offsetof(qsdpa::DecodeParams, B) == 8 * 4 * 8, "DecodeParams layout");
static_assert(offsetof(qsdpa::DecodeParams, scale_log2) == 8 * 4 * 8 + 10 * 4, "DecodeParams layout");
static_assert(offsetof(qsdpa::DecodeParams, sink_stride) == 8 * 4 * 8 + 11 * 4, "DecodeParams layout");
static_assert(sizeof(qsdpa::MergeParams) == 6 * 4, "MergeParams layout");

namespace {

int ceil_div(int a, int b) {
  return (a + b - 1) / b;
}

// Pad a threadgroup memory length to the 16 bytes Metal requires.
size_t pad16(size_t n) {
  return (n + 15) / 16 * 16;
}

KeySplit forced_split(int Lk, int blocks) {
  if (Lk <= 0) {
    return {1, 0};
  }
  const int kpb = ceil_div(Lk, std::min(blocks, Lk));
  return {ceil_div(Lk, kpb), kpb};
}

// The format's token in kernel names (formats.h's table).
std::string format_name(qsdpa::QuantMode mode, int bits) {
  const qsdpa::FormatRow* row = qsdpa::find_format(mode, bits);
  return row ? row->token : "unknown";
}

template <typename T>
std::vector<uint8_t> as_bytes(const T& v) {
  std::vector<uint8_t> out(sizeof(T));
  std::memcpy(out.data(), &v, sizeof(T));
  return out;
}

void copy_strides(int64_t (&dst)[4], const int64_t (&src)[4]) {
  for (int i = 0; i < 4; ++i) {
    dst[i] = src[i];
  }
}

// Every function constant of the library (a kernel ignores the ones it does
// not read; setting all of them keeps one rule for both kernels).
std::vector<ConstantValue> constants_for(const DecodeProblem& p, bool two_pass, bool merge) {
  const Call& c = p.call;
  const bool final_output = merge || !two_pass;
  // Float scales (and biases) have an element type; the fp modes' 8-bit
  // scale codes are decoded by mode, and their constant stays 0.
  const int key_scale_type = qsdpa::mode_float_scales(c.k.mode) ? c.k.scale_type : 0;
  const int value_scale_type = qsdpa::mode_float_scales(c.v.mode) ? c.v.scale_type : 0;
  return {
      {qsdpa::kFcQueryType, false, c.q_type},
      {qsdpa::kFcKeyScaleType, false, key_scale_type},
      {qsdpa::kFcValueScaleType, false, value_scale_type},
      {qsdpa::kFcKeyGroupSize, false, c.k.group_size},
      {qsdpa::kFcKeyHasBiases, true, qsdpa::mode_has_bias(c.k.mode)},
      {qsdpa::kFcValueMode, false, c.v.mode},
      {qsdpa::kFcValueBits, false, c.v.bits},
      {qsdpa::kFcValueGroupSize, false, c.v.group_size},
      {qsdpa::kFcValueHasBiases, true, qsdpa::mode_has_bias(c.v.mode)},
      {qsdpa::kFcCausal, true, c.mask == qsdpa::kMaskCausal},
      {qsdpa::kFcBoolMask, true, c.mask == qsdpa::kMaskBool},
      {qsdpa::kFcFloatMask, true, c.mask == qsdpa::kMaskAdditive},
      // The sink and lse belong to the final normalisation (pass 2 when
      // there are two).
      {qsdpa::kFcHasSinks, true, p.has_sinks && final_output},
      {qsdpa::kFcWriteLse, true, p.return_lse && final_output},
      {qsdpa::kFcWriteFinal, true, !merge && !two_pass},
      {qsdpa::kFcWritePartials, true, !merge && two_pass},
  };
}

// The name of a specialised pipeline: the kernel and the value of every
// constant (constants_for lists them in one fixed order).
std::string pipeline_key(const std::string& kernel, const std::vector<ConstantValue>& cs) {
  std::string key = kernel;
  for (const auto& c : cs) {
    key += "_" + std::to_string(c.value);
  }
  return key;
}

} // namespace

KeySplit choose_key_split(int threadgroups, int Lk, int D, int gpu_cores) {
  if (Lk <= 0 || threadgroups <= 0) {
    return {1, std::max(Lk, 0)};
  }
  const int target = kThreadgroupsPerCore * std::max(gpu_cores, 1);
  int blocks = ceil_div(target, threadgroups);
  blocks = std::min({blocks, Lk / kMinKeysPerBlock, kMaxBlocks});
  if (blocks <= 1) {
    return {1, Lk};
  }
  // Whole tiles per block. A head dim past kTileElems has no kernel (the
  // plan refuses it) and no whole key per tile: one, not a division by 0.
  const int tile = std::max(qsdpa::keys_per_tile(D), 1);
  const int kpb = ceil_div(ceil_div(Lk, blocks), tile) * tile;
  blocks = ceil_div(Lk, kpb);
  if (blocks <= 1) {
    return {1, Lk};
  }
  return {blocks, kpb};
}

int gpu_core_estimate(const std::string& architecture) {
  const char size_class = architecture.empty() ? '?' : architecture.back();
  switch (size_class) {
    case 'g': // phone and tablet chips
    case 'p': // base chips
      return 10;
    case 's':
      return 16;
    case 'c':
      return 32;
    case 'd': // two dies
      return 64;
    default:
      return 16;
  }
}

bool decode_kernel_exists(qsdpa::QuantMode mode, int bits, int D) {
  const int group_sizes = qsdpa::format_group_sizes(mode, bits);
  if (group_sizes == 0) {
    return false;
  }
  if (D == 64 || D == 96 || D == 128 || D == 256) {
    return true;
  }
  // 80 is a multiple of no group size but 16: only formats with 16-element
  // groups quantize it.
  return D == 80 && (group_sizes & qsdpa::kGroupSize16) != 0;
}

bool kernels_cover(const TensorFormat& k, const TensorFormat& v, int D, int Lq) {
  return qsdpa::format_supported(k.mode, k.bits, k.group_size) &&
      qsdpa::format_supported(v.mode, v.bits, v.group_size) && decode_kernel_exists(k.mode, k.bits, D) &&
      D % k.group_size == 0 && D % v.group_size == 0 && Lq >= 1 && Lq <= kMaxQueryRows;
}

std::string decode_kernel_name(qsdpa::QuantMode mode, int bits, int D) {
  return "qsdpa_decode_" + format_name(mode, bits) + "_d" + std::to_string(D);
}

DecodePlan plan_decode(const DecodeProblem& p) {
  const Call& c = p.call;
  const TensorFormat k_format = {static_cast<qsdpa::QuantMode>(c.k.mode), c.k.bits, c.k.group_size};
  const TensorFormat v_format = {static_cast<qsdpa::QuantMode>(c.v.mode), c.v.bits, c.v.group_size};
  if (!kernels_cover(k_format, v_format, c.D, c.Lq) || c.Hkv <= 0 || c.G <= 0 || c.Hq != c.G * c.Hkv ||
      c.B <= 0) {
    throw std::invalid_argument("[quant_sdpa] plan_decode: call not covered by the Metal kernels");
  }
  const int rows = c.G * c.Lq;
  const int row_blocks = ceil_div(rows, qsdpa::kRowsPerThreadgroup);
  const KeySplit split = p.force_blocks > 0
      ? forced_split(c.Lk, p.force_blocks)
      : choose_key_split(c.B * c.Hkv * row_blocks, c.Lk, c.D, p.gpu_cores);
  const bool two_pass = split.blocks > 1;

  DecodePlan plan;
  plan.blocks = split.blocks;
  plan.keys_per_block = split.keys_per_block;

  qsdpa::DecodeParams dp{};
  copy_strides(dp.q_strides, c.qs);
  copy_strides(dp.k_strides, c.k.ws);
  copy_strides(dp.k_scale_strides, c.k.ss);
  copy_strides(dp.k_bias_strides, c.k.bs);
  copy_strides(dp.v_strides, c.v.ws);
  copy_strides(dp.v_scale_strides, c.v.ss);
  copy_strides(dp.v_bias_strides, c.v.bs);
  copy_strides(dp.mask_strides, c.ms);
  dp.B = c.B;
  dp.Hq = c.Hq;
  dp.Hkv = c.Hkv;
  dp.Lq = c.Lq;
  dp.Lk = c.Lk;
  dp.G = c.G;
  dp.rows = rows;
  dp.row_blocks = row_blocks;
  dp.keys_per_block = split.keys_per_block;
  dp.blocks = split.blocks;
  dp.scale_log2 = c.scale_log2;
  dp.sink_stride = static_cast<int>(c.sink_stride);

  KernelLaunch decode;
  decode.kernel = decode_kernel_name(k_format.mode, c.k.bits, c.D);
  decode.constants = constants_for(p, two_pass, /* merge= */ false);
  decode.pipeline_key = pipeline_key(decode.kernel, decode.constants);
  auto& db = decode.buffers;
  db.push_back({qsdpa::kDecodeQueries, Operand::Queries, false});
  db.push_back({qsdpa::kDecodeKeys, Operand::Keys, false});
  db.push_back({qsdpa::kDecodeKeyScales, Operand::KeyScales, false});
  db.push_back({qsdpa::kDecodeValues, Operand::Values, false});
  db.push_back({qsdpa::kDecodeValueScales, Operand::ValueScales, false});
  if (qsdpa::mode_has_bias(c.k.mode)) {
    db.push_back({qsdpa::kDecodeKeyBiases, Operand::KeyBiases, false});
  }
  if (qsdpa::mode_has_bias(c.v.mode)) {
    db.push_back({qsdpa::kDecodeValueBiases, Operand::ValueBiases, false});
  }
  if (c.mask == qsdpa::kMaskBool) {
    db.push_back({qsdpa::kDecodeBoolMask, Operand::Mask, false});
  } else if (c.mask == qsdpa::kMaskAdditive) {
    db.push_back({qsdpa::kDecodeFloatMask, Operand::Mask, false});
  }
  if (two_pass) {
    db.push_back({qsdpa::kDecodePartialOut, Operand::PartialOut, true});
    db.push_back({qsdpa::kDecodePartialStats, Operand::PartialStats, true});
  } else {
    if (p.has_sinks) {
      db.push_back({qsdpa::kDecodeSinks, Operand::Sinks, false});
    }
    db.push_back({qsdpa::kDecodeOut, Operand::Out, true});
    if (p.return_lse) {
      db.push_back({qsdpa::kDecodeLse, Operand::Lse, true});
    }
  }
  decode.params_index = qsdpa::kDecodeParams;
  decode.params = as_bytes(dp);
  decode.grid = {
      static_cast<uint32_t>(split.blocks),
      static_cast<uint32_t>(c.Hkv * row_blocks),
      static_cast<uint32_t>(c.B)};
  decode.threads = {qsdpa::kThreadsPerGroup, 1, 1};
  decode.threadgroup_memory = pad16(sizeof(float) * qsdpa::decode_threadgroup_floats(c.D));
  plan.launches.push_back(std::move(decode));

  if (!two_pass) {
    return plan;
  }
  const int64_t out_rows = int64_t(c.B) * c.Hq * c.Lq;
  plan.partial_out_elems = out_rows * split.blocks * c.D;
  plan.partial_stats_elems = out_rows * split.blocks * 2;

  qsdpa::MergeParams mp{};
  mp.rows = static_cast<int>(out_rows);
  mp.Hq = c.Hq;
  mp.Lq = c.Lq;
  mp.D = c.D;
  mp.blocks = split.blocks;
  mp.sink_stride = static_cast<int>(c.sink_stride);

  KernelLaunch merge;
  merge.kernel = "qsdpa_merge";
  merge.constants = constants_for(p, two_pass, /* merge= */ true);
  merge.pipeline_key = pipeline_key(merge.kernel, merge.constants);
  auto& mb = merge.buffers;
  mb.push_back({qsdpa::kMergePartialOut, Operand::PartialOut, false});
  mb.push_back({qsdpa::kMergePartialStats, Operand::PartialStats, false});
  if (p.has_sinks) {
    mb.push_back({qsdpa::kMergeSinks, Operand::Sinks, false});
  }
  mb.push_back({qsdpa::kMergeOut, Operand::Out, true});
  if (p.return_lse) {
    mb.push_back({qsdpa::kMergeLse, Operand::Lse, true});
  }
  merge.params_index = qsdpa::kMergeParams;
  merge.params = as_bytes(mp);
  merge.grid = {static_cast<uint32_t>(ceil_div(mp.rows, qsdpa::kMergeSimdgroups)), 1, 1};
  merge.threads = {qsdpa::kMergeSimdgroups * qsdpa::kSimdWidth, 1, 1};
  merge.threadgroup_memory = 0;
  plan.launches.push_back(std::move(merge));
  return plan;
}

} // namespace mlx_qsdpa::metal_plan
