// Copyright © 2026 mlx-qsdpa contributors.
//
// The QuantSDPA primitive and the description of one call that every
// backend (CPU, Metal, CUDA) receives.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

#include "mlx_qsdpa/attention_math.h"
#include "mlx_qsdpa/formats.h"

namespace mlx_qsdpa {

namespace mx = mlx::core;

// The format of one quantized tensor: a row of formats.h's table and one
// of its group sizes.
struct QuantFormat {
  qsdpa::QuantMode mode;
  int bits;
  int group_size;

  bool has_biases() const {
    return qsdpa::mode_has_bias(mode);
  }

  bool operator==(const QuantFormat& o) const {
    return mode == o.mode && bits == o.bits && group_size == o.group_size;
  }
  bool operator!=(const QuantFormat& o) const {
    return !(*this == o);
  }
};

// Everything about a call that is not an array. Shapes are read from the
// arrays; this holds what the arrays cannot say.
struct QuantSDPAConfig {
  float scale;
  QuantFormat k, v; // the keys' and the values' formats
  qsdpa::MaskKind mask;
  bool has_sinks;
  bool return_lse;

  bool operator==(const QuantSDPAConfig& o) const {
    return scale == o.scale && k == o.k && v == o.v && mask == o.mask &&
        has_sinks == o.has_sinks && return_lse == o.return_lse;
  }
};

// Positions of the primitive's inputs. The order is
//   q, k, k_scales, [k_biases], v, v_scales, [v_biases], [mask], [sinks]
// where the bracketed ones are present per the config. A mask input is
// already broadcast (as a strided view, no copy) to [B, Hq, Lq, Lk]; an
// additive mask is float32; sinks are float32 [Hq].
struct InputSlots {
  int q = 0, k = 1, k_scales = 2, k_biases = -1;
  int v, v_scales, v_biases = -1, mask = -1, sinks = -1;

  explicit InputSlots(const QuantSDPAConfig& c) {
    int i = 3;
    if (c.k.has_biases()) {
      k_biases = i++;
    }
    v = i++;
    v_scales = i++;
    if (c.v.has_biases()) {
      v_biases = i++;
    }
    if (c.mask == qsdpa::kMaskBool || c.mask == qsdpa::kMaskAdditive) {
      mask = i++;
    }
    if (c.has_sinks) {
      sinks = i++;
    }
  }
};

class QuantSDPA : public mx::Primitive {
 public:
  QuantSDPA(mx::Stream stream, QuantSDPAConfig config)
      : mx::Primitive(stream), config_(config) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;

  // Gradients flow to the queries only (K/V are quantized: not differentiable).
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const char* name() const override {
    return "QuantSDPA";
  }

  bool is_equivalent(const mx::Primitive& other) const override;

  const QuantSDPAConfig& config() const {
    return config_;
  }

 private:
  std::function<std::vector<mx::array>(const std::vector<mx::array>&)> fallback_of_queries(
      const std::vector<mx::array>& primals);

  QuantSDPAConfig config_;
};

// Attention over K/V decoded with mx::dequantize, built from MLX ops. Used
// where a GPU kernel does not cover a shape (documented fallback) and for
// the gradient with respect to the queries. Returns {out} or {out, lse}.
std::vector<mx::array> dequantized_attention(
    const QuantSDPAConfig& config,
    const std::vector<mx::array>& inputs,
    mx::StreamOrDevice s);

// Tests only: while on, every quant_sdpa call (its validation and input
// preparation included) is computed by dequantized_attention, on any device
// the CPU too: how the tests hold the GPU backends' fallback to the oracle on
// a machine without a GPU.
void set_dequantized_fallback(bool on);

} // namespace mlx_qsdpa
