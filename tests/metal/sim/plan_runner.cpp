// Copyright © 2026 mlx-qsdpa contributors.
//
// Runs quant_sdpa in the Metal simulator the way eval_gpu runs it on a Mac:
// the launches come from the same csrc/backends/metal/dispatch_plan.cpp, the
// temporaries are allocated here (uninitialised, as MLX's are), and each
// launch binds the same buffer indices, function constants and parameter
// bytes. Also exposes the plan functions to the tests (ctypes).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "backends/metal/dispatch_plan.h"
#include "qsim/launch.h"

namespace {

using namespace mlx_qsdpa::metal_plan;

// Order of the int32 `dims` array of the C interface.
enum Dim {
  kB,
  kHq,
  kHkv,
  kLq,
  kLk,
  kD,
  kMode,
  kBits,
  kGroupSize,
  kQueryType,
  kKeyScaleType,
  kValueScaleType,
  kMask, // qsdpa::MaskKind
  kHasSinks,
  kReturnLse,
  kGpuCores,
  kForceBlocks,
  kSinkStride,
  kValueMode, // the values' format
  kValueBits,
  kValueGroupSize,
  kNumDims,
};

constexpr int kNumOperands = static_cast<int>(Operand::PartialStats) + 1;

// The problem as eval_gpu_kernel builds it: a Call as describe_call fills
// it for Metal (no addresses), and the plan's own options.
DecodeProblem problem_from(const int32_t* dims, float scale, const int64_t* strides) {
  DecodeProblem p;
  mlx_qsdpa::Call& c = p.call;
  c.B = dims[kB];
  c.Hq = dims[kHq];
  c.Hkv = dims[kHkv];
  c.Lq = dims[kLq];
  c.Lk = dims[kLk];
  c.D = dims[kD];
  c.G = c.Hkv > 0 ? c.Hq / c.Hkv : 0;
  c.k.mode = dims[kMode];
  c.k.bits = dims[kBits];
  c.k.group_size = dims[kGroupSize];
  c.v.mode = dims[kValueMode];
  c.v.bits = dims[kValueBits];
  c.v.group_size = dims[kValueGroupSize];
  c.scale = scale;
  c.scale_log2 = scale * qsdpa::log2e();
  c.q_type = dims[kQueryType];
  c.out_type = dims[kQueryType];
  c.k.scale_type = dims[kKeyScaleType];
  c.v.scale_type = dims[kValueScaleType];
  c.mask = dims[kMask];
  c.sink_stride = dims[kSinkStride];
  // Strides in the order q, k, k scales, k biases, v, v scales, v biases, mask.
  int64_t* all[8] = {c.qs, c.k.ws, c.k.ss, c.k.bs, c.v.ws, c.v.ss, c.v.bs, c.ms};
  for (int a = 0; a < 8; ++a) {
    for (int i = 0; i < 4; ++i) {
      all[a][i] = strides[a * 4 + i];
    }
  }
  p.has_sinks = dims[kHasSinks] != 0;
  p.return_lse = dims[kReturnLse] != 0;
  p.gpu_cores = dims[kGpuCores];
  p.force_blocks = dims[kForceBlocks];
  return p;
}

std::string g_error;

int copy_out(const std::string& s, char* out, int len) {
  if (out && len > 0) {
    std::snprintf(out, static_cast<size_t>(len), "%s", s.c_str());
  }
  return static_cast<int>(s.size()) + 1;
}

} // namespace

