"""The detectors on the real decode kernel: a copy of metal/ with six
realistic bugs, each switched on by itself at run time, is run through
the dispatch plan; the simulator reports each bug with the detector it
belongs to, and with every bug off the copy matches the oracle under each
schedule.

test_metal_sim_detectors.py proves each detector on small purpose-written
kernels; this shows that they also fire inside quant_sdpa_decode, where
a bug hides among 256 threads, 8 simdgroups and nested loops. The copy
instantiates one decode kernel (affine 4-bit, D = 64) and the merge kernel,
to keep its build short.

Mutants 5 and 6 are the two races that a review's sabotage runs found the
simulator missing while it ran simdgroups and lanes only in ascending
order: each gives the oracle's output under that order. The race detector
reports both under every schedule, naming the two kernel lines; the
descending schedule alone (detector off) catches both as well.
"""

import ctypes
import re

import mlx.core as mx
import pytest

import oracle
from metal_qsdpa_sim import QuantSDPASim
from metal_simulator import BUILD, ROOT, Library, SimulatorError, build_library
from test_metal_sim_kernels import Case, run_case

BARRIER = "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);"

RACE = r"data race on threadgroup memory of threadgroup \(\d+,0,0\) at byte offset \d+: "

# mutant id: (anchor in quant_sdpa_decode.h, replacement, expected report)
MUTANTS = {
    # The barrier between decoding a tile and reading it, left out.
    1: (
        f"    {BARRIER}\n\n    for (int j = split; j < nk; j += n_splits) {{",
        f"    if (qsim_mutant != 1) {{\n      {BARRIER}\n    }}\n\n    for (int j = split; j < nk; j += n_splits) {{",
        r"read of threadgroup memory never written: 4 bytes at byte offset \d+ .*quant_sdpa_decode\.h",
    ),
    # The barrier after the handover of the key splits, reached only by
    # the splits that take part in this round.
    2: (
        f"    {BARRIER}\n    if (split < half_n) {{",
        f"    if (qsim_mutant != 2 || split < 2 * half_n) {{\n      {BARRIER}\n    }}\n    if (split < half_n) {{",
        r"deadlock: threads of threadgroup \(0,0,0\) wait at different barriers",
    ),
    # A lane-dependent causal limit: some lanes skip the score's simd_sum.
    3: (
        "        if (key >= limit[rr]) {",
        "        if (key >= limit[rr] - (qsim_mutant == 3 ? int(lane & 1) : 0)) {",
        r"SIMD-group function simd_sum at quant_sdpa_decode\.h:\d+ called by only some lanes",
    ),
    # One key past the end of the range.
    4: (
        "  for (int t0 = k_begin; t0 < k_end; t0 += BK) {",
        "  if (qsim_mutant == 4) {\n    k_end += 1;\n  }\n  for (int t0 = k_begin; t0 < k_end; t0 += BK) {",
        r"out-of-bounds read of \d+ bytes at byte offset \d+ of buffer 'keys'",
    ),
    # The barrier at the end of a merge round of the key splits, left out
    # (write-after-read): the next round's handover overwrites slots that
    # this round's receivers have not read yet, unless they ran first.
    5: (
        f"    {BARRIER}\n  }}\n  if (split != 0) {{",
        f"    if (qsim_mutant != 5) {{\n      {BARRIER}\n    }}\n  }}\n  if (split != 0) {{",
        RACE,
    ),
    # Simdgroup 0 hands its key range to the other simdgroups through
    # threadgroup memory (the last float of the tiles, which the tile decode
    # overwrites after every simdgroup has read it), with no barrier
    # (read-after-write): right only if simdgroup 0 runs first.
    6: (
        "  threadgroup float* k_tile = smem;\n",
        "  if (qsim_mutant == 6) {\n"
        "    if (sgid == 0 && lane == 0) {\n"
        "      smem[2 * BK * D - 1] = float(k_end); // qsim: mutant 6 write\n"
        "    }\n"
        "    if (sgid != 0) {\n"
        "      k_end = int(smem[2 * BK * D - 1]); // qsim: mutant 6 read\n"
        "    }\n"
        "  }\n"
        "  threadgroup float* k_tile = smem;\n",
        rf"{RACE}|read of threadgroup memory never written",
    ),
}

# The kernel lines between which the race detector reports each race
# mutant: the two accesses, each a line of quant_sdpa_decode.h (of the
# copy) holding one of these texts.
RACE_LINES = {
    # The handover's writes and the merge's reads of the slots.
    5: (("x_out[slot * D + d] = o[rr][t];", "x_stats[slot * 2] = m[rr];", "x_stats[slot * 2 + 1] = l[rr];"),
        ("const RowStats theirs = {x_stats[slot * 2], x_stats[slot * 2 + 1]};", "(d < D ? x_out[slot * D + d] : 0.0f)")),
    6: (("// qsim: mutant 6 write",), ("// qsim: mutant 6 read",)),
}  # fmt: skip
SCHEDULES = ("ascending", "descending", "random:1")

CASE = Case(Hq=4, Hkv=2, Lq=2, Lk=64, D=64, mode="affine", bits=4, gs=64, mask="causal")


