"""Fixtures of the Metal tests: the simulator libraries, built once per
session (and cached across sessions in build/metal-sim/).

On CI (CI=true) a missing tool fails these tests; elsewhere they skip with
the reason. The simulator runs on Linux; on macOS the real GPU runs the
kernels instead (QSDPA_DEVICE=gpu).
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import metal_simulator as sim  # noqa: E402
from metal_requirements import require  # noqa: E402

HERE = Path(__file__).resolve().parent


def _require_simulator():
    if not sys.platform.startswith("linux"):
        pytest.skip("the Metal simulator runs on Linux (on macOS the GPU itself runs the kernels)")
    require(sim.find_clang() is not None, "clang++ not found: the Metal simulator needs clang (apt-get install clang)")


@pytest.fixture(scope="session")
def qsdpa_sim():
    """csrc/backends/metal/quant_sdpa.metal in the simulator, with the dispatch plan."""
    _require_simulator()
    from metal_qsdpa_sim import QuantSDPASim

    return QuantSDPASim(sim.Library(sim.build_library(sim.ROOT / "csrc" / "backends" / "metal" / "quant_sdpa.metal", plan_runner=True)))


@pytest.fixture(scope="session")
def sim_library():
    """Builds (once) and loads a simulator library of a .metal file under
    tests/metal: sim_library("broken_kernels/barrier_divergence.metal")."""
    _require_simulator()
    cache = {}

    def load(relpath: str) -> sim.Library:
        if relpath not in cache:
            cache[relpath] = sim.Library(sim.build_library(HERE / relpath))
        return cache[relpath]

    return load
