"""Every code of every format through the kernels' own decoders.

The oracle tests draw random data, which may miss codes (fp8's subnormals
and NaN codes, the extreme affine codes, most scale codes). Here the packed
words are built code by code and read back through the public op:

* with one key, the softmax is 1, so the output row IS the decoded value
  row (the value decoder);
* with queries that are the rows of the identity (head h sees e_h) and one
  key, lse[h] = scale * k[h] (the key decoder).

Both are compared with ``mx.dequantize`` of the same words, on every CPU
kernel variant this machine runs (and on the GPU with QSDPA_DEVICE=gpu).
"""

from __future__ import annotations

import numpy as np
import pytest
import mlx.core as mx

import oracle
from qsdpa_env import CPU_VARIANT, DEVICE
from qsdpa_case import AFFINE_BITS, AFFINE_GROUP_SIZES, SCALE_CODE_FORMATS
from mlx_qsdpa import _ext, format_table, quant_sdpa

D = 256  # every 8-bit code once per row; a multiple of every group size
ROWS = 8  # keys (batch entries), each with other codes, scales and biases


def variants():
    if DEVICE == "gpu":
        return [None]
    return [name for name, ok in _ext.cpu_variants() if ok]


@pytest.fixture(params=variants(), ids=lambda v: v or "gpu")
def variant(request):
    if request.param is not None:
        _ext._set_cpu_variant(request.param)
    yield request.param
    if request.param is not None:
        _ext._set_cpu_variant(CPU_VARIANT)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of codes as formats.h's little-endian bit stream of uint32 words."""
    n = codes.shape[-1]
    bitpos = np.arange(n * bits)
    stream = (codes[..., bitpos // bits] >> (bitpos % bits)) & 1
    stream = stream.reshape(*codes.shape[:-1], n * bits // 32, 32).astype(np.uint64)
    return (stream << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def codes_for(bits: int, rng) -> np.ndarray:
    """[ROWS, D] codes: row 0 counts through every code, the others are random."""
    first = np.arange(D) % (1 << bits)
    rest = rng.integers(0, 1 << bits, size=(ROWS - 1, D))
    return np.concatenate([first[None], rest]).astype(np.int64)


def as4(a):
    """[ROWS, n] -> [ROWS, 1, 1, n] mx array (None stays None)."""
    if a is None:
        return None
    return (a if isinstance(a, mx.array) else mx.array(a)).reshape(ROWS, 1, 1, -1)


def check(wk, wv, s, b, gs, bits, mode, ref_k, ref_v):
    """Runs both read-outs of the packed rows and compares them with the
    decoded keys and values ref_k, ref_v [ROWS, D] (float64, NaN where an
    element decodes to NaN). K and V share their scales and biases."""
    q = mx.broadcast_to(mx.eye(D, dtype=mx.float32)[None, :, None, :], (ROWS, D, 1, D))
    out, lse = quant_sdpa(q, wk, s, b, wv, s, b, scale=1.0, group_size=gs, bits=bits,
                          mode=mode, return_lse=True)
    out = oracle.to_numpy(out)[:, :, 0, :]  # [ROWS, heads, D]
    lse = oracle.to_numpy(lse)[:, :, 0]  # [ROWS, heads]
    # Keys: lse[r, h] = k[r, h]. A NaN element makes every score of its key
    # NaN (0 * NaN in the other heads' dot products), hence the whole row.
    key_nan = np.isnan(ref_k).any(-1, keepdims=True)
    expect_lse = np.where(key_nan, np.nan, ref_k)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(expect_lse))
    ok = ~np.isnan(expect_lse)
    assert ok.any()
    assert np.abs(lse[ok] - expect_lse[ok]).max() <= 1e-6 * max(1.0, np.abs(expect_lse[ok]).max())
    # Values: with one key every head returns the value row.
    expect = np.where(key_nan[:, :, None], np.nan, np.broadcast_to(ref_v[:, None, :], out.shape))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expect))
    ok = ~np.isnan(expect)
    assert np.abs(out[ok] - expect[ok]).max() <= 2e-6 * np.nanmax(np.abs(ref_v))


def code_rows(bits, rng, nan_codes=()):
    """Key and value codes [ROWS, D]. Rows 0 and 1 count through every code;
    key row 1 has the NaN codes replaced by 0, so that it reads out every
    other key code while key row 0 shows a NaN key; value row 1 (seen
    through that finite key) reads out every value code, NaN included."""
    k, v = codes_for(bits, rng), codes_for(bits, rng)
    v[1] = v[0]
    k[1] = np.where(np.isin(k[0], nan_codes), 0, k[0])
    k[2:] = np.where(np.isin(k[2:], nan_codes), 0, k[2:])
    return k, v


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("gs", AFFINE_GROUP_SIZES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_affine_codes(variant, bits, gs, dtype):
    rng = np.random.default_rng(bits * 1000 + gs)
    ck, cv = code_rows(bits, rng)
    wk, wv = as4(pack(ck, bits)), as4(pack(cv, bits))
    s = as4(mx.array(rng.normal(size=(ROWS, D // gs)).astype(np.float32)).astype(dtype))
    b = as4(mx.array(rng.normal(size=(ROWS, D // gs)).astype(np.float32)).astype(dtype))
    # The format's definition, scale * code + bias, in float64 ...
    expand = lambda a: np.repeat(oracle.to_numpy(a)[:, 0, 0, :], gs, axis=-1)
    ref_k = ck * expand(s) + expand(b)
    ref_v = cv * expand(s) + expand(b)
    # ... which is MLX's decoding of these words (rounded to the cache dtype).
    for w, ref in ((wk, ref_k), (wv, ref_v)):
        mlx_ref = oracle.dequantize64(w, s, b, gs, bits, "affine")[:, 0, 0, :]
        assert np.abs(mlx_ref - ref).max() <= oracle.RTOL[dtype] * np.abs(ref).max()
    check(wk, wv, s, b, gs, bits, "affine", ref_k, ref_v)


@pytest.mark.parametrize("mode,bits,gs", SCALE_CODE_FORMATS)
def test_fp_codes(variant, mode, bits, gs):
    rng = np.random.default_rng(bits)
    ck, cv = code_rows(bits, rng, nan_codes=(0x7F, 0xFF) if bits == 8 else ())
    wk, wv = as4(pack(ck, bits)), as4(pack(cv, bits))
    if mode == "nvfp4":
        # e4m3 scale codes: every finite positive one, across the rows.
        scale_codes = np.arange(ROWS * (D // gs)) % 126 + 1
    else:
        # e8m0 scale codes for 2^-20 .. 2^20.
        scale_codes = np.arange(ROWS * (D // gs)) % 41 + 107
    s = as4(scale_codes.reshape(ROWS, D // gs).astype(np.uint8))
    # Exact in float32 (a few significant bits times a power of two or an
    # e4m3 scale), so MLX's decoding is the reference as it is.
    ref_k = oracle.dequantize64(wk, s, None, gs, bits, mode)[:, 0, 0, :]
    ref_v = oracle.dequantize64(wv, s, None, gs, bits, mode)[:, 0, 0, :]
    check(wk, wv, s, None, gs, bits, mode, ref_k, ref_v)


@pytest.mark.parametrize("bits", [r.bits for r in format_table() if r.mode == "turbo"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_turbo_codes(variant, bits, dtype):
    """Every codebook code, keys and values, on every CPU variant (or the
    GPU): scale * level[code] with the oracle's own Lloyd-Max levels."""
    gs = 32
    rng = np.random.default_rng(bits * 77)
    ck, cv = code_rows(bits, rng)
    wk, wv = as4(pack(ck, bits)), as4(pack(cv, bits))
    s = as4(mx.array(rng.normal(size=(ROWS, D // gs)).astype(np.float32)).astype(dtype))
    levels = oracle.gaussian_codebook(bits)
    expand = np.repeat(oracle.to_numpy(s)[:, 0, 0, :], gs, axis=-1)
    check(wk, wv, s, None, gs, bits, "turbo", levels[ck] * expand, levels[cv] * expand)
