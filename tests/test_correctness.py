"""quant_sdpa against the float64 oracle over the matrix of issue 2.

Each factor (format, head dim, GQA factor, Lq, Lk, dtype, batch, sinks,
scale) is swept with the others held at representative values; a seeded
random sweep then mixes all of them (masks and views included)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import SUPPORTED_FORMATS, quant_sdpa
import oracle
from qsdpa_case import (
    MODES, BF16, DTYPES, F16, F32, Case, build, check_case, dtype_id, fmt_id, run, assert_matches,
)

HEAD_DIMS = (64, 80, 96, 128, 256)
A4 = ("affine", 4, 64)


# --- every format x every dtype ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS, ids=fmt_id)
def test_format_and_dtype(device, fmt, dtype):
    c = Case(fmt=fmt, dtype=dtype, Lq=3, Lk=100, D=128, mask="causal", seed=1)
    q, kq, vq, _, _ = build(c)
    # The cache is quantized from data of the queries' dtype: affine and
    # turbo scales (and affine biases) carry that dtype, the fp modes'
    # scales are uint8 codes.
    assert kq[1].dtype == (dtype if fmt[0] in ("affine", "turbo") else mx.uint8)
    out, lse, ref, ref_lse = run(c, device, (q, kq, vq, "causal", None))
    assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("Lq", [33, 100])
@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS, ids=fmt_id)
def test_format_many_queries(device, fmt, Lq):
    # More than one block of query rows, GQA 4, a per-head bool mask.
    i = SUPPORTED_FORMATS.index(fmt)
    c = Case(Hq=8, Hkv=2, Lq=Lq, Lk=150, D=128, fmt=fmt, dtype=DTYPES[i % 3], mask="bool:HQK", seed=Lq + i)
    check_case(c, device)


# --- every format x every head dim it divides ----------------------------

FORMAT_DIMS = [(f, d) for f in SUPPORTED_FORMATS for d in HEAD_DIMS if d % f[2] == 0]


def test_format_dims_cover_every_head_dim():
    assert {d for _, d in FORMAT_DIMS} == set(HEAD_DIMS)
    assert [f for f, d in FORMAT_DIMS if d == 80] == [("nvfp4", 4, 16)]


@pytest.mark.parametrize(
    "i,fmt,D", [(i, f, d) for i, (f, d) in enumerate(FORMAT_DIMS)],
    ids=[f"{fmt_id(f)}-D{d}" for f, d in FORMAT_DIMS],
)  # fmt: skip
def test_format_and_head_dim(device, i, fmt, D):
    # Lq alternates between the single-query and the multi-query paths, the
    # dtype rotates.
    c = Case(fmt=fmt, D=D, Lq=1 if i % 2 == 0 else 5, Lk=70, dtype=DTYPES[i % 3], seed=i)
    check_case(c, device)


# --- GQA / MQA ------------------------------------------------------------

HEADS = [
    (1, 1), (2, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1),
    (4, 2), (6, 2), (16, 2), (6, 3), (12, 3), (8, 4), (32, 4), (16, 8),
]  # fmt: skip
HEAD_FORMATS = [A4, ("mxfp4", 4, 32), ("affine", 8, 32), ("nvfp4", 4, 16), ("affine", 3, 64)]


@pytest.mark.parametrize("Lq", [1, 6])
@pytest.mark.parametrize("Hq,Hkv", HEADS, ids=[f"{a}/{b}" for a, b in HEADS])
def test_gqa(device, Hq, Hkv, Lq):
    fmt = HEAD_FORMATS[(Hq + Hkv) % len(HEAD_FORMATS)]
    check_case(Case(Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=90, D=64, fmt=fmt, mask="causal", seed=Hq * 10 + Hkv), device)


# --- query lengths --------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "causal"])
@pytest.mark.parametrize("Lq", [1, 2, 7, 32, 33, 64, 65, 100])
def test_query_length(device, Lq, mask):
    check_case(Case(Hq=4, Hkv=1, Lq=Lq, Lk=130, D=64, mask=mask, dtype=F32, seed=Lq), device)


@pytest.mark.parametrize("Lq", [1, 7, 33, 100])
def test_query_length_equals_key_length_causal(device, Lq):
    # Prefill: the causal mask is the usual lower triangle.
    check_case(Case(Hq=2, Hkv=1, Lq=Lq, Lk=Lq, D=64, mask="causal", seed=Lq), device)


# --- key lengths ----------------------------------------------------------

KEY_LENGTHS = [1, 2, 3, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 2049, 4100]


@pytest.mark.parametrize("Lq", [1, 4])
@pytest.mark.parametrize("Lk", KEY_LENGTHS)
def test_key_length(device, Lk, Lq):
    fmt = (A4, ("mxfp8", 8, 32), ("affine", 2, 32))[Lk % 3]
    check_case(Case(Hq=4, Hkv=2, Lq=Lq, Lk=Lk, D=64, fmt=fmt, mask="causal" if Lq > 1 else None, seed=Lk), device)


def test_key_length_65536(device):
    # The long-context end of the matrix, kept cheap: 2 heads, D=64.
    c = Case(Hq=2, Hkv=1, Lq=2, Lk=65536, D=64, dtype=F16, mask="causal", sinks="f32", seed=65)
    check_case(c, device)


def test_key_length_65536_view(device):
    # A 65536-key prefix of a longer cache, one query, 8-bit fp keys.
    c = Case(Hq=2, Hkv=2, Lq=1, Lk=65536, D=64, fmt=("mxfp8", 8, 32), dtype=BF16, layout="prefix", seed=66)
    check_case(c, device)


# --- batch ----------------------------------------------------------------


@pytest.mark.parametrize(
    "B,mask,sinks",
    [(2, None, None), (2, "causal", "f32"), (3, "bool:B1QK", None), (3, "f32:BHQK", "f16"), (5, "bool:B11K", "bf16")],
)
def test_batch(device, B, mask, sinks):
    check_case(Case(B=B, Hq=4, Hkv=2, Lq=5, Lk=77, D=64, mask=mask, sinks=sinks, seed=B), device)


def test_batches_are_independent(device):
    # Item b of a batched call equals the call on batch item b alone.
    c = Case(B=3, Hq=4, Hkv=2, Lq=4, Lk=150, D=64, mask="causal", dtype=F32, seed=3)
    q, kq, vq, mask, sinks = build(c)
    full, _, _, _ = run(c, device, (q, kq, vq, mask, sinks))
    for b in range(c.B):
        one = c.replace(B=1)
        with mx.stream(oracle.CPU):  # the inputs: views of batch item b
            pick = lambda t: tuple(None if a is None else a[b : b + 1] for a in t)
            item = oracle.evaluated(q[b : b + 1], pick(kq), pick(vq), mask, sinks)
        out, _, ref, ref_lse = run(one, device, item)
        assert_matches(one, out, None, ref, ref_lse)
        alone = np.array(out).astype(np.float64)
        oracle.assert_close(full[b : b + 1], alone, F32, what=f"batch item {b}")


# --- sinks ----------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "causal", "bool:HQK", "f16:QK"])
@pytest.mark.parametrize("sinks", ["f16", "bf16", "f32"])
def test_sinks(device, sinks, mask):
    check_case(Case(Hq=6, Hkv=2, Lq=4, Lk=60, D=64, mask=mask, sinks=sinks, seed=7), device)


def _three_way(device, c, sinks):
    q, kq, vq, mask, _ = build(c)
    mode, bits, gs = c.fmt
    return quant_sdpa(
        q, *kq, *vq, scale=c.D**-0.5, mask=mask, sinks=sinks,
        group_size=gs, bits=bits, mode=mode, return_lse=True, stream=device,
    )  # fmt: skip


def test_sink_of_minus_inf_is_no_sink(device):
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=50, D=64, dtype=F32, mask="causal", seed=8)
    o0, l0 = _three_way(device, c, None)
    o1, l1 = _three_way(device, c, oracle.evaluated(mx.full((4,), -np.inf, stream=oracle.CPU)))
    assert np.array_equal(np.array(o0), np.array(o1))
    assert np.array_equal(np.array(l0), np.array(l1))


def test_dominant_sink(device):
    # A sink 40 nats above every score takes all the mass: out ~ 0, lse = sink.
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=50, D=64, dtype=F32, seed=9)
    sinks = mx.array([40.0, 41.0, 42.0, 43.0])
    o, l = _three_way(device, c, sinks)
    assert np.abs(np.array(o)).max() < 1e-12
    assert np.allclose(np.array(l), np.array(sinks)[None, :, None], atol=1e-5)


# --- scale ----------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 0.01, 1.0, 2.5, -0.3])
def test_scale(device, scale):
    # scale 0: the plain mean of the values; large scales: a peaked softmax.
    check_case(Case(Hq=4, Hkv=2, Lq=3, Lk=120, D=64, dtype=F32, mask="causal", scale=scale, seed=10), device)


# --- degenerate shapes ----------------------------------------------------


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk", [(1, 2, 1, 3, 0), (1, 2, 1, 0, 5), (0, 2, 1, 2, 5), (2, 0, 1, 2, 5)])
def test_empty_dimensions(device, B, Hq, Hkv, Lq, Lk):
    # No keys: every row is empty (zeros, lse = -inf); other empty axes: an
    # empty result of the right shape. The inputs are made and quantized on
    # the CPU (oracle.py); only quant_sdpa sees the zero-size arrays on the
    # test device.
    q, k, v = oracle.make_qkv(B, Hq, Hkv, Lq, Lk, 64, dtype=F32, seed=11)
    kq, vq = oracle.quantize(k, 64, 4, "affine"), oracle.quantize(v, 64, 4, "affine")
    out, lse = quant_sdpa(q, *kq, *vq, scale=0.125, return_lse=True, stream=device)
    mx.eval(out, lse)
    assert out.shape == (B, Hq, Lq, 64) and lse.shape == (B, Hq, Lq)
    assert np.all(np.array(out) == 0.0)
    assert np.all(np.isneginf(np.array(lse)))


# --- determinism ----------------------------------------------------------


def test_repeated_calls_are_bitwise_equal(device):
    # The key split across threads and its merge must not depend on timing.
    c = Case(Hq=8, Hkv=2, Lq=5, Lk=3000, D=128, dtype=F32, mask="causal", seed=12)
    inputs = build(c)
    o1, l1, _, _ = run(c, device, inputs)
    o2, l2, _, _ = run(c, device, inputs)
    assert np.array_equal(np.array(o1), np.array(o2))
    assert np.array_equal(np.array(l1), np.array(l2))


# --- seeded random sweep --------------------------------------------------

MASK_DIMS = ["QK", "11QK", "B1QK", "BHQK", "HQK", "H1K", "1K", "K", "Q1", "B11K", "1H11", "BH1K"]
LAYOUTS = ["contiguous", "prefix", "seq_major", "seq_major_prefix"]


def random_cases(n=60, seed=20260, long_keys=False):
    """n seeded random configurations; long_keys: Lk from 2000 to 40000
    (the CPU kernel then splits the keys across threads) with few heads."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        # A mode first (each as likely), then one of its formats.
        mode = MODES[rng.integers(len(MODES))]
        fmts = [f for f in SUPPORTED_FORMATS if f[0] == mode]
        fmt = fmts[rng.integers(len(fmts))]
        D = int(rng.choice([d for d in HEAD_DIMS if d % fmt[2] == 0]))
        Hkv = int(rng.choice([1, 2, 4]))
        Hq = Hkv * int(rng.integers(1, 9))
        B = int(rng.choice([1, 1, 2, 3]))
        Lq = int(rng.choice([1, 1, 2, 3, 7, 16, 32, 33, 64, 100]))
        Lk = int(np.exp(rng.uniform(0, np.log(5000))))
        if long_keys:
            Hkv, Hq, B = 1, int(rng.integers(1, 5)), 1
            Lq = int(rng.choice([1, 2, 5, 40]))
            Lk = int(np.exp(rng.uniform(np.log(2000), np.log(40000))))
        while B * Hq * Lq * Lk * D > 3e7:
            Lk = max(1, Lk // 2)
        kind = rng.choice(["none", "causal", "bool", "add"])
        mask = None
        if kind == "causal":
            mask = "causal"
        elif kind == "bool":
            mask = "bool:" + str(rng.choice(MASK_DIMS))
        elif kind == "add":
            mask = str(rng.choice(["f16", "bf16", "f32"])) + ":" + str(rng.choice(MASK_DIMS))
        # Values in another format now and then, and rotated caches.
        vfmt = None
        if rng.random() < 0.25:
            vfmts = [f for f in SUPPORTED_FORMATS if D % f[2] == 0]
            vfmt = vfmts[rng.integers(len(vfmts))]
        rotation = "hadamard" if rng.random() < 0.2 else None
        cases.append(
            Case(
                B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, fmt=fmt, vfmt=vfmt, rotation=rotation,
                dtype=DTYPES[rng.integers(3)], mask=mask,
                sinks=str(rng.choice(["f16", "bf16", "f32"])) if rng.random() < 0.3 else None,
                lse=bool(rng.random() < 0.6),
                layout=str(rng.choice(LAYOUTS)),
                q_layout="seq_major" if rng.random() < 0.2 else "contiguous",
                scale=None if rng.random() < 0.8 else float(rng.uniform(0.02, 1.0)),
                seed=(300 if long_keys else 100) + i,
            )  # fmt: skip
        )
    return cases


RANDOM_CASES = random_cases()


def test_random_sweep_covers_the_factors():
    # The sweep is not degenerate: it mixes every dtype, mode, layout and
    # mask kind, and both causal Lq > Lk and Lq > 32.
    cs = RANDOM_CASES
    assert {c.dtype for c in cs} == set(DTYPES)
    assert {c.fmt[0] for c in cs} == set(MODES)
    assert {c.layout for c in cs} == set(LAYOUTS)
    assert {(c.mask or "none").split(":")[0] for c in cs} >= {"none", "causal", "bool", "f16", "bf16", "f32"}
    assert any(c.mask == "causal" and c.Lq > c.Lk for c in cs)
    assert any(c.Lq > 32 for c in cs) and any(c.B > 1 for c in cs) and any(c.sinks for c in cs)
    assert any(c.vfmt and c.vfmt != c.fmt for c in cs) and any(c.rotation for c in cs)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[f"r{i:02d}-{c}" for i, c in enumerate(RANDOM_CASES)])
def test_random_sweep(device, case):
    check_case(case, device)


LONG_CASES = random_cases(12, seed=4242, long_keys=True)


@pytest.mark.parametrize("case", LONG_CASES, ids=[f"long{i:02d}-{c}" for i, c in enumerate(LONG_CASES)])
def test_random_long_keys(device, case):
    check_case(case, device)
