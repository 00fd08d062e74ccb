// Copyright © 2026 mlx-qsdpa contributors.
//
// The seam between the primitive and its backends. The CPU kernel is always
// built; exactly one GPU implementation is linked: Metal (macOS), CUDA
// (MLX's CUDA build) or none (gpu_none.cpp).
#pragma once

#include <stdexcept>
#include <vector>

#include "call.h"
#include "mlx_qsdpa/formats.h"
#include "primitive.h"

namespace mlx_qsdpa {

// The kernels' element type (formats.h's qsdpa::ElemType) of a dtype the op
// accepted: float32/float16/bfloat16 queries, outputs and affine scales,
// uint8 scale codes of the fp modes.
inline qsdpa::ElemType elem_type(mx::Dtype t) {
  if (t == mx::float32) {
    return qsdpa::kElemFloat32;
  } else if (t == mx::float16) {
    return qsdpa::kElemFloat16;
  } else if (t == mx::bfloat16) {
    return qsdpa::kElemBFloat16;
  } else if (t == mx::uint8) {
    return qsdpa::kElemUint8;
  }
  throw std::invalid_argument("[quant_sdpa] no kernel element type for this dtype");
}

// The description of one call (call.h) from the primitive's config, inputs
// and outputs. `address(array)` is the address the backend's kernels read
// the array at: its data on the CPU, its device pointer on CUDA, nullptr
// where the backend binds buffers itself (Metal).
template <typename Address>
Call describe_call(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    const std::vector<mx::array>& outputs,
    Address&& address) {
  const InputSlots in(c);
  const mx::array& q = inputs[in.q];
  const auto strides = [](int64_t (&dst)[4], const mx::array& a) {
    for (int i = 0; i < 4; ++i) {
      dst[i] = a.strides()[i];
    }
  };
  const auto tensor = [&](const QuantFormat& f, int w, int s, int b) {
    QuantTensor t{};
    t.mode = f.mode;
    t.bits = f.bits;
    t.group_size = f.group_size;
    t.w = static_cast<const uint32_t*>(address(inputs[w]));
    strides(t.ws, inputs[w]);
    t.scales = address(inputs[s]);
    strides(t.ss, inputs[s]);
    t.scale_type = elem_type(inputs[s].dtype());
    if (b >= 0) {
      t.biases = address(inputs[b]);
      strides(t.bs, inputs[b]);
    }
    return t;
  };
  Call call{};
  call.B = q.shape(0);
  call.Hq = q.shape(1);
  call.Lq = q.shape(2);
  call.D = q.shape(3);
  call.Hkv = inputs[in.k].shape(1);
  call.Lk = inputs[in.k].shape(2);
  call.G = call.Hq / call.Hkv;
  call.scale = c.scale;
  call.scale_log2 = c.scale * qsdpa::log2e();
  call.q = address(q);
  strides(call.qs, q);
  call.q_type = elem_type(q.dtype());
  call.k = tensor(c.k, in.k, in.k_scales, in.k_biases);
  call.v = tensor(c.v, in.v, in.v_scales, in.v_biases);
  call.mask = c.mask;
  if (in.mask >= 0) {
    call.mask_ptr = address(inputs[in.mask]);
    strides(call.ms, inputs[in.mask]);
  }
  if (in.sinks >= 0) {
    call.sinks = static_cast<const float*>(address(inputs[in.sinks]));
    call.sink_stride = inputs[in.sinks].strides()[0];
  }
  call.out = const_cast<void*>(address(outputs[0]));
  call.out_type = elem_type(outputs[0].dtype());
  if (c.return_lse) {
    call.lse = static_cast<float*>(const_cast<void*>(address(outputs[1])));
  }
  return call;
}

// The sizes of one call (queries [B, Hq, Lq, D], keys [B, Hkv, Lk, ...]).
struct CallShape {
  int B, Hq, Hkv, Lq, Lk, D;
};

// The fused CPU kernel. Fills `outputs` (allocated by the primitive).
void eval_cpu_kernel(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// Whether the GPU kernels cover a call of these sizes (head dim, query
// length, and for CUDA the grid they need).
// The op routes calls they do not cover to dequantized_attention on the GPU.
bool gpu_kernel_supports(const QuantSDPAConfig& config, const CallShape& shape);

// The fused GPU kernels. Fill `outputs` (allocated by the primitive).
void eval_gpu_kernel(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

// The name of the GPU backend compiled in: "metal", "cuda" or "none".
const char* gpu_backend_name();

} // namespace mlx_qsdpa
