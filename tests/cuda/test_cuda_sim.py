"""The CUDA tensor-core decode kernel (csrc/backends/cuda/decode_mma.cuh) on the CPU
simulator, against the float64 oracle of tests/oracle.py.

Each case runs the kernel the host would pick (8- or 16-row blocks) with
the host's Params and split plan (splits forced where the case says so, so
that one- and two-level merge trees run), through every block of the grid;
the runtime checks every load and store against its buffer and reads of
bytes never written (partials of the merge included), and the harness
checks that the merge counters are zero again afterwards. The mutants prove
the comparison fails when the kernel, or the simulator's fragment layout,
is wrong.

On CI (CI=true) a missing clang fails; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import oracle  # noqa: E402
import qsdpa_case  # noqa: E402
from qsdpa_case import BF16, F16, Case  # noqa: E402
from mlx_qsdpa import SUPPORTED_FORMATS, format_table  # noqa: E402

import cuda_simulator as sim  # noqa: E402
from sim_quant_sdpa import call_of, run_case, variant_of  # noqa: E402


# (case, forced split count: 0 = the host's plan for the simulated GPU). Splits
# hold a multiple of 64 keys, so more than 8 need Lk > 512.
# Hq 8 / Hkv 2 (G = 4) but in the last two cases: Lq 1 gives 4 rows (one 8-row tile, half
# empty), Lq 4 gives 16 rows (the 16-row kernel, NT = 2). Lk is never a
# multiple of 64, so every split's last chunk is partial; it is a multiple of
# 8, so that each kv head's scale rows start 16-byte aligned (the host's
# condition for this kernel, as mlx-lm's caches, grown by 256 keys, are).
G4 = dict(B=1, Hq=8, Hkv=2)
CASES = [
    # Two merge levels (12 splits: groups of 8 and 4, then the root).
    (Case(**G4, Lq=1, Lk=744, D=128, fmt=("affine", 4, 64), dtype=F16), 12),
    (Case(**G4, Lq=1, Lk=744, D=128, fmt=("affine", 4, 64), dtype=F16), 1),
    (Case(**G4, Lq=4, Lk=696, D=128, fmt=("affine", 4, 64), dtype=BF16, mask="causal", sinks="f32"), 3),
    (Case(**G4, Lq=4, Lk=552, D=64, fmt=("affine", 4, 32), dtype=F16, mask="f16:QK"), 9),
    (Case(B=2, Hq=8, Hkv=2, Lq=1, Lk=520, D=128, fmt=("affine", 4, 128), dtype=BF16), 0),
    (Case(**G4, Lq=1, Lk=456, D=64, fmt=("affine", 8, 64), dtype=F16, sinks="f32"), 2),
    (Case(**G4, Lq=4, Lk=200, D=128, fmt=("affine", 8, 64), dtype=BF16, mask="causal"), 1),
    # Three merge levels (17 splits: 3 groups, then the root).
    (Case(**G4, Lq=4, Lk=1064, D=64, fmt=("mxfp4", 4, 32), dtype=F16, mask="causal", sinks="f32"), 17),
    (Case(**G4, Lq=1, Lk=248, D=128, fmt=("mxfp4", 4, 32), dtype=BF16, mask="bool:HQK", lse=False), 4),
    # Two 16-key tiles per warp; in the last split (248 keys) warp 3's
    # second tile of the second chunk holds 8 valid keys of 16.
    (Case(**G4, Lq=1, Lk=760, D=128, fmt=("affine", 4, 64), dtype=F16), 3),
    # G = 3: a lane's accumulator rows 2t and 2t + 1 can be two query
    # positions (the masked steps find each row's head and position), 12
    # rows of the 16-row tile.
    (Case(B=1, Hq=6, Hkv=2, Lq=4, Lk=696, D=128, fmt=("affine", 4, 64), dtype=F16, mask="bool:BHQK"), 3),
    (Case(B=1, Hq=6, Hkv=2, Lq=4, Lk=696, D=128, fmt=("affine", 4, 64), dtype=F16, mask="causal"), 3),
]


@pytest.fixture(scope="module")
def lib():
    """Every tensor-core instantiation the cases use, in one library (built once)."""
    sim.require_clang()
    return sim.Library(sim.build_library([variant_of(c) for c, _ in CASES + POISON_CASES]))


def _id(entry):
    c, splits = entry
    return f"{c}-splits{splits or 'plan'}"


@pytest.mark.parametrize("entry", CASES, ids=[_id(e) for e in CASES])
def test_decode_mma_matches_oracle(lib, entry):
    c, splits = entry
    out, lse, ref, ref_lse, plan = run_case(lib, c, forced_splits=splits)
    if splits:
        assert plan.n_splits == splits, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


# Merge trees of two and three levels, the 16-row kernel: also with the
# warps and lanes taking turns in descending and random order (the runtime's
# schedules; the race detector on shared memory is on in every test).
OTHER_SCHEDULES = [CASES[0], CASES[2], CASES[7]]


@pytest.mark.parametrize("schedule", ["descending", "random:5"])
@pytest.mark.parametrize("entry", OTHER_SCHEDULES, ids=[_id(e) for e in OTHER_SCHEDULES])
def test_decode_mma_under_other_schedules(lib, entry, schedule):
    c, splits = entry
    with lib.schedule(schedule):
        out, lse, ref, ref_lse, _ = run_case(lib, c, forced_splits=splits)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("entry", CASES[:3], ids=[_id(e) for e in CASES[:3]])
def test_strided_rows(lib, entry):
    """Packed K/V rows 16 bytes apart (not adjacent, as in a slice of a wider
    buffer): the chunk copies follow the row stride."""
    c, splits = entry
    out, lse, ref, ref_lse, _ = run_case(lib, c, forced_splits=splits, row_pad=4)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("entry", [CASES[0], CASES[2], CASES[3]], ids=[_id(e) for e in (CASES[0], CASES[2], CASES[3])])
def test_query_rows_off_16_bytes(lib, entry):
    """Query rows an odd number of elements apart: the kernel reads the
    queries element by element (16-byte loads need rows at 16-byte
    boundaries, which the other cases have)."""
    c, splits = entry
    out, lse, ref, ref_lse, _ = run_case(lib, c, forced_splits=splits, q_pad=3)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


def test_host_plan_splits_keys(lib):
    """The unforced plan of the B=2 case really splits (the simulated GPU's
    wave over 4 tiles), so its merge runs too."""
    c = CASES[4][0]
    out, lse, ref, ref_lse, plan = run_case(lib, c)
    assert plan.mma and plan.n_splits > 1, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


def test_plan_takes_generic_kernel_for_unaligned_rows():
    """Packed K/V rows 4 bytes apart from 16-byte boundaries: the host's
    plan (launch_plan.cpp's mma_layout_ok) sends the call to the generic
    kernel, which the tensor-core case's library does not hold."""
    sim.require_clang()
    c = CASES[0][0]
    inputs = qsdpa_case.build(c)
    assert sim.kernel_for(call_of(c, inputs)) == variant_of(c)
    assert isinstance(sim.kernel_for(call_of(c, inputs, row_pad=1)), sim.SimtVariant)
    assert isinstance(sim.kernel_for(call_of(c, inputs), kernel="simt"), sim.SimtVariant)


# The online softmax's lazy max (mma_softmax.cuh): keys whose scale and bias
# grow along the sequence, so the rows' max keeps rising, by less than the
# threshold (weights above 1) and by more (the slow path's rescale), over
# several tiles of every split.
RAMP_CASES = [
    Case(**G4, Lq=1, Lk=744, D=128, fmt=("affine", 4, 64), dtype=F16),
    Case(**G4, Lq=4, Lk=696, D=128, fmt=("affine", 4, 64), dtype=BF16, mask="causal", sinks="f32"),
]


def ramp_inputs(c):
    q, (kw, ks, kb), vq, mask, sinks = qsdpa_case.build(c)
    with mx.stream(mx.cpu):
        ramp = (1.0 + mx.arange(c.Lk, dtype=mx.float32) / 16.0).reshape(1, 1, c.Lk, 1)
        ks = (ks.astype(mx.float32) * ramp).astype(ks.dtype)
        kb = (kb.astype(mx.float32) * ramp).astype(kb.dtype)
        mx.eval(ks, kb)
    return q, (kw, ks, kb), vq, mask, sinks


def ramp_rise(c, inputs) -> float:
    """How far the largest log2-score of the last 64 keys is above that of
    the first 64."""
    q, (kw, ks, kb), *_ = inputs
    k = oracle.to_numpy(mx.dequantize(kw, ks, kb, group_size=64, bits=4, stream=mx.cpu), np.float64)
    qn = oracle.to_numpy(q, np.float64)[0].reshape(c.Hkv, -1, c.D)  # [Hkv, G * Lq, D]
    scores = np.einsum("hqd,hkd->hqk", qn, k[0]) * c.D**-0.5 / np.log(2)
    return float(scores[..., -64:].max() - scores[..., :64].max())


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("c", RAMP_CASES, ids=str)
def test_lazy_max_rescales(lib, c, splits):
    inputs = ramp_inputs(c)
    assert ramp_rise(c, inputs) > 32  # the premise: far more than the threshold (8)
    out, lse, ref, ref_lse, _ = run_case(lib, c, forced_splits=splits, inputs=inputs)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


# fp4 codes decode without float where a tile's scales are exact in T, and
# through float elsewhere (mma_decode.cuh, fp4_pair). Scales 2^-13 of the
# usual ones put some groups' e8m0 scales under fp16's normal range, so both
# paths run, K and V (the cases' scales are 2^-2..2^0); the softmax scale
# makes up for the smaller keys.
SHRINK = 13
FP4_CASE = Case(**G4, Lq=4, Lk=1064, D=64, fmt=("mxfp4", 4, 32), dtype=F16, scale=64**-0.5 * 2**SHRINK)


def shrunk_fp4_inputs(c):
    q, (kw, ks, _), (vw, vs, _), mask, sinks = qsdpa_case.build(c)
    with mx.stream(mx.cpu):
        ks = (ks.astype(mx.int32) - SHRINK).astype(mx.uint8)
        vs = (vs.astype(mx.int32) - SHRINK).astype(mx.uint8)
        mx.eval(ks, vs)
    return q, (kw, ks, None), (vw, vs, None), mask, sinks


@pytest.mark.parametrize("splits", [1, 5])
def test_fp4_decode_paths(lib, splits):
    inputs = shrunk_fp4_inputs(FP4_CASE)
    _, (_, ks, _), (_, vs, _), _, _ = inputs
    normal = 127 - 14  # e8m0 of fp16's smallest normal number
    for scales in (ks, vs):
        e = np.array(scales)
        assert (e < normal).any() and (e >= normal).any()  # the premise: both paths
    out, lse, ref, ref_lse, _ = run_case(lib, FP4_CASE, forced_splits=splits, inputs=inputs)
    qsdpa_case.assert_matches(FP4_CASE, out, lse, ref, ref_lse)


# ---------------------------------------------------------------------------
# The generic kernel (decode_simt.cu): float32 queries, the formats and head
# dims without a tensor-core kernel (3-, 5- and 6-bit codes; every multiple
# of 16 up to 256: 16, 80, 96, 160 here, and 256, whose rows fill the
# kernel's registers), and a case the tensor-core kernel would take, forced
# as the test override kernel="simt" does.
# ---------------------------------------------------------------------------

SIMT_CASES = [
    (Case(**G4, Lq=1, Lk=391, D=128, fmt=("affine", 4, 64), dtype=mx.float32), 3),
    (Case(B=1, Hq=6, Hkv=2, Lq=3, Lk=264, D=80, fmt=("nvfp4", 4, 16), dtype=BF16, mask="causal", sinks="f32"), 2),
    (Case(**G4, Lq=2, Lk=560, D=96, fmt=("affine", 3, 32), dtype=F16, mask="f32:HQK"), 9),
    (Case(B=2, Hq=4, Hkv=2, Lq=4, Lk=136, D=64, fmt=("mxfp8", 8, 32), dtype=F16, mask="bool:BHQK", lse=False), 1),
    (Case(B=1, Hq=4, Hkv=2, Lq=2, Lk=130, D=16, fmt=("nvfp4", 4, 16), dtype=F16, mask="causal"), 2),
    (Case(B=1, Hq=4, Hkv=1, Lq=3, Lk=264, D=160, fmt=("affine", 5, 32), dtype=BF16, sinks="bf16"), 3),
    (Case(B=1, Hq=2, Hkv=1, Lq=1, Lk=150, D=256, fmt=("affine", 6, 64), dtype=mx.float32, mask="f32:HQK"), 2),
]


@pytest.fixture(scope="module")
def lib_simt():
    sim.require_clang()
    return sim.Library(sim.build_library([variant_of(c, simt=True) for c, _ in SIMT_CASES + SIMT_POISON_CASES], tag="simt"))


@pytest.mark.parametrize("entry", SIMT_CASES, ids=[_id(e) for e in SIMT_CASES])
def test_decode_simt_matches_oracle(lib_simt, entry):
    c, splits = entry
    out, lse, ref, ref_lse, plan = run_case(lib_simt, c, forced_splits=splits, simt=True)
    assert plan.n_splits == splits, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("schedule", ["descending", "random:5"])
@pytest.mark.parametrize("entry", SIMT_CASES[:2], ids=[_id(e) for e in SIMT_CASES[:2]])
def test_decode_simt_under_other_schedules(lib_simt, entry, schedule):
    c, splits = entry
    with lib_simt.schedule(schedule):
        out, lse, ref, ref_lse, _ = run_case(lib_simt, c, forced_splits=splits, simt=True)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


# formats.h's table walked on the generic kernel, which decodes every row
# (test_mma_traits.py walks it through the tensor-core kernel's decoders):
# each row at each of its group sizes, two key splits.
TABLE_CASES = [
    Case(B=1, Hq=4, Hkv=2, Lq=2, Lk=136, D=128, fmt=(f.mode, f.bits, gs), dtype=F16, mask="causal", seed=f.bits)
    for f in format_table()
    for gs in f.group_sizes
]


@pytest.fixture(scope="module")
def lib_table():
    sim.require_clang()
    return sim.Library(sim.build_library([variant_of(c, simt=True) for c in TABLE_CASES], tag="table"))


@pytest.mark.parametrize("c", TABLE_CASES, ids=lambda c: qsdpa_case.fmt_id(c.fmt))
def test_format_table_on_the_generic_kernel(lib_table, c):
    out, lse, ref, ref_lse, plan = run_case(lib_table, c, forced_splits=2, simt=True)
    assert plan.n_splits == 2, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


# ---------------------------------------------------------------------------
# Non-finite inputs (qsdpa_case.POISONS, the semantics of
# tests/test_nonfinite.py, which runs them on the test device): every poison
# through the tensor-core kernel, single-token decode (8-row tiles, K scale
# after the MMA, a two-level merge) and Lq = 4 (16-row tiles, bf16 8-bit
# codes decoded before the MMA, sinks), and through the generic kernel, with
# the keys split so that the poisoned key lies in a later split than the
# first and its row meets the merge tree.
# ---------------------------------------------------------------------------

POISON_BASES = [
    (Case(**G4, Lq=1, Lk=744, D=128, fmt=("affine", 4, 64), dtype=F16, seed=21), 12, (None, "f32:HQK", "bool:HQK")),
    (Case(**G4, Lq=4, Lk=696, D=64, fmt=("affine", 8, 64), dtype=BF16, sinks="f32", seed=22), 3, ("causal", "f16:QK", "bool:BHQK")),
]
SIMT_POISON_BASE = (Case(B=1, Hq=4, Hkv=2, Lq=2, Lk=300, D=96, fmt=("affine", 4, 32), dtype=mx.float32, seed=23), 2, ("causal", "f32:BHQK", "bool:HQK"))


def _poisoned(base, kind):
    c, splits, (plain, additive, boolean) = base
    mask = additive if kind.startswith("mask") else boolean if kind.startswith("bool") else plain
    return c.replace(poison=kind, mask=mask), splits


# The fp formats' scale codes: mxfp4's e8m0 has no NaN (0xff is +inf, which
# makes the key's scores NaN or infinite), nvfp4's e4m3 0x7f is NaN; their
# scales go through float, not the magic form.
POISON_CASES = [_poisoned(base, kind) for base in POISON_BASES for kind in sorted(qsdpa_case.POISONS)] + [
    (Case(**G4, Lq=1, Lk=248, D=128, fmt=("mxfp4", 4, 32), dtype=BF16, poison="kscale_nan", seed=26), 4),
]
SIMT_POISON_CASES = [_poisoned(SIMT_POISON_BASE, kind) for kind in sorted(qsdpa_case.POISONS)] + [
    (Case(B=1, Hq=6, Hkv=2, Lq=3, Lk=264, D=80, fmt=("nvfp4", 4, 16), dtype=BF16, mask="causal", sinks="f32",
          poison="kscale_nan", seed=27), 2),  # fmt: skip
]


@pytest.mark.parametrize("entry", POISON_CASES, ids=[_id(e) for e in POISON_CASES])
def test_decode_mma_nonfinite(lib, entry):
    c, splits = entry
    out, lse, ref, ref_lse, plan = run_case(lib, c, forced_splits=splits)
    assert plan.n_splits == splits, plan
    qsdpa_case.poison_premise(c, ref, ref_lse)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("entry", SIMT_POISON_CASES, ids=[_id(e) for e in SIMT_POISON_CASES])
def test_decode_simt_nonfinite(lib_simt, entry):
    c, splits = entry
    out, lse, ref, ref_lse, plan = run_case(lib_simt, c, forced_splits=splits, simt=True)
    assert plan.n_splits == splits, plan
    qsdpa_case.poison_premise(c, ref, ref_lse)
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


# A row that sees no key is zero beside rows that see a key whose value is
# NaN (and beside a NaN row): the tensor-core kernel's MMAs, and the generic
# kernel's accumulation, meet that value with the empty row's weight 0.
EMPTY_ROW_CASES = [
    (Case(**G4, Lq=2, Lk=696, D=128, fmt=("affine", 4, 64), dtype=F16, mask="bool:HQK", seed=24), 3, False),
    (Case(B=1, Hq=4, Hkv=2, Lq=2, Lk=300, D=96, fmt=("affine", 4, 32), dtype=mx.float32, mask="bool:HQK", seed=25), 2, True),
]


@pytest.mark.parametrize("poison", ["q_nan", "vscale_nan"])
@pytest.mark.parametrize("entry", EMPTY_ROW_CASES, ids=["mma", "simt"])
def test_empty_row_beside_poisoned_rows(lib, lib_simt, entry, poison):
    base, splits, simt = entry
    c = base.replace(poison=poison)
    h = c.Hq - 1  # the poisoned row's head
    inputs = qsdpa_case.emptied_row(c, qsdpa_case.build(c), h=h, i=0)
    out, lse, ref, ref_lse, _ = run_case(lib_simt if simt else lib, c, forced_splits=splits, inputs=inputs, simt=simt)
    assert (ref[0, h, 0] == 0).all() and np.isneginf(ref_lse[0, h, 0]) and np.isnan(ref[0, h, 1]).any()
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)


