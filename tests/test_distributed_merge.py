"""merge_attention and the pieces of mlx_qsdpa.distributed, in one process.

A cache cut into chunks (2 to 4, a float tail next to a quantized body, the
shards of a causal mask): each chunk's quant_sdpa with its lse, merged by
merge_attention, equals the float64 oracle over the whole cache. The
sharded causal mask (key and query offsets) is checked for every format the
way sharded_quant_sdpa composes it, each shard's call in this process;
tests/test_distributed_launch.py runs it over real ranks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_qsdpa
from mlx_qsdpa import format_table, merge_attention, quant_sdpa
from mlx_qsdpa.distributed import _causal_shard, sharded_quant_sdpa
import oracle
from distributed_worker import format_args, shard_inputs
from qsdpa_case import BF16, F16, F32, Case, assert_matches, build, exact_scales, fmt_id, reference, scale_of

# One row per (mode, bits) of the format table, at its first group size.
TABLE_FORMATS = tuple((f.mode, f.bits, f.group_sizes[0]) for f in format_table())


def partial(c: Case, device, inputs, mask, sinks):
    """quant_sdpa of the case over the keys of ``inputs``: (out, lse)."""
    q, kq, vq = inputs[:3]
    return quant_sdpa(
        q, *kq, *vq, scale=scale_of(c), mask=mask, sinks=sinks, return_lse=True, stream=device, **format_args(c)
    )


def causal_columns(c: Case, a: int, b: int) -> mx.array:
    """Columns [a, b) of the case's whole causal mask (bottom-right), as bool."""
    rows = np.arange(c.Lq)[:, None] + c.Lk - c.Lq
    return mx.array(rows >= np.arange(a, b)[None, :])


def merged_chunks(c: Case, device, cuts, sink_chunk=0):
    """Keys cut at ``cuts``, each chunk attended with its columns of the
    case's mask; the sinks go to chunk ``sink_chunk`` only."""
    inputs = build(c)
    bounds = (0, *cuts, c.Lk)
    outs, lses = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        q, kq, vq, mask, sinks = shard_inputs(c, a, b, inputs)
        if mask == "causal":
            mask = causal_columns(c, a, b)
        out, lse = partial(c, device, (q, kq, vq), mask, sinks if i == sink_chunk else None)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention(outs, lses, return_lse=True, stream=device)
    mx.eval(out, lse)
    return inputs, out, lse


@pytest.mark.parametrize(
    "c,cuts",
    [
        (Case(Hq=8, Hkv=2, Lq=1, Lk=700, D=128, fmt=("affine", 4, 64), dtype=F16, sinks="f32", seed=1), (350,)),
        (Case(Hq=4, Hkv=2, Lq=6, Lk=500, D=64, fmt=("affine", 8, 32), dtype=BF16, mask="causal", seed=2), (100, 497)),
        (Case(Hq=4, Hkv=1, Lq=5, Lk=300, D=64, fmt=("mxfp4", 4, 32), dtype=F32, mask="causal", sinks="f32", seed=3),
         (1, 150, 298)),
        (Case(B=2, Hq=4, Hkv=2, Lq=3, Lk=400, D=64, fmt=("nvfp4", 4, 16), dtype=F16, mask="bool:B1QK", seed=4), (64, 128, 200)),
        (Case(Hq=4, Hkv=2, Lq=2, Lk=256, D=128, fmt=("turbo", 3, 64), vfmt=("affine", 4, 64), rotation="hadamard",
              dtype=F16, mask="f32:1HQK", sinks="f16", seed=5), (128,)),
    ],
    ids=lambda v: str(v) if isinstance(v, Case) else "cuts" + "-".join(map(str, v)),
)
def test_merge_of_chunks_matches_oracle(device, c, cuts):
    inputs, out, lse = merged_chunks(c, device, cuts, sink_chunk=len(cuts))  # sinks on the last chunk
    assert_matches(c, out, lse, *reference(c, *inputs))


