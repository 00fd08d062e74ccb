"""Gradients: with respect to the queries they match a float32 attention
over the dequantized cache written here with mx ops (and float64 finite
differences of the oracle); with respect to anything else they raise.

The inputs and the reference gradients are computed on the CPU stream
(see oracle.py); only quant_sdpa and its vjp/jvp run on the test device."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import quant_sdpa
import oracle
from qsdpa_case import CPU, F16, F32, Case, build, exact_scales, fmt_id

# Tolerance on float32 gradients (relative to the largest |reference|).
# quant_sdpa's vjp and jvp differentiate the dequantized attention written
# with MLX ops (csrc/primitive.cpp), so they go through MLX matmuls on the
# test device. On the CPU (and Metal) those are float32: 1e-4. On MLX's CUDA
# build float32 matmuls run in TF32, whose 10-bit mantissa rounds each
# operand to 2^-11 relative, so each product carries up to 2^-10 ~ 9.8e-4;
# the gradient chains three such matmuls (the recomputed scores, the product
# with V, the product with K), so 4 * 2^-10 ~ 3.9e-3. A wrong gradient is
# off by far more (order 1e-1 or worse).


def grad_rtol_f32(device):
    tf32 = device == mx.gpu and mx.cuda.is_available()
    return 4 * 2.0**-10 if tf32 else 1e-4

GRAD_FORMATS = [("affine", 4, 64), ("affine", 3, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)]


def mx_attention(q, k, v, scale, mask=None, sinks=None):
    """Plain float32 attention with mx ops (differentiable), k/v already
    dequantized [B, Hkv, Lk, D]; rows that see nothing give zeros."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = scale * (q.astype(F32) @ mx.swapaxes(k, -1, -2))
    if isinstance(mask, str):
        vis = (mx.arange(Lq)[:, None] + (Lk - Lq)) >= mx.arange(Lk)[None, :]
        s = mx.where(vis, s, -mx.inf)
    elif mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask.astype(F32)
    m = mx.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sk = sinks.astype(F32)[None, :, None, None]
        m = mx.maximum(m, sk)
    m = mx.stop_gradient(mx.where(mx.isinf(m), 0.0, m))
    p = mx.exp(s - m)
    l = p.sum(-1, keepdims=True)
    if sinks is not None:
        l = l + mx.exp(sk - m)
    safe = mx.where(l > 0, l, 1.0)
    o = mx.where(l > 0, (p @ v) / safe, 0.0)
    lse = mx.where(l > 0, mx.log(safe) + m, -mx.inf)  # log(0) kept out of the graph
    return o, lse[..., 0]


def _deq(triple, fmt):
    """The reference's K or V: mx.dequantize in float32, on the CPU."""
    mode, bits, gs = fmt
    with mx.stream(CPU):
        return mx.dequantize(*exact_scales(triple), group_size=gs, bits=bits, mode=mode, dtype=F32)


def _setup(c):
    q, kq, vq, mask, sinks = build(c)
    rng = np.random.default_rng(c.seed + 50)
    w_out = mx.array(rng.normal(size=(c.B, c.Hq, c.Lq, c.D)).astype(np.float32))
    w_lse = mx.array(rng.normal(size=(c.B, c.Hq, c.Lq)).astype(np.float32))
    return q, kq, vq, mask, sinks, w_out, w_lse


def _loss_fns(c, device, kq, vq, mask, sinks, w_out, w_lse, with_lse):
    mode, bits, gs = c.fmt
    scale = c.D**-0.5
    k, v = _deq(kq, c.fmt), _deq(vq, c.fmt)

    def ours(q):
        res = quant_sdpa(
            q, *kq, *vq, scale=scale, mask=mask, sinks=sinks, group_size=gs, bits=bits,
            mode=mode, return_lse=with_lse, stream=device,
        )  # fmt: skip
        out, lse = res if with_lse else (res, None)
        loss = (out.astype(F32) * w_out).sum()
        if with_lse:
            lse_ok = mx.where(mx.isinf(lse), 0.0, lse)
            loss = loss + (lse_ok * w_lse).sum()
        return loss

    def theirs(q):
        out, lse = mx_attention(q, k, v, scale, mask, sinks)
        loss = (out * w_out).sum()
        if with_lse:
            loss = loss + (mx.where(mx.isinf(lse), 0.0, lse) * w_lse).sum()
        return loss

    return ours, theirs


