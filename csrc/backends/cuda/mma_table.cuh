// Copyright © 2026 mlx-qsdpa contributors.
//
// The table of the tensor-core decode kernels: for one (query type, head
// dim), the kernel of every format of formats.h's table and every group
// size it allows, wherever mma_kernel_built (params.h) says one is built.
// Each (query type, head dim) is compiled in its own decode_mma_*.cu, so
// that the build runs them in parallel; mma_kernels.cu picks among them.
#pragma once

#include <type_traits>

#include "decode_mma.cuh"

namespace mlx_qsdpa::cuda {

// Calls f(std::integral_constant<int, GS>{}) for the group size GS ==
// group_size if the table allows it for the format (MODE, BITS).
template <int MODE, int BITS, typename F>
void dispatch_group_size(int group_size, F&& f) {
  constexpr int kAllowed = qsdpa::format_group_sizes(MODE, BITS);
  static_assert((kAllowed & ~(16 | 32 | 64 | 128)) == 0, "a group size the table below lacks");
  const auto one = [&](auto gs) {
    if constexpr ((kAllowed & decltype(gs)::value) != 0) {
      if (group_size == decltype(gs)::value) {
        f(gs);
      }
    }
  };
  one(std::integral_constant<int, 16>{});
  one(std::integral_constant<int, 32>{});
  one(std::integral_constant<int, 64>{});
  one(std::integral_constant<int, 128>{});
}

// The kernel of queries T, head dim D and NT row tiles for a format and
// group size; {nullptr, 0} where none is built.
template <typename T, int D, int NT>
KernelRef mma_kernel_for(int mode, int bits, int group_size) {
  constexpr int kQType = std::is_same_v<T, __half> ? qsdpa::kElemFloat16 : qsdpa::kElemBFloat16;
  KernelRef ref{nullptr, 0};
  qsdpa::dispatch_format(mode, bits, [&](auto fmt) {
    constexpr int MODE = decltype(fmt)::mode;
    constexpr int BITS = decltype(fmt)::bits;
    dispatch_group_size<MODE, BITS>(group_size, [&](auto gs) {
      constexpr int GS = decltype(gs)::value;
      if constexpr (mma_kernel_built(kQType, MODE, BITS, GS, D)) {
        ref = mma_kernel_ref<T, MODE, BITS, GS, D, NT>();
      }
    });
  });
  return ref;
}

template <typename T, int D>
KernelRef mma_kernel_for(int mode, int bits, int group_size, int row_tiles) {
  return row_tiles == 1 ? mma_kernel_for<T, D, 1>(mode, bits, group_size)
                        : mma_kernel_for<T, D, 2>(mode, bits, group_size);
}

// Defined by decode_mma_{f16,bf16}_d{64,128,256}.cu.
KernelRef mma_kernel_f16_d64(int mode, int bits, int group_size, int row_tiles);
KernelRef mma_kernel_f16_d128(int mode, int bits, int group_size, int row_tiles);
KernelRef mma_kernel_f16_d256(int mode, int bits, int group_size, int row_tiles);
KernelRef mma_kernel_bf16_d64(int mode, int bits, int group_size, int row_tiles);
KernelRef mma_kernel_bf16_d128(int mode, int bits, int group_size, int row_tiles);
KernelRef mma_kernel_bf16_d256(int mode, int bits, int group_size, int row_tiles);

} // namespace mlx_qsdpa::cuda
