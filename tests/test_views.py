"""Strided K/V (and query) views: results, and that the cache is read in
place rather than copied."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import quant_sdpa
import oracle
from qsdpa_case import CPU, DTYPES, F16, Case, assert_matches, check_case, dtype_id, fmt_id, run

VIEW_FORMATS = [
    ("affine", 4, 64), ("affine", 3, 32), ("affine", 6, 128), ("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16),
]  # fmt: skip


@pytest.mark.parametrize("Lq", [1, 8])
@pytest.mark.parametrize("layout", ["prefix", "seq_major", "seq_major_prefix"])
@pytest.mark.parametrize("fmt", VIEW_FORMATS, ids=fmt_id)
def test_cache_layouts(device, fmt, layout, Lq):
    c = Case(B=2, Hq=4, Hkv=2, Lq=Lq, Lk=300, D=128, fmt=fmt, layout=layout, mask="causal", seed=Lq)
    check_case(c, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_query_seq_major_layout(device, dtype):
    # mlx-lm hands queries over as [B, L, H, D] transposed to [B, H, L, D].
    check_case(Case(Hq=8, Hkv=2, Lq=7, Lk=90, D=64, dtype=dtype, q_layout="seq_major", seed=2), device)


def _cache(B, H, L, D, fmt, dtype=F16, seed=0):
    _, k, v = oracle.make_qkv(B, H, H, 1, L, D, dtype=dtype, seed=seed)
    mode, bits, gs = fmt
    return oracle.quantize(k, gs, bits, mode), oracle.quantize(v, gs, bits, mode)


def _view(triple, fn):
    """fn (a view) of each array of the triple, taken on the CPU like every input."""
    with mx.stream(CPU):
        return oracle.evaluated(tuple(None if a is None else fn(a) for a in triple))


@pytest.mark.parametrize(
    "name,fn",
    [
        ("window", lambda a: a[:, :, 5:205, :]),  # a sliding window: offset start
        ("heads_every_other", lambda a: a[:, ::2, :200, :]),  # strided head axis
        ("batch_slice", lambda a: a[1:3, :, :200, :]),  # batch offset
        ("reversed_heads", lambda a: a[:, ::-1, :200, :]),  # negative stride
    ],
)
def test_other_strided_views(device, name, fn):
    fmt = ("affine", 5, 32)
    kq, vq = _cache(3, 4, 260, 64, fmt, seed=3)
    kq, vq = _view(kq, fn), _view(vq, fn)
    B, Hkv, Lk = kq[0].shape[:3]
    c = Case(B=B, Hq=2 * Hkv, Hkv=Hkv, Lq=3, Lk=Lk, D=64, fmt=fmt, mask="causal", seed=3)
    q, _, _ = oracle.make_qkv(B, c.Hq, Hkv, 3, 1, 64, dtype=F16, seed=4)
    out, lse, ref, ref_lse = run(c, device, (q, kq, vq, "causal", None))
    assert_matches(c, out, lse, ref, ref_lse)


def test_keys_and_values_in_different_layouts(device):
    fmt = ("affine", 4, 64)
    c = Case(B=1, Hq=4, Hkv=2, Lq=2, Lk=120, D=64, fmt=fmt, seed=5)
    q, k, v = oracle.make_qkv(1, 4, 2, 2, 150, 64, dtype=F16, seed=5)
    kq = _view(oracle.quantize(k, 64, 4, "affine"), lambda a: a[..., :120, :])
    with mx.stream(CPU):
        vs = oracle.quantize(mx.contiguous(mx.swapaxes(v[:, :, :120], 1, 2)), 64, 4, "affine")
    vq = _view(vs, lambda a: mx.swapaxes(a, 1, 2))
    out, lse, ref, ref_lse = run(c, device, (q, kq, vq, None, None))
    assert_matches(c, out, lse, ref, ref_lse)


def _poison_tail(triple, Lk, mode):
    """The cache with every row past Lk made poisonous: NaN affine scales,
    e8m0 scale 0xff (inf) or e4m3 0x7f for the fp modes, so that any read of
    a row past the view that leaks into the result shows as NaN/inf."""
    w, s, b = triple
    tail = np.array(s)
    if mode == "affine":
        tail[..., Lk:, :] = np.nan
        b_np = np.array(b)
        b_np[..., Lk:, :] = np.nan
        b = mx.array(b_np).astype(b.dtype, stream=CPU)
        s = mx.array(tail).astype(s.dtype, stream=CPU)
    else:
        tail[..., Lk:, :] = 0xFF if mode != "nvfp4" else 0x7F
        s = mx.array(tail)
    mx.eval(s, *([b] if b is not None else []))
    return w, s, b


@pytest.mark.parametrize("fmt", [("affine", 4, 64), ("mxfp4", 4, 32), ("nvfp4", 4, 16)], ids=fmt_id)
@pytest.mark.parametrize("Lk", [1, 63, 100, 1000])
def test_rows_past_the_view_are_not_read(device, fmt, Lk):
    # Lk not a multiple of the key block: a kernel that pads blocks with the
    # rows after the view would read the poison.
    mode = fmt[0]
    kq, vq = _cache(1, 2, Lk + 70, 64, fmt, seed=Lk)
    kq = _view(_poison_tail(kq, Lk, mode), lambda a: a[..., :Lk, :])
    vq = _view(_poison_tail(vq, Lk, mode), lambda a: a[..., :Lk, :])
    c = Case(B=1, Hq=4, Hkv=2, Lq=3, Lk=Lk, D=64, fmt=fmt, seed=Lk)
    q, _, _ = oracle.make_qkv(1, 4, 2, 3, 1, 64, dtype=F16, seed=Lk + 1)
    out, lse, ref, ref_lse = run(c, device, (q, kq, vq, None, None))
    assert np.isfinite(ref).all()  # the oracle reads only the view
    assert_matches(c, out, lse, ref, ref_lse)


# --- no copy of the cache -------------------------------------------------


def _bytes_allocated_by(fn):
    """Peak memory the evaluation of fn() adds over what is live before it."""
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return max(0, mx.get_peak_memory() - before), out


@pytest.mark.parametrize("layout", ["prefix", "seq_major_prefix"])
def test_cache_view_is_not_copied(device, layout):
    # A 16K-row 8-bit cache (4 MiB of packed words per tensor); the op runs
    # on a 12000-row view of it and must allocate far less than the view.
    B, H, Lmax, D, Lk = 1, 2, 16384, 128, 12000
    fmt = ("affine", 8, 32)
    _, k, v = oracle.make_qkv(B, H, H, 1, Lmax, D, dtype=F16, seed=6)
    if layout == "prefix":
        kq, vq = oracle.quantize(k, 32, 8, "affine"), oracle.quantize(v, 32, 8, "affine")
        cut = lambda a: a[..., :Lk, :]
    else:
        with mx.stream(CPU):
            kq = oracle.quantize(mx.contiguous(mx.swapaxes(k, 1, 2)), 32, 8, "affine")
            vq = oracle.quantize(mx.contiguous(mx.swapaxes(v, 1, 2)), 32, 8, "affine")
        cut = lambda a: mx.swapaxes(a[:, :Lk], 1, 2)
    del k, v
    q, _, _ = oracle.make_qkv(B, 4, H, 1, 1, D, dtype=F16, seed=7)

    # Taking the views allocates nothing (MLX slices share the buffer), so
    # the op really receives strided inputs.
    views_bytes, (kv, vv) = _bytes_allocated_by(lambda: (_view(kq, cut), _view(vq, cut)))
    assert views_bytes < 64 * 1024
    view_bytes = kv[0].nbytes  # 12000 rows of packed words: ~3 MiB

    # The measurement sees a copy when there is one.
    copy_bytes, _ = _bytes_allocated_by(lambda: mx.contiguous(kv[0], stream=CPU))
    assert copy_bytes >= view_bytes

    op_bytes, out = _bytes_allocated_by(
        lambda: quant_sdpa(q, *kv, *vv, scale=D**-0.5, group_size=32, bits=8, stream=device)
    )
    assert op_bytes < view_bytes // 8, f"quant_sdpa allocated {op_bytes} bytes for a {view_bytes}-byte view"

    c = Case(B=B, Hq=4, Hkv=H, Lq=1, Lk=Lk, D=D, fmt=fmt, lse=False)
    out, _, ref, ref_lse = run(c, device, (q, kv, vv, None, None))
    assert_matches(c, out, None, ref, ref_lse)
