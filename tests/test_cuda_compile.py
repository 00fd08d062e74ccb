"""The CUDA kernels (csrc/backends/cuda/*.cu) compile, on any machine with nvcc (no GPU).

CI has no GPU, so nothing else there would notice a kernel that no longer
compiles (a changed format definition in csrc/mlx_qsdpa/formats.h, a template
instantiation that breaks a static_assert, malformed inline PTX). Each
translation unit is compiled for sm_90 (the GPU the kernels are tested on)
down to machine code, so ptxas checks the inline PTX too; ptxas runs at -O0
to keep this check to about a minute on two cores. The CUDA host code needs
MLX's CUDA headers and is compiled on the GPU machine only."""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def test_timeline_build_compiles(tmp_path):
    """The measurement build of run_gpu.sh's timeline step (the kernels'
    prints, csrc/backends/cuda/debug_timeline.cuh) compiles: one unit with both kernels'
    paths through the split merge."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not found")
    for src in (ROOT / "csrc" / "backends" / "cuda" / "decode_mma_f16_d128.cu", ROOT / "csrc" / "backends" / "cuda" / "decode_simt.cu"):
        name, rc, log = compile_unit(compiler, src, tmp_path, ("-DQSDPA_DEBUG_TIMELINE=1",))
        assert rc == 0, f"{name}:\n{log}"
