// Copyright © 2026 mlx-qsdpa contributors.
//
// The Metal backend's test entry point: the private Python function
// _ext._set_metal_test_blocks (python/bindings.cpp) calls it. It exists in
// Metal builds only (cmake/metal.cmake defines MLX_QSDPA_GPU_METAL for the
// bindings); the other builds' binding raises.
#pragma once

namespace mlx_qsdpa {

// Tests only: every later Metal call splits its keys into `blocks` blocks
// as far as Lk allows (the 2-pass kernels from 2 blocks on), so the test
// suite can run the merge kernel on short contexts. 0 restores the plan's
// own choice; a negative count is an error.
void set_metal_test_key_blocks(int blocks);

} // namespace mlx_qsdpa
