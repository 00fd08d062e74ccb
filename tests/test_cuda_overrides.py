"""The CUDA backend's private test entry point,
mlx_qsdpa._ext._set_cuda_test_overrides (launch_plan.h's TestOverrides): it
exists in CUDA builds only, refuses bad arguments, and on a CUDA GPU each
override (the generic kernel forced, fixed split counts, the pool
workspace) still gives the oracle's results. tests/conftest.py sets the
overrides for a whole run from QSDPA_CUDA_KERNEL / QSDPA_CUDA_SPLITS /
QSDPA_CUDA_WORKSPACE; these tests put those back when they are done."""

import pytest

import qsdpa_case
from mlx_qsdpa import _ext
from qsdpa_case import BF16, F16, Case
from qsdpa_env import CUDA_KERNEL, CUDA_SPLITS, CUDA_WORKSPACE, DEVICE

CUDA = _ext.gpu_backend() == "cuda"
cuda_only = pytest.mark.skipif(not CUDA, reason="the CUDA build's entry point")


@pytest.fixture
def restore_overrides():
    yield
    _ext._set_cuda_test_overrides(kernel=CUDA_KERNEL, splits=CUDA_SPLITS, workspace=CUDA_WORKSPACE)


def test_entry_point_only_in_cuda_builds():
    assert hasattr(_ext, "_set_cuda_test_overrides") == CUDA


@cuda_only
@pytest.mark.parametrize("bad", [dict(kernel="mma"), dict(workspace="ring"), dict(splits=-1)], ids=str)
def test_bad_arguments_are_refused(bad, restore_overrides):
    with pytest.raises(ValueError):
        _ext._set_cuda_test_overrides(**bad)


CASES = [
    Case(B=1, Hq=8, Hkv=2, Lq=1, Lk=3000, D=128, fmt=("affine", 4, 64), dtype=F16, mask="causal", sinks="f32"),
    Case(B=2, Hq=8, Hkv=2, Lq=4, Lk=1500, D=64, fmt=("mxfp4", 4, 32), dtype=BF16, mask="bool:HQK"),
]


@cuda_only
@pytest.mark.skipif(DEVICE != "gpu", reason="runs the CUDA kernels: QSDPA_DEVICE=gpu")
@pytest.mark.parametrize(
    "overrides", [dict(kernel="simt"), dict(splits=1), dict(splits=3), dict(splits=100), dict(workspace="pool")], ids=str
)
@pytest.mark.parametrize("c", CASES, ids=str)
def test_overrides_match_oracle(c, overrides, device, restore_overrides):
    _ext._set_cuda_test_overrides(**overrides)
    qsdpa_case.check_case(c, device)
