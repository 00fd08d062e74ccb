"""The codebook format (turbo) and keys and values of different formats on
the CUDA simulator, against the float64 oracle of tests/oracle.py.

turbo2/turbo4 run on the tensor-core kernel (decode_mma.cuh, MmaFormat's
float path: the codebook level times the group's float scale, no bias),
turbo3 and every call whose keys and values differ in format on the generic
kernel (decode_simt.cu: the keys' format is the instantiation's, the
values' is decoded by its run-time description). Every case splits its
keys, so that the split merge runs too. On CI (CI=true) a missing clang
fails; elsewhere it skips.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import qsdpa_case  # noqa: E402
from qsdpa_case import BF16, F16, Case  # noqa: E402

import cuda_simulator as sim  # noqa: E402
from sim_quant_sdpa import call_of, run_case, variant_of  # noqa: E402

G4 = dict(B=1, Hq=8, Hkv=2)

# (case, forced split count). Lk a multiple of 8 (16-byte aligned scale
# rows, the tensor-core kernel's condition) but not of 64.
TURBO_MMA_CASES = [
    (Case(**G4, Lq=1, Lk=744, D=128, fmt=("turbo", 4, 64), dtype=F16, seed=31), 12),
    (Case(**G4, Lq=4, Lk=696, D=128, fmt=("turbo", 2, 32), dtype=BF16, mask="causal", sinks="f32", seed=32), 3),
    (Case(**G4, Lq=1, Lk=552, D=64, fmt=("turbo", 4, 32), dtype=BF16, mask="bool:HQK", seed=33), 2),
    (Case(B=2, Hq=4, Hkv=2, Lq=2, Lk=264, D=256, fmt=("turbo", 2, 128), dtype=F16, mask="f16:QK", seed=34), 2),
]

# Keys and values of different modes, widths and group sizes (and the
# generic kernel's turbo3); the plan sends them to the generic kernel.
MIXED_CASES = [
    (Case(**G4, Lq=1, Lk=744, D=128, fmt=("affine", 4, 64), vfmt=("affine", 2, 32), dtype=F16, seed=41), 3),
    (Case(**G4, Lq=4, Lk=520, D=128, fmt=("affine", 8, 128), vfmt=("turbo", 3, 64), dtype=BF16, mask="causal",
          seed=42), 2),  # fmt: skip
    (Case(**G4, Lq=2, Lk=1064, D=64, fmt=("mxfp4", 4, 32), vfmt=("nvfp4", 4, 16), dtype=F16, sinks="f32", seed=43), 9),
    (Case(**G4, Lq=1, Lk=391, D=128, fmt=("turbo", 4, 32), vfmt=("affine", 4, 64), dtype=mx.float32, seed=44), 3),
    (Case(B=2, Hq=4, Hkv=2, Lq=3, Lk=300, D=96, fmt=("nvfp4", 4, 16), vfmt=("mxfp8", 8, 32), dtype=BF16,
          mask="bool:BHQK", seed=45), 2),  # fmt: skip
    (Case(B=1, Hq=4, Hkv=1, Lq=2, Lk=264, D=160, fmt=("affine", 3, 32), vfmt=("turbo", 2, 32), dtype=mx.float32,
          mask="f32:HQK", seed=46), 3),  # fmt: skip
    # One mode and width, two group sizes: the instantiation's decoder with
    # the values' own group size.
    (Case(**G4, Lq=1, Lk=456, D=128, fmt=("affine", 4, 64), vfmt=("affine", 4, 32), dtype=F16, seed=47), 2),
    (Case(**G4, Lq=2, Lk=330, D=128, fmt=("turbo", 3, 32), vfmt=("affine", 6, 64), dtype=F16, mask="causal",
          seed=48), 2),  # fmt: skip
]


def _id(entry):
    c, splits = entry
    return f"{c}-splits{splits}"


@pytest.fixture(scope="module")
def lib_formats():
    sim.require_clang()
    variants = [variant_of(c) for c, _ in TURBO_MMA_CASES + MIXED_CASES]
    variants += [variant_of(c, simt=True) for c, _ in TURBO_MMA_CASES[:1]]
    return sim.Library(sim.build_library(variants, tag="formats"))


@pytest.mark.parametrize("entry", TURBO_MMA_CASES, ids=[_id(e) for e in TURBO_MMA_CASES])
def test_turbo_on_the_tensor_core_kernel(lib_formats, entry):
    c, splits = entry
    out, lse, ref, ref_lse, plan = run_case(lib_formats, c, forced_splits=splits)
    assert plan.mma and plan.n_splits == splits, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


def test_turbo_on_the_generic_kernel_forced(lib_formats):
    c, splits = TURBO_MMA_CASES[0]
    out, lse, ref, ref_lse, plan = run_case(lib_formats, c, forced_splits=splits, simt=True)
    assert not plan.mma and plan.n_splits == splits, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("entry", MIXED_CASES, ids=[_id(e) for e in MIXED_CASES])
def test_keys_and_values_of_different_formats(lib_formats, entry):
    c, splits = entry
    out, lse, ref, ref_lse, plan = run_case(lib_formats, c, forced_splits=splits)
    assert not plan.mma and plan.n_splits == splits, plan
    assert plan.kernel == f"simt_{c.fmt[0]}{c.fmt[1]}", plan  # the keys' format's instantiation
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


def test_values_format_reaches_the_kernel(lib_formats):
    """The comparison sees the values' format: the same inputs described
    with the keys' format for the values fail."""
    c, splits = MIXED_CASES[2]
    inputs = qsdpa_case.build(c)
    call = call_of(c, inputs)
    call.vfmt = None  # nvfp4 values read as mxfp4 (e4m3 scales as e8m0, groups of 32)
    out, lse, _ = lib_formats.quant_sdpa(call, splits=splits)
    q, kq, vq, mask, sinks = inputs
    ref, ref_lse = qsdpa_case.reference(c, q, kq, vq, mask, sinks)
    with pytest.raises(AssertionError):
        qsdpa_case.assert_matches(c, mx.array(out).astype(c.dtype), mx.array(lse), ref, ref_lse)