def _write_mutant_sources():
    """build/metal-sim/mutants/: csrc/backends/metal/*.h with the mutations, and a
    .metal with the two kernels CASE needs. Returns the .metal path."""
    out = BUILD / "mutants"
    out.mkdir(parents=True, exist_ok=True)
    for h in (ROOT / "csrc" / "backends" / "metal").glob("*.h"):
        text = h.read_text()
        if h.name == "quant_sdpa_decode.h":
            for mid, (anchor, replacement, _) in MUTANTS.items():
                assert text.count(anchor) == 1, f"mutant {mid}: its anchor is not (once) in quant_sdpa_decode.h; update MUTANTS"
                text = text.replace(anchor, replacement)
            text = text.replace("#pragma once\n", '#pragma once\n\nextern "C" int qsim_mutant; // which bug is on (0: none)\n', 1)
        if not (out / h.name).exists() or (out / h.name).read_text() != text:
            (out / h.name).write_text(text)
    metal = (ROOT / "csrc" / "backends" / "metal" / "quant_sdpa.metal").read_text()
    metal, n = re.subn(r"^(QSDPA_DECODE_KERNELS?|QSDPA_FORMATS)\(.*\)\n", "", metal, flags=re.M)
    assert n >= 1, "quant_sdpa.metal has no QSDPA_DECODE_KERNELS lines; update the mutant builder"
    metal += '\nextern "C" int qsim_mutant = 0;\nQSDPA_DECODE_KERNEL(qsdpa_decode_affine4_d64, qsdpa::kAffine, 4, 64)\n'
    path = out / "quant_sdpa_mutants.metal"
    if not path.exists() or path.read_text() != metal:
        path.write_text(metal)
    return path


@pytest.fixture(scope="module")
def mutant(qsdpa_sim):  # qsdpa_sim: the prerequisites (clang, Linux)
    lib = Library(build_library(_write_mutant_sources(), plan_runner=True))
    switch = ctypes.c_int.in_dll(lib.lib, "qsim_mutant")
    yield QuantSDPASim(lib), switch
    switch.value = 0


def _race_lines(mid: int) -> tuple[set[int], set[int]]:
    """The line numbers, in the mutated quant_sdpa_decode.h, of RACE_LINES[mid]."""
    lines = (BUILD / "mutants" / "quant_sdpa_decode.h").read_text().splitlines()
    return tuple({i + 1 for i, line in enumerate(lines) if any(t in line for t in texts)} for texts in RACE_LINES[mid])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_unmutated_copy_matches_the_oracle(mutant, schedule):
    sim, switch = mutant
    switch.value = 0
    with sim.lib.schedule(schedule):
        out, lse, _, ref, ref_lse = run_case(sim, CASE)
    oracle.assert_close(mx.array(out), ref, CASE.dtype)
    oracle.assert_lse_close(lse, ref_lse, dtype=CASE.dtype)


@pytest.mark.parametrize("mid", [1, 2, 3, 4], ids=["missing_barrier", "divergent_barrier", "divergent_simd_sum", "key_past_end"])
def test_bug_in_the_decode_kernel_is_reported(mutant, mid):
    sim, switch = mutant
    switch.value = mid
    try:
        with pytest.raises(SimulatorError, match=MUTANTS[mid][2]):
            run_case(sim, CASE)
    finally:
        switch.value = 0
    # The library is usable again afterwards.
    out, _, _, ref, _ = run_case(sim, CASE)
    oracle.assert_close(mx.array(out), ref, CASE.dtype)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mid", [5, 6], ids=["merge_round_write_after_read", "simdgroup0_read_after_write"])
def test_race_is_reported_with_both_kernel_lines(mutant, mid, schedule):
    """Under every schedule (ascending included, which runs both mutants
    to the oracle's output) the race detector reports the race and names
    the line of each access; under an order in which mutant 6's readers run
    before simdgroup 0, the read of the unwritten byte is reported first."""
    sim, switch = mutant
    switch.value = mid
    try:
        with sim.lib.schedule(schedule), pytest.raises(SimulatorError, match=MUTANTS[mid][2]) as report:
            run_case(sim, CASE)
    finally:
        switch.value = 0
    message = str(report.value)
    if "data race" in message:
        # The two accesses' lines (the barrier that began the interval follows).
        first, second = (int(n) for n in re.findall(r"at quant_sdpa_decode\.h:(\d+)", message)[:2])
        writes, reads = _race_lines(mid)
        assert {first, second} & writes and {first, second} & reads, (message, writes, reads)
    else:
        assert schedule != "ascending", message


@pytest.mark.parametrize("mid", [5, 6], ids=["merge_round_write_after_read", "simdgroup0_read_after_write"])
def test_descending_schedule_alone_catches_the_race(mutant, mid):
    """Without the race detector, running the simdgroups and lanes in
    descending order catches both races: a wrong output (mutant 5) or a read
    of a byte not yet written (mutant 6)."""
    sim, switch = mutant
    sim.lib.set_race_detector(False)
    switch.value = mid
    try:
        with sim.lib.schedule("descending"):
            try:
                out, _, _, ref, _ = run_case(sim, CASE)
            except SimulatorError as e:
                assert "never written" in str(e), e
            else:
                with pytest.raises(AssertionError):
                    oracle.assert_close(mx.array(out), ref, CASE.dtype)
    finally:
        switch.value = 0
        sim.lib.set_race_detector(True)
