"""The test run's settings from the environment, importable by test modules
(a `from conftest import ...` can pick up another folder's conftest)."""

import os

# QSDPA_DEVICE=cpu (default) or gpu: the device the op runs on.
DEVICE = os.environ.get("QSDPA_DEVICE", "cpu").lower()
if DEVICE not in ("cpu", "gpu"):
    raise RuntimeError(f"QSDPA_DEVICE must be 'cpu' or 'gpu', got {DEVICE!r}")

# QSDPA_CPU_VARIANT=<name>: the CPU kernel variant the suite runs on (None:
# the automatic choice). conftest.py selects it.
CPU_VARIANT = os.environ.get("QSDPA_CPU_VARIANT") or None

# QSDPA_METAL_BLOCKS=<n>: on a Metal build, every call splits its keys into n
# blocks (the 2-pass kernels on short contexts too); conftest.py sets it
# through the private entry point _ext._set_metal_test_blocks.
METAL_BLOCKS = int(os.environ.get("QSDPA_METAL_BLOCKS") or 0)

# QSDPA_CUDA_KERNEL=simt (the generic kernel wherever the tensor-core one
# would run), QSDPA_CUDA_SPLITS=N (N key splits) and QSDPA_CUDA_WORKSPACE=pool
# (split-K memory from the fallback pool): how the CUDA kernels launch
# (benchmarks/cuda/run_gpu.sh's tests_simt and tests_variants). conftest.py
# applies them through the CUDA build's test entry point.
CUDA_KERNEL = os.environ.get("QSDPA_CUDA_KERNEL") or None
CUDA_SPLITS = int(os.environ.get("QSDPA_CUDA_SPLITS") or 0)
CUDA_WORKSPACE = os.environ.get("QSDPA_CUDA_WORKSPACE") or None
