"""Shared test setup.

QSDPA_DEVICE=cpu (default) or gpu selects the device the op runs on, so the
whole oracle suite runs unchanged on a GPU build (Metal or CUDA).
"""

import os
import sys

# Full float32 matmuls on GPUs that would run them in TF32 (MLX's CUDA
# build; MLX_ENABLE_TF32, default 1, read by MLX): the mlx-lm end-to-end
# tests compare float32 models whose projections are MLX matmuls, and TF32
# rounding there (2^-11 per operand) amplifies into token flips that have
# nothing to do with quant_sdpa. Set before mlx is imported; an explicit
# setting in the environment wins.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from qsdpa_env import CPU_VARIANT, CUDA_KERNEL, CUDA_SPLITS, CUDA_WORKSPACE, DEVICE, METAL_BLOCKS  # noqa: E402

# QSDPA_CPU_VARIANT=<name> runs the whole suite on that variant of the CPU
# kernel (mlx_qsdpa._ext.cpu_variants() lists them); a name this CPU cannot
# run fails here rather than silently testing another.
if CPU_VARIANT:
    from mlx_qsdpa import _ext  # noqa: E402

    _ext._set_cpu_variant(CPU_VARIANT)

# QSDPA_METAL_BLOCKS=<n> (Metal builds) forces n key blocks on every call; a
# build without Metal refuses it here rather than silently testing 1-pass.
if METAL_BLOCKS:
    from mlx_qsdpa import _ext  # noqa: E402

    _ext._set_metal_test_blocks(METAL_BLOCKS)

# QSDPA_CUDA_KERNEL / QSDPA_CUDA_SPLITS / QSDPA_CUDA_WORKSPACE (qsdpa_env.py)
# set the CUDA kernels' test overrides for the whole run; without a CUDA
# build they fail here rather than silently test the plan.
if CUDA_KERNEL or CUDA_SPLITS or CUDA_WORKSPACE:
    from mlx_qsdpa import _ext  # noqa: E402

    if not hasattr(_ext, "_set_cuda_test_overrides"):
        raise RuntimeError(f"QSDPA_CUDA_* settings need the CUDA build; this one's GPU backend is {_ext.gpu_backend()!r}")
    _ext._set_cuda_test_overrides(kernel=CUDA_KERNEL, splits=CUDA_SPLITS, workspace=CUDA_WORKSPACE)


@pytest.fixture(scope="session", autouse=True)
def _default_device():
    mx.set_default_device(mx.gpu if DEVICE == "gpu" else mx.cpu)
    yield


@pytest.fixture
def device():
    return mx.gpu if DEVICE == "gpu" else mx.cpu
