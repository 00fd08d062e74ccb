"""Each detector of the Metal simulator, fed a deliberately broken kernel
(broken_kernels/broken_kernels.metal), reports that specific defect; the
well-formed control kernel runs clean."""

import numpy as np
import pytest

from metal_simulator import SimulatorError

SOURCE = "broken_kernels/broken_kernels.metal"


@pytest.fixture(scope="module")
def lib(sim_library):
    return sim_library(SOURCE)


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
