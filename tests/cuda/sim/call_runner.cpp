// Copyright © 2026 mlx-qsdpa contributors.
//
// Runs quant_sdpa in the CUDA simulator the way quant_sdpa_cuda.cpp runs it
// on a GPU: the Call from the operands' addresses and strides, then
// csrc/backends/cuda/launch_plan.cpp's kernel choice, launch plan and
// parameter block, split-K memory as the host's ring hands it out (zeroed
// counters, unwritten partials), the launch, and a check that the merge left
// its counters zero again (so that the ring can hand them out again).
#include <cstdio>
#include <cstring>
#include <string>

#include "call_runner.h"
#include "qsim/launch.h"

namespace {

namespace cu = mlx_qsdpa::cuda;

// A CUDA block may use up to 227 KB of shared memory (sm_90).
constexpr int64_t kMaxSharedPerBlock = 227 * 1024;

// The operands of the C interface, in order.
enum Operand {
  kQ,
  kKWords,
  kKScales,
  kKBiases,
  kVWords,
  kVScales,
  kVBiases,
  kMask,
  kSinks,
  kOut,
  kLse,
  kNumOperands,
};
constexpr int kNumStrided = kMask + 1; // q .. mask have 4-d strides

// Order of the int32 `dims` array.
// (kBits, kGroupSize: the keys' format; kVBits, kVGroupSize: the values'.)
enum Dim { kB, kHq, kHkv, kLq, kLk, kD, kBits, kGroupSize, kVBits, kVGroupSize, kNumDims };

// Order of the int64 `info` array.
enum Info {
  kInfoMma, // 1: the tensor-core kernel, 0: the generic one
  kInfoRowTiles,
  kInfoRowsPerBlock,
  kInfoSplits,
  kInfoKeysPerSplit,
  kInfoGridX,
  kInfoGridY,
  kInfoGridZ,
  kInfoSmem,
  kInfoPartialOBytes,
  kInfoPartialMlBytes,
  kInfoCounters,
  kNumInfo,
};

std::string g_error;

int fail(const std::string& message) {
  g_error = message;
  return 2;
}

void copy4(int64_t (&dst)[4], const int64_t* src) {
  for (int i = 0; i < 4; ++i) {
    dst[i] = src[i];
  }
}

// The operand's address, or nullptr where absent.
const void* address(const int64_t* buffers, const int64_t* offsets, int op) {
  if (buffers[op] < 0) {
    return nullptr;
  }
  return static_cast<const unsigned char*>(qsim_data(buffers[op])) + offsets[op];
}

} // namespace

