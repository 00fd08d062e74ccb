"""Shared test setup.

QSDPA_DEVICE=cpu (default) or gpu selects the device the op runs on, so the
whole oracle suite runs unchanged on a GPU build (Metal or CUDA).
"""

import os
import sys

import mlx.core as mx
import pytest

sys.path.insert(0, os.path.dirname(__file__))

DEVICE = os.environ.get("QSDPA_DEVICE", "cpu").lower()
if DEVICE not in ("cpu", "gpu"):
    raise RuntimeError(f"QSDPA_DEVICE must be 'cpu' or 'gpu', got {DEVICE!r}")


@pytest.fixture(scope="session", autouse=True)
def _default_device():
    mx.set_default_device(mx.gpu if DEVICE == "gpu" else mx.cpu)
    yield


@pytest.fixture
def device():
    return mx.gpu if DEVICE == "gpu" else mx.cpu
