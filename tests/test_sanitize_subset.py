"""The oracle cases that tools/sanitize_check.sh runs under AddressSanitizer
and UndefinedBehaviorSanitizer (a build with -DMLX_QSDPA_SANITIZE=ON).

A small, fast selection that still reaches every path of the CPU kernel
where memory is addressed differently: every format (affine 1-8 bits,
including the word-straddling 3/5/6, mxfp4, mxfp8, nvfp4), head dims beyond
the suite's 256 (D=320 and 512 at 8 bits and 1024 at 4 bits: the longest
packed rows), the strided cache views (prefix, seq_major, seq_major_prefix),
every mask kind (causal, bool, additive f16/bf16/f32, broadcast and full),
B > 1, Lq > 1 (more than one block of query rows), sinks and LSE.

Marked `sanitize` and deselected by `python -m pytest tests` (pyproject's
addopts): the sanitizer step selects them with `-m sanitize`. They are
ordinary oracle checks, which any build runs with
`python -m pytest tests -m sanitize`. The head dims beyond 256 are here only
(issue 20): the CPU kernel before its rewrite copied each packed row into a
72-word stack buffer, which D=320 at 8 bits overruns silently and D=512 at
8 bits (128 words) overruns into a crash."""

import pytest

from qsdpa_case import BF16, F16, F32, Case, check_case

pytestmark = pytest.mark.sanitize

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)

CASES = []

# Every format, at D=128, Lq > 1, a mask kind and a dtype each.
MASKS = ["causal", "bool:HQK", "f16:QK", "bf16:B1QK", "f32:K", None, "bool:B1QK"]
for i, bits in enumerate(AFFINE_BITS):
    CASES.append(
        Case(B=1 + i % 2, Hq=4, Hkv=2, Lq=3, Lk=100, D=128, fmt=("affine", bits, GROUP_SIZES[i % 3]),
             dtype=(F16, BF16, F32)[i % 3], mask=MASKS[i], seed=100 + bits)
    )  # fmt: skip
for i, fmt in enumerate([("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]):
    CASES.append(
        Case(B=2, Hq=6, Hkv=2, Lq=5, Lk=90, D=128, fmt=fmt, dtype=(BF16, F16, F32)[i],
             mask=("causal", "bool:BHQK", "f32:BHQK")[i], sinks="f32", seed=200 + i)
    )  # fmt: skip

# The longest packed rows: D=320 and 512 at 8 bits (80 and 128 words a
# row), 1024 at 4 bits (128 words); in every layout, single and multi query,
# every third one long enough (> 512 keys) for the key splits and their merge.
LARGE = [
    (320, ("affine", 8, 64)), (320, ("affine", 8, 32)), (320, ("mxfp8", 8, 32)),
    (512, ("affine", 8, 64)), (512, ("affine", 8, 128)), (512, ("mxfp8", 8, 32)),
    (1024, ("affine", 4, 64)), (1024, ("affine", 4, 128)), (1024, ("nvfp4", 4, 16)), (1024, ("mxfp4", 4, 32)),
    (512, ("affine", 6, 64)), (320, ("affine", 5, 32)), (1024, ("affine", 3, 128)),
]  # fmt: skip
LAYOUTS = ["contiguous", "prefix", "seq_major", "seq_major_prefix"]
for i, (D, fmt) in enumerate(LARGE):
    CASES.append(
        Case(B=1 + i % 2, Hq=4, Hkv=2, Lq=1 if i % 2 == 0 else 4, Lk=700 + i if i % 3 == 0 else 70 + 13 * i, D=D, fmt=fmt,
             dtype=(F16, BF16, F32)[i % 3], mask=(None, "causal", "bool:QK", "f16:B1QK")[i % 4],
             layout=LAYOUTS[i % 4], seed=300 + i)
    )  # fmt: skip

# Strided views of small rows with every format family, and more than one
# block of query rows (Lq 33, 65) with the additive and bool masks.
for i, (fmt, layout) in enumerate(
    [(("affine", 3, 32), "prefix"), (("affine", 5, 64), "seq_major"), (("nvfp4", 4, 16), "seq_major_prefix"),
     (("mxfp4", 4, 32), "prefix"), (("affine", 1, 32), "seq_major_prefix"), (("affine", 2, 64), "seq_major")]
):  # fmt: skip
    CASES.append(
        Case(B=2, Hq=8, Hkv=2, Lq=(33, 65, 2)[i % 3], Lk=(150, 1100)[i % 2], D=64, fmt=fmt, dtype=(F32, F16, BF16)[i % 3],
             mask=("bf16:BHQK", "bool:B1QK", "causal")[i % 3], sinks=(None, "f16")[i % 2],
             layout=layout, q_layout=("contiguous", "seq_major")[i % 2], seed=400 + i)
    )  # fmt: skip


def test_subset_covers_what_it_claims():
    fmts = {c.fmt for c in CASES}
    assert {b for m, b, _ in fmts if m == "affine"} == set(AFFINE_BITS)
    assert {m for m, _, _ in fmts} == {"affine", "mxfp4", "mxfp8", "nvfp4"}
    assert {(c.D, c.fmt[1]) for c in CASES} >= {(320, 8), (512, 8), (1024, 4)}
    assert {c.layout for c in CASES} == set(LAYOUTS)
    kinds = {None if c.mask is None else c.mask.split(":")[0] for c in CASES}
    assert kinds == {None, "causal", "bool", "f16", "bf16", "f32"}
    assert max(c.B for c in CASES) > 1 and max(c.Lq for c in CASES) > 64
    assert max(c.Lk for c in CASES if c.D > 256) > 512 and max(c.Lk for c in CASES) > 1024


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c}" for i, c in enumerate(CASES)])
def test_oracle_case(device, case):
    check_case(case, device)
