"""cmake/metal.cmake, configured on Linux with MLX's own mlx_build_metallib
(extension.cmake of the installed MLX package): the Metal host sources join
the library, the metallib is built from csrc/backends/metal/*.metal with our include
dirs and installed next to the library, and the Python bindings (a target
linking the library) see MLX_QSDPA_GPU_METAL, which compiles in the test
entry point _set_metal_test_blocks. (The build itself needs Apple's Metal
compiler: the macOS workflow runs it.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metal_requirements import require
from metal_simulator import ROOT


def mlx_cmake_dir() -> Path:
    out = subprocess.run([sys.executable, "-m", "mlx", "--cmake-dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "share" / "cmake" / "MLX"


def test_metal_cmake_configures(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("on macOS the real build runs cmake/metal.cmake")
    require(shutil.which("cmake") is not None, "cmake not found")
    require(shutil.which("ninja") is not None, "ninja not found")
    extension = mlx_cmake_dir() / "extension.cmake"
    assert extension.exists(), extension
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "stub.cpp").write_text("int stub() { return 0; }\n")
    (tmp_path / "src" / "bindings_stub.cpp").write_text("int bindings_stub() { return 0; }\n")
    (tmp_path / "src" / "CMakeLists.txt").write_text(
        f"""cmake_minimum_required(VERSION 3.27)
project(metal_cmake_check LANGUAGES CXX)
include({extension.as_posix()})
set(MLX_INCLUDE_DIRS /mlx/include)
# Stands for the real library target of the top-level CMakeLists.txt.
add_library(mlx_qsdpa SHARED stub.cpp)
include({(ROOT / 'cmake' / 'metal.cmake').as_posix()})
# Stands for the Python module, which links the library privately.
add_library(bindings_stub MODULE bindings_stub.cpp)
target_link_libraries(bindings_stub PRIVATE mlx_qsdpa)
"""
    )
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", str(tmp_path / "src"), "-B", str(build), "-G", "Ninja"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    ninja = (build / "build.ninja").read_text()
    # The host sources are part of the library.
    for src in ("csrc/backends/metal/dispatch_plan.cpp", "csrc/backends/metal/quant_sdpa_metal.cpp"):
        assert (ROOT / src).as_posix() in ninja
    # The metallib: csrc/backends/metal/quant_sdpa.metal compiled with our include dirs
    # and MLX's, linked into mlx_qsdpa.metallib, a dependency of the library.
    compile_line = next(line for line in ninja.splitlines() if "xcrun -sdk macosx metal" in line and " -c " in line)
    assert (ROOT / "csrc" / "backends" / "metal" / "quant_sdpa.metal").as_posix() in compile_line
    for inc in (ROOT / "csrc", ROOT / "csrc" / "backends" / "metal", Path("/mlx/include")):
        assert f"-I{inc.as_posix()}" in compile_line
    assert "mlx_qsdpa.metallib" in ninja
    # The bindings compile with the Metal test entry point.
    flags = ninja.split("bindings_stub.cpp", 1)[1].split("\nbuild ", 1)[0]
    assert "-DMLX_QSDPA_GPU_METAL" in flags, flags
    r = subprocess.run(["ninja", "-C", str(build), "-t", "query", "mlx_qsdpa_metallib"], capture_output=True, text=True)
    assert "mlx_qsdpa.metallib" in r.stdout
    # Installed into the package directory, next to the library.
    install = (build / "cmake_install.cmake").read_text()
    assert "mlx_qsdpa.metallib" in install
    assert '"${CMAKE_INSTALL_PREFIX}/mlx_qsdpa"' in install
