"""The Python surface: the fast alias, the format list, defaults, keyword
arguments, streams, and mx.compile."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import mlx_qsdpa
from mlx_qsdpa import SUPPORTED_FORMATS, is_supported_format, quant_sdpa
import oracle
from qsdpa_case import F16, F32, Case, assert_matches, build, run
from qsdpa_case import MODES as TABLE_MODES


def test_fast_is_the_same_function(device):
    import mlx_qsdpa.fast

    assert mlx_qsdpa.fast.quant_sdpa is mlx_qsdpa.quant_sdpa
    c = Case(Hq=4, Hkv=2, Lq=2, Lk=40, D=64, dtype=F32, mask="causal", seed=1)
    q, kq, vq, _, _ = build(c)
    a = mlx_qsdpa.fast.quant_sdpa(q, *kq, *vq, scale=0.125, mask="causal", stream=device)
    b = quant_sdpa(q, *kq, *vq, scale=0.125, mask="causal", stream=device)
    assert np.array_equal(np.array(a), np.array(b))


def test_public_names():
    for name in mlx_qsdpa.__all__:
        assert hasattr(mlx_qsdpa, name), name
    assert isinstance(mlx_qsdpa.__version__, str) and mlx_qsdpa.__version__


@pytest.mark.parametrize(
    "kw",
    [dict(scale=np.float32(0.125)), dict(scale=np.float64(0.125)), dict(scale=np.float16(0.125)),
     dict(scale=np.int64(1)), dict(group_size=np.int64(64)), dict(group_size=np.int32(64)),
     dict(bits=np.int64(4)), dict(bits=np.uint8(4)), dict(mode=np.str_("affine")),
     dict(scale=np.float32(0.125), group_size=np.int64(64), bits=np.int64(4))],
    ids=lambda kw: ",".join(f"{k}={type(v).__name__}" for k, v in kw.items()),
)
def test_numpy_scalars_are_accepted(device, kw):
    # As MLX's own functions accept them (mx.quantize(group_size=np.int64(64))):
    # the same result as with Python scalars of the same value.
    c = Case(Hq=4, Hkv=2, Lq=2, Lk=40, D=64, seed=5)
    q, kq, vq, _, _ = build(c)
    args = {**dict(scale=0.125, group_size=64, bits=4, mode="affine"), **kw}
    want = quant_sdpa(q, *kq, *vq, **{k: v.item() if isinstance(v, np.generic) else v for k, v in args.items()},
                      stream=device)
    got = quant_sdpa(q, *kq, *vq, **args, stream=device)
    assert np.array_equal(np.array(got), np.array(want))


KNOWN_CPU_VARIANTS = {"x86-64-v2", "x86-64-v3", "x86-64-v4", "arm64-neon", "generic", "native"}


def test_cpu_variant_names_one_compiled_in():
    variant, variants = mlx_qsdpa.cpu_variant(), mlx_qsdpa.cpu_variants()
    assert all(isinstance(n, str) and isinstance(ok, bool) for n, ok in variants)
    # A variant it compiled in and this CPU runs.
    assert variant in KNOWN_CPU_VARIANTS
    assert {n for n, _ in variants} <= KNOWN_CPU_VARIANTS
    assert (variant, True) in variants


def test_cpu_variant_reads_the_extension(monkeypatch):
    from mlx_qsdpa import _api

    ext = type("Ext", (), {})()
    ext.cpu_variant = lambda: "x86-64-v3"
    ext.cpu_variants = lambda: [("generic", True), ("x86-64-v3", True), ("x86-64-v4", False)]
    monkeypatch.setattr(_api, "_ext", ext)
    assert mlx_qsdpa.cpu_variant() == "x86-64-v3"
    assert mlx_qsdpa.cpu_variants() == [("generic", True), ("x86-64-v3", True), ("x86-64-v4", False)]


MODES = [*TABLE_MODES, "int4", "", "AFFINE"]
BITS = list(range(0, 10)) + [16, -4]
GROUPS = [0, 8, 16, 32, 64, 128, 256, -32]


def test_is_supported_format_agrees_with_supported_formats():
    listed = set(SUPPORTED_FORMATS)
    assert len(listed) == len(SUPPORTED_FORMATS) == 24 + 9  # mx.quantize's, and turbo 2/3/4 x 3 group sizes
    for mode, bits, gs in itertools.product(MODES, BITS, GROUPS):
        assert is_supported_format(mode, bits, gs) == ((mode, bits, gs) in listed), (mode, bits, gs)


def test_supported_formats_are_what_mx_quantize_produces():
    # Every (mode, bits, group_size) mx.quantize accepts on this grid is
    # listed, and nothing else but the codebook mode of mlx_qsdpa.quantize.
    # MLX's CPU quantize is the definition (a GPU backend's may lack
    # kernels: MLX-CUDA 0.32.4 has no 1-bit one).
    x = mx.random.normal((1, 1, 4, 256), key=mx.random.key(0), stream=oracle.CPU)
    accepted = set()
    for mode, bits, gs in itertools.product(TABLE_MODES, range(1, 10), [8, 16, 32, 64, 128, 256]):
        try:
            mx.eval(mx.quantize(x, group_size=gs, bits=bits, mode=mode, stream=oracle.CPU))
        except (ValueError, RuntimeError):
            continue
        accepted.add((mode, bits, gs))
    assert accepted == {f for f in SUPPORTED_FORMATS if f[0] != "turbo"}


def test_defaults_are_affine_4bit_group_64(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=50, D=128, fmt=("affine", 4, 64), seed=2)
    q, kq, vq, _, _ = build(c)
    out = quant_sdpa(q, *kq, *vq, scale=c.D**-0.5, stream=device)
    assert not isinstance(out, tuple)
    _, _, ref, ref_lse = run(c.replace(lse=False), device, (q, kq, vq, None, None))
    assert_matches(c.replace(lse=False), out, None, ref, ref_lse)


def test_return_lse_gives_a_pair(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=50, D=64, seed=3)
    q, kq, vq, _, _ = build(c)
    res = quant_sdpa(q, *kq, *vq, scale=0.125, return_lse=True, stream=device)
    assert isinstance(res, tuple) and len(res) == 2
    assert res[0].shape == q.shape and res[1].shape == (1, 4, 3) and res[1].dtype == F32


def test_options_are_keyword_only(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=50, D=64, seed=4)
    q, kq, vq, _, _ = build(c)
    with pytest.raises(TypeError):
        quant_sdpa(q, *kq, *vq, 0.125)
    with pytest.raises(TypeError):
        quant_sdpa(q, *kq, *vq)  # scale is required


@pytest.mark.parametrize("kind", ["device", "stream", "default"])
def test_stream_argument(device, kind):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=50, D=64, dtype=F32, mask="causal", seed=5)
    inputs = build(c)
    q, kq, vq, _, _ = inputs
    stream = {"device": device, "stream": mx.default_stream(device), "default": None}[kind]
    out = quant_sdpa(q, *kq, *vq, scale=0.125, mask="causal", stream=stream)
    c1 = c.replace(scale=0.125, lse=False)
    _, _, ref, ref_lse = run(c1, device, (q, kq, vq, "causal", None))
    assert_matches(c1, out, None, ref, ref_lse)


# --- mx.compile -----------------------------------------------------------


def test_compile(device):
    c = Case(B=2, Hq=8, Hkv=2, Lq=4, Lk=200, D=64, dtype=F16, mask="f32:B1QK", sinks="f32", seed=6)
    mode, bits, gs = c.fmt

    def attend(q, kw, ks, kb, vw, vs, vb, mask, sinks):
        out, lse = quant_sdpa(
            q, kw, ks, kb, vw, vs, vb, scale=c.D**-0.5, mask=mask, sinks=sinks,
            group_size=gs, bits=bits, mode=mode, return_lse=True, stream=device,
        )  # fmt: skip
        return out * 2.0, lse

    compiled = mx.compile(attend)
    for seed in (6, 7):  # a second call with new data reuses the compiled graph
        cs = c.replace(seed=seed)
        q, kq, vq, mask, sinks = build(cs)
        eager = attend(q, *kq, *vq, mask, sinks)
        got = compiled(q, *kq, *vq, mask, sinks)
        assert np.array_equal(np.array(got[0]), np.array(eager[0]))
        assert np.array_equal(np.array(got[1]), np.array(eager[1]))
        _, _, ref, ref_lse = run(cs, device, (q, kq, vq, mask, sinks))
        assert_matches(cs, got[0] / 2.0, got[1], ref, ref_lse)


def test_compile_with_captured_cache_and_new_shapes(device):
    # The cache captured by the closure; the query length changes between
    # calls (a new trace).
    c = Case(Hq=4, Hkv=2, Lq=1, Lk=120, D=64, dtype=F32, mask="causal", seed=8)
    _, kq, vq, _, _ = build(c)
    f = mx.compile(lambda q: quant_sdpa(q, *kq, *vq, scale=0.125, mask="causal", stream=device))
    for Lq in (1, 5, 1):
        cq = c.replace(Lq=Lq, scale=0.125, lse=False)
        q, _, _ = oracle.make_qkv(1, 4, 2, Lq, 1, 64, dtype=F32, seed=Lq)
        out = f(q)
        _, _, ref, ref_lse = run(cq, device, (q, kq, vq, "causal", None))
        assert_matches(cq, out, None, ref, ref_lse)


def test_compile_of_the_gradient(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=60, D=64, dtype=F32, mask="causal", seed=9)
    q, kq, vq, _, _ = build(c)
    loss = lambda x: quant_sdpa(x, *kq, *vq, scale=0.125, mask="causal", stream=device).sum()
    g1 = mx.grad(loss)(q)
    g2 = mx.compile(mx.grad(loss))(q)
    assert np.allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-6)
