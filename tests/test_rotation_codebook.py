"""Rotated caches, the codebook format ("turbo") and keys and values of
different formats (issue 22), against the float64 oracle.

The oracle (oracle.py) decodes "turbo" codes and rebuilds the Hadamard
rotation from their definitions on its own; these tests hold
mlx_qsdpa.quantize / dequantize / rotation_matrix and the op to it on the
test device, fused and through the dequantize fallback.
"""

import mlx.core as mx
import numpy as np
import pytest

import oracle
import mlx_qsdpa
from mlx_qsdpa import format_table
from qsdpa_case import DTYPES, MIXED_FORMATS, Case, check_case, dtype_id, fmt_id

TURBO = tuple(("turbo", r.bits, g) for r in format_table() if r.mode == "turbo" for g in r.group_sizes)
ROTATED = (("affine", 4, 64), ("affine", 2, 32), ("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16), ("turbo", 3, 64))
# Keys and values in different formats: different modes, bits and group sizes.
MIXED = MIXED_FORMATS


def test_codebook_is_the_normal_lloyd_max():
    """formats.h's levels are the Lloyd-Max quantizer of N(0, 1) (the
    oracle's own computation) to float32 precision, ascending with the code."""
    for bits in (2, 3, 4):
        want = oracle.gaussian_codebook(bits)
        n = 2**bits
        # One group of 32 codes 0..n-1 (repeated), scale 1.
        codes = np.tile(np.arange(n), 32 // n)
        packed = np.zeros(bits, np.uint32)
        for i, c in enumerate(codes):
            for b in range(bits):
                if (c >> b) & 1:
                    bit = i * bits + b
                    packed[bit // 32] |= np.uint32(1 << (bit % 32))
        got = mlx_qsdpa.dequantize(
            mx.array(packed[None]), mx.ones((1, 1), mx.float32), None, 32, bits, "turbo", dtype=mx.float32
        )
        np.testing.assert_allclose(np.array(got)[0, :n], want, rtol=2e-7, atol=0)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 576])
def test_rotation_matrix_is_the_definition(D):
    R = np.array(mlx_qsdpa.rotation_matrix(D, 7)).astype(np.float64)
    np.testing.assert_allclose(R, oracle.rotation64(D, 7), atol=1e-7, rtol=0)
    np.testing.assert_allclose(R @ R.T, np.eye(D), atol=1e-6)
    assert not np.allclose(R, np.array(mlx_qsdpa.rotation_matrix(D, 8)))


@pytest.mark.parametrize("rotation", [None, "hadamard"])
@pytest.mark.parametrize("fmt", TURBO + ROTATED, ids=fmt_id)
def test_quantize_dequantize_round_trip(fmt, rotation):
    """dequantize(quantize(x)) is the oracle's decoding (rotated back), and
    close to x (turbo: the Lloyd-Max error of a normal variable)."""
    mode, bits, gs = fmt
    x = mx.random.normal((2, 3, 40, 128), key=mx.random.key(bits)).astype(mx.float16)
    parts = mlx_qsdpa.quantize(x, gs, bits, mode, rotation=rotation)
    assert len(parts) == (3 if mode == "affine" else 2)
    biases = parts[2] if mode == "affine" else None
    y = mlx_qsdpa.dequantize(parts[0], parts[1], biases, gs, bits, mode, rotation=rotation, dtype=mx.float32)
    widen = (lambda a: a) if parts[1].dtype == mx.uint8 else (lambda a: None if a is None else a.astype(mx.float32))
    want = oracle.dequantize64(parts[0], widen(parts[1]), widen(biases), gs, bits, mode)
    if rotation:
        want = want @ oracle.rotation64(128, 0)
    np.testing.assert_allclose(np.array(y), want, atol=2e-3 * np.abs(want).max())
    rel = float(np.mean((np.array(y) - np.array(x.astype(mx.float32))) ** 2))
    assert rel < {2: 0.13, 3: 0.045, 4: 0.016, 8: 0.002}[bits], (fmt, rotation, rel)


@pytest.mark.parametrize("fallback", [False, True], ids=["fused", "dequantize_fallback"])
@pytest.mark.parametrize("fmt", TURBO, ids=fmt_id)
def test_turbo_matches_the_oracle(device, fmt, fallback):
    check_case(Case(Hq=4, Hkv=2, Lq=2, Lk=70, fmt=fmt, mask="causal", seed=fmt[1]), device, fallback=fallback)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fmt", ROTATED, ids=fmt_id)
def test_rotated_matches_the_oracle(device, fmt, dtype):
    check_case(Case(Hq=8, Hkv=2, Lq=3, Lk=131, fmt=fmt, dtype=dtype, mask="causal", sinks="f32", rotation="hadamard"), device)


@pytest.mark.parametrize("D,fmt", [(64, ("turbo", 4, 32)), (80, ("nvfp4", 4, 16)), (96, ("turbo", 2, 32)), (256, ("affine", 3, 128))])
def test_rotated_head_dims(device, D, fmt):
    """Power-of-two and block-diagonal rotations (80 = 64 + 16, 96 = 64 + 32)."""
    check_case(Case(Hq=4, Hkv=4, Lq=1, Lk=90, D=D, fmt=fmt, rotation="hadamard"), device)


@pytest.mark.parametrize("fallback", [False, True], ids=["fused", "dequantize_fallback"])
@pytest.mark.parametrize("kfmt,vfmt", MIXED, ids=[f"{fmt_id(k)}-{fmt_id(v)}" for k, v in MIXED])
def test_keys_and_values_in_different_formats(device, kfmt, vfmt, fallback):
    c = Case(Hq=6, Hkv=2, Lq=4, Lk=150, fmt=kfmt, vfmt=vfmt, mask="causal", sinks="f16", layout="prefix")
    check_case(c, device, fallback=fallback)
    check_case(c.replace(rotation="hadamard", layout="contiguous", dtype=mx.bfloat16, mask=None), device, fallback=fallback)


def test_value_format_defaults_to_the_keys():
    """value_* left out: the keys' format; one of them given: the others
    still follow the keys."""
    q, k, v = oracle.make_qkv(1, 4, 2, 2, 64, 128)
    kq = mlx_qsdpa.quantize(k, 64, 4)
    vq = mlx_qsdpa.quantize(v, 32, 4)
    a = mlx_qsdpa.quant_sdpa(q, *kq, *vq, scale=0.1, value_group_size=32)
    b = mlx_qsdpa.quant_sdpa(q, *kq, *vq, scale=0.1, value_mode="affine", value_bits=4, value_group_size=32)
    assert mx.array_equal(a, b)
    with pytest.raises(ValueError, match="value_scales must have shape"):
        mlx_qsdpa.quant_sdpa(q, *kq, *vq, scale=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(value_mode="int4"), "value_mode must be one of"),
        (dict(value_bits=7), r"unsupported value format \(value_mode='affine', value_bits=7"),
        (dict(value_group_size=48), "unsupported value format"),
        (dict(value_mode="turbo", value_bits=8), "unsupported value format"),
        (dict(rotation="random"), "rotation must be None or 'hadamard'"),
    ],
)
def test_bad_value_format_and_rotation(kwargs, match):
    q, k, v = oracle.make_qkv(1, 2, 2, 1, 32, 64)
    kq = mlx_qsdpa.quantize(k, 64, 4)
    with pytest.raises(ValueError, match=match):
        mlx_qsdpa.quant_sdpa(q, *kq, *kq, scale=0.1, **kwargs)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(value_bits="4"), TypeError, "value_bits must be an int"),
        (dict(value_mode=4), TypeError, "value_mode must be a str"),
        (dict(rotation=1), TypeError, "rotation must be a str"),
        (dict(rotation_seed=1.5), TypeError, "rotation_seed must be an int"),
    ],
)
def test_bad_option_types(kwargs, err, match):
    q, k, v = oracle.make_qkv(1, 2, 2, 1, 32, 64)
    kq = mlx_qsdpa.quantize(k, 64, 4)
    with pytest.raises(err, match=match):
        mlx_qsdpa.quant_sdpa(q, *kq, *kq, scale=0.1, **kwargs)


