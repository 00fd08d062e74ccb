"""Every head dim that validation accepts (any positive multiple of the group
size) against the float64 oracle, on the test device and through the GPU
backends' dequantize fallback (dequantized_attention, on any device).

The fused GPU kernels take fixed head dims (Metal: 64, 80, 96, 128, 256;
CUDA: up to 256, the tensor-core kernel 64, 128 and 256); the GPU backends
send the others to the fallback (gpu_kernel_supports). The CPU kernel takes
every D. Kept fast: few heads, short contexts. The non-finite semantics of
tests/test_nonfinite.py hold at these head dims too (the fallback's own
ops; on the CPU, the kernel's code for wide rows)."""

import pytest

from qsdpa_case import BF16, F16, F32, Case, check_case, poison_premise, assert_matches, run

CASES = [
    # The head dims of the issue: 8-bit at 512, 4-bit group 64 at 576
    # (72 words per packed row), 4-bit at 1024.
    Case(Hq=4, Hkv=2, Lq=1, Lk=70, D=512, fmt=("affine", 8, 64), dtype=F16, seed=1),
    Case(Hq=4, Hkv=1, Lq=3, Lk=90, D=576, fmt=("affine", 4, 64), dtype=BF16, mask="causal", sinks="f32", seed=2),
    Case(Hq=2, Hkv=1, Lq=2, Lk=50, D=1024, fmt=("affine", 4, 128), dtype=F32, mask="bool:HQK", seed=3),
    Case(Hq=2, Hkv=2, Lq=1, Lk=40, D=1024, fmt=("mxfp4", 4, 32), dtype=F16, mask="f32:HQK", seed=4),
    # The other ends: the smallest head dims, a wide one, and dims between
    # the kernels' own.
    Case(Hq=4, Hkv=2, Lq=2, Lk=60, D=16, fmt=("nvfp4", 4, 16), dtype=F16, mask="causal", seed=5),
    Case(Hq=2, Hkv=1, Lq=1, Lk=33, D=32, fmt=("affine", 3, 32), dtype=F32, seed=6),
    Case(Hq=4, Hkv=2, Lq=4, Lk=45, D=160, fmt=("affine", 5, 32), dtype=BF16, sinks="bf16", seed=7),
    Case(Hq=2, Hkv=1, Lq=1, Lk=64, D=320, fmt=("mxfp8", 8, 32), dtype=F16, seed=8),
    Case(Hq=2, Hkv=1, Lq=2, Lk=24, D=2048, fmt=("affine", 2, 128), dtype=F32, mask="causal", seed=9),
]


@pytest.mark.parametrize("c", CASES, ids=str)
def test_head_dim(device, c):
    check_case(c, device)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_head_dim_fallback(device, c):
    check_case(c, device, fallback=True)


# NaN and fully masked rows at a head dim that no GPU kernel takes.
POISONED = [
    Case(Hq=4, Hkv=1, Lq=3, Lk=90, D=576, fmt=("affine", 4, 64), dtype=BF16, mask="causal", poison="q_nan", seed=10),
    Case(Hq=4, Hkv=2, Lq=1, Lk=70, D=512, fmt=("affine", 8, 64), dtype=F16, mask="bool:HQK", poison="vscale_nan", seed=11),
    Case(Hq=2, Hkv=1, Lq=2, Lk=50, D=1024, fmt=("affine", 4, 128), dtype=F32, mask="f32:HQK", sinks="f32",
         poison="mask_ninf_row", seed=12),  # fmt: skip
]


@pytest.mark.parametrize("fallback", [False, True], ids=["device", "fallback"])
@pytest.mark.parametrize("c", POISONED, ids=str)
def test_head_dim_nonfinite(device, c, fallback):
    out, lse, ref, ref_lse = run(c, device, fallback=fallback)
    poison_premise(c, ref, ref_lse)
    assert_matches(c, out, lse, ref, ref_lse)