def test_merge_equals_single_call(device):
    # The merge of chunks agrees with one quant_sdpa call over the whole
    # cache to float32 rounding (both are the oracle's within its tolerance;
    # this checks they are the same computation).
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=600, D=64, fmt=("affine", 4, 64), dtype=F32, mask="causal", sinks="f32", seed=6)
    inputs, out, lse = merged_chunks(c, device, (200, 400))
    whole_out, whole_lse = partial(c, device, inputs, "causal", inputs[4])
    np.testing.assert_allclose(np.array(out), np.array(whole_out), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.array(lse), np.array(whole_lse), rtol=1e-6, atol=1e-6)


def float_attention(q, k, v, scale, mask):
    """(out, lse) of float keys and values as plain MLX ops in float32: the
    partial result of a float tail. A row that sees none of its keys has
    lse -inf and a NaN output, which the merge must not read."""
    G = q.shape[1] // k.shape[1]
    k = mx.repeat(k.astype(F32), G, axis=1)
    v = mx.repeat(v.astype(F32), G, axis=1)
    s = (q.astype(F32) @ mx.swapaxes(k, -1, -2)) * scale
    s = mx.where(mask, s, -mx.inf)
    lse = mx.logsumexp(s, axis=-1)
    out = mx.exp(s - lse[..., None]) @ v
    return out.astype(q.dtype), lse


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
def test_float_tail_and_quantized_body(device, dtype):
    # The last keys kept in float (not yet quantized), the rest quantized:
    # the body through quant_sdpa (with the sinks), the tail through MLX ops,
    # merged; against the oracle over the dequantized body and the float tail.
    B, Hq, Hkv, Lq, Lk, D, tail = 1, 8, 2, 4, 330, 64, 2  # queries 0 and 1 see nothing of the tail
    q, k, v = oracle.make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=11)
    body = Lk - tail
    kq = oracle.quantize(k[..., :body, :], 64, 4, "affine")
    vq = oracle.quantize(v[..., :body, :], 64, 4, "affine")
    sinks = mx.array(np.random.default_rng(0).normal(size=Hq).astype(np.float32))
    scale = D**-0.5
    c = Case(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype, mask="causal")
    tri = causal_columns(c, 0, Lk)
    body_part = quant_sdpa(q, *kq, *vq, scale=scale, mask=tri[:, :body], sinks=sinks, return_lse=True, stream=device)
    with mx.stream(device):
        tail_part = float_attention(q, k[..., body:, :], v[..., body:, :], scale, tri[:, body:])
    assert np.isneginf(np.array(tail_part[1][..., :2])).all()
    out, lse = merge_attention([body_part[0], tail_part[0]], [body_part[1], tail_part[1]], return_lse=True, stream=device)
    assert out.dtype == dtype and lse.dtype == F32
    k64 = np.concatenate([oracle.dequantize64(*exact_scales(kq), 64, 4, "affine"), oracle.to_numpy(k[..., body:, :])], axis=2)
    v64 = np.concatenate([oracle.dequantize64(*exact_scales(vq), 64, 4, "affine"), oracle.to_numpy(v[..., body:, :])], axis=2)
    ref, ref_lse = oracle.attention64(oracle.to_numpy(q), k64, v64, scale, "causal", oracle.to_numpy(sinks))
    assert_matches(c, out, lse, ref, ref_lse)


# ---------------------------------------------------------------------------
# The merge's own rules
# ---------------------------------------------------------------------------


def _parts(lses, D=4, fill=1.0):
    """Partial outputs (each filled with ``fill * (i + 1)``) and lses of one row each."""
    outs = [mx.full((1, 1, len(l), D), fill * (i + 1), dtype=F32) for i, l in enumerate(lses)]
    return outs, [mx.array([[l]], dtype=F32) for l in lses]