extern "C" {

const char* qsim_plan_error() {
  return g_error.c_str();
}

// Plans and runs one call. operand_buffer[i] / operand_offset[i]: the
// buffer id (qsim_alloc) and byte offset of Operand i (-1 when absent);
// the temporaries are allocated here. info receives blocks, keys per block
// and the number of launches. Returns 0, 1 (a launch failed: see
// qsim_last_error) or 2 (planning failed: see qsim_plan_error).
int qsim_quant_sdpa(
    const int32_t* dims,
    float scale,
    const int64_t* strides,
    const int64_t* operand_buffer,
    const int64_t* operand_offset,
    int32_t* info) {
  DecodePlan plan;
  try {
    plan = plan_decode(problem_from(dims, scale, strides));
  } catch (const std::exception& e) {
    g_error = e.what();
    return 2;
  }
  info[0] = plan.blocks;
  info[1] = plan.keys_per_block;
  info[2] = static_cast<int32_t>(plan.launches.size());

  std::vector<int64_t> ids(operand_buffer, operand_buffer + kNumOperands);
  std::vector<int64_t> offsets(operand_offset, operand_offset + kNumOperands);
  std::vector<int64_t> owned;
  if (plan.partial_out_elems > 0) {
    ids[int(Operand::PartialOut)] = qsim_alloc(plan.partial_out_elems * 4, 0, "partial_out (temporary)");
    ids[int(Operand::PartialStats)] = qsim_alloc(plan.partial_stats_elems * 4, 0, "partial_stats (temporary)");
    offsets[int(Operand::PartialOut)] = 0;
    offsets[int(Operand::PartialStats)] = 0;
    owned.push_back(ids[int(Operand::PartialOut)]);
    owned.push_back(ids[int(Operand::PartialStats)]);
  }
  int status = 0;
  for (const auto& l : plan.launches) {
    std::vector<int> c_index;
    std::vector<int64_t> c_value;
    for (const auto& c : l.constants) {
      c_index.push_back(c.index);
      c_value.push_back(c.value);
    }
    // set_bytes: the parameter struct in a buffer of its own.
    const int64_t params = qsim_alloc(static_cast<int64_t>(l.params.size()), 1, "params (set_bytes)");
    std::memcpy(qsim_data(params), l.params.data(), l.params.size());
    std::vector<int> b_index = {l.params_index};
    std::vector<int64_t> b_buffer = {params};
    std::vector<int64_t> b_offset = {0};
    for (const auto& b : l.buffers) {
      const int op = static_cast<int>(b.operand);
      if (ids[op] < 0) {
        g_error = "the plan binds an operand the caller did not provide";
        qsim_free(params);
        status = 2;
        break;
      }
      b_index.push_back(b.index);
      b_buffer.push_back(ids[op]);
      b_offset.push_back(offsets[op]);
    }
    if (status) {
      break;
    }
    status = qsim_launch(
        l.kernel.c_str(), static_cast<int>(c_index.size()), c_index.data(), c_value.data(),
        static_cast<int>(b_index.size()), b_index.data(), b_buffer.data(), b_offset.data(),
        l.grid.data(), l.threads.data(), static_cast<int64_t>(l.threadgroup_memory));
    qsim_free(params);
    if (status) {
      break;
    }
  }
  for (int64_t id : owned) {
    qsim_free(id);
  }
  return status;
}

// The plan of a call as text: a first line "blocks=.. keys_per_block=..
// partial_out=.. partial_stats=..", then per launch "kernel=.. key=..
// grid=x,y,z threads=x,y,z tgmem=.. constants=i:v,.. buffers=i:operand:w,..".
int qsim_describe_plan(const int32_t* dims, float scale, const int64_t* strides, char* out, int len) {
  DecodePlan plan;
  try {
    plan = plan_decode(problem_from(dims, scale, strides));
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
  std::string s = "blocks=" + std::to_string(plan.blocks) +
      " keys_per_block=" + std::to_string(plan.keys_per_block) +
      " partial_out=" + std::to_string(plan.partial_out_elems) +
      " partial_stats=" + std::to_string(plan.partial_stats_elems) + "\n";
  for (const auto& l : plan.launches) {
    s += "kernel=" + l.kernel + " key=" + l.pipeline_key;
    s += " grid=" + std::to_string(l.grid[0]) + "," + std::to_string(l.grid[1]) + "," + std::to_string(l.grid[2]);
    s += " threads=" + std::to_string(l.threads[0]) + "," + std::to_string(l.threads[1]) + "," + std::to_string(l.threads[2]);
    s += " tgmem=" + std::to_string(l.threadgroup_memory);
    s += " params=" + std::to_string(l.params_index) + ":" + std::to_string(l.params.size());
    s += " constants=";
    for (size_t i = 0; i < l.constants.size(); ++i) {
      s += (i ? "," : "") + std::to_string(l.constants[i].index) + ":" + std::to_string(l.constants[i].value);
    }
    s += " buffers=";
    for (size_t i = 0; i < l.buffers.size(); ++i) {
      s += (i ? "," : "") + std::to_string(l.buffers[i].index) + ":" +
          std::to_string(static_cast<int>(l.buffers[i].operand)) + ":" + (l.buffers[i].written ? "w" : "r");
    }
    s += "\n";
  }
  return copy_out(s, out, len);
}

void qsim_choose_key_split(int threadgroups, int Lk, int D, int gpu_cores, int32_t* out) {
  const KeySplit s = choose_key_split(threadgroups, Lk, D, gpu_cores);
  out[0] = s.blocks;
  out[1] = s.keys_per_block;
}

int qsim_gpu_core_estimate(const char* architecture) {
  return gpu_core_estimate(architecture);
}

// Coverage of keys of format (k_mode, k_bits, k_group_size) and values of
// format (v_mode, v_bits, v_group_size).
int qsim_kernels_cover(int k_mode, int k_bits, int k_group_size, int v_mode, int v_bits, int v_group_size, int D, int Lq) {
  const TensorFormat k = {static_cast<qsdpa::QuantMode>(k_mode), k_bits, k_group_size};
  const TensorFormat v = {static_cast<qsdpa::QuantMode>(v_mode), v_bits, v_group_size};
  return kernels_cover(k, v, D, Lq) ? 1 : 0;
}

// The QuantMode of a mode name of formats.h's table ("affine", "mxfp4",
// ...), -1 for a name it does not have: the tests name formats as
// mx.quantize does and take the numbers from here.
int qsim_quant_mode(const char* name) {
  for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
    if (std::strcmp(r.mode_name, name) == 0) {
      return r.mode;
    }
  }
  return -1;
}

int qsim_decode_kernel_name(int mode, int bits, int D, char* out, int len) {
  return copy_out(decode_kernel_name(static_cast<qsdpa::QuantMode>(mode), bits, D), out, len);
}

} // extern "C"
