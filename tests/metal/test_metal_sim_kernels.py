"""The Metal kernels (csrc/backends/metal/quant_sdpa.metal), executed by the simulator
through the host's dispatch plan, against the float64 oracle.

Each case is small (the simulator runs every GPU thread on the CPU); the
list covers every format (turbo included), keys and values of different
formats (MIXED_PAIRS: mode, bits and group size differ), every head dim, 1-pass and 2-pass (up to 64 key
blocks, and the automatic split of a long context), GQA factors 1-8, query
lengths 1-32 (and row counts beyond one threadgroup), each mask kind
(broadcast and fully masked rows included), sinks, LSE, strided K/V views
(prefix / offset of a longer cache, sequence-major layout), B > 1 and the
three query dtypes; and non-finite inputs (qsdpa_case.POISONS: NaN/inf
queries, NaN scales and mask entries, fully masked rows), whose rows the
oracle expects NaN or zero, 1-pass and through the merge kernel.

Schedules (the order of the simulated threads' turns, tests/metal/README.md):
every case runs in the default ascending order; the sweep of every format at
every head dim (every kernel, 1-pass and 2-pass) also in descending and a
seeded random order; each case of the feature list in one of the two as
well, alternately, which keeps the suite's time. The race detector is on
throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import mlx.core as mx
import numpy as np
import pytest

import oracle
import qsdpa_case
from metal_qsdpa_sim import FORMATS, HEAD_DIMS, broadcast, derived, head_dims, whole

F16, BF16, F32 = mx.float16, mx.bfloat16, mx.float32
DTYPE_NAMES = {F16: "f16", BF16: "bf16", F32: "f32"}

# The format of the head dim that only 16-element groups quantize (80).
FORMAT_D80 = next(f for f in FORMATS if 80 in head_dims(*f[:2]) and 80 % f[2] == 0)

# Keys and values in different formats (qsdpa_case.MIXED_FORMATS): the kernel
# is the keys' format's, the values' decoder is chosen by function constants.
MIXED_PAIRS = qsdpa_case.MIXED_FORMATS


@dataclass(frozen=True, eq=False)
class Case:
    B: int = 1
    Hq: int = 4
    Hkv: int = 2
    Lq: int = 1
    Lk: int = 64
    D: int = 64
    mode: str = "affine"
    bits: int = 4
    gs: int = 64
    vfmt: tuple | None = None  # the values' (mode, bits, gs); default: the keys' format
    dtype: object = F16  # queries and output
    # K/V before quantization (the affine scale dtype); default: dtype. Not
    # bfloat16 with other query dtypes: mx.dequantize (the oracle) rounds
    # bfloat16-scaled values to bfloat16 twice, the kernels decode in
    # float32, and the difference exceeds the float16/float32 tolerances.
    kv_dtype: object = None
    v_dtype: object = None  # V's own dtype before quantization; default: kv_dtype
    mask: str | None = None  # None, causal, bool, bool_bcast, bool_empty, additive, additive_bcast
    sinks: bool = False
    strided_sinks: bool = False  # sinks as every other element of a longer array
    lse: bool = True
    blocks: int = 0  # forced key blocks (0: the plan decides)
    cores: int = 16
    layout: str = "contiguous"  # K/V: contiguous, prefix, offset, seq_major
    q_layout: str = "contiguous"  # or transposed
    seed: int = 0
    poison: str | None = None  # a key of qsdpa_case.POISONS (contiguous layouts)

    def __str__(self):
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("dtype", "kv_dtype", "v_dtype"):
                if v is not f.default:
                    parts.append(f"{f.name}={DTYPE_NAMES[v]}")
            elif v != f.default:
                parts.append(f"{f.name}={v}")
        return ",".join(parts) or "default"


def _cases() -> list[Case]:
    cases = []
    # Every format (dtypes cycling, so affine scales come in all three).
    for i, (mode, bits, gs) in enumerate(FORMATS):
        cases.append(
            Case(
                mode=mode, bits=bits, gs=gs, D=128, Lq=2, Lk=72,
                dtype=(F16, BF16, F32)[i % 3],
                mask="causal" if i % 2 else None,
                sinks=i % 4 == 3,
                blocks=2 if i % 5 == 0 else 0,
            )
        )  # fmt: skip
    # Every head dim, 1-pass and 2-pass.
    for D, (mode, bits, gs) in [
        (64, ("affine", 4, 64)),
        (80, FORMAT_D80),
        (96, ("affine", 8, 32)),
        (128, ("mxfp8", 8, 32)),
        (256, ("affine", 3, 128)),
    ]:
        for blocks in (0, 3):
            cases.append(Case(D=D, mode=mode, bits=bits, gs=gs, Lk=80, Lq=2, blocks=blocks))
    # Keys and values of different formats, 1-pass and 2-pass, D = 128 and
    # 256, each query dtype (and so each float scale dtype).
    for i, (kfmt, vfmt) in enumerate(MIXED_PAIRS):
        for j, (D, blocks) in enumerate(((128, 0), (256, 2))):
            cases.append(
                Case(
                    mode=kfmt[0], bits=kfmt[1], gs=kfmt[2], vfmt=vfmt, D=D, Lq=1 + (i + j) % 3, Lk=70,
                    blocks=blocks, dtype=(F16, BF16, F32)[(i + j) % 3], mask=(None, "causal", "additive")[(i + j) % 3],
                    sinks=(i + j) % 2 == 1, seed=40 + i,
                )
            )  # fmt: skip
    # Mixed formats in a strided cache, and with different scale dtypes.
    cases.append(Case(mode="turbo", bits=3, gs=32, vfmt=("affine", 8, 64), layout="seq_major", Lq=2, Lk=50, blocks=3))
    cases.append(Case(mode="affine", bits=4, gs=32, vfmt=("turbo", 4, 128), layout="offset", D=128, Lq=2, Lk=50, dtype=BF16))
    cases.append(Case(mode="turbo", bits=4, gs=64, vfmt=("affine", 2, 64), dtype=F32, kv_dtype=F16, v_dtype=F32, Lq=2, Lk=60, blocks=2))
    # Query dtypes.
    for dtype in (F16, BF16, F32):
        for blocks in (0, 4):
            cases.append(Case(dtype=dtype, kv_dtype=F16, Lq=3, Lk=70, blocks=blocks, sinks=blocks > 0))
    # GQA factors 1..8.
    for G in range(1, 9):
        Hkv = 2 if G <= 4 else 1
        cases.append(Case(Hq=G * Hkv, Hkv=Hkv, Lq=1 + G % 3, Lk=64, blocks=2 if G % 2 == 0 else 0, mask="causal"))
    # Query lengths 1..32, and more rows than one threadgroup takes (32).
    for Lq in (1, 2, 5, 8, 13, 16, 31, 32):
        cases.append(Case(Hq=2, Hkv=1, Lq=Lq, Lk=max(Lq, 40), mask="causal" if Lq % 2 else "bool"))
    cases.append(Case(Hq=8, Hkv=1, Lq=32, Lk=48, mask="causal"))  # 256 rows: 8 row blocks
    cases.append(Case(Hq=12, Hkv=4, Lq=12, Lk=40, blocks=2, sinks=True))  # 36 rows: 2 row blocks
    # Masks, 1-pass and 2-pass, with and without sinks.
    for mask in ("causal", "bool", "bool_bcast", "additive", "additive_bcast"):
        for blocks in (0, 3):
            cases.append(Case(mask=mask, blocks=blocks, Lq=4, Lk=96, sinks=blocks == 3))
    # Rows that see no key: zeros and lse = -inf (or the sink alone).
    for sinks in (False, True):
        for blocks in (0, 2):
            cases.append(Case(mask="bool_empty", sinks=sinks, blocks=blocks, Lq=4, Lk=64))
            cases.append(Case(mask="causal", sinks=sinks, blocks=blocks, Lq=6, Lk=4, Hq=2, Hkv=1))
    # K/V as strided views of a larger cache, queries transposed.
    for layout in ("prefix", "offset", "seq_major"):
        for blocks in (0, 3):
            cases.append(Case(layout=layout, blocks=blocks, Lq=2, Lk=50, mode="affine", bits=6, gs=32, dtype=BF16))
    mode, bits, gs = FORMAT_D80
    cases.append(Case(layout="prefix", mode=mode, bits=bits, gs=gs, D=80, Lk=33, mask="causal", Lq=3))
    cases.append(Case(q_layout="transposed", Lq=3, Lk=40))
    # Batches.
    cases.append(Case(B=2, Lq=2, Lk=40, mask="additive"))
    cases.append(Case(B=3, Hq=6, Hkv=3, Lq=1, Lk=56, blocks=2, mask="bool", sinks=True, layout="prefix"))
    # Long context: the plan's own split (several blocks), and 64 blocks.
    cases.append(Case(Hq=2, Hkv=1, D=64, Lk=2048, mode="affine", bits=4, gs=64))
    cases.append(Case(Hq=4, Hkv=1, D=64, Lk=1024, blocks=64, mask="causal", Lq=2, mode="mxfp4", bits=4, gs=32))
    # K and V with different scale dtypes; sinks as a strided view.
    cases.append(Case(dtype=F32, kv_dtype=F32, v_dtype=F16, Lq=2, Lk=60, gs=32))
    cases.append(Case(dtype=F32, kv_dtype=F16, v_dtype=F32, Lq=2, Lk=60, blocks=2, sinks=True))
    cases.append(Case(sinks=True, strided_sinks=True, Lq=2, Lk=50, mask="causal"))
    cases.append(Case(sinks=True, strided_sinks=True, Lq=2, Lk=50, blocks=3))
    # Without lse.
    cases.append(Case(lse=False, Lq=2, Lk=50))
    cases.append(Case(lse=False, Lq=2, Lk=50, blocks=2, sinks=True))
    # Non-finite inputs: every poison, 1-pass and 2-pass (the merge kernel,
    # with sinks), decode and Lq = 3, the three query dtypes.
    for i, kind in enumerate(sorted(qsdpa_case.POISONS)):
        plain = "causal" if i % 2 else None
        mask = "additive" if kind.startswith("mask") else "bool" if kind.startswith("bool") else plain
        for blocks in (0, 3):
            cases.append(
                Case(
                    poison=kind, mask=mask, Lq=1 + 2 * (i % 2), Lk=96, blocks=blocks, sinks=blocks == 3,
                    dtype=(F16, BF16, F32)[i % 3], mode="affine", bits=(4, 8)[blocks // 3], gs=(64, 32)[blocks // 3],
                    seed=30 + i,
                )
            )  # fmt: skip
    return cases


CASES = _cases()


def scheduled(cases: list[Case], every_schedule: bool) -> list:
    """(case, schedule) parameters: each case ascending, then descending and
    random (every_schedule) or one of them (alternately); random seeded by
    the case's index."""
    params = []
    for i, c in enumerate(cases):
        others = ["descending", f"random:{i}"]
        for schedule in ["ascending", *(others if every_schedule else [others[i % 2]])]:
            params.append(pytest.param(c, schedule, id=str(c) if schedule == "ascending" else f"{c}@{schedule}"))
    return params