def test_merge_rows_that_see_nothing_and_nan_rows():
    inf, nan = float("inf"), float("nan")
    # Per row (columns): a normal row, a row empty in part 0, a row empty
    # everywhere, a NaN row in part 1, a +inf lse in part 0.
    l0 = [0.0, -inf, -inf, 1.0, inf]
    l1 = [np.log(3.0), 2.0, -inf, nan, 0.0]
    outs, lses = _parts([l0, l1])
    # An empty part's output is not read, NaN included.
    outs[0] = mx.where(mx.array([False, True, True, False, False])[None, None, :, None], nan, outs[0])
    out, lse = merge_attention(outs, lses, return_lse=True)
    o, l = np.array(out)[0, 0, :, 0], np.array(lse)[0, 0]
    np.testing.assert_allclose(o[0], (1 * 1 + 3 * 2) / 4, rtol=1e-6)
    np.testing.assert_allclose(l[0], np.log(4.0), rtol=1e-6)
    assert o[1] == 2.0 and l[1] == 2.0  # part 1 alone
    assert o[2] == 0.0 and l[2] == -inf  # no part sees a key: zeros, -inf
    assert np.isnan(o[3]) and np.isnan(l[3])  # NaN in one part: the row is NaN
    assert np.isnan(o[4]) and np.isnan(l[4])  # +inf lse: NaN, as quant_sdpa's +inf score


def test_merge_keeps_the_dtype_and_reads_low_precision_lses():
    for dtype in (F16, BF16, F32):
        outs, lses = _parts([[0.5, 1.0], [0.25, -1.0]])
        outs = [o.astype(dtype) for o in outs]
        lses = [l.astype(F16) for l in lses]
        out, lse = merge_attention(outs, lses, return_lse=True)
        assert out.dtype == dtype and lse.dtype == F32
    one = _parts([[0.5]])
    assert mx.array_equal(merge_attention(*one), one[0][0])


@pytest.mark.parametrize(
    "outs,lses,err,match",
    [
        (mx.zeros((1, 2, 4)), [mx.zeros((1, 2))], TypeError, "outs must be a list or tuple"),
        ([mx.zeros((1, 2, 4))], mx.zeros((1, 2)), TypeError, "lses must be a list or tuple"),
        ([np.zeros((1, 2, 4))], [mx.zeros((1, 2))], TypeError, "outs must be a list or tuple of mx.array"),
        ([], [], ValueError, "at least one"),
        ([mx.zeros((1, 2, 4))] * 2, [mx.zeros((1, 2))], ValueError, "one lse per output"),
        ([mx.zeros((1, 2, 4), dtype=mx.int32)], [mx.zeros((1, 2))], TypeError, "outs must be float16"),
        ([mx.zeros((1, 2, 4)), mx.zeros((1, 2, 4), dtype=F16)], [mx.zeros((1, 2))] * 2, ValueError, "one shape and dtype"),
        ([mx.zeros((1, 2, 4))] * 2, [mx.zeros((1, 2)), mx.zeros((1, 3))], ValueError, r"lses\[1\] must have the shape"),
        ([mx.zeros((1, 2, 4))], [mx.zeros((1, 2), dtype=mx.int32)], TypeError, "lses must be float16"),
        ([mx.array(1.0)], [mx.array(1.0)], ValueError, "at least one dimension"),
    ],
)
def test_merge_argument_errors(outs, lses, err, match):
    with pytest.raises(err, match=match):
        merge_attention(outs, lses)


# ---------------------------------------------------------------------------
# Shards of a causal mask (sharded_quant_sdpa's local step)
# ---------------------------------------------------------------------------

# Keys cut so that the shards take each of _causal_shard's forms: all keys
# seen (no mask), the shard ending at the last query (quant_sdpa's causal),
# a shard ending among the queries (bool mask), keys past the last query
# (left out), an empty shard.
SHARD_CUTS = ((0, 120, 296, 300), (0, 0, 298, 300), (0, 297, 300, 300))


