"""Each detector of the Metal simulator, fed a deliberately broken kernel
(broken_kernels/broken_kernels.metal), reports that specific defect; the
well-formed control kernel runs clean. The race detector reports each race
under every schedule, naming both accesses' lines."""

import re

import numpy as np
import pytest

from metal_simulator import SimulatorError

SOURCE = "broken_kernels/broken_kernels.metal"


@pytest.fixture(scope="module")
def lib(sim_library):
    return sim_library(SOURCE)


SCHEDULES = ("ascending", "descending", "random:3")
HERE = __import__("pathlib").Path(__file__).resolve().parent


def launch(lib, kernel, *, threads=64, grid=1, tg_bytes=0, inputs=(), out_index=None, n_out=64, constants=None, init_out=False):
    """Binds inputs at 0, 1, .. and a float output at out_index (default:
    after the inputs), and launches."""
    buffers = {}
    out_index = len(inputs) if out_index is None else out_index
    for i, a in enumerate(inputs):
        buffers[i + (i >= out_index)] = lib.upload(np.asarray(a), f"in{i}")
    out = lib.alloc(n_out * 4, "out", init_out)
    buffers[out_index] = out
    try:
        lib.launch(
            kernel, constants=constants or {}, buffers=buffers, grid=(grid, 1, 1), threads=(threads, 1, 1),
            threadgroup_memory=tg_bytes,
        )  # fmt: skip
        return lib.download(out, np.float32, n_out)
    finally:
        for b in buffers.values():
            lib.free(b)