def _make_mask(c: Case):
    """(mask for the oracle, simulator View, simulator mask mode)."""
    shape = (c.B, c.Hq, c.Lq, c.Lk)
    rng = np.random.default_rng(c.seed + 7)
    if c.mask is None:
        return None, None, None
    if c.mask == "causal":
        return "causal", None, "causal"
    if c.mask in ("bool", "bool_bcast", "bool_empty"):
        mshape = (c.Lq, c.Lk) if c.mask == "bool_bcast" else shape
        m = rng.random(mshape) < 0.7
        if c.mask == "bool_empty":
            m[..., 1, :] = False  # query row 1 sees nothing, in every head
        return mx.array(m), broadcast(m, shape), "bool"
    mshape = (c.B, 1, c.Lq, c.Lk) if c.mask == "additive" else (1, 1, 1, c.Lk)
    m = (rng.standard_normal(mshape) * 2).astype(np.float32)
    m[rng.random(mshape) < 0.2] = -np.inf
    return mx.array(m), broadcast(m, shape), "additive"


def value_format(c: Case) -> tuple:
    return c.vfmt or (c.mode, c.bits, c.gs)


def _quantized_kv(c: Case, x: mx.array, dtype, fmt):
    """(oracle triple, simulator Views) of K or V, quantized to fmt (mode,
    bits, gs), in the case's layout."""
    mode, bits, gs = fmt
    x = x.astype(dtype)
    if c.layout == "seq_major":
        # The cache is stored [B, L, H, D]; the op gets its [B, H, L, D] transpose.
        stored = oracle.quantize(mx.swapaxes(x, 1, 2), gs, bits, mode)
        view = [None if a is None else mx.swapaxes(a, 1, 2) for a in stored]
        sim = tuple(None if a is None else derived(a, lambda n: np.swapaxes(n, 1, 2)) for a in stored)
        return tuple(view), sim
    full = oracle.quantize(x, gs, bits, mode)
    if c.layout == "contiguous":
        return full, tuple(None if a is None else whole(a) for a in full)
    start = 0 if c.layout == "prefix" else 9
    sl = (slice(None), slice(None), slice(start, start + c.Lk))
    view = tuple(None if a is None else a[sl] for a in full)
    sim = tuple(None if a is None else derived(a, lambda n: n[sl]) for a in full)
    return view, sim


