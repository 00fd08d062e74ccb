"""The CPU kernel's fused path (items of at most 16 query rows: decoding)
against the float64 oracle, case by case where its code branches.

An item is the query rows of one (batch, kv head): G * Lq rows. Up to 16 go
through the fused path in tiles of 1, 2, 4 or 8 rows (3, 5-7 and the last
tile of 9-15 padded with zero rows); 17 and more take the float-tile path.
Its value loops read "value order" chunks: one group per chunk (4-bit group
64), several (4-bit group 32, 2-bit, 1-bit), 3-bit packs (AVX2), or values
outside the value order (5/6-bit), decoded to a float tile. Keys are words
(1, 2, 4, 8 bits) or runs of 32 elements (3, 5, 6 bits). Blocks of 64 keys
(AVX2) end mid-block here (Lk = 150). On the x86-64-v2 build (and generic
ones) the fused path is not compiled, and these run the float-tile path.
"""

import mlx.core as mx
import pytest

from qsdpa_case import BF16, F16, F32, Case, check_case
from qsdpa_env import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel's fused path")

# (Hq, Hkv, Lq): G * Lq query rows per item.
ROWS = {
    1: (2, 2, 1),
    2: (4, 2, 1),
    3: (3, 1, 1),
    4: (8, 2, 1),
    5: (5, 1, 1),
    8: (8, 1, 1),
    9: (3, 1, 3),
    16: (8, 2, 2),
    17: (1, 1, 17),
}

FORMATS = [
    ("affine", 4, 64),  # one group per chunk
    ("affine", 4, 32),  # two groups per chunk
    ("affine", 2, 64),
    ("affine", 8, 32),
    ("affine", 3, 64),  # 3-bit packs (AVX2), runs of 32 for the keys
    ("affine", 5, 32),  # values outside the value order
    ("mxfp4", 4, 32),
    ("nvfp4", 4, 16),
    ("mxfp8", 8, 32),
    ("turbo", 3, 64),
    ("turbo", 4, 32),
]

CASES = []
for i, rows in enumerate(ROWS):
    Hq, Hkv, Lq = ROWS[rows]
    for j, fmt in enumerate(FORMATS):
        if (i + j) % 3:  # every row count meets a third of the formats
            continue
        CASES.append(
            Case(Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=150, D=128, fmt=fmt, dtype=(F16, BF16, F32)[j % 3],
                 mask=("causal", None, "bool:HQK")[i % 3], sinks="f32" if rows in (3, 8) else None,
                 seed=100 * i + j))
# The widths and head dims whose chunks span several groups or none is whole.
CASES += [
    Case(Hq=4, Hkv=1, Lq=1, Lk=150, D=256, fmt=("affine", 1, 32), dtype=F32, seed=1),
    Case(Hq=4, Hkv=1, Lq=2, Lk=70, D=256, fmt=("affine", 2, 32), dtype=F16, mask="causal", seed=2),
    Case(Hq=8, Hkv=1, Lq=1, Lk=150, D=64, fmt=("affine", 3, 32), dtype=F16, seed=3),
    Case(Hq=2, Hkv=1, Lq=1, Lk=150, D=96, fmt=("affine", 6, 32), dtype=BF16, seed=4),
    Case(Hq=4, Hkv=2, Lq=1, Lk=150, D=80, fmt=("nvfp4", 4, 16), dtype=F16, seed=5),
    # Keys and values of different formats: each side's own branch.
    Case(Hq=4, Hkv=1, Lq=1, Lk=150, D=128, fmt=("turbo", 3, 64), vfmt=("affine", 8, 64), dtype=F16, seed=6),
    Case(Hq=8, Hkv=2, Lq=1, Lk=150, D=128, fmt=("affine", 8, 64), vfmt=("affine", 5, 32), dtype=F32, seed=7),
    Case(Hq=6, Hkv=1, Lq=2, Lk=150, D=128, fmt=("affine", 3, 32), vfmt=("mxfp4", 4, 32), dtype=BF16,
         mask="causal", seed=8),
    # Strided cache views.
    Case(Hq=4, Hkv=1, Lq=1, Lk=150, D=128, layout="prefix", seed=9),
    Case(Hq=4, Hkv=1, Lq=3, Lk=150, D=128, fmt=("affine", 4, 32), layout="seq_major", mask="causal", seed=10),
]


@pytest.mark.parametrize("c", CASES, ids=str)
def test_fused_path(c):
    check_case(c, mx.cpu)
