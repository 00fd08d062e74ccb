// Copyright © 2026 mlx-qsdpa contributors.
//
// The CPU kernel's instruction-set variants: which are compiled in, which
// one runs (variants.cpp).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "backends/cpu/kernel.h"

namespace mlx_qsdpa::cpu {

// The variant in use: the best this CPU supports, unless select_variant
// chose another. Throws if the CPU supports none.
const Variant& active_variant();

// Every compiled variant, best first, with whether this CPU supports it.
std::vector<std::pair<std::string, bool>> compiled_variants();

// Makes `name` the variant in use ("" restores the automatic choice).
// Throws std::invalid_argument for an unknown name or one this CPU cannot
// run. For tests, which run the oracle suite on each variant.
void select_variant(const std::string& name);

} // namespace mlx_qsdpa::cpu