# ---------------------------------------------------------------------------
# Mutants: the checks must fail on a wrong kernel or a wrong model
# ---------------------------------------------------------------------------

MUTANT_CASE = Case(**G4, Lq=1, Lk=600, D=64, fmt=("affine", 4, 64), dtype=F16)
MUTANTS = {
    # The fp32 fold uses key g's scale for key g + 8 too.
    "fold_scale": ("mma_tiles.cuh", "s[nt][e4] = fmaf(sc[e4 >> 1], acc[nt][e4],", "s[nt][e4] = fmaf(sc[0], acc[nt][e4],"),
    # The sum of M q takes 2^10 for every element, also for codes masked in
    # place higher up the mantissa (whose magic is smaller).
    "magic_sum": ("mma_query.cuh", "y = fmaf(-F::magic_value(F::magic_pos(sh)), q2, y);", "y = fmaf(-F::magic_value(0), q2, y);"),
    # Every merge group believed full: the last group never completes.
    "merge_members": ("split_merge.cuh", "const int members = min(kMergeRadix, count - first);", "const int members = kMergeRadix;"),
    # The last chunk copies whole rows past the split's end: past the end of
    # the cache for the last kv head (the runtime's bounds check).
    "tail_copy": ("mma_ring.cuh", "const bool ok = row < valid;", "const bool ok = true;"),
    # A warp reads its stage without the warp barrier after its lanes' waits:
    # other lanes' copies have not landed (the cp.async model lands a copy at
    # its issuing lane's wait).
    "warp_barrier": ("decode_mma.cuh", "cp_async_wait<kStages - 2>();\n      __syncwarp();\n", "cp_async_wait<kStages - 2>();\n"),
    # The lazy max lets weights grow to 2^64: fp16 P overflows.
    "lazy_threshold": ("mma_softmax.cuh", "rows.lim[nt][e] = m_new == neg_inf() ? neg_inf() : kLazyMax;", "rows.lim[nt][e] = m_new == neg_inf() ? neg_inf() : 64.0f;"),
    # The slow path forgets to rescale the denominator.
    "lazy_rescale_l": ("mma_softmax.cuh", "rows.l[nt][e] *= corr[e];", ""),
    # The merge reads partial rows as float4 from 8 bytes into the row: the
    # GPU faults on a vector load that is not aligned to its size (as a
    # float4 of shared memory at an 8-byte offset did on a GPU), so the
    # simulator must too.
    "misaligned_float4": (
        "split_merge.cuh",
        "reinterpret_cast<const float4*>(p.part_o) + slot_row * D4",
        "reinterpret_cast<const float4*>(p.part_o + 2) + slot_row * D4",
    ),
}
# What each mutant's report must say (a wrong number is not enough where a
# detector is meant to speak).
MUTANT_REPORT = {
    "fold_scale": "relative error",
    "magic_sum": "relative error",
    "merge_members": "merge counters not reset",
    "tail_copy": "out-of-bounds read",
    "warp_barrier": "never written",
    "lazy_threshold": "non-finite output",
    "lazy_rescale_l": "relative error",
    "misaligned_float4": "not aligned to its size",
}
# The mutants that only a growing max exposes run on a ramp case.
MUTANT_RAMP = {"lazy_threshold", "lazy_rescale_l"}


