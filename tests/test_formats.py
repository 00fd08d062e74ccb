"""The format definitions of formats.h against MLX, code by code.

`_ext._decode_table(name)` decodes every code of a scalar format and
`_ext._unpack_row(words, bits)` unpacks a row of packed words, both through
formats.h. They are held against mx.dequantize on crafted inputs (and
NumPy's float16). The last tests push every code through the kernel
itself: with one key, lse = scale * q . k, and with an identity mask
out = v, so one-hot queries read the decoded K and V back exactly.

MLX's side (mx.quantize, mx.dequantize, its dtype conversions) and every
input run on the CPU whatever the test device (see oracle.py); the kernel
tests run only quant_sdpa on the test device."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import SUPPORTED_FORMATS, _ext, quant_sdpa
import oracle
from oracle import CPU, evaluated, to_numpy
from qsdpa_case import AFFINE_BITS, F16, BF16, F32, DTYPES, dtype_id, fmt_id


def pack_codes(codes, bits):
    """MLX's packing, written out: element i of a row occupies bits
    [i*bits, (i+1)*bits) of the row's little-endian bit stream."""
    codes = np.asarray(codes, dtype=np.uint64)
    stream = (codes[..., :, None] >> np.arange(bits, dtype=np.uint64)) & 1
    stream = stream.reshape(*codes.shape[:-1], -1, 32)
    return (stream << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def dequant(words, scales, biases, group_size, bits, mode):
    b = None if biases is None else mx.array(biases)
    out = mx.dequantize(
        mx.array(words), mx.array(scales), b, group_size=group_size, bits=bits, mode=mode, dtype=F32, stream=CPU
    )
    return np.array(out)


def table(name):
    return np.array(_ext._decode_table(name), dtype=np.float32)


def assert_same_floats(got, want, what):
    """Equal values, equal signs of zero, NaN where NaN."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    bad = ~((got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want)))
    assert not bad.any(), f"{what}: codes {np.flatnonzero(bad).tolist()} decode to {got[bad]}, MLX gives {want[bad]}"


# --- the packer used below is MLX's layout --------------------------------


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_pack_codes_is_what_mx_quantize_writes(bits):
    # Each group of 32 holds 0 and 2**bits - 1, so mx.quantize's scale is
    # exactly +-1 (MLX may pick scale -1, bias 2**bits - 1): the words hold
    # the codes or their complement.
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**bits, size=(4, 128))
    x[:, ::32] = 0
    x[:, 1::32] = 2**bits - 1
    w, s, b = mx.quantize(mx.array(x.astype(np.float32)), group_size=32, bits=bits, stream=CPU)
    s, b = np.repeat(np.array(s), 32, axis=1), np.repeat(np.array(b), 32, axis=1)
    assert np.all(np.abs(s) == 1.0)
    codes = np.rint((x - b) / s).astype(np.int64)
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    assert np.array_equal(np.array(w), pack_codes(codes, bits))


# --- unpacking ------------------------------------------------------------


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_unpack_row_every_code(bits):
    # Every code at many positions (so at every shift, straddling words for
    # 3/5/6 bits), against mx.dequantize with scale 1 and bias 0.
    rng = np.random.default_rng(10 + bits)
    n = 32 * 2**bits  # each code 32 times
    codes = rng.permutation(np.arange(n) % 2**bits)
    words = pack_codes(codes[None], bits)
    got = np.array(_ext._unpack_row(words[0].tolist(), bits))
    assert np.array_equal(got, codes)
    ones = np.ones((1, n // 32), np.float32)
    mlx_codes = dequant(words, ones, 0 * ones, 32, bits, "affine")[0]
    assert np.array_equal(mlx_codes, codes)


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_unpack_row_random_words(bits):
    # Arbitrary bit patterns, decoded by mx.dequantize as the reference.
    rng = np.random.default_rng(20 + bits)
    words = rng.integers(0, 2**32, size=(1, 3 * bits * 4), dtype=np.uint64).astype(np.uint32)
    n = words.shape[1] * 32 // bits
    ones = np.ones((1, n // 32), np.float32)
    want = dequant(words, ones, 0 * ones, 32, bits, "affine")[0]
    got = np.array(_ext._unpack_row(words[0].tolist(), bits))
    assert np.array_equal(got, want)


def test_unpack_row_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        _ext._unpack_row([1, 2, 3], 7)


def test_decode_table_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown table"):
        _ext._decode_table("fp6_e3m2")


# --- scalar formats -------------------------------------------------------


def test_fp4_e2m1_every_code():
    # mxfp4 with scale code 127 (= 1.0): the element codes decode to
    # themselves.
    codes = np.tile(np.arange(16), 2)[None]
    want = dequant(pack_codes(codes, 4), np.full((1, 1), 127, np.uint8), None, 32, 4, "mxfp4")[0]
    got = table("fp4_e2m1")
    assert got.shape == (16,)
    assert_same_floats(got, want[:16], "fp4_e2m1")
    assert_same_floats(got[:8], [0, 0.5, 1, 1.5, 2, 3, 4, 6], "fp4_e2m1 values")


def test_fp8_e4m3_every_code_as_element():
    # mxfp8 elements, scale 1.0.
    codes = np.arange(256)[None]
    want = dequant(pack_codes(codes, 8), np.full((1, 8), 127, np.uint8), None, 32, 8, "mxfp8")[0]
    assert_same_floats(table("fp8_e4m3"), want, "fp8_e4m3 (mxfp8 element)")


def test_fp8_e4m3_every_code_as_nvfp4_scale():
    # nvfp4 groups of the element 1.0 (code 2), one group per scale code.
    codes = np.full((1, 256 * 16), 2)
    scales = np.arange(256, dtype=np.uint8)[None]
    want = dequant(pack_codes(codes, 4), scales, None, 16, 4, "nvfp4")[0, ::16]
    assert_same_floats(table("fp8_e4m3"), want, "fp8_e4m3 (nvfp4 scale)")


def test_e8m0_every_code():
    # mxfp4 groups of the element 1.0, one group per scale code: 2^(c - 127),
    # code 0 a float32 subnormal, 0xff infinite.
    codes = np.full((1, 256 * 32), 2)
    scales = np.arange(256, dtype=np.uint8)[None]
    want = dequant(pack_codes(codes, 4), scales, None, 32, 4, "mxfp4")[0, ::32]
    got = table("e8m0")
    assert_same_floats(got, want, "e8m0")
    assert got[127] == 1.0 and got[0] == np.float32(2.0**-127) and np.isinf(got[255])


def test_float16_every_code():
    want = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    assert_same_floats(table("float16"), want, "float16")
    # And MLX's own float16 -> float32 conversion agrees.
    mlx = np.array(mx.array(np.arange(65536).astype(np.uint16)).view(F16, stream=CPU).astype(F32, stream=CPU))
    assert_same_floats(table("float16"), mlx, "float16 (mx)")


def test_bfloat16_every_code():
    want = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    assert_same_floats(table("bfloat16"), want, "bfloat16")
    mlx = np.array(mx.array(np.arange(65536).astype(np.uint16)).view(BF16, stream=CPU).astype(F32, stream=CPU))
    assert_same_floats(table("bfloat16"), mlx, "bfloat16 (mx)")


# --- every code through the kernel ----------------------------------------

# fp8 e4m3 codes 0x7f/0xff are NaN in MLX (test_fp8_e4m3_* above compare
# them); mx.quantize never writes them, and a NaN would hide every other
# code of the row here.
E4M3_FINITE = np.array([c for c in range(256) if c & 0x7F != 0x7F])


def crafted_cache(fmt, H, R, D, dtype, rng, narrow_scales=False):
    """R rows of each of H heads covering every element code of the format
    and a spread of scale codes (fp modes) or random scales/biases (affine);
    returns the quantized triple of arrays [1, H, R, *]. narrow_scales keeps
    the fp scales within 2^-4..2^4 (for the lse's absolute precision)."""
    mode, bits, gs = fmt
    n = H * R * D
    if mode == "mxfp8":
        pool = E4M3_FINITE
    else:
        pool = np.arange(2 ** (bits if mode in ("affine", "turbo") else 4))
    codes = rng.permutation(np.resize(pool, n)).reshape(1, H, R, D)
    w = mx.array(pack_codes(codes, bits))
    G = D // gs
    if mode == "affine":
        s = mx.array(rng.uniform(-0.5, 0.5, (1, H, R, G)).astype(np.float32)).astype(dtype, stream=CPU)
        b = mx.array(rng.normal(size=(1, H, R, G)).astype(np.float32)).astype(dtype, stream=CPU)
        return evaluated(w, s, b)
    if mode == "turbo":
        s = mx.array(rng.uniform(-1.0, 1.0, (1, H, R, G)).astype(np.float32)).astype(dtype, stream=CPU)
        return evaluated(w, s, None)
    if narrow_scales:
        scale_pool = np.arange(0x20, 0x58) if mode == "nvfp4" else np.arange(123, 132)
    elif mode == "nvfp4":
        scale_pool = E4M3_FINITE  # every finite e4m3 scale, signs and zero included
    else:
        scale_pool = np.arange(112, 143)  # e8m0: 2^-15 .. 2^15
    s = rng.permutation(np.resize(scale_pool, H * R * G)).reshape(1, H, R, G)
    return w, mx.array(s.astype(np.uint8)), None


KERNEL_FORMATS = [f for f in SUPPORTED_FORMATS if f[0] != "affine" or f[2] == 32] + [("affine", 4, 128)]


def decoded(triple, fmt):
    """mx.dequantize in float32, affine scales and biases widened first (the
    kernels decode in float32; see qsdpa_case.exact_scales)."""
    mode, bits, gs = fmt
    w, s, b = triple
    if mode == "turbo":
        return oracle.dequantize64(w, s, None, gs, bits, mode).astype(np.float32)
    with mx.stream(CPU):
        if b is not None:
            s, b = s.astype(F32), b.astype(F32)
        return np.array(mx.dequantize(w, s, b, group_size=gs, bits=bits, mode=mode, dtype=F32))


def assert_rows_close(got, want, eps, what):
    """|got - want| <= eps * (largest |value| of the row), row by row: the
    affine decode's scale * q + bias may cancel, so per-element relative
    errors are meaningless near zero."""
    row = np.maximum(np.abs(want).max(-1, keepdims=True), 1e-30)
    err = (np.abs(got - want) / row).max()
    assert err <= eps, f"{what}: off by {err:.3e} of the row's largest value"


EPS = {F32: 2.0**-20, F16: 2.0**-10, BF16: 2.0**-7}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fmt", KERNEL_FORMATS, ids=fmt_id)
def test_kernel_decodes_every_value_code(device, fmt, dtype):
    # Identity mask over R rows: query row i sees only key i, so out[i] is
    # the decoded value row i itself (softmax weight 1), for every head.
    mode, bits, gs = fmt
    rng = np.random.default_rng(bits * 7 + gs)
    H, R, D = 4, 64, 256 if mode == "mxfp8" else 128
    # float16 queries: scales narrowed so that every value fits float16 --
    # the output's, and the keys' too, which the CUDA tensor-core kernel
    # decodes into the query dtype as mx.dequantize into a float16 cache
    # would (the e8m0 scales up to 2^15 of the wide pool overflow it; data
    # quantized from float16 never has them).
    vq = crafted_cache(fmt, H, R, D, dtype, rng, narrow_scales=dtype == F16)
    kq = crafted_cache(fmt, H, R, D, dtype, rng, narrow_scales=dtype == F16)
    q = evaluated(mx.array(rng.normal(size=(1, H, R, D)).astype(np.float32)).astype(dtype, stream=CPU))
    mask = mx.array(np.eye(R, dtype=bool))
    out = quant_sdpa(q, *kq, *vq, scale=0.1, mask=mask, group_size=gs, bits=bits, mode=mode, stream=device)
    want = decoded(vq, fmt)
    assert np.isfinite(want).all()
    assert_rows_close(to_numpy(out, np.float32), want, EPS[dtype], f"{fmt_id(fmt)} values")


@pytest.mark.parametrize("fmt", KERNEL_FORMATS, ids=fmt_id)
def test_kernel_decodes_every_key_code(device, fmt):
    # One key per head: lse = scale * q . k (the softmax has one term), and
    # one-hot queries (query d picks element d) read the whole decoded key
    # row back through the lse.
    mode, bits, gs = fmt
    rng = np.random.default_rng(bits * 11 + gs)
    H, D = 16, 256 if mode == "mxfp8" else 128
    kq = crafted_cache(fmt, H, 1, D, F32, rng, narrow_scales=True)
    vq = crafted_cache(fmt, H, 1, D, F32, rng)
    with mx.stream(CPU):
        q = evaluated(mx.broadcast_to(mx.eye(D)[None, None], (1, H, D, D)))
    out, lse = quant_sdpa(q, *kq, *vq, scale=0.5, group_size=gs, bits=bits, mode=mode, return_lse=True, stream=device)
    k = decoded(kq, fmt)[0, :, 0, :]  # [H, D]
    got = np.array(lse)[0]  # [H, D]
    # The lse is precise to ~1e-7 absolute (ln of a sum that is 1 up to an ulp).
    bad = np.abs(got - 0.5 * k) > 1e-6 * np.abs(0.5 * k) + 2.5e-7
    assert not bad.any(), f"{fmt_id(fmt)}: keys decode to {got[bad][:8]}, MLX gives {(0.5 * k)[bad][:8]}"
    v = decoded(vq, fmt)[0, :, 0, :]
    assert_rows_close(np.array(out)[0], np.broadcast_to(v[:, None, :], (H, D, D)), EPS[F32], "values")
