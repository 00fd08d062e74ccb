// Copyright © 2026 mlx-qsdpa contributors.
//
// Public C++ API of mlx-qsdpa: fused scaled-dot-product attention over a
// quantized K/V cache, exactly as `mx::quantize` returns it.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace mlx_qsdpa {

namespace mx = mlx::core;

/**
 * Attention over a quantized K/V cache.
 *
 *   out = softmax(scale * q @ dequantize(k).T + mask) @ dequantize(v)
 *
 * queries:  [B, Hq, Lq, D] float16, bfloat16 or float32.
 * keys, key_scales, key_biases, values, value_scales, value_biases: what
 *   `mx::quantize(x, group_size, bits, mode)` returns for x of shape
 *   [B, Hkv, Lk, D]; biases are std::nullopt for the fp modes. Views (for
 *   example a prefix of a preallocated cache along the sequence axis) are
 *   read in place, never copied.
 * scale:    multiplies q @ k.T (usually 1/sqrt(D)).
 * mask_mode: "" (no mask), "causal" (bottom-right aligned: query i attends
 *   key j iff j <= Lk - Lq + i) or "array" (then mask_arr is required: bool,
 *   True = attend, or additive float, broadcastable to [B, Hq, Lq, Lk]).
 * sinks:    optional [Hq] logits of a virtual key whose value is zero.
 * group_size, bits, mode: the quantization of K and V ("affine" with bits
 *   2, 3, 4, 5, 6, 8 (and 1) and group_size 32, 64, 128; "mxfp4" and "mxfp8"
 *   with group_size 32; "nvfp4" with group_size 16).
 *
 * Returns [B, Hq, Lq, D] in the queries' dtype. A query row that sees no key
 * returns zeros. Invalid arguments throw std::invalid_argument naming the
 * argument and what is allowed.
 */
mx::array quant_sdpa(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const std::string& mask_mode = "",
    const std::optional<mx::array>& mask_arr = std::nullopt,
    const std::optional<mx::array>& sinks = std::nullopt,
    int group_size = 64,
    int bits = 4,
    const std::string& mode = "affine",
    mx::StreamOrDevice s = {});

/**
 * As quant_sdpa, and also returns the log-sum-exp of each query row:
 * lse [B, Hq, Lq] float32 = log(sum_j exp(score_j) + exp(sink)), the natural
 * log of the softmax denominator (-inf for a row that sees no key and has no
 * sink). Outputs of disjoint key ranges merge exactly with it.
 */
std::pair<mx::array, mx::array> quant_sdpa_with_lse(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const std::string& mask_mode = "",
    const std::optional<mx::array>& mask_arr = std::nullopt,
    const std::optional<mx::array>& sinks = std::nullopt,
    int group_size = 64,
    int bits = 4,
    const std::string& mode = "affine",
    mx::StreamOrDevice s = {});

/**
 * Everything of a quant_sdpa call beyond the arrays and the scale. The
 * values' format defaults to the keys'; a rotation (rotation = "hadamard")
 * means K and V were quantized after quantize()'s rotation with this seed:
 * the op rotates the queries and undoes the rotation on the output.
 */
struct QuantSDPAOptions {
  std::string mask_mode; // "", "causal" or "array" (mask_arr)
  std::optional<mx::array> mask_arr;
  std::optional<mx::array> sinks;
  int group_size = 64; // the keys' format
  int bits = 4;
  std::string mode = "affine";
  std::optional<std::string> value_mode; // the values' format (default: the keys')
  std::optional<int> value_bits;
  std::optional<int> value_group_size;
  std::optional<std::string> rotation; // std::nullopt / "" or "hadamard"
  int rotation_seed = 0;
  bool return_lse = false;
};

/**
 * quant_sdpa with every option: returns {out} or, with return_lse, {out, lse}.
 */
std::vector<mx::array> quant_sdpa(
    const mx::array& queries,
    const mx::array& keys,
    const mx::array& key_scales,
    const std::optional<mx::array>& key_biases,
    const mx::array& values,
    const mx::array& value_scales,
    const std::optional<mx::array>& value_biases,
    float scale,
    const QuantSDPAOptions& options,
    mx::StreamOrDevice s = {});

/**
 * Quantizes x [..., D] in any format of the table: what mx::quantize returns
 * ({w, scales, biases} or {w, scales}), for the codebook mode "turbo" too
 * ({w, scales}: codes of the Gaussian Lloyd-Max codebook and one float scale
 * per group, in x's dtype). With rotation = "hadamard", x is first rotated by
 * rotation_matrix(D, rotation_seed) (x R^T).
 */
std::vector<mx::array> quantize(
    const mx::array& x,
    int group_size = 64,
    int bits = 4,
    const std::string& mode = "affine",
    const std::optional<std::string>& rotation = std::nullopt,
    int rotation_seed = 0,
    mx::StreamOrDevice s = {});

/**
 * Inverts quantize(): the values, rotated back when rotation = "hadamard".
 * dtype defaults to the scales' dtype (bfloat16 for the 8-bit-scale modes).
 */
mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    int group_size = 64,
    int bits = 4,
    const std::string& mode = "affine",
    const std::optional<std::string>& rotation = std::nullopt,
    int rotation_seed = 0,
    std::optional<mx::Dtype> dtype = std::nullopt,
    mx::StreamOrDevice s = {});

/**
 * The rotation R [D, D] float32 of rotation = "hadamard": R = H diag(s),
 * orthogonal. s_j = -1 where the top bit of the j-th output of SplitMix64
 * seeded with (uint32) seed is set, else +1; H is block diagonal with
 * normalized Sylvester-Hadamard blocks of the powers of two that sum to D,
 * largest first (D = 128: one block; D = 80: 64 and 16).
 */
mx::array rotation_matrix(int D, int seed = 0);

/** Whether (mode, bits, group_size) is a format quant_sdpa accepts. */
bool is_supported_format(const std::string& mode, int bits, int group_size);

/** The version of mlx-qsdpa, and of MLX it was built against. */
const char* version();
const char* mlx_build_version();

} // namespace mlx_qsdpa