def _mutant_kernels(name: str) -> Path:
    """A copy of csrc/backends/cuda with the mutant's edit, under
    build/cuda-sim/mutants/<name>/backends/cuda."""
    file, old, new = MUTANTS[name]
    dst = sim.BUILD / "mutants" / name / "backends" / "cuda"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(sim.ROOT / "csrc" / "backends" / "cuda", dst)
    text = (dst / file).read_text()
    assert text.count(old) == 1, f"mutant {name}: the edited line is gone from {file}"
    (dst / file).write_text(text.replace(old, new))
    return dst


def _fails(library, c, splits, inputs=None) -> str:
    try:
        out, lse, ref, ref_lse, _ = run_case(library, c, forced_splits=splits, inputs=inputs)
        qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)
    except (AssertionError, sim.SimulatorError) as e:
        return str(e)
    return ""


def test_unmutated_mutant_case_passes(lib):
    """The mutants' case itself passes on the real kernel (so a failure
    below is the mutant's)."""
    library = sim.Library(sim.build_library([variant_of(MUTANT_CASE)], tag="mutant-base"))
    assert _fails(library, MUTANT_CASE, 10) == ""


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_kernel_mutant_is_caught(lib, name):
    kernels = _mutant_kernels(name)
    c = RAMP_CASES[0] if name in MUTANT_RAMP else MUTANT_CASE
    inputs = ramp_inputs(c) if name in MUTANT_RAMP else None
    library = sim.Library(sim.build_library([variant_of(c)], kernel_dir=kernels, tag=f"mutant-{name}"))
    report = _fails(library, c, 10 if c is MUTANT_CASE else 3, inputs)
    assert report, f"mutant {name} went unnoticed"
    assert MUTANT_REPORT[name] in report, report


