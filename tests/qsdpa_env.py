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
