// Copyright © 2026 mlx-qsdpa contributors.
//
// The op's side of quantize.cpp: the rotation and the dequantization of one
// tensor of any format of the table (the fallback's and the gradient's).
#pragma once

#include <optional>
#include <string>

#include "mlx/array.h"
#include "mlx/utils.h"

#include "mlx_qsdpa/quant_sdpa.h"
#include "primitive.h"

namespace mlx_qsdpa {

// Validation that quant_sdpa and quantize / dequantize share (ops.cpp).
bool is_float_type(mx::Dtype t);

// The format (mode, bits, group_size) the arguments name, or a
// std::invalid_argument prefixed with `tag` that names them (`prefix`: ""
// for the keys or a tensor, "value_" for quant_sdpa's values) and lists the
// table's formats.
QuantFormat parse_format(
    const char* tag, const std::string& prefix, const std::string& mode, int bits, int group_size);

enum class Rotation { kNone, kHadamard };

// The rotation argument (None, "" or "hadamard"); std::invalid_argument
// prefixed with `tag` otherwise.
Rotation parse_rotation(const std::optional<std::string>& rotation, const char* tag);

// x [..., D] times the rotation's transpose (rotates rows), or, inverse,
// times the rotation (undoes it); computed in float32, returned in x's dtype.
mx::array rotate(const mx::array& x, int seed, bool inverse, mx::StreamOrDevice s);

// The values of one quantized tensor [..., D], as `dtype`.
mx::array dequantize_tensor(
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const QuantFormat& f,
    mx::Dtype dtype,
    mx::StreamOrDevice s);

} // namespace mlx_qsdpa
