"""Unit tests of csrc/backends/metal/dispatch_plan.cpp (the host side of the Metal
kernels that needs no Metal), through the simulator library it is linked
into: the 1-pass / 2-pass choice and block count, the kernel coverage, and
the launches (kernels, constants, buffers, grid, threadgroup memory)."""

import mlx.core as mx
import pytest

from metal_qsdpa_sim import FORMATS, HEAD_DIMS, KERNEL_TOKENS, OPERANDS, head_dims

FC = {
    "query_type": 0,
    "key_scale_type": 1,
    "value_scale_type": 2,
    "key_group_size": 3,
    "key_has_biases": 4,
    "causal": 5,
    "bool_mask": 6,
    "float_mask": 7,
    "has_sinks": 8,
    "write_lse": 9,
    "write_final": 10,
    "write_partials": 11,
    "value_mode": 12,
    "value_bits": 13,
    "value_group_size": 14,
    "value_has_biases": 15,
}
TILE = {64: 32, 80: 25, 96: 21, 128: 16, 256: 8}  # keys_per_tile(D) = 2048 / D


# ---------------------------------------------------------------------------
# choose_key_split
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("Lk", [0, 1, 100, 511])
def test_short_contexts_take_one_pass(qsdpa_sim, Lk):
    assert qsdpa_sim.choose_key_split(1, Lk, 128, 16) == (1, Lk)


def test_a_full_gpu_takes_one_pass(qsdpa_sim):
    # 4 threadgroups per core already: splitting the keys gains nothing.
    assert qsdpa_sim.choose_key_split(64, 65536, 128, 16) == (1, 65536)


@pytest.mark.parametrize("threadgroups,Lk,D,cores", [(1, 2048, 64, 16), (2, 4096, 128, 16), (8, 32768, 128, 10), (1, 1 << 20, 256, 64), (3, 5000, 80, 32)])
def test_long_contexts_split_the_keys(qsdpa_sim, threadgroups, Lk, D, cores):
    blocks, kpb = qsdpa_sim.choose_key_split(threadgroups, Lk, D, cores)
    assert blocks > 1
    assert kpb % TILE[D] == 0  # blocks are whole tiles
    assert kpb >= 256  # kMinKeysPerBlock
    assert blocks * kpb >= Lk > (blocks - 1) * kpb  # every key, no empty block
    assert blocks <= 1024
    # Enough threadgroups for the GPU, or as many blocks as the keys allow.
    assert threadgroups * blocks >= 4 * cores or blocks >= Lk // 256 - 1


@pytest.mark.parametrize("D", [512, 1024, 2048, 4096, 8192])
def test_key_split_at_head_dims_without_kernels(qsdpa_sim, D):
    """Head dims the kernels do not take (the fallback's) still plan: past
    2048 a tile holds no whole key (keys_per_tile is 0), which must not
    divide by zero."""
    blocks, kpb = qsdpa_sim.choose_key_split(1, 4096, D, 16)
    assert blocks >= 1 and blocks * kpb >= 4096, (blocks, kpb)


def test_more_cores_more_blocks(qsdpa_sim):
    small = qsdpa_sim.choose_key_split(2, 1 << 16, 128, 10)[0]
    large = qsdpa_sim.choose_key_split(2, 1 << 16, 128, 64)[0]
    assert 1 < small < large


def test_block_count_is_capped(qsdpa_sim):
    assert qsdpa_sim.choose_key_split(1, 1 << 24, 64, 100000)[0] <= 1024


@pytest.mark.parametrize("arch,cores", [("applegpu_g13p", 10), ("applegpu_g14g", 10), ("applegpu_g15s", 16), ("applegpu_g13c", 32), ("applegpu_g13d", 64), ("", 16)])
def test_gpu_core_estimate(qsdpa_sim, arch, cores):
    assert qsdpa_sim.gpu_core_estimate(arch) == cores