def test_quantize_rejects_bad_arguments():
    x = mx.zeros((2, 64))
    with pytest.raises(ValueError, match="unsupported format"):
        mlx_qsdpa.quantize(x, 64, 5, "turbo")
    with pytest.raises(ValueError, match="multiple of group_size"):
        mlx_qsdpa.quantize(mx.zeros((2, 48)), 32, 3, "turbo")
    with pytest.raises(ValueError, match="rotation must be None or 'hadamard'"):
        mlx_qsdpa.quantize(x, 64, 4, rotation="fft")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        mlx_qsdpa.quantize(mx.zeros((2, 64), mx.int32), 64, 4, "turbo")


def test_rotation_seed_must_match():
    """A cache quantized with one seed and attended with another is not the
    same attention (the seed is part of the format)."""
    q, k, v = oracle.make_qkv(1, 2, 2, 1, 64, 128)
    kq = mlx_qsdpa.quantize(k, 64, 4, rotation="hadamard", rotation_seed=3)
    vq = mlx_qsdpa.quantize(v, 64, 4, rotation="hadamard", rotation_seed=3)
    a = mlx_qsdpa.quant_sdpa(q, *kq, *vq, scale=0.1, rotation="hadamard", rotation_seed=3)
    b = mlx_qsdpa.quant_sdpa(q, *kq, *vq, scale=0.1, rotation="hadamard", rotation_seed=4)
    ref = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale=0.1)
    ea = float(mx.abs(a.astype(mx.float32) - ref).max())
    eb = float(mx.abs(b.astype(mx.float32) - ref).max())
    assert ea < 0.1 < eb, (ea, eb)


def test_quantize_positional_and_dequantize_of_its_parts():
    """quantize(x, group_size, bits, mode, rotation, rotation_seed) by
    position, and dequantize(*quantize(...), group_size=..., ...) for the
    3-part (affine) and 2-part (turbo, fp) results alike."""
    x = mx.random.normal((2, 4, 128), key=mx.random.key(5))
    for mode, bits, gs in (("affine", 4, 64), ("turbo", 3, 32), ("mxfp4", 4, 32)):
        parts = mlx_qsdpa.quantize(x, gs, bits, mode, "hadamard", 9)
        by_name = mlx_qsdpa.quantize(x, group_size=gs, bits=bits, mode=mode, rotation="hadamard", rotation_seed=9)
        assert all(mx.array_equal(a, b) for a, b in zip(parts, by_name))
        y = mlx_qsdpa.dequantize(*parts, group_size=gs, bits=bits, mode=mode, rotation="hadamard", rotation_seed=9,
                                 dtype=mx.float32)
        assert y.shape == x.shape
        assert float(mx.mean((y - x) ** 2)) < 0.05, mode
