// Copyright © 2026 mlx-qsdpa contributors.
//
// Stand-in for CUDA's <cuda_bf16.h> in the CPU simulator: the kernels include it
// first, so it brings the whole CUDA compatibility layer.
#pragma once

#include "qsim_cuda/cuda_compat.h"