# ---------------------------------------------------------------------------
# Coverage and kernel names
# ---------------------------------------------------------------------------


def test_coverage(qsdpa_sim):
    for mode, bits, gs in FORMATS:
        for D in HEAD_DIMS:
            expected = D in head_dims(mode, bits) and D % gs == 0
            assert qsdpa_sim.kernels_cover(mode, bits, gs, D, 1) == expected, (mode, bits, gs, D)
        for D in (16, 32, 72, 160, 192, 320, 512, 576, 1024, 2048, 4096):
            assert not qsdpa_sim.kernels_cover(mode, bits, gs, D, 1)
    for Lq, covered in [(0, False), (1, True), (17, True), (32, True), (33, False), (128, False)]:
        assert qsdpa_sim.kernels_cover("affine", 4, 64, 128, Lq) == covered


def test_coverage_of_mixed_formats(qsdpa_sim):
    """Any values' format of the table pairs with any keys' kernel: the head
    dim must be a multiple of both group sizes."""
    for kfmt in FORMATS:
        for vfmt in FORMATS:
            for D in HEAD_DIMS:
                expected = D in head_dims(*kfmt[:2]) and D % kfmt[2] == 0 and D % vfmt[2] == 0
                assert qsdpa_sim.kernels_cover(*kfmt, D, 1, vfmt=vfmt) == expected, (kfmt, vfmt, D)
    # Values' formats outside the table.
    for vfmt in [("affine", 7, 64), ("mxfp4", 4, 64), ("turbo", 4, 16), ("turbo", 8, 64)]:
        assert not qsdpa_sim.kernels_cover("affine", 4, 64, 128, 1, vfmt=vfmt), vfmt


def test_every_planned_kernel_is_in_the_library_and_back(qsdpa_sim):
    """The names the host asks for are exactly the kernels of the .metal."""
    planned = {
        qsdpa_sim.decode_kernel_name(mode, bits, D)
        for mode, bits, gs in FORMATS
        for D in HEAD_DIMS
        if qsdpa_sim.kernels_cover(mode, bits, gs, D, 1)
    }
    assert set(qsdpa_sim.lib.kernel_names()) == planned | {"qsdpa_merge"}
    # One per (format, head dim), named after the table's kernel token.
    assert planned == {f"qsdpa_decode_{KERNEL_TOKENS[m, b]}_d{D}" for m, b in KERNEL_TOKENS for D in head_dims(m, b)}


def test_function_constant_types_match_the_kernels(qsdpa_sim):
    """A bool/int mismatch would fail pipeline creation on the GPU."""
    declared = qsdpa_sim.lib.function_constants()
    _, launches = describe(qsdpa_sim, blocks=4)
    for launch in launches:
        for item in launch["constants"].split(","):
            index = int(item.split(":")[0])
            assert index in declared
    ints = {FC[n] for n in ("query_type", "key_scale_type", "value_scale_type", "key_group_size", "value_mode", "value_bits", "value_group_size")}
    assert {i for i, (t, _) in declared.items() if t == "int"} == ints
    assert {i for i, (t, _) in declared.items() if t == "bool"} == set(FC.values()) - ints


# ---------------------------------------------------------------------------
# plan_decode
# ---------------------------------------------------------------------------


def describe(qsdpa_sim, shape=(1, 8, 2, 1, 4096, 128), *, mode="affine", bits=4, gs=64, dtype=mx.float16, mask=None, sinks=False, lse=True, blocks=0, cores=16,
             vfmt=None, value_scale_dtype=None):  # fmt: skip
    return qsdpa_sim.describe_plan(
        shape, mode=mode, bits=bits, group_size=gs, query_dtype=dtype, scale_dtype=dtype, mask_mode=mask,
        sinks=sinks, return_lse=lse, gpu_cores=cores, force_blocks=blocks, vfmt=vfmt,
        value_scale_dtype=value_scale_dtype,
    )  # fmt: skip


