// Copyright © 2026 mlx-qsdpa contributors.
//
// QuantSDPA: evaluation hooks, transformations, and the dequantized
// reference path built from MLX ops.
#include <cmath>
#include <limits>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

#include "backend.h"
#include "primitive.h"
#include "quantize.h"

namespace mlx_qsdpa {

namespace {

// Every backend writes row-contiguous outputs: allocate them once here.
void allocate_outputs(std::vector<mx::array>& outputs) {
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
}

} // namespace

void QuantSDPA::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  allocate_outputs(outputs);
  eval_cpu_kernel(config_, inputs, outputs, stream());
}

void QuantSDPA::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  allocate_outputs(outputs);
  eval_gpu_kernel(config_, inputs, outputs, stream());
}

std::vector<mx::Shape> QuantSDPA::output_shapes(
    const std::vector<mx::array>& inputs) {
  const auto& q = inputs[0];
  std::vector<mx::Shape> shapes = {q.shape()};
  if (config_.return_lse) {
    shapes.push_back({q.shape(0), q.shape(1), q.shape(2)});
  }
  return shapes;
}

bool QuantSDPA::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantSDPA&>(other);
  return config_ == o.config_;
}

namespace {

// Only the queries (input 0) have a derivative.
void check_argnums(const std::vector<int>& argnums) {
  for (int a : argnums) {
    if (a != 0) {
      throw std::invalid_argument(
          "[quant_sdpa] not differentiable with respect to the quantized "
          "keys/values, their scales and biases, the mask or the sinks; only "
          "the queries have a gradient.");
    }
  }
}

} // namespace

// The op's fallback as a function of the queries alone, the other inputs
// fixed: the dequantized reference, which vjp and jvp differentiate (the
// way MLX's fast ops differentiate their fallback).
std::function<std::vector<mx::array>(const std::vector<mx::array>&)> QuantSDPA::fallback_of_queries(
    const std::vector<mx::array>& primals) {
  return [config = config_, rest = primals, s = stream()](const std::vector<mx::array>& q) {
    auto ins = rest;
    ins[0] = q[0];
    return dequantized_attention(config, ins, s);
  };
}

std::vector<mx::array> QuantSDPA::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  check_argnums(argnums);
  auto [outs, grads] = mx::vjp(fallback_of_queries(primals), {primals[0]}, cotangents);
  return {grads[0]};
}

std::vector<mx::array> QuantSDPA::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  check_argnums(argnums);
  auto [outs, jvps] = mx::jvp(fallback_of_queries(primals), {primals[0]}, tangents);
  return jvps;
}

std::pair<std::vector<mx::array>, std::vector<int>> QuantSDPA::vmap(
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::invalid_argument(
      "[quant_sdpa] vmap is not supported: the op is already batched over "
      "[B, Hq]; fold the mapped axis into the batch axis instead.");
}

std::vector<mx::array> dequantized_attention(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    mx::StreamOrDevice s) {
  using namespace mlx::core;
  InputSlots in(c);
  const auto& q = inputs[in.q];
  int B = q.shape(0), Hq = q.shape(1), Lq = q.shape(2), D = q.shape(3);
  int Hkv = inputs[in.k].shape(1), Lk = inputs[in.k].shape(2);
  int G = Hq / Hkv;
  auto deq = [&](const QuantFormat& f, int w, int sc, int bi) {
    std::optional<array> biases;
    if (bi >= 0) {
      biases = inputs[bi];
    }
    return dequantize_tensor(inputs[w], inputs[sc], biases, f, float32, s);
  };
  auto k = deq(c.k, in.k, in.k_scales, in.k_biases); // [B, Hkv, Lk, D]
  auto v = deq(c.v, in.v, in.v_scales, in.v_biases);

  // [B, Hkv, G, Lq, D] @ [B, Hkv, 1, D, Lk] -> [B, Hkv, G, Lq, Lk]
  auto qf = multiply(astype(q, float32, s), array(c.scale, float32), s);
  qf = reshape(qf, {B, Hkv, G, Lq, D}, s);
  auto scores = matmul(qf, expand_dims(swapaxes(k, -1, -2, s), 2, s), s);

  float ninf = -std::numeric_limits<float>::infinity();
  if (c.mask == qsdpa::kMaskCausal) {
    auto qi = reshape(arange(Lk - Lq, Lk, int32, s), {Lq, 1}, s);
    auto kj = reshape(arange(0, Lk, int32, s), {1, Lk}, s);
    scores = where(greater_equal(qi, kj, s), scores, array(ninf), s);
  } else if (c.mask == qsdpa::kMaskBool) {
    auto m = reshape(inputs[in.mask], {B, Hkv, G, Lq, Lk}, s);
    scores = where(m, scores, array(ninf), s);
  } else if (c.mask == qsdpa::kMaskAdditive) {
    auto m = reshape(inputs[in.mask], {B, Hkv, G, Lq, Lk}, s);
    scores = add(scores, m, s);
  }

  // The non-finite semantics of MLX's own SDPA (and of the kernels): a row
  // with a NaN or +inf score (the sink counts as one) is NaN throughout,
  // lse included, whatever max() does with a NaN on the device. -inf
  // scores weigh nothing; a row that sees no key (l = 0) gives zeros and
  // lse = -inf, even where a masked key's value is NaN (p @ v there is
  // 0 * NaN).
  auto poisoned = [&](const array& x) { return logical_or(isnan(x, s), isposinf(x, s), s); };
  auto bad = any(poisoned(scores), -1, true, s);
  std::optional<array> sink;
  if (c.has_sinks) {
    sink = reshape(inputs[in.sinks], {1, Hkv, G, 1, 1}, s);
    bad = logical_or(bad, poisoned(*sink), s);
  }
  // Row max over the keys and the sink; rows that see nothing (max -inf)
  // and poisoned rows use 0, so that exp() stays finite where it matters.
  auto mx_ = max(scores, -1, true, s);
  if (sink) {
    mx_ = maximum(mx_, *sink, s);
  }
  auto safe_max = where(logical_or(isneginf(mx_, s), bad, s), zeros_like(mx_, s), mx_, s);
  auto p = exp(subtract(scores, safe_max, s), s);
  auto l = sum(p, -1, true, s);
  if (sink) {
    l = add(l, exp(subtract(*sink, safe_max, s), s), s);
  }
  auto o = matmul(p, expand_dims(v, 2, s), s); // [B, Hkv, G, Lq, D]
  auto empty = equal(l, array(0.0f), s);
  auto safe_l = where(empty, ones_like(l, s), l, s);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  o = where(empty, zeros_like(o, s), divide(o, safe_l, s), s);
  o = where(bad, array(nan), o, s);
  o = astype(reshape(o, {B, Hq, Lq, D}, s), q.dtype(), s);
  std::vector<array> outs = {o};
  if (c.return_lse) {
    // -inf for empty rows, without log(0) (whose gradient is NaN).
    auto lse = where(
        empty,
        array(-std::numeric_limits<float>::infinity()),
        add(log(safe_l, s), safe_max, s),
        s);
    lse = where(bad, array(nan), lse, s);
    outs.push_back(reshape(lse, {B, Hq, Lq}, s));
  }
  return outs;
}

} // namespace mlx_qsdpa
