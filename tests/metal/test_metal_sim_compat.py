"""The Metal simulator itself, against what Metal specifies: SIMD-group
functions with 32-lane simdgroups (and a partial last simdgroup), built-in
thread positions, function constants, half/bfloat conversions; and the
schedules, which order the threads' turns within what Metal allows
(probe_kernels/probe_kernels.metal)."""

import mlx.core as mx
import numpy as np
import pytest

SOURCE = "probe_kernels/probe_kernels.metal"


@pytest.fixture(scope="module")
def lib(sim_library):
    return sim_library(SOURCE)


def test_simd_functions(lib):
    n = 64
    out = lib.alloc(n * 16 * 4, "out", False)
    lib.launch("simd_functions", constants={0: 3}, buffers={0: out}, grid=(1, 1, 1), threads=(n, 1, 1))
    r = lib.download(out, np.float32, n * 16).reshape(n, 16)
    lib.free(out)
    lane = np.arange(n) % 32
    x = lane + 1.0
    expect = np.stack(
        [
            np.full(n, 528.0),  # sum of 1..32
            np.full(n, 32.0),
            np.full(n, 1.0),
            (lane + 1) * (lane + 2) / 2,  # inclusive prefix sum
            lane * (lane + 1) / 2,
            (lane + 3) % 32 + 1.0,  # shuffle from lane + 3 (mod 32)
            np.where(lane + 4 < 32, x + 4, x),  # shuffle_down keeps the top lanes
            np.where(lane >= 4, x - 4, x),  # shuffle_up keeps the bottom lanes
            (lane ^ 5) + 1.0,
            np.full(n, 8.0),
            np.full(n, 1.0),
            np.full(n, 1.0),  # simd_any(lane == 9)
            np.full(n, 0.0),  # simd_all(lane < 31)
            np.full(n, 496.0),  # int sum of 0..31
            (lane + 1) % 32 + 1.0,  # rotate down by 1
            3.0 * x,  # function constant 0 = 3
        ],
        axis=1,
    )
    np.testing.assert_array_equal(r, expect)


def test_builtins(lib):
    grid, tpg = (2, 3, 2), (4, 4, 4)
    total = np.prod(grid) * np.prod(tpg)
    out = lib.alloc(total * 11 * 4, "out", False)
    lib.launch("builtins", constants={}, buffers={0: out}, grid=grid, threads=tpg)
    r = lib.download(out, np.uint32, total * 11).reshape(grid[2] * 4, grid[1] * 4, grid[0] * 4, 11)
    lib.free(out)
    z, y, x = np.meshgrid(*(np.arange(g * 4) for g in grid[::-1]), indexing="ij")
    lidx = (z % 4) * 16 + (y % 4) * 4 + x % 4
    for i, want in enumerate([x, y, z, x % 4, y % 4, lidx, x // 4, z // 4, lidx // 32, lidx % 32, np.full_like(x, 2)]):
        np.testing.assert_array_equal(r[..., i], want, err_msg=f"built-in {i}")


def test_partial_last_simdgroup(lib):
    n = 80  # simdgroups of 32, 32 and 16 lanes
    data = np.arange(n, dtype=np.float32)
    inp = lib.upload(data, "in")
    out = lib.alloc(4, "out", False)
    lib.launch("partial_simdgroup_sum", constants={}, buffers={0: inp, 1: out}, grid=(1, 1, 1), threads=(n, 1, 1), threadgroup_memory=16)
    assert lib.download(out, np.float32, 1)[0] == data.sum()
    lib.free(inp)
    lib.free(out)


def test_half_and_bfloat_conversions(lib):
    rng = np.random.default_rng(0)
    special = np.array(
        [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, np.inf, -np.inf, 6e-8, 2.9e-8, 3.0e-8, 6.1e-5, 1.0 + 2**-11, 1.0 + 3 * 2**-11],
        np.float32,
    )
    values = np.concatenate([special, rng.standard_normal(4016).astype(np.float32) * 10.0 ** rng.integers(-8, 5, 4016)]).astype(np.float32)
    n = values.size
    inp = lib.upload(values, "in")
    as_half = lib.alloc(n * 2, "as_half", False)
    half_back = lib.alloc(n * 4, "half_back", False)
    bf_back = lib.alloc(n * 4, "bfloat_back", False)
    lib.launch(
        "conversions", constants={}, buffers={0: inp, 1: as_half, 2: half_back, 3: bf_back},
        grid=((n + 63) // 64, 1, 1), threads=(64, 1, 1),
    )  # fmt: skip
    assert n % 64 == 0  # the kernel has no bounds check
    with np.errstate(over="ignore"):  # large values overflow to inf, as on the GPU
        as_f16 = values.astype(np.float16)
    np.testing.assert_array_equal(lib.download(as_half, np.uint16, n), as_f16.view(np.uint16))
    np.testing.assert_array_equal(lib.download(half_back, np.float32, n), as_f16.astype(np.float32))
    bf_expect = np.array(mx.array(values).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(lib.download(bf_back, np.float32, n), bf_expect)
    for b in (inp, as_half, half_back, bf_back):
        lib.free(b)


def _turn_order(lib, schedule: str, threads: int = 64) -> np.ndarray:
    """The thread indices in the order of their two turns (turn_order)."""
    log = lib.upload(np.zeros(1 + 2 * threads, np.uint32), "log")
    with lib.schedule(schedule):
        lib.launch("turn_order", constants={}, buffers={0: log}, grid=(1, 1, 1), threads=(threads, 1, 1))
    r = lib.download(log, np.uint32, 1 + 2 * threads)
    lib.free(log)
    assert r[0] == 2 * threads
    return r[1:]


def test_ascending_and_descending_schedules(lib):
    """Each simdgroup runs as far as it can before the next; lanes in order."""
    up = np.arange(32)
    np.testing.assert_array_equal(_turn_order(lib, "ascending"), np.concatenate([up, up, up + 32, up + 32]))
    down = up[::-1]
    np.testing.assert_array_equal(_turn_order(lib, "descending"), np.concatenate([down + 32, down + 32, down, down]))


def test_random_schedule(lib):
    """Seeded: the same seed gives the same order; lanes take their turns
    in a shuffled order, and simdgroups interleave at SIMD-group functions,
    yet no lane starts its second turn before every lane of its simdgroup
    has finished the first (the simdgroup_barrier between them)."""
    orders = {seed: _turn_order(lib, f"random:{seed}") for seed in range(1, 5)}
    np.testing.assert_array_equal(orders[1], _turn_order(lib, "random:1"))
    interleaved = 0
    for seed, order in orders.items():
        assert sorted(order) == sorted(list(range(64)) * 2), seed
        for sg in (0, 1):
            turns = np.flatnonzero(order // 32 == sg)  # positions of this simdgroup's 64 turns
            first, second = order[turns[:32]], order[turns[32:]]
            assert sorted(first) == sorted(second) == list(range(32 * sg, 32 * sg + 32)), seed
            assert not np.array_equal(first, np.sort(first)) and not np.array_equal(first, np.sort(first)[::-1]), seed
        sg_of_turn = order // 32
        interleaved += np.count_nonzero(np.diff(sg_of_turn)) > 1  # more than one switch of simdgroup
    assert interleaved > 0, orders


def test_unknown_schedule_is_refused(lib):
    for bad in ("sideways", "random", "ascending:3", "random:x"):
        with pytest.raises(ValueError, match="schedule"):
            lib.set_schedule(bad)
