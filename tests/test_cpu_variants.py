"""The oracle sweep on every CPU kernel variant this machine can run.

The whole suite runs on the variant the dispatcher picks (the best this CPU
has); this runs the seeded random sweep of test_correctness.py (every
format, dtype, mask kind, layout, B > 1, Lq > 1, long keys) on each of the
others too. `QSDPA_CPU_VARIANT=<name> python -m pytest tests` runs the
whole suite on one variant.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from qsdpa_env import CPU_VARIANT, DEVICE
from mlx_qsdpa import _ext
from qsdpa_case import Case, F32, check_case
from test_correctness import LONG_CASES, RANDOM_CASES

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="CPU kernel variants")

SUPPORTED = [name for name, ok in _ext.cpu_variants() if ok]
DEFAULT = _ext.cpu_variant()
OTHERS = [v for v in SUPPORTED if v != (CPU_VARIANT or DEFAULT)]
CASES = RANDOM_CASES[::2] + LONG_CASES[::3] + [
    Case(Hq=8, Hkv=2, Lq=2048 // 64, Lk=700, D=64, mask="causal", dtype=F32, seed=5),
    Case(Hq=4, Hkv=1, Lq=3, Lk=129, D=512, fmt=("affine", 8, 64), mask="f32:QK", seed=6),
    Case(Hq=2, Hkv=1, Lq=1, Lk=65, D=1024, fmt=("affine", 4, 64), layout="prefix", seed=7),
    Case(Hq=2, Hkv=2, Lq=5, Lk=33, D=80, fmt=("nvfp4", 4, 16), layout="seq_major", seed=8),
]


@pytest.fixture(params=OTHERS or [None], ids=lambda v: v or "none")
def variant(request):
    if request.param is None:
        pytest.skip("this CPU runs one variant only")
    _ext._set_cpu_variant(request.param)
    yield request.param
    _ext._set_cpu_variant(CPU_VARIANT)


def test_the_best_supported_variant_runs_by_default():
    if CPU_VARIANT:
        pytest.skip("QSDPA_CPU_VARIANT forces a variant")
    assert SUPPORTED and DEFAULT == SUPPORTED[0]
    assert [name for name, _ in _ext.cpu_variants()][-1] in ("x86-64-v2", "arm64-neon", "generic", "native")


def test_unknown_or_unsupported_variant_is_refused():
    with pytest.raises(ValueError, match="unknown CPU kernel variant 'sse1'.*compiled"):
        _ext._set_cpu_variant("sse1")
    for name, ok in _ext.cpu_variants():
        if not ok:
            with pytest.raises(ValueError, match="needs instructions this CPU lacks"):
                _ext._set_cpu_variant(name)
    assert _ext.cpu_variant() == (CPU_VARIANT or DEFAULT)


@pytest.mark.parametrize("case", CASES, ids=[f"c{i:02d}-{c}" for i, c in enumerate(CASES)])
def test_oracle_on_variant(variant, case):
    check_case(case, mx.cpu)