def constants(launch):
    return {int(i): int(v) for i, v in (c.split(":") for c in launch["constants"].split(","))}


def buffers(launch):
    return {int(i): (OPERANDS[int(op)], rw) for i, op, rw in (b.split(":") for b in launch["buffers"].split(","))}


def test_one_pass_plan(qsdpa_sim):
    head, launches = describe(qsdpa_sim, shape=(2, 8, 2, 3, 100, 128), mask="bool", sinks=True)
    assert head["blocks"] == 1 and head["partial_out"] == 0
    (l,) = launches
    assert l["kernel"] == f"qsdpa_decode_{KERNEL_TOKENS['affine', 4]}_d128"
    assert l["grid"] == "1,2,2"  # (blocks, Hkv * row blocks, B)
    assert l["threads"] == "256,1,1"
    c = constants(l)
    assert c[FC["write_final"]] == 1 and c[FC["write_partials"]] == 0
    assert c[FC["bool_mask"]] == 1 and c[FC["float_mask"]] == 0 and c[FC["causal"]] == 0
    assert c[FC["has_sinks"]] == 1 and c[FC["write_lse"]] == 1
    assert c[FC["key_has_biases"]] == 1 and c[FC["value_has_biases"]] == 1
    assert c[FC["query_type"]] == 1 and c[FC["key_group_size"]] == 64 and c[FC["value_group_size"]] == 64
    assert c[FC["value_mode"]] == qsdpa_sim.modes["affine"] and c[FC["value_bits"]] == 4
    b = buffers(l)
    assert b[0] == ("queries", "r") and b[7] == ("mask", "r") and b[9] == ("sinks", "r")
    assert b[10] == ("out", "w") and b[11] == ("lse", "w")
    assert 12 not in b and 13 not in b
    assert l["params"] == "14:304"


def test_two_pass_plan(qsdpa_sim):
    head, launches = describe(qsdpa_sim, shape=(1, 8, 2, 2, 4096, 64), mode="mxfp4", bits=4, gs=32, mask="additive", sinks=True)
    assert head["blocks"] > 1
    assert head["partial_out"] == 1 * 8 * 2 * head["blocks"] * 64
    assert head["partial_stats"] == 1 * 8 * 2 * head["blocks"] * 2
    decode, merge = launches
    assert decode["grid"] == f"{head['blocks']},2,1"
    c = constants(decode)
    assert c[FC["write_partials"]] == 1 and c[FC["write_final"]] == 0
    # The sink and lse belong to the merge.
    assert c[FC["has_sinks"]] == 0 and c[FC["write_lse"]] == 0
    assert c[FC["key_has_biases"]] == 0 and c[FC["value_has_biases"]] == 0
    b = buffers(decode)
    assert b[8] == ("mask", "r")  # additive mask
    assert b[12] == ("partial_out", "w") and b[13] == ("partial_stats", "w")
    assert not {9, 10, 11, 3, 6} & set(b)  # no sinks / out / lse / biases
    assert merge["kernel"] == "qsdpa_merge"
    assert merge["grid"] == "2,1,1"  # 16 rows / 8 simdgroups
    m = constants(merge)
    assert m[FC["has_sinks"]] == 1 and m[FC["write_lse"]] == 1
    assert buffers(merge) == {0: ("partial_out", "r"), 1: ("partial_stats", "r"), 2: ("sinks", "r"), 3: ("out", "w"), 4: ("lse", "w")}
    assert merge["params"] == "5:24" and merge["tgmem"] == "0"


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
def test_threadgroup_memory(qsdpa_sim, D):
    mode, bits, gs = next(f for f in FORMATS if D in head_dims(*f[:2]) and D % f[2] == 0)
    _, (l,) = describe(qsdpa_sim, shape=(1, 2, 1, 1, 10, D), mode=mode, bits=bits, gs=gs)
    tg = int(l["tgmem"])
    assert tg % 16 == 0 and tg <= 16 * 1024 + 256
    # The K and V tiles, and the exchange of 16 rows between key splits.
    assert tg >= 4 * max(2 * TILE[D] * D, 16 * (D + 2))


