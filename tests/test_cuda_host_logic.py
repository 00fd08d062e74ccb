"""Plain C++ parts of the CUDA host code, checked on any machine (no GPU):
- csrc/backends/cuda/launch_plan.cpp and split_plan.h, how a call is
  launched: tests/cuda/launch_plan_check.cpp sweeps ~160K shapes and asserts
  that the row tiles and splits cover every row and key, no split is empty,
  limits hold, the GPU is filled, the merge tree's slots and counters fit
  its workspace; that the kernel choice follows the cache's layout
  (dense, 16-byte aligned rows take the tensor-core kernel, others the
  generic one); and params.h's FastDiv (the kernels' divisions by G and
  Hkv) against `/`;
- csrc/backends/cuda/ring_slots.h, the device-memory slots that calls in flight hold:
  tests/cuda/ring_slots_check.cpp runs random takes and give-backs and
  asserts that no two ranges in flight overlap and that room comes back."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(tmp_path, name: str, *sources: str) -> str:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / name
    subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{ROOT}", f"-I{ROOT / 'csrc'}", str(ROOT / f"tests/cuda/{name}.cpp"),
         *[str(ROOT / s) for s in sources], "-o", str(exe)],
        check=True,
    )  # fmt: skip
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
    return r.stdout


def test_launch_plan_invariants(tmp_path):
    assert "0 failures" in run_check(tmp_path, "launch_plan_check", "csrc/backends/cuda/launch_plan.cpp")


def test_ring_slots_never_overlap(tmp_path):
    out = run_check(tmp_path, "ring_slots_check")
    assert "0 failures" in out
    assert " 0 ranges taken" not in out