# _make_mask's masks as qsdpa_case mask specs (their shapes).
SHARED_MASK = {None: None, "causal": "causal", "bool": "bool:BHQK", "bool_bcast": "bool:QK", "bool_empty": "bool:BHQK",
               "additive": "f32:B1QK", "additive_bcast": "f32:111K"}  # fmt: skip


def shared_case(c: Case) -> qsdpa_case.Case:
    """The case as a qsdpa_case.Case (its poison helpers' view of it)."""
    return qsdpa_case.Case(
        B=c.B, Hq=c.Hq, Hkv=c.Hkv, Lq=c.Lq, Lk=c.Lk, D=c.D, fmt=(c.mode, c.bits, c.gs), dtype=c.dtype,
        vfmt=c.vfmt, mask=SHARED_MASK[c.mask], sinks="f32" if c.sinks else None, lse=c.lse, seed=c.seed,
        poison=c.poison,
    )  # fmt: skip


def run_case(qsdpa_sim, c: Case):
    extra = 0 if c.layout in ("contiguous", "seq_major") else 24
    q, _, _ = oracle.make_qkv(c.B, c.Hq, c.Hkv, c.Lq, 1, c.D, dtype=c.dtype, seed=c.seed)
    _, k, v = oracle.make_qkv(c.B, c.Hq, c.Hkv, 1, c.Lk + extra, c.D, dtype=F32, seed=c.seed + 1)
    k_dtype = c.kv_dtype or c.dtype
    kq, k_sim = _quantized_kv(c, k, k_dtype, (c.mode, c.bits, c.gs))
    vq, v_sim = _quantized_kv(c, v, c.v_dtype or k_dtype, value_format(c))
    if c.q_layout == "transposed":
        # Stored [B, Lq, Hq, D], seen as [B, Hq, Lq, D].
        stored = mx.contiguous(mx.swapaxes(q, 1, 2))
        mx.eval(stored)
        q = mx.swapaxes(stored, 1, 2)
        q_sim = derived(stored, lambda n: np.swapaxes(n, 1, 2))
    else:
        q_sim = whole(q)
    mask_ref, mask_sim, mask_mode = _make_mask(c)
    sinks = sinks_sim = None
    if c.sinks:
        sinks_all = mx.random.normal((2 * c.Hq,), key=mx.random.key(c.seed + 3))
        if c.strided_sinks:
            sinks = sinks_all[1::2]
            sinks_sim = derived(sinks_all, lambda n: n[1::2])
        else:
            sinks = sinks_all[: c.Hq]
            sinks_sim = np.array(sinks)
    if c.poison:
        assert c.layout == "contiguous" and c.q_layout == "contiguous", "poison: contiguous inputs only"
        with mx.stream(oracle.CPU):
            q, kq, vq, mask_ref, _ = oracle.evaluated(*qsdpa_case.poisoned(shared_case(c), q, kq, vq, mask_ref, sinks))
        q_sim = whole(q)
        k_sim, v_sim = (tuple(None if a is None else whole(a) for a in t) for t in (kq, vq))
        if isinstance(mask_ref, mx.array):
            mask_sim = broadcast(np.array(mask_ref), (c.B, c.Hq, c.Lq, c.Lk))
    scale = c.D**-0.5

    out, lse, info = qsdpa_sim.run(
        q_sim, c.dtype, k_sim, v_sim,
        shape=(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D), scale=scale,
        group_size=c.gs, bits=c.bits, mode=c.mode, scale_dtype=kq[1].dtype,
        value_scale_dtype=vq[1].dtype, mask_mode=mask_mode, mask=mask_sim, sinks=sinks_sim,
        return_lse=c.lse, gpu_cores=c.cores, force_blocks=c.blocks, vfmt=c.vfmt,
    )  # fmt: skip
    ref, ref_lse = oracle.reference(q, kq, vq, scale, c.gs, c.bits, c.mode, mask=mask_ref, sinks=sinks, vfmt=c.vfmt)
    return out, lse, info, ref, ref_lse


