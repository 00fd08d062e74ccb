// Copyright © 2026 mlx-qsdpa contributors.
//
// Everything about launching the Metal kernels that needs no Metal: which
// kernels a call runs, with which function constants, buffers, parameters,
// grid and threadgroup memory, and the choice between the 1-pass and the
// 2-pass kernel. quant_sdpa_metal.cpp encodes such a plan on the GPU; the
// Metal simulator of the test suite (tests/metal) executes the very same
// plan on Linux, so this file is tested without a Mac.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "call.h"
#include "mlx_qsdpa/formats.h"

namespace mlx_qsdpa::metal_plan {

// One quant_sdpa call, as the plan needs it.
struct DecodeProblem {
  // Sizes, format, element types, mask kind (qsdpa::MaskKind) and strides.
  // Its pointers are not read: Metal binds the arrays themselves, so the
  // host builds it with null addresses (describe_call).
  Call call{};
  // Whether the call has sinks and returns lse (the Call's null pointers
  // cannot say).
  bool has_sinks = false;
  bool return_lse = false;
  // Size hint of the GPU (gpu_core_estimate); decides the key split.
  int gpu_cores = 16;
  // > 0: split the keys into this many blocks exactly as far as Lk allows
  // (2-pass from 2 blocks on). Set by the tests (set_metal_test_key_blocks).
  int force_blocks = 0;
};

// The arrays a launch binds.
enum class Operand {
  Queries,
  Keys,
  KeyScales,
  KeyBiases,
  Values,
  ValueScales,
  ValueBiases,
  Mask,
  Sinks,
  Out,
  Lse,
  PartialOut, // float32 temporary [B * Hq * Lq, blocks, D]
  PartialStats, // float32 temporary [B * Hq * Lq, blocks, 2]
};

struct BufferBinding {
  int index; // [[buffer(index)]]
  Operand operand;
  bool written; // the kernel writes it (an output or temporary)
};

struct ConstantValue {
  int index; // [[function_constant(index)]]
  bool is_bool; // bool or int
  int value;
};

struct KernelLaunch {
  std::string kernel; // function name in the metallib
  std::string pipeline_key; // kernel + constant values: names the specialised pipeline
  std::vector<ConstantValue> constants;
  std::vector<BufferBinding> buffers;
  int params_index; // [[buffer(params_index)]] receives `params` (set_bytes)
  std::vector<uint8_t> params; // bytes of qsdpa::DecodeParams or MergeParams
  std::array<uint32_t, 3> grid; // threadgroups
  std::array<uint32_t, 3> threads; // threads per threadgroup
  size_t threadgroup_memory; // bytes at [[threadgroup(0)]]
};

struct DecodePlan {
  int blocks = 1; // key blocks; > 1 means 2-pass
  int keys_per_block = 0;
  int64_t partial_out_elems = 0; // float32 elements of Operand::PartialOut
  int64_t partial_stats_elems = 0; // float32 elements of Operand::PartialStats
  std::vector<KernelLaunch> launches;
};

// How the keys are split over threadgroups.
struct KeySplit {
  int blocks; // 1: 1-pass
  int keys_per_block;
};

// Picks 1-pass or 2-pass and the number of key blocks. `threadgroups` is
// what one block of keys already launches (B * Hkv * row blocks): when it
// fills the GPU, or the keys are few, one pass it is; otherwise the keys are
// split until the GPU has about kThreadgroupsPerCore threadgroups per core,
// keeping at least kMinKeysPerBlock keys per block (below that the merge
// costs more than the parallelism gains). Blocks are whole multiples of
// the kernel's key tile.
KeySplit choose_key_split(int threadgroups, int Lk, int D, int gpu_cores);

// The number of GPU cores to plan for, from the architecture name MLX
// reports (e.g. "applegpu_g15s"): its last letter is the size class MLX's
// own kernels tune for. An estimate: it only moves the key split.
int gpu_core_estimate(const std::string& architecture);

// The format of the keys or of the values: a row of formats.h's table and
// one of its group sizes.
struct TensorFormat {
  qsdpa::QuantMode mode;
  int bits;
  int group_size;
};

// Whether the metallib has a decode kernel for this keys' format and head
// dim: every format of formats.h's table at head dims 64, 96, 128 and 256,
// and the formats with 16-element groups also at 80 (quant_sdpa.metal).
bool decode_kernel_exists(qsdpa::QuantMode mode, int bits, int D);

// Whether the kernels cover a call (the rest falls back to dequantize +
// attention): a compiled (keys' format, D), any values' format of the
// table (the kernels decode values by function constants), D a multiple of
// both group sizes, and 1..32 query rows.
bool kernels_cover(const TensorFormat& k, const TensorFormat& v, int D, int Lq);

// Name of the decode kernel of a keys' format and head dim (see
// quant_sdpa.metal).
std::string decode_kernel_name(qsdpa::QuantMode mode, int bits, int D);

// The launches of one call. Requires kernels_cover(...) and a non-empty
// output (B * Hq * Lq > 0).
DecodePlan plan_decode(const DecodeProblem& p);

// Tuning constants of choose_key_split (design choices, not measurements:
// no Apple GPU was available to tune them).
constexpr int kThreadgroupsPerCore = 4;
constexpr int kMinKeysPerBlock = 256;
constexpr int kMaxBlocks = 1024;
constexpr int kMaxQueryRows = 32; // Lq the kernels take per launch

} // namespace mlx_qsdpa::metal_plan
