"""The correctness oracle shared by every backend's tests.

K and V are decoded with ``mx.dequantize`` (MLX's own definition of each
format) and attention is computed in float64 with NumPy. Nothing here uses
mlx_qsdpa's decoding, so a bug in it cannot hide in the reference. The
codebook mode "turbo" is this project's (mx.quantize has none): its codes
come from ``mlx_qsdpa.quantize`` (the data under test), and are decoded here
from the bit stream with a codebook this module computes itself (Lloyd's
iteration on the normal law, float64); the Hadamard rotation is rebuilt here
from its definition (SplitMix64 signs, Sylvester blocks).

Everything here runs on MLX's CPU stream, whatever the test device
(QSDPA_DEVICE, conftest.py): the test inputs (random data, ``mx.quantize``)
and the reference (``mx.dequantize``) must not depend on a GPU backend's own
quantize/dequantize (MLX-CUDA 0.32.4 has no 1-bit kernels and crashes on an
empty ``mx.quantize``). Only the op under test runs on the test device; it
takes the CPU-made arrays as they are (unified memory on Metal and CUDA).
"""

from __future__ import annotations

import numpy as np
import mlx.core as mx


# The stream of every input and reference computation (see the docstring).
CPU = mx.cpu


def make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=mx.float16, seed=0):
    """Random queries and float K/V (before quantization), evaluated."""
    with mx.stream(CPU):
        key = mx.random.key(seed)
        k1, k2, k3 = mx.random.split(key, 3)
        q = mx.random.normal((B, Hq, Lq, D), key=k1).astype(dtype)
        k = mx.random.normal((B, Hkv, Lk, D), key=k2).astype(dtype)
        v = mx.random.normal((B, Hkv, Lk, D), key=k3).astype(dtype)
        mx.eval(q, k, v)
    return q, k, v


def quantize(x, group_size, bits, mode, rotation=None):
    """mx.quantize on the CPU (mlx_qsdpa.quantize for "turbo" or a rotation),
    always returned as a (w, scales, biases-or-None) triple."""
    if mode == "turbo" or rotation is not None:
        import mlx_qsdpa

        out = mlx_qsdpa.quantize(x, group_size, bits, mode, rotation=rotation, stream=CPU)
    else:
        out = mx.quantize(x, group_size=group_size, bits=bits, mode=mode, stream=CPU)
    w, s = out[0], out[1]
    b = out[2] if mode == "affine" else None
    mx.eval(w, s, *( [b] if b is not None else []))
    return w, s, b


def gaussian_codebook(bits):
    """The Lloyd-Max levels of N(0, 1) with 2^bits levels, ascending (float64)."""
    from math import erf, exp, pi, sqrt

    n = 2**bits
    c = np.linspace(-2.0, 2.0, n)
    for _ in range(20000):
        t = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
        pdf = np.array([0.0 if np.isinf(x) else exp(-x * x / 2) / sqrt(2 * pi) for x in t])
        cdf = np.array([0.0 if x == -np.inf else 1.0 if x == np.inf else 0.5 * (1 + erf(x / sqrt(2))) for x in t])
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
        if np.max(np.abs(new - c)) < 1e-13:
            return new
        c = new
    return c