def test_row_blocks(qsdpa_sim):
    # G * Lq = 8 * 32 = 256 rows: 8 threadgroups of 32 rows per kv head.
    _, (l,) = describe(qsdpa_sim, shape=(1, 16, 2, 32, 100, 64), blocks=1)
    assert l["grid"] == "1,16,1"


def test_forced_blocks(qsdpa_sim):
    head, _ = describe(qsdpa_sim, shape=(1, 2, 1, 1, 1000, 64), blocks=64)
    assert (head["blocks"], head["keys_per_block"]) == (63, 16)  # ceil(1000 / 16)
    head, _ = describe(qsdpa_sim, shape=(1, 2, 1, 1, 5, 64), blocks=64)
    assert (head["blocks"], head["keys_per_block"]) == (5, 1)


def test_pipeline_keys_name_every_constant(qsdpa_sim):
    keys = {
        describe(qsdpa_sim, shape=(1, 8, 2, 1, 100, 128), **kw)[1][0]["key"]
        for kw in [{}, {"mask": "causal"}, {"mask": "bool"}, {"sinks": True}, {"lse": False}, {"dtype": mx.float32}, {"gs": 128}, {"blocks": 2},
                   {"vfmt": ("affine", 4, 32)}, {"vfmt": ("affine", 8, 64)}, {"vfmt": ("turbo", 4, 64)}, {"vfmt": ("mxfp4", 4, 32)},
                   {"value_scale_dtype": mx.float32}]  # fmt: skip
    }
    assert len(keys) == 13


def test_mixed_format_plan(qsdpa_sim):
    """The keys' format names the kernel; the values' format is constants,
    and only the tensor whose mode has biases binds them."""
    _, (l,) = describe(qsdpa_sim, shape=(1, 4, 2, 1, 100, 128), mode="turbo", bits=3, gs=32, vfmt=("affine", 8, 128),
                       value_scale_dtype=mx.bfloat16)  # fmt: skip
    assert l["kernel"] == f"qsdpa_decode_{KERNEL_TOKENS['turbo', 3]}_d128"
    c = constants(l)
    assert c[FC["key_group_size"]] == 32 and c[FC["key_has_biases"]] == 0
    assert c[FC["key_scale_type"]] == 1  # turbo scales are floats of the cache's dtype
    assert c[FC["value_mode"]] == qsdpa_sim.modes["affine"] and c[FC["value_bits"]] == 8
    assert c[FC["value_group_size"]] == 128 and c[FC["value_has_biases"]] == 1 and c[FC["value_scale_type"]] == 2
    b = buffers(l)
    assert b[6] == ("value_biases", "r") and 3 not in b
    _, (l,) = describe(qsdpa_sim, shape=(1, 4, 2, 1, 100, 128), mode="affine", bits=4, gs=64, vfmt=("nvfp4", 4, 16))
    c = constants(l)
    # 8-bit scale codes: no scale type, however the caller's dtype reads.
    assert c[FC["value_scale_type"]] == 0 and c[FC["value_has_biases"]] == 0 and c[FC["key_has_biases"]] == 1
    b = buffers(l)
    assert b[3] == ("key_biases", "r") and 6 not in b


def test_uncovered_calls_are_refused(qsdpa_sim):
    with pytest.raises(ValueError, match="not covered"):
        describe(qsdpa_sim, shape=(1, 2, 1, 33, 100, 64))
    with pytest.raises(ValueError, match="not covered"):
        describe(qsdpa_sim, shape=(1, 2, 1, 1, 100, 192))
    with pytest.raises(ValueError, match="not covered"):  # 80 is a multiple of no values' group
        describe(qsdpa_sim, shape=(1, 2, 1, 1, 100, 80), mode="nvfp4", bits=4, gs=16, vfmt=("affine", 4, 32))
