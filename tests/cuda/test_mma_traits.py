"""The tensor-core kernel's decoders (csrc/backends/cuda/mma_decode.cuh,
MmaFormat) against formats.h, for every code of every format of the format
table that the kernel decodes, with fp16 and bf16 operands:
tests/cuda/mma_traits_check.cpp, built with the CUDA simulator's headers (the
kernel's device code compiled as C++, as the simulator compiles it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import cuda_simulator as sim  # noqa: E402

# The formats of formats.h's table whose codes the tensor-core kernel
# decodes (mma_decodes: 2, 4 and 8 bits); the others take the generic kernel.
DECODED = {"affine2", "affine4", "affine8", "mxfp4", "mxfp8", "nvfp4", "turbo2", "turbo4"}


def build_and_run(tmp_path, defines=()) -> subprocess.CompletedProcess:
    clang = sim.find_clang()
    if clang is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("clang++ not found (required on CI)")
        pytest.skip("clang++ not found")
    exe = tmp_path / "mma_traits_check"
    src = sim.SIM.parent / "mma_traits_check.cpp"
    cmd = [clang, *sim.HOST_FLAGS, *[f"-D{d}" for d in defines], *[f"-I{d}" for d in sim.INCLUDES], str(src), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return subprocess.run([str(exe)], capture_output=True, text=True)


def test_decoders_match_formats_h(tmp_path):
    r = build_and_run(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]
    checked = {line.split()[1].rstrip(":") for line in r.stdout.splitlines() if line.endswith(": checked")}
    assert checked == DECODED, r.stdout
    assert " 0 failures" in r.stdout, r.stdout[-4000:]


def test_a_wrong_decoder_is_caught(tmp_path):
    """The check's own mutant: formats.h's e2m1 code 3 believed to be 1.25
    in the reference; code_value, fp4_pair and dequant_pair must disagree."""
    r = build_and_run(tmp_path, ("MMA_TRAITS_CHECK_MUTANT",))
    assert r.returncode == 1, r.stdout[-4000:]
    for what in ("code_value", "fp4_pair", "dequant_pair"):
        assert f"mxfp4 f16 {what}" in r.stdout and f"nvfp4 bf16 {what}" in r.stdout, (what, r.stdout[-4000:])