def unpack_codes(w, bits):
    """The codes of packed words [..., W] (little-endian bit stream: element i
    at bits [i*bits, (i+1)*bits)), as int64 [..., W * 32 / bits]."""
    words = np.array(w).astype(np.uint32)
    bytes_ = words.view(np.uint8).reshape(*words.shape[:-1], -1)
    bitstream = np.unpackbits(bytes_, axis=-1, bitorder="little")
    n = bitstream.shape[-1] // bits
    fields = bitstream[..., : n * bits].reshape(*bitstream.shape[:-1], n, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(-1)


def rotation64(D, seed):
    """The rotation of rotation="hadamard" (R, rows rotated as x @ R.T), float64."""
    mask = (1 << 64) - 1
    state = seed & 0xFFFFFFFF
    signs = np.empty(D)
    for j in range(D):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        signs[j] = -1.0 if z >> 63 else 1.0
    R = np.zeros((D, D))
    start, b = 0, 1 << 30
    while b:
        if D & b:
            H = np.array([[1.0]])
            while H.shape[0] < b:
                H = np.block([[H, H], [H, -H]])
            R[start : start + b, start : start + b] = H / np.sqrt(b)
            start += b
        b >>= 1
    return R * signs[None, :]


def dequantize64(w, s, b, group_size, bits, mode):
    """MLX's decoding of a quantized triple (on the CPU), as float64 NumPy;
    the "turbo" codebook's from the bit stream (see the module docstring)."""
    if mode == "turbo":
        codes = unpack_codes(w, bits)
        vals = gaussian_codebook(bits)[codes]
        scales = to_numpy(s)
        shape = vals.shape
        vals = vals.reshape(*shape[:-1], shape[-1] // group_size, group_size) * scales[..., None]
        return vals.reshape(shape)
    x = mx.dequantize(w, s, b, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32, stream=CPU)
    return np.array(x).astype(np.float64)


def evaluated(*trees):
    """Evaluates arrays made on the CPU stream (None and nested tuples are
    fine) before they go to the op on the test device, and returns them, so
    that the op never waits on pending CPU work of another stream."""
    mx.eval(*[t for t in trees if t is not None])
    return trees[0] if len(trees) == 1 else trees


def to_numpy(x, dtype=np.float64):
    """An mx array (any device, any float dtype) as NumPy, converted on the CPU."""
    if x.dtype == mx.bool_:
        return np.array(x)
    return np.array(x.astype(mx.float32, stream=CPU)).astype(dtype)


def attention64(q, k, v, scale, mask=None, sinks=None):
    """Float64 attention. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (NumPy float64).

    mask: None, "causal" (bottom-right aligned), or a NumPy bool (True =
    attend) / float (additive) array broadcastable to [B,Hq,Lq,Lk].
    Returns (out [B,Hq,Lq,D], lse [B,Hq,Lq]).

    Non-finite inputs follow MLX's own SDPA (mx.fast.scaled_dot_product_
    attention on the dequantized cache): a row whose scores (after the
    mask; the sink counts as one) hold a NaN or +inf is NaN in every
    output element and in lse. -inf scores (causal, bool False, additive
    -inf) weigh nothing; a row that sees no key (and has no sink) gives
    zeros and lse = -inf. NaN/inf in a value reaches the output through
    p @ v by IEEE arithmetic (only keys of weight > 0 are specified: a
    masked key's NaN value still meets its weight 0 here, as in MLX).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k = np.repeat(k, G, axis=1)
    v = np.repeat(v, G, axis=1)
    finite = bool(np.isfinite(q).all() and np.isfinite(k).all() and np.isfinite(v).all())
    with np.errstate(invalid="ignore", over="ignore"):
        # einsum's own loops where an operand is not finite: a BLAS kernel
        # may multiply padding zeros by an inf and make NaN of a finite
        # product sum.
        qk = q @ np.swapaxes(k, -1, -2) if finite else np.einsum("bhqd,bhkd->bhqk", q, k)
        s = scale * qk
    if isinstance(mask, str):
        assert mask == "causal"
        vis = (np.arange(Lq)[:, None] + (Lk - Lq)) >= np.arange(Lk)[None, :]
        s = np.where(vis, s, -np.inf)
    elif mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            s = np.where(mask, s, -np.inf)
        else:
            with np.errstate(invalid="ignore"):
                s = s + mask.astype(np.float64)
    s = np.broadcast_to(s, (B, Hq, Lq, Lk))
    bad = (np.isnan(s) | (s == np.inf)).any(axis=-1)
    sk = None
    if sinks is not None:
        sk = np.asarray(sinks, dtype=np.float64)[None, :, None, None]
        bad = bad | (np.isnan(sk) | (sk == np.inf))[..., 0]
    s = np.where(bad[..., None], -np.inf, s)  # poisoned rows: NaN below
    m = s.max(axis=-1, keepdims=True) if Lk > 0 else np.full((B, Hq, Lq, 1), -np.inf)
    if sk is not None:
        m = np.maximum(m, np.where(bad[..., None], -np.inf, sk))
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    if sk is not None:
        l = l + np.where(bad[..., None], 0.0, np.exp(sk - m))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        pv = p @ v if finite else np.einsum("bhqk,bhkd->bhqd", p, v)
        o = np.where(l > 0, pv / np.where(l > 0, l, 1.0), 0.0)
        lse = (np.log(l) + m)[..., 0]
    o = np.where(bad[..., None], np.nan, o)
    lse = np.where(bad, np.nan, lse)
    return o, lse


def reference(q, kq, vq, scale, group_size, bits, mode, mask=None, sinks=None, vfmt=None, rotation=None):
    """The oracle for quant_sdpa's inputs: mx arrays in, float64 NumPy out.
    vfmt: the values' (mode, bits, group_size) where they differ from the
    keys'; rotation: "hadamard" (seed 0) where K and V were rotated before
    quantization. Attention then runs in the rotated space, as the op's
    contract says: the queries rotated and rounded to their dtype, the
    output rotated back (its rounding before that is the tolerance's)."""
    vmode, vbits, vgs = vfmt if vfmt is not None else (mode, bits, group_size)
    k = dequantize64(*kq, group_size, bits, mode)
    v = dequantize64(*vq, vgs, vbits, vmode)
    qn = to_numpy(q)
    R = None
    if rotation is not None:
        R = rotation64(k.shape[-1], 0)
        q_rot = np.nan_to_num(qn, nan=0.0, posinf=0.0, neginf=0.0) @ R.T
        rounded = mx.array(q_rot.astype(np.float32)).astype(q.dtype, stream=CPU)
        # A non-finite query element poisons every rotated element.
        bad = ~np.isfinite(qn).all(-1, keepdims=True)
        qn = np.where(bad, np.nan, to_numpy(rounded))
    if isinstance(mask, mx.array):
        mask = to_numpy(mask, np.float32)
    sk = None if sinks is None else to_numpy(sinks)
    out, lse = attention64(qn, k, v, scale, mask, sk)
    if R is not None:
        with np.errstate(invalid="ignore"):
            out = out @ R
    return out, lse


# Relative tolerance on max|out - ref| / max|ref| by output dtype: float32
# accumulation lands far below these; the output rounding dominates.
RTOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def assert_close(out, ref, dtype, what=""):
    out = to_numpy(out)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), f"{what}: non-finite output"
    scale = max(np.abs(ref).max(), 1e-6)
    err = np.abs(out - ref).max() / scale
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.1e}"


def assert_close_nonfinite(out, ref, dtype, what=""):
    """assert_close for a reference with non-finite elements (NaN rows,
    NaN/inf columns of a value): NaN exactly where the reference is NaN,
    the same infinity where it is infinite, and the finite elements within
    assert_close's tolerance of the largest finite |reference|."""
    out = to_numpy(out)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    nan_ref, nan_out = np.isnan(ref), np.isnan(out)
    assert np.array_equal(nan_out, nan_ref), (
        f"{what}: NaN at {_where(nan_out & ~nan_ref)} (not in the reference), "
        f"missing at {_where(nan_ref & ~nan_out)}"
    )
    inf_ref = np.isinf(ref)
    assert np.array_equal(np.isinf(out), inf_ref), f"{what}: infinite elements differ"
    assert np.array_equal(out[inf_ref], ref[inf_ref]), f"{what}: infinities of the wrong sign"
    fin = np.isfinite(ref)
    if fin.any():
        scale = max(np.abs(ref[fin]).max(), 1e-6)
        err = np.abs(out[fin] - ref[fin]).max() / scale
        assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.1e}"