def test_well_formed_kernel_runs_clean(lib):
    out = launch(lib, "well_formed", threads=64, tg_bytes=256)
    tid = np.arange(64)
    neighbour = (tid + 1) % 64
    sums = np.array([neighbour[s * 32 : s * 32 + 32].sum() for s in range(2)])
    np.testing.assert_array_equal(out, sums[tid // 32] + tid % 32)


def test_barrier_not_reached_by_every_thread(lib):
    with pytest.raises(SimulatorError, match=r"deadlock: threadgroup_barrier at broken_kernels\.metal:\d+ "
                       r"reached by 48 of the 64 threads .* threads 0\.\.15 returned without reaching it"):  # fmt: skip
        launch(lib, "early_return_before_barrier", tg_bytes=256)


def test_threads_at_different_barriers(lib):
    with pytest.raises(SimulatorError, match=r"deadlock: threads of threadgroup \(0,0,0\) wait at different barriers"):
        launch(lib, "mismatched_barriers")


def test_simd_function_called_by_some_lanes(lib):
    with pytest.raises(SimulatorError, match=r"SIMD-group function simd_sum at broken_kernels\.metal:\d+ called by only some "
                       r"lanes of simdgroup 0 .*: lanes 0\.\.15 of 32; lanes 16\.\.31 had returned"):  # fmt: skip
        launch(lib, "divergent_simd_sum")


def test_out_of_bounds_read(lib):
    with pytest.raises(SimulatorError, match=r"out-of-bounds read of 4 bytes at byte offset 256 of buffer 'in0' \(256 bytes\) "
                       r"by thread \(63,0,0\) .* at broken_kernels\.metal:\d+"):  # fmt: skip
        launch(lib, "read_past_end", inputs=(np.zeros(64, np.float32), np.array([64], np.uint32)), out_index=1)


def test_out_of_bounds_write(lib):
    # Grid of 2 x 64 threads: thread 64 (the first of threadgroup 1) writes out[64].
    with pytest.raises(SimulatorError, match=r"out-of-bounds write of 4 bytes at byte offset 256 of buffer 'out' \(256 bytes\) "
                       r"by thread \(0,0,0\) \[simdgroup 0, lane 0\] of threadgroup \(1,0,0\)"):  # fmt: skip
        launch(lib, "write_past_end", inputs=(np.array([64], np.uint32),), out_index=0, grid=2)


def test_read_of_unwritten_threadgroup_memory(lib):
    with pytest.raises(SimulatorError, match=r"read of threadgroup memory never written: 4 bytes at byte offset 252 .* "
                       r"by thread \(62,0,0\)"):  # fmt: skip
        launch(lib, "read_unwritten_threadgroup", tg_bytes=256)


def test_missing_barrier_reads_unwritten_threadgroup_memory(lib):
    # Simdgroup 0 runs first and reads what simdgroup 1 has not written yet.
    with pytest.raises(SimulatorError, match=r"read of threadgroup memory never written: 4 bytes at byte offset 128 "):
        launch(lib, "missing_barrier", tg_bytes=256)


def test_threadgroup_memory_out_of_bounds(lib):
    with pytest.raises(SimulatorError, match=r"out-of-bounds write of 4 bytes at byte offset 256 of threadgroup memory \(256 bytes"):
        launch(lib, "threadgroup_past_end", tg_bytes=256)


def test_unset_function_constant(lib):
    with pytest.raises(SimulatorError, match=r"function constant 'fc_never_set' \(index 7\) is read by the kernel but the launch did not set it"):
        launch(lib, "reads_unset_constant")
    out = launch(lib, "reads_unset_constant", constants={7: True})
    assert np.all(out == 1.0)


def test_unbound_buffer(lib):
    with pytest.raises(SimulatorError, match=r"kernel 'read_past_end' argument 'n' \[\[buffer\(2\)\]\] is not bound"):
        launch(lib, "read_past_end", inputs=(np.zeros(65, np.float32),), out_index=1)


def test_read_of_unwritten_device_memory(lib):
    with pytest.raises(SimulatorError, match=r"read of device memory never written: 4 bytes at byte offset 0 of buffer 'out'"):
        launch(lib, "accumulates_into_unwritten_output")
    out = launch(lib, "accumulates_into_unwritten_output", init_out=True)
    assert np.all(out == 1.0)


def test_misaligned_vector_store(lib):
    with pytest.raises(SimulatorError, match=r"write of 16 bytes at byte offset 4 of buffer 'out': not 16-byte aligned"):
        launch(lib, "misaligned_float4_store", init_out=True)


def test_misaligned_scalar_store(lib):
    with pytest.raises(SimulatorError, match=r"write of 4 bytes at byte offset 2 of buffer 'out': not 4-byte aligned"):
        launch(lib, "misaligned_float_store", init_out=True)


def _marked_lines(kernel: str) -> dict[str, int]:
    """{"read": line, "write": line} of a kernel's accesses marked `// the
    read` and `// the write` in broken_kernels.metal."""
    lines = (HERE / SOURCE).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f"void {kernel}(" in line)
    marks = {}
    for i in range(start, len(lines)):
        m = re.search(r"// the (read|write)$", lines[i])
        if m:
            marks[m.group(1)] = i + 1
        if lines[i] == "}":
            return marks
    raise AssertionError(f"{kernel}: no end")


def _race(earlier: str, later: str, earlier_line, later_line, *, lanes: bool = False) -> str:
    barrier = "threadgroup barrier or SIMD-group barrier" if lanes else "threadgroup barrier"
    return (
        rf"data race on threadgroup memory of threadgroup \(0,0,0\) at byte offset \d+: {earlier} of 4 bytes by thread "
        rf"\(\d+,0,0\) \[simdgroup \d, lane \d+\] at broken_kernels\.metal:{earlier_line}, then {later} of 4 bytes by "
        rf"thread \(\d+,0,0\) \[simdgroup \d, lane \d+\] at broken_kernels\.metal:{later_line}, with no {barrier} "
        r"ordering threadgroup memory between them"
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_write_after_read_is_a_race(lib, schedule):
    lines = _marked_lines("write_after_read")
    expected = (
        _race("read", "write", lines["read"], lines["write"])
        if schedule == "ascending"  # simdgroup 0 reads first
        else rf"{_race('read', 'write', lines['read'], lines['write'])}|{_race('write', 'read', lines['write'], lines['read'])}"
    )
    with lib.schedule(schedule), pytest.raises(SimulatorError, match=expected):
        launch(lib, "write_after_read", tg_bytes=256)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_read_after_write_is_a_race(lib, schedule):
    """Ascending, simdgroup 0 writes before the others read, so every value
    read is the one meant: only the detector sees the race."""
    lines = _marked_lines("read_after_write")
    either = rf"{_race('write', 'read', lines['write'], lines['read'])}|{_race('read', 'write', lines['read'], lines['write'])}"
    with lib.schedule(schedule), pytest.raises(SimulatorError, match=either):
        launch(lib, "read_after_write", tg_bytes=256)
    lib.set_race_detector(False)
    try:
        out = launch(lib, "read_after_write", tg_bytes=256)
    finally:
        lib.set_race_detector(True)
    np.testing.assert_array_equal(out, np.arange(64) % 32 + 1.0)


def test_write_after_write_is_a_race(lib):
    with pytest.raises(SimulatorError, match=r"data race on threadgroup memory .*: write of 4 bytes by thread \(0,0,0\) .*, then "
                       r"write of 4 bytes by thread \(32,0,0\) \[simdgroup 1, lane 0\]"):  # fmt: skip
        launch(lib, "write_after_write", tg_bytes=256)


def test_barrier_without_mem_threadgroup_orders_no_threadgroup_memory(lib):
    with pytest.raises(SimulatorError, match=r"data race on threadgroup memory .*: write of 4 bytes by thread \(32,0,0\) "
                       r".*, then read of 4 bytes by thread \(0,0,0\)"):  # fmt: skip
        launch(lib, "barrier_without_threadgroup_flag", tg_bytes=256)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lanes_are_ordered_by_simdgroup_barrier_only(lib, schedule):
    """simd_sum exchanges values, simdgroup_barrier(mem_none) synchronises
    execution: neither orders lane 0's write before the other lanes' read.
    simdgroup_barrier(mem_threadgroup) does."""
    lines = _marked_lines("lanes_share_threadgroup_memory")
    race = rf"{_race('write', 'read', lines['write'], lines['read'], lanes=True)}|{_race('read', 'write', lines['read'], lines['write'], lanes=True)}"
    with lib.schedule(schedule):
        for execution_only in (False, True):
            with pytest.raises(SimulatorError, match=race):
                launch(lib, "lanes_share_threadgroup_memory", tg_bytes=256, constants={3: False, 4: execution_only})
        out = launch(lib, "lanes_share_threadgroup_memory", tg_bytes=256, constants={3: True, 4: False})
    np.testing.assert_array_equal(out, np.arange(64) // 32 + 1.0 + 496.0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_well_formed_kernel_is_race_free_under_each_schedule(lib, schedule):
    with lib.schedule(schedule):
        test_well_formed_kernel_runs_clean(lib)
