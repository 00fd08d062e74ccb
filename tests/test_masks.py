"""Masks: every kind and broadcast shape, and the fully masked row."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import quant_sdpa
from oracle import evaluated, to_numpy
from qsdpa_case import BF16, CPU, DTYPES, F16, F32, Case, assert_matches, build, check_case, dtype_id, run

# [Lq, Lk], [1, 1, Lq, Lk], [B, 1, Lq, Lk], [B, Hq, Lq, Lk], [Hq, 1, Lk], ...
MASK_DIMS = ["QK", "11QK", "B1QK", "BHQK", "HQK", "H1K", "1K", "K", "Q1", "B11K", "1H11", "BH1K", "1111", "1"]
BASE = Case(B=2, Hq=4, Hkv=2, Lq=5, Lk=70, D=64)


@pytest.mark.parametrize("dims", MASK_DIMS)
def test_bool_mask_shapes(device, dims):
    check_case(BASE.replace(mask=f"bool:{dims}", seed=len(dims)), device)


@pytest.mark.parametrize("kind", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("dims", ["QK", "B1QK", "BHQK", "H1K", "K"])
def test_additive_mask_shapes(device, dims, kind):
    # Random values with about 15% -inf entries.
    check_case(BASE.replace(mask=f"{kind}:{dims}", seed=len(dims)), device)


@pytest.mark.parametrize("kind", ["bool", "f16", "bf16", "f32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mask_dtype_with_query_dtype(device, dtype, kind):
    check_case(BASE.replace(dtype=dtype, mask=f"{kind}:QK", sinks="f32", seed=3), device)


@pytest.mark.parametrize("Lq,Lk", [(1, 50), (2, 50), (7, 7), (33, 40), (100, 1000), (12, 5), (70, 64)])
def test_causal(device, Lq, Lk):
    # Bottom-right aligned, including Lq > Lk (the first Lq - Lk rows see no key).
    check_case(Case(Hq=4, Hkv=1, Lq=Lq, Lk=Lk, D=64, mask="causal", seed=Lq + Lk), device)


def test_causal_equals_its_bool_mask(device):
    c = Case(Hq=4, Hkv=2, Lq=9, Lk=300, D=64, dtype=F32, seed=4)
    inputs = build(c)
    out_c, lse_c, _, _ = run(c.replace(mask="causal"), device, inputs[:3] + ("causal", None))
    tri = mx.array((np.arange(9)[:, None] + 300 - 9) >= np.arange(300)[None, :])
    out_b, lse_b, _, _ = run(c.replace(mask="bool:QK"), device, inputs[:3] + (tri, None))
    assert np.allclose(np.array(out_c), np.array(out_b), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.array(lse_c), np.array(lse_b), rtol=1e-6, atol=1e-6)


def test_causal_with_one_query_is_no_mask(device):
    c = Case(Hq=4, Hkv=2, Lq=1, Lk=200, D=64, dtype=F32, seed=5)
    inputs = build(c)
    out_c, _, _, _ = run(c, device, inputs[:3] + ("causal", None))
    out_n, _, _, _ = run(c, device, inputs[:3] + (None, None))
    assert np.allclose(np.array(out_c), np.array(out_n), rtol=1e-6, atol=1e-7)


def test_strided_and_broadcast_mask_arrays(device):
    # A mask that is itself a view: a slice of a wider mask, transposed, and
    # an mx.broadcast_to result.
    c = BASE.replace(dtype=F32, mask="bool:BHQK", seed=6)
    q, kq, vq, _, _ = build(c)
    rng = np.random.default_rng(6)
    wide = mx.array(rng.random((c.B, c.Hq, c.Lq, c.Lk + 13)) < 0.7)
    with mx.stream(CPU):  # the views are inputs: taken on the CPU
        masks = (
            wide[..., 5 : 5 + c.Lk],
            mx.swapaxes(mx.array(rng.random((c.B, c.Hq, c.Lk, c.Lq)) < 0.7), 2, 3),
            mx.broadcast_to(mx.array(rng.normal(size=(1, c.Hq, 1, c.Lk)).astype(np.float32)), (c.B, c.Hq, c.Lq, c.Lk)),
        )
        evaluated(*masks)
    for mask in masks:
        out, lse, ref, ref_lse = run(c, device, (q, kq, vq, mask, None))
        assert_matches(c, out, lse, ref, ref_lse)


def test_large_finite_negative_entries(device):
    # -1e4 entries exclude their keys without -inf; a whole row shifted by
    # -3000 keeps its softmax (the shift cancels).
    c = BASE.replace(dtype=F16, mask="f32:BHQK", seed=7)
    q, kq, vq, _, _ = build(c)
    rng = np.random.default_rng(7)
    m = np.where(rng.random((c.B, c.Hq, c.Lq, c.Lk)) < 0.5, -1e4, 0.0).astype(np.float32)
    m[:, :, 1, :] -= 3000.0
    out, lse, ref, ref_lse = run(c, device, (q, kq, vq, mx.array(m), None))
    assert_matches(c, out, lse, ref, ref_lse)


# --- the fully masked row -------------------------------------------------


def _lse_run(c, device, mask, sinks=None):
    q, kq, vq, _, _ = build(c)
    mode, bits, gs = c.fmt
    out, lse = quant_sdpa(
        q, *kq, *vq, scale=c.D**-0.5, mask=mask, sinks=sinks,
        group_size=gs, bits=bits, mode=mode, return_lse=True, stream=device,
    )  # fmt: skip
    mx.eval(out, lse)
    return (q, kq, vq), to_numpy(out, np.float32), np.array(lse)


def _empty_rows_bool(c):
    """A random bool mask [B, Hq, Lq, Lk] with some fully False rows: row 0
    of head 1, row 2 of every head, and all of batch item 1's last head."""
    rng = np.random.default_rng(c.seed)
    m = rng.random((c.B, c.Hq, c.Lq, c.Lk)) < 0.6
    m[:, 1, 0, :] = False
    m[:, :, 2, :] = False
    m[1, -1] = False
    return m


