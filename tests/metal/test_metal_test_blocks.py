"""The Metal backend's test entry point, _ext._set_metal_test_blocks: on a
Metal build it forces the key split of every call (the 2-pass kernels on a
short context then give the oracle's result too, with the sink and lse
added by the merge kernel); a build without Metal refuses it. The whole
suite runs with it through QSDPA_METAL_BLOCKS (tests/conftest.py)."""

import mlx.core as mx
import pytest

import mlx_qsdpa
import oracle
from mlx_qsdpa import _ext
from qsdpa_env import DEVICE, METAL_BLOCKS


def test_builds_without_metal_refuse_it():
    if mlx_qsdpa.gpu_backend() == "metal":
        pytest.skip("a Metal build takes it (test_forced_blocks_on_the_gpu)")
    with pytest.raises(RuntimeError, match="no Metal backend"):
        _ext._set_metal_test_blocks(4)


@pytest.mark.parametrize("blocks", [0, 1, 3, 8])
def test_forced_blocks_on_the_gpu(blocks):
    if mlx_qsdpa.gpu_backend() != "metal" or DEVICE != "gpu":
        pytest.skip("needs the Metal GPU (QSDPA_DEVICE=gpu on a Metal build)")
    B, Hq, Hkv, Lq, Lk, D, gs, bits = 1, 4, 2, 2, 100, 64, 64, 4
    q, k, v = oracle.make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=5)
    kq = oracle.quantize(k, gs, bits, "affine")
    vq = oracle.quantize(v, gs, bits, "affine")
    sinks = mx.random.normal((Hq,), key=mx.random.key(6))
    scale = D**-0.5
    _ext._set_metal_test_blocks(blocks)
    try:
        out, lse = mlx_qsdpa.quant_sdpa(
            q, *kq, *vq, scale=scale, mask="causal", sinks=sinks, group_size=gs, bits=bits, return_lse=True,
            stream=mx.gpu,
        )  # fmt: skip
        mx.eval(out, lse)
    finally:
        _ext._set_metal_test_blocks(METAL_BLOCKS)  # the suite's own setting
    ref, ref_lse = oracle.reference(q, kq, vq, scale, gs, bits, "affine", mask="causal", sinks=sinks)
    oracle.assert_close(out, ref, mx.float16, what=f"blocks={blocks}")
    oracle.assert_lse_close(lse, ref_lse, what=f"blocks={blocks}", dtype=mx.float16)


def test_negative_counts_are_refused():
    if mlx_qsdpa.gpu_backend() != "metal":
        pytest.skip("a build without Metal refuses every count")
    with pytest.raises(ValueError, match=">= 0"):
        _ext._set_metal_test_blocks(-1)
