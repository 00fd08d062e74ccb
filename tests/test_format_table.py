"""The format table (csrc/mlx_qsdpa/formats.h's QSDPA_FORMATS), walked.

Every other list of formats in the tree is generated from this table or
asks it; these tests hold each consumer to it: the Python format list
(validation against it: tests/test_api.py), mx.quantize (the definition
of each format), the CPU kernel and the dequantize fallback the GPU
backends use, and the Metal and CUDA kernels (through their simulators, tests/metal and tests/cuda, which
build their kernel lists from the same table). Adding a format is a row
there, its decoders if new, and nothing here.
"""

import itertools

import mlx.core as mx
import pytest

import oracle
from mlx_qsdpa import SUPPORTED_FORMATS, format_table
from qsdpa_case import Case, check_case, fmt_id

TABLE = format_table()


def row_id(row) -> str:
    return row.kernel_name


def test_rows_are_distinct_and_well_formed():
    assert len({(r.mode, r.bits) for r in TABLE}) == len(TABLE)
    assert len({r.kernel_name for r in TABLE}) == len(TABLE)
    for r in TABLE:
        assert r.kernel_name.isidentifier(), r
        assert 1 <= r.bits <= 8, r
        assert r.group_sizes and all(g > 0 and g & (g - 1) == 0 for g in r.group_sizes), r
        assert list(r.group_sizes) == sorted(r.group_sizes), r
    # A mode's rows agree on whether groups carry biases.
    for mode, rows in itertools.groupby(sorted(TABLE, key=lambda r: r.mode), key=lambda r: r.mode):
        assert len({r.has_biases for r in rows}) == 1, mode


def test_supported_formats_expand_the_table():
    assert SUPPORTED_FORMATS == tuple((r.mode, r.bits, g) for r in TABLE for g in r.group_sizes)


@pytest.mark.parametrize("row", TABLE, ids=row_id)
def test_mx_quantize_makes_every_row(row):
    """Each row is a format mx.quantize (or, for the codebook mode,
    mlx_qsdpa.quantize) produces, with biases exactly when the table says so."""
    x = mx.random.normal((1, 2, 3, 128), key=mx.random.key(row.bits))
    for gs in row.group_sizes:
        # mlx_qsdpa.quantize: mx.quantize for its modes, ours for "turbo".
        parts = oracle.quantize(x, gs, row.bits, row.mode)
        has_biases = len(parts) == 3 and parts[2] is not None
        assert has_biases == row.has_biases, (row, gs)
        assert parts[0].shape == (1, 2, 3, 128 * row.bits // 32)
        assert parts[1].shape == (1, 2, 3, 128 // gs)


@pytest.mark.parametrize("fallback", [False, True], ids=["fused", "dequantize_fallback"])
@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS, ids=fmt_id)
def test_every_format_matches_the_oracle(device, fmt, fallback):
    """The fused kernel of the test device and the GPU backends' dequantize
    fallback, for every (mode, bits, group size) of the table."""
    D = 128 if 128 % fmt[2] == 0 else fmt[2]
    check_case(Case(Hq=4, Hkv=2, Lq=2, Lk=70, D=D, fmt=fmt, mask="causal", seed=fmt[1]), device, fallback=fallback)


def test_readme_formats_table_is_the_table():
    """The README's table of formats (documentation) says what the table says."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Formats"):text.index("### C++")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \| ([\d, ]+) \| ([\d, ]+) \|.*\| (yes|no) \|$", line)
        if m:
            ints = lambda t: tuple(int(x) for x in t.split(","))
            rows[m.group(1)] = (ints(m.group(2)), ints(m.group(3)), m.group(4) == "yes")
    want = {}
    for r in TABLE:
        bits, groups, biases = want.get(r.mode, ((), r.group_sizes, r.has_biases))
        want[r.mode] = (bits + (r.bits,), groups, biases)
    assert rows == want