@pytest.mark.parametrize("case,schedule", scheduled(CASES, every_schedule=False))
def test_kernel_matches_oracle(qsdpa_sim, case, schedule):
    with qsdpa_sim.lib.schedule(schedule):
        check_case(qsdpa_sim, case)


def check_case(qsdpa_sim, case):
    out, lse, info, ref, ref_lse = run_case(qsdpa_sim, case)
    blocks, _, launches = info
    if case.blocks:
        expected = min(case.blocks, case.Lk)
        assert blocks == -(-case.Lk // -(-case.Lk // expected)), info
    assert launches == (2 if blocks > 1 else 1), info
    # mx.dequantize rounds affine values to the scale dtype (see oracle):
    # the output is compared at the coarser of that and its own dtype.
    k_dtype = case.kv_dtype or case.dtype
    affine_dtypes = [d for m, d in ((case.mode, k_dtype), (value_format(case)[0], case.v_dtype or k_dtype)) if m == "affine"]
    cache_dtype = max(affine_dtypes, key=lambda d: oracle.RTOL[d]) if affine_dtypes else None
    tol_dtype = max((case.dtype, cache_dtype or F32), key=lambda d: oracle.RTOL[d])
    if case.poison:
        qsdpa_case.poison_premise(shared_case(case), ref, ref_lse)
        oracle.assert_close_nonfinite(mx.array(out), ref, tol_dtype, what=str(case))
    else:
        oracle.assert_close(mx.array(out), ref, tol_dtype, what=str(case))
    if case.lse:
        oracle.assert_lse_close(lse, ref_lse, what=str(case), dtype=cache_dtype)
    # A row that sees no key (and has no sink) is exactly zero, never NaN.
    empty = np.isneginf(ref_lse)
    if empty.any():
        assert np.all(out[empty] == 0.0)


def test_long_context_uses_many_blocks(qsdpa_sim):
    """The automatic plan splits a long single-head context into blocks."""
    c = Case(Hq=2, Hkv=1, D=64, Lk=2048)
    *_, info, _, _ = run_case(qsdpa_sim, c)
    assert info[0] == 2048 // 256, info  # kMinKeysPerBlock keys per block


def test_empty_key_range(qsdpa_sim):
    """Lk = 0: zeros and lse = -inf, or the sink's logit with sinks."""
    B, Hq, Hkv, Lq, D = 1, 2, 1, 3, 64
    q, _, _ = oracle.make_qkv(B, Hq, Hkv, Lq, 1, D)
    w = np.zeros((B, Hkv, 0, D * 4 // 32), np.uint32)
    s = np.zeros((B, Hkv, 0, D // 64), np.float16)
    views = tuple(whole(mx.array(a)) for a in (w, s, s))
    for sinks in (None, np.array([0.5, -1.0], np.float32)):
        out, lse, info = qsdpa_sim.run(
            whole(q), F16, views, views, shape=(B, Hq, Hkv, Lq, 0, D), scale=0.1,
            group_size=64, bits=4, mode="affine", scale_dtype=F16, sinks=sinks, return_lse=True,
        )  # fmt: skip
        assert np.all(out == 0.0)
        expected = np.full((B, Hq, Lq), -np.inf) if sinks is None else np.broadcast_to(sinks[None, :, None], (B, Hq, Lq))
        np.testing.assert_allclose(lse, expected, rtol=1e-6)


def _sweep() -> list[Case]:
    """Every format at every head dim it can quantize (D % group == 0)."""
    cases = []
    for i, (mode, bits, gs) in enumerate(FORMATS):
        for j, D in enumerate(HEAD_DIMS):
            if D % gs or D not in head_dims(mode, bits):
                continue
            cases.append(
                Case(
                    mode=mode, bits=bits, gs=gs, D=D, Hq=2, Hkv=1, Lq=1 + (i + j) % 3, Lk=33 + 7 * j,
                    dtype=(F16, BF16, F32)[(i + j) % 3], blocks=(0, 2)[(i + j) % 2],
                    mask=(None, "causal", "additive_bcast")[(i + 2 * j) % 3], seed=i + j,
                )
            )  # fmt: skip
    return cases


@pytest.mark.parametrize("case,schedule", scheduled(_sweep(), every_schedule=True))
def test_every_format_at_every_head_dim(qsdpa_sim, case, schedule):
    with qsdpa_sim.lib.schedule(schedule):
        check_case(qsdpa_sim, case)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("blocks", [0, 3])
def test_kv_words_are_read_once_per_kv_head(qsdpa_sim, bits, blocks):
    """GQA: the query heads of a group share each K/V load. The bytes the
    kernels load from K and V do not grow with G: every word is loaded once
    per 4-element decode step it holds (once at 8 bits, twice at 4)."""
    loads = {}
    for G in (1, 2, 4, 8):
        c = Case(Hq=2 * G, Hkv=2, Lq=1, Lk=96, D=128, bits=bits, gs=64, blocks=blocks)
        run_case(qsdpa_sim, c)
        loads[G] = (qsdpa_sim.bytes_read["keys"], qsdpa_sim.bytes_read["values"])
    assert len(set(loads.values())) == 1, loads
    words_bytes = 1 * 2 * 96 * (128 * bits // 32) * 4
    assert loads[1] == ((32 // bits // 4) * words_bytes,) * 2
