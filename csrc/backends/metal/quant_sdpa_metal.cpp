// Copyright © 2026 mlx-qsdpa contributors.
//
// The Metal implementation of the GPU hooks (backend.h). Everything that
// decides what runs (kernels, function constants, buffers, parameters,
// grids, the 1-pass / 2-pass choice) is in dispatch_plan.cpp, which the
// Linux test suite executes in the Metal simulator; this file only turns
// such a plan into MLX command-encoder calls, with the kernels of
// mlx_qsdpa.metallib (installed next to this library).
#include <dlfcn.h>

#include <atomic>
#include <climits>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"

#include "backend.h"
#include "backends/metal/dispatch_plan.h"
#include "backends/metal/test_hooks.h"
#include "quant_sdpa_params.h"

namespace mlx_qsdpa {

namespace {

namespace plan = metal_plan;

// Key blocks every call is split into (set_metal_test_key_blocks, tests
// only); 0: the plan decides.
std::atomic<int> g_test_key_blocks{0};

// The directory of the binary holding this code: mlx_qsdpa.metallib is
// installed next to it (cmake/metal.cmake).
const std::string& binary_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info) || !info.dli_fname) {
      throw std::runtime_error("[quant_sdpa] cannot locate the mlx_qsdpa library (dladdr failed).");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

// A float32 temporary of n elements, released when the command buffer
// completes.
mx::array temporary(int64_t n, mx::metal::CommandEncoder& enc) {
  if (n > INT_MAX) {
    throw std::runtime_error("[quant_sdpa] the 2-pass partial results exceed 2^31 elements.");
  }
  mx::array a({static_cast<int>(n)}, mx::float32, nullptr, {});
  a.set_data(mx::allocator::malloc(a.nbytes()));
  enc.add_temporary(a);
  return a;
}

} // namespace

void set_metal_test_key_blocks(int blocks) {
  if (blocks < 0) {
    throw std::invalid_argument("[quant_sdpa] the test key block count must be >= 0 (0: the plan decides).");
  }
  g_test_key_blocks.store(blocks, std::memory_order_relaxed);
}

bool gpu_kernel_supports(const QuantSDPAConfig& c, const CallShape& shape) {
  const plan::TensorFormat k = {c.k.mode, c.k.bits, c.k.group_size};
  const plan::TensorFormat v = {c.v.mode, c.v.bits, c.v.group_size};
  return plan::kernels_cover(k, v, shape.D, shape.Lq);
}

void eval_gpu_kernel(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream) {
  InputSlots in(c);
  mx::array& out = outputs[0];
  if (out.size() == 0) {
    return;
  }

  auto& d = mx::metal::device(stream.device);
  plan::DecodeProblem p;
  // Sizes, format, types, mask kind and strides; no addresses: the plan's
  // launches bind the arrays themselves.
  p.call = describe_call(c, inputs, outputs, [](const mx::array&) -> const void* { return nullptr; });
  p.has_sinks = c.has_sinks;
  p.return_lse = c.return_lse;
  p.gpu_cores = plan::gpu_core_estimate(d.get_architecture());
  p.force_blocks = g_test_key_blocks.load(std::memory_order_relaxed);
  const plan::DecodePlan dp = plan::plan_decode(p);

  auto& enc = mx::metal::get_command_encoder(stream);
  std::optional<mx::array> partial_out, partial_stats;
  if (dp.partial_out_elems > 0) {
    partial_out = temporary(dp.partial_out_elems, enc);
    partial_stats = temporary(dp.partial_stats_elems, enc);
  }
  auto operand = [&](plan::Operand o) -> mx::array& {
    switch (o) {
      case plan::Operand::Out:
        return outputs[0];
      case plan::Operand::Lse:
        return outputs[1];
      case plan::Operand::PartialOut:
        return *partial_out;
      case plan::Operand::PartialStats:
        return *partial_stats;
      default:
        break;
    }
    // An input: the plan only binds it with set_input_array (read), the
    // const_cast just lets one lambda serve both kinds of operand.
    const int slot = o == plan::Operand::Queries ? in.q
        : o == plan::Operand::Keys               ? in.k
        : o == plan::Operand::KeyScales          ? in.k_scales
        : o == plan::Operand::KeyBiases          ? in.k_biases
        : o == plan::Operand::Values             ? in.v
        : o == plan::Operand::ValueScales        ? in.v_scales
        : o == plan::Operand::ValueBiases        ? in.v_biases
        : o == plan::Operand::Mask               ? in.mask
                                                 : in.sinks;
    return const_cast<mx::array&>(inputs[slot]);
  };

  auto* lib = d.get_library("mlx_qsdpa", binary_dir());
  for (const auto& l : dp.launches) {
    // The constant values must outlive get_kernel (it reads them there).
    const size_t n = l.constants.size();
    std::unique_ptr<bool[]> bools(new bool[n]);
    std::unique_ptr<int[]> ints(new int[n]);
    mx::metal::MTLFCList constants;
    for (size_t i = 0; i < n; ++i) {
      const auto& fc = l.constants[i];
      if (fc.is_bool) {
        bools[i] = fc.value != 0;
        constants.emplace_back(&bools[i], MTL::DataType::DataTypeBool, fc.index);
      } else {
        ints[i] = fc.value;
        constants.emplace_back(&ints[i], MTL::DataType::DataTypeInt, fc.index);
      }
    }
    auto* kernel = d.get_kernel(l.kernel, lib, l.pipeline_key, constants);
    const size_t threads = size_t(l.threads[0]) * l.threads[1] * l.threads[2];
    if (kernel->maxTotalThreadsPerThreadgroup() < threads) {
      throw std::runtime_error(
          "[quant_sdpa] Metal kernel " + l.kernel + " runs at most " +
          std::to_string(kernel->maxTotalThreadsPerThreadgroup()) +
          " threads per threadgroup on this GPU; it needs " + std::to_string(threads) + ".");
    }
    enc.set_compute_pipeline_state(kernel);
    for (const auto& b : l.buffers) {
      if (b.written) {
        enc.set_output_array(operand(b.operand), b.index);
      } else {
        enc.set_input_array(operand(b.operand), b.index);
      }
    }
    enc.set_bytes(l.params.data(), static_cast<int>(l.params.size()), l.params_index);
    if (l.threadgroup_memory > 0) {
      enc.set_threadgroup_memory_length(l.threadgroup_memory, 0);
    }
    enc.dispatch_threadgroups(
        MTL::Size(l.grid[0], l.grid[1], l.grid[2]),
        MTL::Size(l.threads[0], l.threads[1], l.threads[2]));
  }
}

const char* gpu_backend_name() {
  return "metal";
}

} // namespace mlx_qsdpa
