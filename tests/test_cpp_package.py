"""The C++ API as a native user gets it: the CMake package installed with
the wheel (``python -m mlx_qsdpa --cmake-dir``), a program built against it
with find_package, run, and its result checked.

The program (tests/cpp/consumer.cpp) runs the op on the suite's device
(QSDPA_DEVICE, passed on) and computes its inputs and reference on the CPU;
it prints one line per check and names the ones that failed."""

import os
import shutil
import subprocess
import sys

import pytest

import mlx_qsdpa

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("QSDPA_DEVICE", "cpu").lower()  # the suite's device (conftest.py)


def test_cmake_dir_cli_matches_package():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_qsdpa", "--cmake-dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == mlx_qsdpa.cmake_dir()
    assert os.path.isfile(os.path.join(out, "mlx_qsdpaConfig.cmake"))
    assert os.path.isfile(os.path.join(mlx_qsdpa.include_dir(), "mlx_qsdpa", "quant_sdpa.h"))


# A CMake build of the consumer: left out of `python -m pytest tests` (and so
# needs no cmake there), run by .ci/run's `python -m pytest tests -m slow` step.
@pytest.mark.slow
def test_cpp_consumer_builds_and_runs(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the C++ consumer (pip install cmake)"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    subprocess.run(
        [cmake, "-S", os.path.join(HERE, "cpp"), "-B", str(build), *gen,
         "-DCMAKE_BUILD_TYPE=Release", f"-Dmlx_qsdpa_DIR={mlx_qsdpa.cmake_dir()}"],
        check=True, capture_output=True, text=True,
    )
    r = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = build / "consumer"
    env = dict(os.environ, QSDPA_DEVICE=DEVICE)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"op device: {DEVICE}" in r.stdout
    assert "FAILED" not in r.stdout and r.stdout.rstrip().endswith("OK")