def _where(mask, n=6):
    """The first few indices where mask is set, for messages."""
    idx = np.argwhere(mask)
    return f"{len(idx)} elements {idx[:n].tolist()}" if len(idx) else "none"


def assert_lse_close(lse, ref_lse, what="", dtype=None):
    """lse against the oracle's. `dtype` is the cache's dtype (that of its
    scales; the queries' for affine caches): mx.dequantize rounds decoded
    values to it (even with dtype=float32), while the kernels decode in
    float32, so scores, and the lse, may differ at that dtype's precision.
    -inf (rows that see no key) and NaN (rows with a NaN or +inf score)
    must be exactly where the reference has them."""
    lse = np.array(lse).astype(np.float64)
    assert lse.shape == ref_lse.shape
    inf_ref = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), inf_ref), f"{what}: -inf rows differ"
    nan_ref = np.isnan(ref_lse)
    assert np.array_equal(np.isnan(lse), nan_ref), (
        f"{what}: NaN lse at {_where(np.isnan(lse) & ~nan_ref)} (not in the reference), "
        f"missing at {_where(nan_ref & ~np.isnan(lse))}"
    )
    fin = ~inf_ref & ~nan_ref
    if fin.any():
        rel = 1e-4 if dtype is None or dtype == mx.float32 else RTOL[dtype]
        err = np.abs(lse[fin] - ref_lse[fin]).max()
        tol = rel * max(1.0, np.abs(ref_lse[fin]).max())
        assert err <= tol, f"{what}: lse error {err:.3e} > {tol:.1e}"
