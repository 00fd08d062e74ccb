// Copyright © 2026 mlx-qsdpa contributors.
//
// The kernels of mlx_qsdpa.metallib: one decode kernel per (keys' format,
// head dim) and the 2-pass merge kernel. Everything else (the values'
// format, query dtype, scale dtypes, group sizes, mask kind, sinks, lse,
// 1-pass or pass 1 of 2) is a function constant, set per pipeline by the
// host.
//
// Kernel names: qsdpa_decode_<format>_d<D>, <format> the token of a row of
// formats.h's table (affine4, mxfp4, ...; csrc/backends/metal/
// dispatch_plan.cpp builds the same names), and qsdpa_merge.
#include <metal_stdlib>

#include "quant_sdpa_decode.h"
#include "quant_sdpa_merge.h"

// A decode kernel: binds the arguments (those a function constant removes
// are only read when it is true) and runs qsdpa::quant_sdpa_decode.
#define QSDPA_DECODE_KERNEL(name, MODE, BITS, D)                                        \
  [[kernel]] void name(                                                                 \
      const device uchar* queries [[buffer(qsdpa::kDecodeQueries)]],                    \
      const device uint* keys [[buffer(qsdpa::kDecodeKeys)]],                           \
      const device uchar* key_scales [[buffer(qsdpa::kDecodeKeyScales)]],               \
      const device uchar* key_biases                                                    \
      [[buffer(qsdpa::kDecodeKeyBiases), function_constant(fc_key_has_biases)]],        \
      const device uint* values [[buffer(qsdpa::kDecodeValues)]],                       \
      const device uchar* value_scales [[buffer(qsdpa::kDecodeValueScales)]],           \
      const device uchar* value_biases                                                  \
      [[buffer(qsdpa::kDecodeValueBiases), function_constant(fc_value_has_biases)]],    \
      const device bool* bool_mask                                                      \
      [[buffer(qsdpa::kDecodeBoolMask), function_constant(fc_bool_mask)]],              \
      const device float* float_mask                                                    \
      [[buffer(qsdpa::kDecodeFloatMask), function_constant(fc_float_mask)]],            \
      const device float* sinks [[buffer(qsdpa::kDecodeSinks), function_constant(fc_has_sinks)]], \
      device uchar* out [[buffer(qsdpa::kDecodeOut), function_constant(fc_write_final)]], \
      device float* lse [[buffer(qsdpa::kDecodeLse), function_constant(fc_write_lse)]], \
      device float* partial_out                                                         \
      [[buffer(qsdpa::kDecodePartialOut), function_constant(fc_write_partials)]],       \
      device float* partial_stats                                                       \
      [[buffer(qsdpa::kDecodePartialStats), function_constant(fc_write_partials)]],     \
      constant qsdpa::DecodeParams& params [[buffer(qsdpa::kDecodeParams)]],            \
      threadgroup float* smem [[threadgroup(0)]],                                       \
      uint3 tgid [[threadgroup_position_in_grid]],                                      \
      uint tid [[thread_index_in_threadgroup]],                                         \
      uint sgid [[simdgroup_index_in_threadgroup]],                                     \
      uint lane [[thread_index_in_simdgroup]]) {                                        \
    qsdpa::DecodeBuffers buf;                                                           \
    buf.queries = queries;                                                              \
    buf.keys = keys;                                                                    \
    buf.key_scales = key_scales;                                                        \
    buf.key_biases = fc_key_has_biases ? key_biases : nullptr;                          \
    buf.values = values;                                                                \
    buf.value_scales = value_scales;                                                    \
    buf.value_biases = fc_value_has_biases ? value_biases : nullptr;                    \
    buf.bool_mask = fc_bool_mask ? bool_mask : nullptr;                                 \
    buf.float_mask = fc_float_mask ? float_mask : nullptr;                              \
    buf.sinks = fc_has_sinks ? sinks : nullptr;                                         \
    buf.out = fc_write_final ? out : nullptr;                                           \
    buf.lse = fc_write_lse ? lse : nullptr;                                             \
    buf.partial_out = fc_write_partials ? partial_out : nullptr;                        \
    buf.partial_stats = fc_write_partials ? partial_stats : nullptr;                    \
    qsdpa::quant_sdpa_decode<MODE, BITS, D>(buf, params, smem, tgid, tid, sgid, lane); \
  }

// Head dims 64, 96, 128 and 256 for every keys' format.
#define QSDPA_DECODE_KERNELS(fmt, MODE, BITS)                         \
  QSDPA_DECODE_KERNEL(qsdpa_decode_##fmt##_d64, MODE, BITS, 64)       \
  QSDPA_DECODE_KERNEL(qsdpa_decode_##fmt##_d96, MODE, BITS, 96)       \
  QSDPA_DECODE_KERNEL(qsdpa_decode_##fmt##_d128, MODE, BITS, 128)     \
  QSDPA_DECODE_KERNEL(qsdpa_decode_##fmt##_d256, MODE, BITS, 256)

// One set per row of formats.h's format table.
#define QSDPA_DECODE_FORMAT_KERNELS(MODE, TOKEN, BITS, GROUP_SIZES) \
  QSDPA_DECODE_KERNELS(TOKEN, qsdpa::MODE, BITS)

QSDPA_FORMATS(QSDPA_DECODE_FORMAT_KERNELS)

// Head dim 80, a multiple of no group size but 16: one kernel per format
// with 16-element groups, the rule dispatch_plan.cpp's decode_kernel_exists
// reads from the table (tests/metal/test_metal_dispatch_plan.py holds the
// two to the same list).
QSDPA_DECODE_KERNEL(qsdpa_decode_nvfp4_d80, qsdpa::kNvfp4, 4, 80)

[[kernel]] void qsdpa_merge(
    const device float* partial_out [[buffer(qsdpa::kMergePartialOut)]],
    const device float* partial_stats [[buffer(qsdpa::kMergePartialStats)]],
    const device float* sinks [[buffer(qsdpa::kMergeSinks), function_constant(fc_has_sinks)]],
    device uchar* out [[buffer(qsdpa::kMergeOut)]],
    device float* lse [[buffer(qsdpa::kMergeLse), function_constant(fc_write_lse)]],
    constant qsdpa::MergeParams& params [[buffer(qsdpa::kMergeParams)]],
    uint tgid [[threadgroup_position_in_grid]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  qsdpa::quant_sdpa_merge(
      partial_out, partial_stats, fc_has_sinks ? sinks : nullptr, out,
      fc_write_lse ? lse : nullptr, params, tgid, sgid, lane);
}