def _assert_empty_rows(out, lse, empty, sinks=None):
    assert np.isfinite(out).all(), "NaN or inf in the output"
    assert not np.isnan(lse).any(), "NaN in the lse"
    assert np.all(out[empty] == 0.0), "a fully masked row is not zero"
    if sinks is None:
        assert np.all(np.isneginf(lse[empty])), "a fully masked row's lse is not -inf"
        assert np.all(np.isfinite(lse[~empty])), "a row that sees keys has a non-finite lse"
    else:
        want = np.broadcast_to(np.array(sinks)[None, :, None], lse.shape)
        assert np.allclose(lse[empty], want[empty], rtol=0, atol=1e-6), "lse of a fully masked row is not the sink"


@pytest.mark.parametrize("Lk", [1, 70, 3000])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fully_masked_rows_bool(device, dtype, Lk):
    # Lk=3000 also makes the CPU kernel split the keys across threads, so
    # the merge of partial results that saw no key is exercised.
    c = Case(B=2, Hq=4, Hkv=2, Lq=4, Lk=Lk, D=64, dtype=dtype, mask="bool:BHQK", seed=Lk)
    m = _empty_rows_bool(c)
    (q, kq, vq), out, lse = _lse_run(c, device, mx.array(m))
    empty = ~m.any(-1)
    _assert_empty_rows(out, lse, empty)
    o2, l2, ref, ref_lse = run(c, device, (q, kq, vq, mx.array(m), None))
    assert_matches(c, o2, l2, ref, ref_lse)


@pytest.mark.parametrize("kind", ["f16", "bf16", "f32"])
def test_fully_masked_rows_additive(device, kind):
    c = Case(B=2, Hq=4, Hkv=2, Lq=4, Lk=300, D=64, mask=f"{kind}:BHQK", seed=8)
    m = _empty_rows_bool(c)
    rng = np.random.default_rng(8)
    add = np.where(m, rng.normal(size=m.shape), -np.inf).astype(np.float32)
    mask = evaluated(mx.array(add).astype({"f16": F16, "bf16": BF16, "f32": F32}[kind], stream=CPU))
    (q, kq, vq), out, lse = _lse_run(c, device, mask)
    _assert_empty_rows(out, lse, ~m.any(-1))
    o2, l2, ref, ref_lse = run(c, device, (q, kq, vq, mask, None))
    assert_matches(c, o2, l2, ref, ref_lse)


@pytest.mark.parametrize("Lq,Lk", [(6, 3), (40, 1), (700, 600)])
def test_fully_masked_rows_causal(device, Lq, Lk):
    c = Case(Hq=2, Hkv=1, Lq=Lq, Lk=Lk, D=64, mask="causal", seed=9)
    _, out, lse = _lse_run(c, device, "causal")
    empty = np.zeros((1, 2, Lq), bool)
    empty[:, :, : Lq - Lk] = True
    _assert_empty_rows(out, lse, empty)
    check_case(c, device)


def test_only_some_key_blocks_visible(device):
    # Only the first 10 and the last 3 of 3000 keys are visible: most key
    # blocks (and thread splits) see nothing and must merge as empty.
    c = Case(Hq=4, Hkv=2, Lq=2, Lk=3000, D=64, dtype=F32, mask="bool:K", seed=10)
    q, kq, vq, _, _ = build(c)
    m = np.zeros(3000, bool)
    m[:10] = True
    m[-3:] = True
    out, lse, ref, ref_lse = run(c, device, (q, kq, vq, mx.array(m), None))
    assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "causal"])
def test_fully_masked_rows_with_sinks(device, mask_kind):
    # With a sink, a row that sees no key gives all the mass to the sink's
    # zero value: out = 0 and lse = sink.
    c = Case(B=2, Hq=4, Hkv=2, Lq=4, Lk=70 if mask_kind != "causal" else 2, D=64, dtype=F32, seed=11)
    sinks = mx.array([0.5, -1.25, 2.0, 3.5])
    if mask_kind == "causal":
        mask, empty = "causal", np.zeros((2, 4, 4), bool)
        empty[:, :, :2] = True
    else:
        m = _empty_rows_bool(c)
        empty = ~m.any(-1)
        mask = mx.array(m) if mask_kind == "bool" else mx.array(np.where(m, 0.0, -np.inf).astype(np.float32))
    (q, kq, vq), out, lse = _lse_run(c, device, mask, sinks)
    _assert_empty_rows(out, lse, empty, sinks)
    cc = c.replace(mask="causal" if mask_kind == "causal" else "bool:BHQK", sinks="f32")
    o2, l2, ref, ref_lse = run(cc, device, (q, kq, vq, mask, sinks))
    assert_matches(cc, o2, l2, ref, ref_lse)