extern "C" {

const char* qsim_cuda_error() {
  return g_error.c_str();
}

// Plans one call (run = 0) or plans and runs it (run = 1). k_mode, v_mode:
// mode names of the format table (the keys' and the values'); q_type, k_scale_type, v_scale_type: "f32", "f16",
// "bf16" or "u8"; mask: "", "causal", "bool" or "additive"; strides: 4 per
// operand q .. mask; buffers / offsets: the buffer id (qsim_alloc, -1 where
// absent) and byte offset of each operand; device: SM count and blocks per
// SM (the occupancy the host would get); overrides: generic kernel forced
// (0/1), forced split count. info receives the plan (Info above) and
// kernel_name the library kernel run (or to be run). Returns 0, 1 (the
// launch failed: qsim_last_error) or 2 (qsim_cuda_error).
int qsim_cuda_quant_sdpa(
    const char* k_mode,
    const char* v_mode,
    const char* q_type,
    const char* k_scale_type,
    const char* v_scale_type,
    const char* mask,
    const int32_t* dims,
    float scale,
    const int64_t* strides,
    int64_t sink_stride,
    const int64_t* buffers,
    const int64_t* offsets,
    const int32_t* device,
    const int32_t* overrides,
    int run,
    int64_t* info,
    char* kernel_name,
    int name_len) {
  mlx_qsdpa::Call c{};
  c.B = dims[kB];
  c.Hq = dims[kHq];
  c.Hkv = dims[kHkv];
  c.Lq = dims[kLq];
  c.Lk = dims[kLk];
  c.D = dims[kD];
  c.G = c.Hq / c.Hkv;
  const struct {
    mlx_qsdpa::QuantTensor* t;
    const char* mode;
    int bits, group_size;
  } formats[] = {{&c.k, k_mode, dims[kBits], dims[kGroupSize]}, {&c.v, v_mode, dims[kVBits], dims[kVGroupSize]}};
  for (const auto& f : formats) {
    f.t->mode = qsim_cuda::mode_named(f.mode);
    f.t->bits = f.bits;
    f.t->group_size = f.group_size;
    if (!qsdpa::format_supported(f.t->mode, f.bits, f.group_size)) {
      return fail(std::string("no format ") + f.mode + " bits " + std::to_string(f.bits) + " group size " +
                  std::to_string(f.group_size));
    }
  }
  c.scale = scale;
  c.scale_log2 = scale * qsdpa::log2e();
  c.q = address(buffers, offsets, kQ);
  copy4(c.qs, strides + 4 * kQ);
  c.q_type = qsim_cuda::elem_named(q_type);
  c.out_type = c.q_type;
  const struct {
    mlx_qsdpa::QuantTensor* t;
    int words, scales, biases;
    const char* scale_type;
  } tensors[] = {{&c.k, kKWords, kKScales, kKBiases, k_scale_type}, {&c.v, kVWords, kVScales, kVBiases, v_scale_type}};
  for (const auto& x : tensors) {
    x.t->w = static_cast<const uint32_t*>(address(buffers, offsets, x.words));
    copy4(x.t->ws, strides + 4 * x.words);
    x.t->scales = address(buffers, offsets, x.scales);
    copy4(x.t->ss, strides + 4 * x.scales);
    x.t->biases = address(buffers, offsets, x.biases);
    copy4(x.t->bs, strides + 4 * x.biases);
    x.t->scale_type = qsim_cuda::elem_named(x.scale_type);
  }
  c.mask = qsim_cuda::same(mask, "causal") ? qsdpa::kMaskCausal
      : qsim_cuda::same(mask, "bool")      ? qsdpa::kMaskBool
      : qsim_cuda::same(mask, "additive")  ? qsdpa::kMaskAdditive
                                           : qsdpa::kMaskNone;
  c.mask_ptr = address(buffers, offsets, kMask);
  copy4(c.ms, strides + 4 * (kNumStrided - 1));
  c.sinks = static_cast<const float*>(address(buffers, offsets, kSinks));
  c.sink_stride = sink_stride;
  c.out = const_cast<void*>(address(buffers, offsets, kOut));
  c.lse = static_cast<float*>(const_cast<void*>(address(buffers, offsets, kLse)));

  if (!cu::kernels_cover(c.B, c.Hq, c.Hkv, c.Lq, c.D)) {
    return fail("the CUDA kernels do not cover this call (the host takes the dequantize fallback)");
  }
  cu::TestOverrides o;
  o.force_simt = overrides[0] != 0;
  o.splits = overrides[1];
  const cu::KernelChoice choice = cu::choose_kernel(c, o);
  const qsim_cuda::LibraryKernel kernel = qsim_cuda::kernel_for(c, choice);
  const cu::LaunchPlan plan = cu::plan_launch(c, choice, cu::KernelFacts{kernel.smem_bytes, device[1]}, device[0], o);
  const int64_t values[kNumInfo] = {
      choice.kind == cu::KernelKind::Mma, choice.row_tiles, choice.rows_per_block, plan.n_splits, plan.keys_per_split,
      plan.grid[0], plan.grid[1], plan.grid[2], plan.smem_bytes, plan.partial_o_bytes, plan.partial_ml_bytes,
      plan.counters};
  std::memcpy(info, values, sizeof(values));
  std::snprintf(kernel_name, size_t(name_len), "%s", kernel.name ? kernel.name : "");
  if (!run) {
    return 0;
  }
  if (!kernel.name) {
    return fail("the library does not hold the kernel the plan chose");
  }

  cu::Params p = cu::make_params(c, plan);
  int64_t counters = -1;
  if (plan.n_splits > 1) {
    // As the host's ring hands them out: partials never written before,
    // counters zero.
    const int64_t o_id = qsim_alloc(plan.partial_o_bytes, 0, "part_o");
    const int64_t ml_id = qsim_alloc(plan.partial_ml_bytes, 0, "part_ml");
    counters = qsim_alloc(plan.counters * int64_t(sizeof(unsigned int)), 1, "counters");
    std::memset(qsim_data(counters), 0, size_t(plan.counters) * sizeof(unsigned int));
    p.part_o = static_cast<float*>(qsim_data(o_id));
    p.part_ml = static_cast<float*>(qsim_data(ml_id));
    p.counters = static_cast<unsigned int*>(qsim_data(counters));
  }
  // __grid_constant__: every thread reads the same parameter block.
  const int64_t params = qsim_alloc(sizeof(p), 1, "params");
  std::memcpy(qsim_data(params), &p, sizeof(p));
  qsim_set_threadgroup_limit(kMaxSharedPerBlock);
  const int binding_index[] = {0};
  const int64_t binding_buffer[] = {params};
  const int64_t binding_offset[] = {0};
  const uint32_t threads[] = {plan.block, 1, 1};
  const int status = qsim_launch(
      kernel.name, 0, nullptr, nullptr, 1, binding_index, binding_buffer, binding_offset, plan.grid, threads,
      (plan.smem_bytes + 15) / 16 * 16);
  if (status != 0) {
    return 1;
  }
  if (counters >= 0) {
    const unsigned int* left = static_cast<const unsigned int*>(qsim_data(counters));
    std::string nonzero;
    for (int64_t i = 0; i < plan.counters; ++i) {
      if (left[i] != 0) {
        nonzero += " [" + std::to_string(i) + "]=" + std::to_string(left[i]);
      }
    }
    if (!nonzero.empty()) {
      return fail("merge counters not reset after the call:" + nonzero);
    }
  }
  return 0;
}

} // extern "C"