def test_fragment_layout_mutant_is_caught(lib):
    """The simulator's own mma model with A's rows g and g + 8 swapped."""
    library = sim.Library(
        sim.build_library([variant_of(MUTANT_CASE)], defines=("QSIM_CUDA_MUTANT_MMA_ROWS",), tag="mutant-mma-rows")
    )
    assert _fails(library, MUTANT_CASE, 1), "a wrong mma fragment layout went unnoticed"


# ---------------------------------------------------------------------------
# Every instantiation the host can pick (opt-in: about 150 kernel units, a
# few minutes to build on two cores): QSDPA_CUDA_SIM_ALL=1.
# ---------------------------------------------------------------------------

# The formats of the table with a tensor-core kernel (codes of 2, 4 or 8
# bits: params.h's mma_decodes).
FORMATS = [f for f in SUPPORTED_FORMATS if f[1] in (2, 4, 8)]
ALL_CASES = [
    # Lk a multiple of 16 (scale rows of any format 16-byte aligned per
    # head), not of 64; 10 splits of 64 keys: a two-level merge.
    Case(**G4, Lq=lq, Lk=592, D=D, fmt=fmt, dtype=dt, mask="causal" if lq > 1 else "f32:HQK", sinks="f32" if lq > 1 else None)
    for dt in (F16, BF16)
    for fmt in FORMATS
    for D in (64, 128, 256)
    for lq in (1, 4)
    if fmt[2] <= D
]


SIM_ALL = os.environ.get("QSDPA_CUDA_SIM_ALL", "") not in ("", "0")


@pytest.fixture(scope="module")
def lib_all():
    sim.require_clang()
    return sim.Library(sim.build_library([variant_of(c) for c in ALL_CASES], tag="all"))


# Collected only when asked for: one skip line instead of 196.
@pytest.mark.skipif(not SIM_ALL, reason="every instantiation: set QSDPA_CUDA_SIM_ALL=1")
@pytest.mark.parametrize("c", ALL_CASES if SIM_ALL else ALL_CASES[:1], ids=str)
def test_every_instantiation(lib_all, c):
    out, lse, ref, ref_lse, plan = run_case(lib_all, c, forced_splits=10)
    assert plan.n_splits == 10, plan
    qsdpa_case.assert_matches(c, out, lse, ref, ref_lse)
