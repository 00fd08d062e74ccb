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
