// Copyright © 2026 mlx-qsdpa contributors.
#pragma once

#include <stdexcept>
#include <string>

namespace mlx_qsdpa {

// An argument of the wrong dtype. It is a std::invalid_argument for C++
// callers; the Python bindings raise it as TypeError (other invalid
// arguments raise ValueError).
class type_error : public std::invalid_argument {
 public:
  explicit type_error(const std::string& msg) : std::invalid_argument(msg) {}
};

} // namespace mlx_qsdpa