def _assert_grads_close(g, ref, rtol, what):
    g, ref = oracle.to_numpy(g), oracle.to_numpy(ref)
    assert np.isfinite(g).all(), f"{what}: non-finite gradient"
    err = np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err <= rtol, f"{what}: gradient relative error {err:.2e} > {rtol:.0e}"


GRAD_CASES = [
    Case(Hq=4, Hkv=2, Lq=1, Lk=70, D=64, dtype=F32, seed=1),
    Case(Hq=4, Hkv=2, Lq=5, Lk=70, D=64, dtype=F32, mask="causal", seed=2),
    Case(Hq=4, Hkv=1, Lq=6, Lk=3, D=64, dtype=F32, mask="causal", seed=3),  # Lq > Lk: empty rows
    Case(B=2, Hq=4, Hkv=2, Lq=4, Lk=50, D=64, dtype=F32, mask="bool:BHQK", seed=4),
    Case(Hq=6, Hkv=3, Lq=3, Lk=90, D=128, dtype=F32, mask="f32:QK", sinks="f32", seed=5),
    Case(Hq=4, Hkv=2, Lq=2, Lk=600, D=64, dtype=F32, sinks="f16", seed=6),
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("fmt", GRAD_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: str(c).split("-affine")[0] + ("-" + c.mask if c.mask else ""))
def test_grad_queries_matches_mx_attention(device, case, fmt, with_lse):
    c = case.replace(fmt=fmt) if case.D % fmt[2] == 0 else case
    q, kq, vq, mask, sinks, w_out, w_lse = _setup(c)
    ours, theirs = _loss_fns(c, device, kq, vq, mask, sinks, w_out, w_lse, with_lse)
    l1, g1 = mx.value_and_grad(ours)(q)
    with mx.stream(CPU):
        l2, g2 = mx.value_and_grad(theirs)(q)
    # The loss is the forward kernel's (float32 on every device).
    assert abs(l1.item() - l2.item()) <= 1e-4 * max(1.0, abs(l2.item()))
    _assert_grads_close(g1, g2, grad_rtol_f32(device), str(c))


def test_grad_queries_float16(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=80, D=64, dtype=F16, mask="causal", seed=7)
    q, kq, vq, mask, sinks, w_out, w_lse = _setup(c)
    ours, theirs = _loss_fns(c, device, kq, vq, mask, sinks, w_out, w_lse, False)
    g1 = mx.grad(ours)(q)
    with mx.stream(CPU):
        g2 = mx.grad(theirs)(q.astype(F32))
    assert g1.dtype == F16
    _assert_grads_close(g1, g2, 1e-2, str(c))


@pytest.mark.parametrize("mask", [None, "causal"])
def test_grad_queries_matches_float64_finite_differences(device, mask):
    # Directional derivatives of the float64 oracle along random directions.
    c = Case(Hq=2, Hkv=1, Lq=3, Lk=20, D=32, fmt=("affine", 4, 32), dtype=F32, mask=mask, seed=8)
    q, kq, vq, _, _, w_out, _ = _setup(c)
    ours, _ = _loss_fns(c, device, kq, vq, mask, None, w_out, None, False)
    g = np.array(mx.grad(ours)(q)).astype(np.float64)
    k = oracle.dequantize64(*exact_scales(kq), 32, 4, "affine")
    v = oracle.dequantize64(*exact_scales(vq), 32, 4, "affine")
    w = np.array(w_out).astype(np.float64)
    q64 = np.array(q).astype(np.float64)
    loss64 = lambda x: (oracle.attention64(x, k, v, c.D**-0.5, mask)[0] * w).sum()
    rng = np.random.default_rng(9)
    for _ in range(3):
        d = rng.normal(size=q64.shape)
        eps = 1e-4
        fd = (loss64(q64 + eps * d) - loss64(q64 - eps * d)) / (2 * eps)
        an = (g * d).sum()
        assert abs(fd - an) <= grad_rtol_f32(device) * max(1.0, abs(fd)), (fd, an)


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
def test_grad_of_fully_masked_rows_is_zero(device, with_lse):
    # Rows that see no key have a constant output (0) and lse (-inf): their
    # query gradient is 0, not NaN, also when the lse (with a zero cotangent
    # on those rows) is part of the loss.
    c = Case(Hq=2, Hkv=1, Lq=5, Lk=2, D=64, dtype=F32, mask="causal", seed=10)
    q, kq, vq, mask, sinks, w_out, w_lse = _setup(c)
    ours, _ = _loss_fns(c, device, kq, vq, mask, sinks, w_out, w_lse, with_lse)
    g = np.array(mx.grad(ours)(q))
    assert np.isfinite(g).all()
    assert np.all(g[:, :, :3] == 0.0)  # rows 0..2 see no key
    assert np.abs(g[:, :, 3:]).max() > 0


def test_jvp_queries(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=40, D=64, dtype=F32, mask="causal", sinks="f32", seed=11)
    q, kq, vq, mask, sinks, _, _ = _setup(c)
    t = mx.array(np.random.default_rng(11).normal(size=q.shape).astype(np.float32))
    mode, bits, gs = c.fmt
    opts = dict(scale=c.D**-0.5, mask=mask, sinks=sinks, group_size=gs, bits=bits, mode=mode, stream=device)
    f = lambda x: quant_sdpa(x, *kq, *vq, **opts)
    k, v = _deq(kq, c.fmt), _deq(vq, c.fmt)
    ref = lambda x: mx_attention(x, k, v, c.D**-0.5, mask, sinks)[0]
    (_,), (j1,) = mx.jvp(f, [q], [t])
    with mx.stream(CPU):
        (_,), (j2,) = mx.jvp(ref, [q], [t])
    _assert_grads_close(j1, j2, grad_rtol_f32(device), "jvp")


# --- what has no gradient -------------------------------------------------

NOT_DIFFERENTIABLE = ["keys", "key_scales", "key_biases", "values", "value_scales", "value_biases", "mask", "sinks"]


@pytest.mark.parametrize("name", NOT_DIFFERENTIABLE)
def test_grad_other_arguments_raise(device, name):
    c = Case(Hq=4, Hkv=2, Lq=2, Lk=30, D=64, dtype=F32, mask="f32:QK", sinks="f32", seed=12)
    q, kq, vq, mask, sinks, _, _ = _setup(c)
    args = dict(zip(["keys", "key_scales", "key_biases"], kq))
    args.update(zip(["values", "value_scales", "value_biases"], vq))
    args.update(mask=mask, sinks=sinks)

    def f(x):
        a = dict(args, **{name: x})
        out = quant_sdpa(
            q, a["keys"], a["key_scales"], a["key_biases"], a["values"], a["value_scales"],
            a["value_biases"], scale=0.125, mask=a["mask"], sinks=a["sinks"], stream=device,
        )  # fmt: skip
        return out.sum()

    with pytest.raises(ValueError, match=r"not differentiable with respect to the quantized keys/values"):
        mx.eval(mx.grad(f)(args[name]))


def test_vmap_raises(device):
    c = Case(Hq=4, Hkv=2, Lq=2, Lk=30, D=64, dtype=F32, seed=13)
    q, kq, vq, _, _ = build(c)
    f = lambda x: quant_sdpa(x, *kq, *vq, scale=0.125, stream=device)
    with pytest.raises(ValueError, match=r"vmap is not supported.*fold the mapped axis into the batch axis"):
        mx.eval(mx.vmap(f)(mx.stack([q, q], stream=CPU)))
