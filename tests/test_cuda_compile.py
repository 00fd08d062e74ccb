"""The CUDA backend (csrc/backends/cuda) compiles, on any machine with nvcc (no GPU).

CI has no GPU, so nothing else there would notice a kernel that no longer
compiles (a changed format definition in csrc/mlx_qsdpa/formats.h, a template
instantiation that breaks a static_assert, malformed inline PTX). Each
translation unit is compiled for sm_90 (the GPU the kernels are tested on)
down to machine code, so ptxas checks the inline PTX too; ptxas runs at -O0
to keep this check to about a minute on two cores. The host code
(quant_sdpa_cuda.cpp, launch_plan.cpp) and the bindings of a CUDA build are
checked by the C++ compiler against MLX's CUDA headers and the toolkit's."""

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "backends" / "cuda").glob("*.cu"))

# Minutes of nvcc on two cores: left out of `python -m pytest tests`, run by
# .ci/run's `python -m pytest tests -m slow` step.
pytestmark = pytest.mark.slow


def nvcc():
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    return found


def compile_unit(compiler: str, src: Path, out_dir: Path, defines=()):
    cmd = [
        compiler, "-std=c++20", "-arch=sm_90", "-cubin", "-Xptxas", "-O0", *defines,
        f"-I{ROOT}", f"-I{ROOT / 'csrc'}", str(src), "-o", str(out_dir / (src.stem + ".cubin")),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return src.name, r.returncode, (r.stdout + r.stderr)[-3000:]


def test_every_kernel_unit_compiles(tmp_path):
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not found")
    assert len(SOURCES) >= 8, [s.name for s in SOURCES]
    workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda s: compile_unit(compiler, s, tmp_path), SOURCES))
    failed = [(name, log) for name, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(f"{name}:\n{log}" for name, log in failed)
    for src in SOURCES:
        assert (tmp_path / (src.stem + ".cubin")).stat().st_size > 0


# MLX's CUDA headers include fmt for one message (lru_cache.h's
# fmt::format); where fmt's headers are not installed, this stand-in lets the
# compiler check the host code all the same.
FMT_STAND_IN = """#pragma once
#include <string>
namespace fmt {
template <typename... Args>
std::string format(Args&&...) {
  return {};
}
} // namespace fmt
"""


def fmt_include(tmp_path: Path) -> Path:
    given = os.environ.get("FMT_INCLUDE_DIR")
    if given and (Path(given) / "fmt" / "format.h").exists():
        return Path(given)
    (tmp_path / "fmt").mkdir(exist_ok=True)
    (tmp_path / "fmt" / "format.h").write_text(FMT_STAND_IN)
    return tmp_path


def test_host_code_compiles(tmp_path):
    """quant_sdpa_cuda.cpp and launch_plan.cpp as the CUDA build compiles
    them, and the bindings with the CUDA backend's test entry point."""
    compiler = nvcc()
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None or cxx is None:
        pytest.skip("nvcc or a C++ compiler not found")
    mlx_include = Path(mx.__file__).resolve().parent / "include"
    if not (mlx_include / "mlx" / "backend" / "cuda" / "device.h").exists():
        pytest.skip("MLX's CUDA headers not found")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(compiler).resolve().parent.parent, "/usr/local/cuda"]
    found = [Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_runtime.h").exists()]
    if not found:
        pytest.skip("the CUDA toolkit's headers not found")
    cuda_include = found[0]
    flags = [
        "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", f"-I{ROOT}", f"-I{ROOT / 'csrc'}",
        "-isystem", str(mlx_include), "-isystem", str(cuda_include), "-isystem", str(fmt_include(tmp_path)),
    ]  # fmt: skip
    units = [[str(ROOT / "csrc/backends/cuda" / name)] for name in ("quant_sdpa_cuda.cpp", "launch_plan.cpp")]
    try:
        import nanobind

        units.append([
            "-DMLX_QSDPA_CUDA_BACKEND=1", "-isystem", nanobind.include_dir(),
            "-isystem", sysconfig.get_paths()["include"], str(ROOT / "python" / "bindings.cpp"),
        ])  # fmt: skip
    except ImportError:
        pass
    for unit in units:
        r = subprocess.run([cxx, *flags, *unit], capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr, f"{unit[-1]}:\n{r.stderr[-3000:]}"
