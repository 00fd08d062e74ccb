"""The lse: attention over disjoint key ranges, merged through the lse of
each part, equals attention over all the keys."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import quant_sdpa
import oracle
from qsdpa_case import F16, F32, BF16, Case, build, fmt_id, reference

MERGE_FORMATS = [("affine", 4, 64), ("affine", 2, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]


def _call(c, device, q, kq, vq, mask=None, sinks=None):
    mode, bits, gs = c.fmt
    out, lse = quant_sdpa(
        q, *kq, *vq, scale=c.D**-0.5, mask=mask, sinks=sinks,
        group_size=gs, bits=bits, mode=mode, return_lse=True, stream=device,
    )  # fmt: skip
    mx.eval(out, lse)
    return oracle.to_numpy(out), np.array(lse).astype(np.float64)


def merge(parts):
    """Exact merge of (out, lse) pairs over disjoint key ranges."""
    lses = np.stack([l for _, l in parts])
    m = lses.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(lses - m)  # exp(-inf) = 0 for empty parts
    total = w.sum(axis=0)
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total[..., None] > 0, out / np.where(total > 0, total, 1.0)[..., None], 0.0)
        lse = np.log(total) + m
    return out, lse


def _split(triple, a, b):
    """Keys a..b of a cache triple (views taken on the CPU, like every input)."""
    with mx.stream(oracle.CPU):
        return oracle.evaluated(tuple(None if t is None else t[..., a:b, :] for t in triple))


@pytest.mark.parametrize("fmt", MERGE_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("cuts", [(1,), (64,), (500,), (137, 900), (1, 2, 3)])
def test_merge_of_key_ranges(device, fmt, cuts):
    c = Case(B=2, Hq=6, Hkv=2, Lq=5, Lk=1200, D=64, fmt=fmt, dtype=F32, seed=sum(cuts))
    q, kq, vq, _, _ = build(c)
    full = _call(c, device, q, kq, vq)
    bounds = (0,) + cuts + (c.Lk,)
    parts = [_call(c, device, q, _split(kq, a, b), _split(vq, a, b)) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge(parts)
    oracle.assert_close(mx.array(out.astype(np.float32)), full[0], F32, "merged vs full")
    oracle.assert_lse_close(lse, full[1], "merged lse vs full")
    # And the merge equals the oracle itself.
    ref, ref_lse = reference(c, q, kq, vq, None, None)
    oracle.assert_close(mx.array(out.astype(np.float32)), ref, F32, "merged vs oracle")
    oracle.assert_lse_close(lse, ref_lse, "merged lse vs oracle")


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
def test_merge_with_causal_mask_and_sinks(device, dtype):
    # The causal mask of the whole range, cut into bool masks per part; the
    # sink is included in exactly one part. A part where some rows see no
    # key (the later range for early queries) merges as empty there.
    c = Case(B=1, Hq=4, Hkv=1, Lq=40, Lk=300, D=64, dtype=dtype, seed=3)
    q, kq, vq, _, _ = build(c)
    sinks = mx.array([0.3, -2.0, 1.0, 4.0])
    tri = (np.arange(c.Lq)[:, None] + c.Lk - c.Lq) >= np.arange(c.Lk)[None, :]
    full = _call(c, device, q, kq, vq, "causal", sinks)
    cut = 280  # queries 0..19 see no key in [280, 300)
    p1 = _call(c, device, q, _split(kq, 0, cut), _split(vq, 0, cut), mx.array(tri[:, :cut]), sinks)
    p2 = _call(c, device, q, _split(kq, cut, c.Lk), _split(vq, cut, c.Lk), mx.array(tri[:, cut:]))
    assert np.isneginf(p2[1][..., :20]).all() and (p2[0][..., :20, :] == 0).all()
    out, lse = merge([p1, p2])
    tol = max((dtype, F32 if dtype == F32 else dtype), key=lambda d: oracle.RTOL[d])
    ref, ref_lse = reference(c.replace(mask="causal", sinks="f32"), q, kq, vq, "causal", sinks)
    oracle.assert_close(mx.array(out.astype(np.float32)), ref, tol, "merged vs oracle")
    oracle.assert_lse_close(lse, ref_lse, "merged lse vs oracle", dtype=dtype)
    oracle.assert_lse_close(lse, full[1], "merged lse vs full", dtype=dtype)
