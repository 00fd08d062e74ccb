"""Compile check of the Metal host code on Linux.

csrc/backends/metal/*.cpp is compiled with clang++ -fsyntax-only against the real
headers of the macOS wheel mlx-metal (the MLX version we build against:
mlx/backend/metal/*.h and metal-cpp), plus the stand-ins of
tests/metal/apple_stubs for the Apple SDK headers they include. An API
misuse in the dispatch code (a wrong CommandEncoder or Device call, a
wrong MTL type) fails here instead of on a user's Mac.

Setup: `bash tools/fetch_metal_headers.sh` (downloads the wheel into
build/mlx-metal-<version>/) and clang++. On CI (CI=true) a missing
prerequisite fails the test; elsewhere it skips.
"""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from metal_requirements import require
from metal_simulator import ROOT, find_clang

# clang++ over the Metal host code: left out of `python -m pytest tests`, run
# by .ci/run's `python -m pytest tests -m slow` step.
pytestmark = pytest.mark.slow

HEADERS = ROOT / "build" / f"mlx-metal-{mx.__version__}" / "mlx" / "include"
SOURCES = sorted((ROOT / "csrc" / "backends" / "metal").glob("*.cpp"))


def compile_check(source: Path) -> subprocess.CompletedProcess:
    clang = find_clang()
    cmd = [
        clang, "-std=c++20", "-fblocks", "-include", "cmath", "-fsyntax-only", "-D_METAL_",
        "-Wall", "-Wextra", "-Werror",
        # The SDK stand-ins and the wheel's headers are not ours: no warnings there.
        "-isystem", str(ROOT / "tests" / "metal" / "apple_stubs"),
        "-isystem", str(HEADERS), "-isystem", str(HEADERS / "metal_cpp"),
        "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "backends" / "metal"),
        "-x", "c++", str(source),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module", autouse=True)
def prerequisites():
    if sys.platform == "darwin":
        pytest.skip("on macOS the real build compiles the Metal host code")
    require(find_clang() is not None, "clang++ not found (apt-get install clang)")
    require(
        (HEADERS / "mlx" / "backend" / "metal" / "device.h").exists() and (HEADERS / "metal_cpp").is_dir(),
        f"the mlx-metal {mx.__version__} headers are missing: run `bash tools/fetch_metal_headers.sh`",
    )


def test_sources_exist():
    names = {p.name for p in SOURCES}
    assert {"quant_sdpa_metal.cpp", "dispatch_plan.cpp"} <= names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_metal_host_code_compiles(source):
    r = compile_check(source)
    assert r.returncode == 0, f"{source.name} does not compile against the mlx-metal headers:\n{r.stderr}"


def test_the_check_catches_api_misuse(tmp_path):
    """The check has teeth: a wrong encoder call and a wrong MTL enum fail."""
    src = (ROOT / "csrc" / "backends" / "metal" / "quant_sdpa_metal.cpp").read_text()
    bad = src.replace(
        "enc.set_threadgroup_memory_length(l.threadgroup_memory, 0);",
        "enc.set_threadgroup_memory_length(l.threadgroup_memory);",
    ).replace("MTL::DataType::DataTypeBool", "MTL::DataType::DataTypeBoolean")
    assert bad != src
    path = tmp_path / "quant_sdpa_metal.cpp"
    path.write_text(bad)
    r = compile_check(path)
    assert r.returncode != 0
    assert "too few arguments to function call" in r.stderr
    assert "no member named 'DataTypeBoolean'" in r.stderr