@pytest.mark.parametrize("fmt", TABLE_FORMATS, ids=fmt_id)
def test_causal_shards_every_format(device, fmt):
    c = Case(Hq=4, Hkv=2, Lq=5, Lk=300, D=128, fmt=fmt, dtype=F16, mask="causal", sinks="f32", seed=len(fmt_id(fmt)))
    inputs = build(c)
    ref = reference(c, *inputs)
    q0 = c.Lk - c.Lq
    for bounds in SHARD_CUTS:
        outs, lses = [], []
        for rank, (a, b) in enumerate(zip(bounds, bounds[1:])):
            q, kq, vq, _, sinks = shard_inputs(c, a, b, inputs)
            kq, vq, mask = _causal_shard(q, kq, vq, a, q0)
            out, lse = partial(c, device, (q, kq, vq), mask, sinks if rank == 0 else None)
            outs.append(out)
            lses.append(lse)
        out, lse = merge_attention(outs, lses, return_lse=True, stream=device)
        assert_matches(c, out, lse, *ref)


def test_causal_shard_forms():
    q = mx.zeros((1, 1, 4, 64))
    kq = (mx.zeros((1, 1, 10, 8), dtype=mx.uint32), mx.zeros((1, 1, 10, 1)), None)

    def form(k0, q0):
        ks, _, mask = _causal_shard(q, kq, kq, k0, q0)
        return ks[0].shape[2], mask if mask is None or isinstance(mask, str) else np.array(mask).tolist()

    assert form(0, 20) == (10, None)  # every key before the first query
    assert form(0, 6) == (10, "causal")  # the shard ends at the last query
    assert form(10, 6) == (0, None)  # every key after the last query
    assert form(0, 12) == (10, None)
    n, mask = form(0, 8)  # ends among the queries: keys 0..9, queries at 8..11
    assert n == 10 and [row.count(True) for row in mask] == [9, 10, 10, 10]
    n, mask = form(5, 2)  # keys 5..14, queries 2..5: keys 6.. never seen
    assert (n, mask) == (1, "causal")


def test_sharded_quant_sdpa_one_rank_is_quant_sdpa(device):
    # Without a launcher mx.distributed.init() is a group of one: the call
    # is quant_sdpa itself, bit for bit.
    c = Case(Hq=4, Hkv=2, Lq=4, Lk=200, D=64, mask="causal", sinks="f32", seed=9)
    q, kq, vq, _, sinks = build(c)
    group = mx.distributed.init()
    assert group.size() == 1
    got = sharded_quant_sdpa(
        q, *kq, *vq, scale=0.125, mask="causal", key_offset=0, query_offset=c.Lk - c.Lq, sinks=sinks,
        return_lse=True, stream=device,
    )
    want = quant_sdpa(q, *kq, *vq, scale=0.125, mask="causal", sinks=sinks, return_lse=True, stream=device)
    assert all(mx.array_equal(a, b) for a, b in zip(got, want))


def test_sharded_quant_sdpa_argument_errors():
    c = Case(Hq=4, Hkv=2, Lq=1, Lk=64, D=64)
    q, kq, vq, _, _ = build(c)
    with pytest.raises(ValueError, match="needs key_offset"):
        sharded_quant_sdpa(q, *kq, *vq, scale=0.1, mask="causal", query_offset=63)
    with pytest.raises(ValueError, match="needs query_offset"):
        sharded_quant_sdpa(q, *kq, *vq, scale=0.1, mask="causal", key_offset=0)
    with pytest.raises(TypeError, match="key_offset must be an int"):
        sharded_quant_sdpa(q, *kq, *vq, scale=0.1, mask="causal", key_offset=True, query_offset=63)
    with pytest.raises(ValueError, match="with mask='causal' only"):
        sharded_quant_sdpa(q, *kq, *vq, scale=0.1, key_offset=0, query_offset=63)
    with pytest.raises(TypeError, match="keys must be a 4-D mx.array"):
        sharded_quant_sdpa(q, kq[0][0], *kq[1:], *vq, scale=0.1, mask="causal", key_offset=0, query_offset=63)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bitz'"):
        sharded_quant_sdpa(q, *kq, *vq, scale=0.1, bitz=4)
    with pytest.raises(ValueError, match="lse must have the shape"):
        mlx_qsdpa.distributed.all_merge_attention(mx.zeros((1, 2, 3, 4)), mx.zeros((1, 2, 4)))
