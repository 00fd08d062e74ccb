"""One oracle check of quant_sdpa, described by a `Case`.

The top-level test files describe what they cover as Cases (shapes,
format, dtype, mask, sinks, cache layout) and call `check_case`, which
builds seeded random inputs, runs the op on the test device and compares
the output (and the lse) with the float64 oracle of oracle.py. The inputs
(quantization, views, masks, sinks) and the reference are computed on the
CPU stream whatever the test device; only quant_sdpa runs on it.

Mask specs are strings:
  None, "causal",
  "bool:DIMS"          a random bool array (True = attend),
  "f16:DIMS" / "bf16:DIMS" / "f32:DIMS"
                       a random additive array of that dtype with some -inf,
where DIMS names the mask's axes with letters B, H (query heads), Q, K
or 1, e.g. "QK" is [Lq, Lk] and "B1QK" is [B, 1, Lq, Lk].

Layouts of the quantized K/V (words, scales and biases alike):
  "contiguous"        what mx.quantize returns,
  "prefix"            cache[..., :Lk, :] of a longer preallocated cache,
  "seq_major"         quantized as [B, Lk, Hkv, D], seen through transpose,
  "seq_major_prefix"  both: [B, Lmax, Hkv, D][:, :Lk] then transposed.

Non-finite inputs (`poison`, contiguous layouts only; see POISONS): one
element of the inputs is made NaN or infinite, or one row fully masked,
at a query row and key that the mask lets see each other (the test of a
kernel's NaN/inf handling, tests/test_nonfinite.py). The oracle then
expects NaN (or zero) rows, which assert_matches compares NaN-aware.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

import oracle
from mlx_qsdpa import format_table

# Views of the format table (formats.h, through the extension) that tests
# parametrize over: never a list typed again.
MODES = tuple(dict.fromkeys(f.mode for f in format_table()))
AFFINE_BITS = tuple(f.bits for f in format_table() if f.mode == "affine")
AFFINE_GROUP_SIZES = next(f.group_sizes for f in format_table() if f.mode == "affine")
# Keys' and values' formats that differ in mode, width, group size or all
# three: the pairs the backends' mixed-format tests run.
MIXED_FORMATS = (
    (("affine", 4, 64), ("affine", 2, 32)),
    (("affine", 8, 128), ("turbo", 3, 64)),
    (("mxfp4", 4, 32), ("nvfp4", 4, 16)),
    (("turbo", 4, 32), ("affine", 4, 64)),
    (("nvfp4", 4, 16), ("mxfp8", 8, 32)),
    (("turbo", 2, 128), ("turbo", 4, 32)),
    (("affine", 3, 32), ("mxfp4", 4, 32)),
    (("mxfp8", 8, 32), ("affine", 6, 128)),
)
# (mode, bits, group_size) of the formats whose scales are 8-bit codes (no biases).
SCALE_CODE_FORMATS = tuple((f.mode, f.bits, g) for f in format_table() if not f.float_scales for g in f.group_sizes)
from mlx_qsdpa import _ext, quant_sdpa

F16, BF16, F32 = mx.float16, mx.bfloat16, mx.float32
CPU = oracle.CPU
DTYPES = (F16, BF16, F32)
DTYPE_BY_NAME = {"f16": F16, "bf16": BF16, "f32": F32}
DTYPE_NAME = {F16: "f16", BF16: "bf16", F32: "f32"}

# Extra rows of the preallocated cache behind the "prefix" layouts: not a
# multiple of anything, and filled with data so that reading past Lk shows.
EXTRA_ROWS = 37


def fmt_id(fmt) -> str:
    mode, bits, gs = fmt
    if mode in ("affine", "turbo"):
        return f"{mode}{bits}g{gs}"
    return mode


def dtype_id(dtype) -> str:
    return DTYPE_NAME[dtype]


@dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 4
    Hkv: int = 2
    Lq: int = 3
    Lk: int = 100
    D: int = 128
    fmt: Tuple[str, int, int] = ("affine", 4, 64)
    dtype: mx.Dtype = F16
    mask: Optional[str] = None
    sinks: Optional[str] = None  # None or the sinks' dtype name
    lse: bool = True
    layout: str = "contiguous"
    q_layout: str = "contiguous"  # or "seq_major": [B, Lq, Hq, D] transposed
    scale: Optional[float] = None  # None: D ** -0.5
    seed: int = 0
    poison: Optional[str] = None  # a key of POISONS
    vfmt: Optional[Tuple[str, int, int]] = None  # the values' format; None: fmt
    rotation: Optional[str] = None  # None or "hadamard" (seed 0)


    def replace(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)

    def __str__(self) -> str:
        s = (
            f"B{self.B}-H{self.Hq}/{self.Hkv}-Lq{self.Lq}-Lk{self.Lk}-D{self.D}-"
            f"{fmt_id(self.fmt)}-{dtype_id(self.dtype)}"
        )
        if self.mask:
            s += f"-mask={self.mask}"
        if self.sinks:
            s += f"-sinks={self.sinks}"
        if self.layout != "contiguous":
            s += f"-{self.layout}"
        if self.q_layout != "contiguous":
            s += f"-q_{self.q_layout}"
        if self.scale is not None:
            s += f"-scale{self.scale:g}"
        if not self.lse:
            s += "-nolse"
        if self.poison:
            s += f"-{self.poison}"
        if self.vfmt:
            s += f"-v_{fmt_id(self.vfmt)}"
        if self.rotation:
            s += f"-{self.rotation}"
        return s + f"-s{self.seed}"


def mask_shape(dims: str, c: Case) -> Tuple[int, ...]:
    size = {"B": c.B, "H": c.Hq, "Q": c.Lq, "K": c.Lk, "1": 1}
    return tuple(size[d] for d in dims)


def make_mask(spec, c: Case, rng: np.random.Generator):
    """The mask argument for `spec` (see the module docstring)."""
    if spec is None or spec == "causal":
        return spec
    kind, dims = spec.split(":")
    shape = mask_shape(dims, c)
    if kind == "bool":
        return mx.array(rng.random(shape) < 0.75)
    vals = rng.normal(size=shape).astype(np.float32) * 1.5
    vals[rng.random(shape) < 0.15] = -np.inf
    return mx.array(vals).astype(DTYPE_BY_NAME[kind])


def value_fmt(c: Case):
    return c.vfmt or c.fmt


def quantized(x, c: Case, layout: str, fmt=None):
    """mx.quantize of x [B, H, L, D] (x may be longer than c.Lk along L for
    the prefix layouts) in `fmt` (default: the keys'), returned as views
    [B, H, c.Lk, *] in `layout`."""
    mode, bits, gs = fmt or c.fmt
    if layout in ("seq_major", "seq_major_prefix"):
        stored = mx.contiguous(mx.swapaxes(x, 1, 2))  # [B, L, H, D]
        triple = oracle.quantize(stored, gs, bits, mode, c.rotation)
        return tuple(
            None if a is None else mx.swapaxes(a[:, : c.Lk], 1, 2) for a in triple
        )
    triple = oracle.quantize(x, gs, bits, mode, c.rotation)
    return tuple(None if a is None else a[..., : c.Lk, :] for a in triple)


def build(c: Case):
    """Inputs of the case: (q, kq triple, vq triple, mask, sinks), made on the CPU."""
    with mx.stream(CPU):
        inputs = _build(c)
        if c.poison:
            inputs = poisoned(c, *inputs)
        return oracle.evaluated(*inputs)


def _build(c: Case):
    mode, bits, gs = c.fmt
    rows = c.Lk + (EXTRA_ROWS if c.layout.endswith("prefix") else 0)
    q, k, v = oracle.make_qkv(c.B, c.Hq, c.Hkv, c.Lq, rows, c.D, dtype=c.dtype, seed=c.seed)
    if c.q_layout == "seq_major":
        stored = mx.contiguous(mx.swapaxes(q, 1, 2))
        mx.eval(stored)
        q = mx.swapaxes(stored, 1, 2)
    kq = quantized(k, c, c.layout)
    vq = quantized(v, c, c.layout, value_fmt(c))
    rng = np.random.default_rng(1000 + c.seed)
    mask = make_mask(c.mask, c, rng)
    sinks = None
    if c.sinks:
        sinks = mx.array(rng.normal(size=(c.Hq,)).astype(np.float32) * 2.0)
        sinks = sinks.astype(DTYPE_BY_NAME[c.sinks])
    return q, kq, vq, mask, sinks


# What `poison` changes (see poisoned()): one query element (NaN, +inf,
# -inf), the first key/value scale of a key (NaN), one additive mask entry
# (NaN, +inf, -inf), or one whole row of the mask (additive -inf, bool
# False).
POISONS = {
    "q_nan": "a NaN query element",
    "q_inf": "a +inf query element",
    "q_ninf": "a -inf query element",
    "kscale_nan": "a NaN key scale",
    "vscale_nan": "a NaN value scale",
    "mask_nan": "a NaN additive mask entry",
    "mask_inf": "a +inf additive mask entry",
    "mask_ninf": "a -inf additive mask entry (the key weighs nothing)",
    "mask_ninf_row": "a row of additive -inf",
    "bool_row_empty": "a row of bool False",
}


def poison_site(c: Case):
    """(b, h, i, j): the batch, query head and position of the poisoned
    row and the key it sees the poison at. The last query position, the
    last kv head's last query head, and a key every query position sees
    under the causal mask, two thirds into the keys (a later split of
    the key range than the first)."""
    j = max(c.Lk - c.Lq, 0) * 2 // 3
    return c.B - 1, c.Hq - 1, c.Lq - 1, j


def _set(a: mx.array, index, value) -> mx.array:
    """A copy of `a` with a[index] = value (on the CPU)."""
    sel = np.zeros(a.shape, np.bool_)
    sel[index] = True
    return mx.where(mx.array(sel), mx.array(value, dtype=a.dtype), a)


def _mask_index(spec: str, c: Case, b, h, i, j):
    """The element of a mask of spec `spec` ("kind:DIMS") at (b, h, i, j)."""
    at = {"B": b, "H": h, "Q": i, "K": j, "1": 0}
    return tuple(at[d] for d in spec.split(":")[1])


def poisoned(c: Case, q, kq, vq, mask, sinks):
    """The case's inputs with its poison applied (see POISONS)."""
    assert c.poison in POISONS, c.poison
    assert c.layout == "contiguous" and c.q_layout == "contiguous", "poison: contiguous inputs only"
    b, h, i, j = poison_site(c)
    kind = c.poison
    G = c.Hq // c.Hkv
    kvh = h // G
    nan, inf = float("nan"), float("inf")
    if isinstance(mask, mx.array):
        # The poisoned key is visible to every row (a NaN value reaches
        # every row of its kv head, whose outputs then all hold NaN).
        col = np.zeros(mask.shape, np.bool_)
        if mask.shape[-1] == c.Lk:
            col[..., j] = True
            fill = True if mask.dtype == mx.bool_ else 0.0
            mask = mx.where(mx.array(col), mx.array(fill, dtype=mask.dtype), mask)
    if kind in ("q_nan", "q_inf", "q_ninf"):
        q = _set(q, (b, h, i, c.D // 3), {"q_nan": nan, "q_inf": inf, "q_ninf": -inf}[kind])
    elif kind in ("kscale_nan", "vscale_nan"):
        w, s, bi = kq if kind == "kscale_nan" else vq
        # fp modes: the scale code that decodes to NaN where there is one
        # (nvfp4's e4m3 0x7f; e8m0 has none: 0xff is +inf, as in MLX).
        s = _set(s, (b, kvh, j, 0), nan if s.dtype != mx.uint8 else (0x7F if c.fmt[0] == "nvfp4" else 0xFF))
        if kind == "kscale_nan":
            kq = (w, s, bi)
        else:
            vq = (w, s, bi)
    elif kind in ("mask_nan", "mask_inf", "mask_ninf", "mask_ninf_row"):
        assert isinstance(mask, mx.array) and mask.dtype != mx.bool_, f"{kind} needs an additive mask"
        if kind == "mask_ninf_row":
            at = _mask_index(c.mask, c, b, h, i, j)[:-1] + (slice(None),)
            mask = _set(mask, at, -inf)
        else:
            value = {"mask_nan": nan, "mask_inf": inf, "mask_ninf": -inf}[kind]
            mask = _set(mask, _mask_index(c.mask, c, b, h, i, j), value)
    elif kind == "bool_row_empty":
        assert isinstance(mask, mx.array) and mask.dtype == mx.bool_, f"{kind} needs a bool mask"
        at = _mask_index(c.mask, c, b, h, i, j)[:-1] + (slice(None),)
        mask = _set(mask, at, False)
    return q, kq, vq, mask, sinks


def emptied_row(c: Case, inputs, h: int = 0, i: int = 0):
    """The case's inputs with the bool mask's row (query head h, position i)
    all False, in every batch item: a row that sees no key, beside rows
    that see the poisoned key (c.mask: "bool:HQK" or "bool:BHQK")."""
    q, kq, vq, mask, sinks = inputs
    assert c.mask in ("bool:HQK", "bool:BHQK"), c.mask
    with mx.stream(CPU):
        m = np.array(mask)
        m[..., h, i, :] = False
        return oracle.evaluated(q, kq, vq, mx.array(m), sinks)


def poison_premise(c: Case, ref, ref_lse):
    """Asserts what the oracle must say for a poisoned case to test its
    poison: the poisoned row (b, h, i) NaN, or NaN columns of one group in
    the rows of the kv head, or an empty row; the other rows finite."""
    b, h, i, _ = poison_site(c)
    kind = c.poison
    row = ref[b, h, i]
    others = np.ones(ref.shape[:3], np.bool_)
    if kind in ("q_nan", "q_inf", "q_ninf", "mask_nan", "mask_inf"):
        assert np.isnan(row).all() and np.isnan(ref_lse[b, h, i]), kind
        if c.mask and c.poison.startswith("mask") and c.mask.split(":")[1] != "BHQK":
            return  # a broadcast mask poisons the same position of other heads too
        others[b, h, i] = False
        assert np.isfinite(ref[others]).all()
    elif kind == "kscale_nan":
        G = c.Hq // c.Hkv
        kvh = h // G
        assert np.isnan(ref[b, kvh * G : (kvh + 1) * G]).all(), kind  # every row of the kv head
        others[b, kvh * G : (kvh + 1) * G] = False
        assert np.isfinite(ref[others]).all()
    elif kind == "vscale_nan":
        G = c.Hq // c.Hkv
        kvh = h // G
        gs = c.fmt[2]
        rows = ref[b, kvh * G : (kvh + 1) * G]
        assert np.isnan(rows[..., :gs]).all() and np.isfinite(rows[..., gs:]).all(), kind
        assert np.isfinite(ref_lse).all()
    elif kind in ("mask_ninf_row", "bool_row_empty"):
        if c.sinks:
            assert (row == 0).all() and np.isfinite(ref_lse[b, h, i]), kind
        else:
            assert (row == 0).all() and np.isneginf(ref_lse[b, h, i]), kind
        assert np.isfinite(ref).all()
    elif kind == "mask_ninf":
        assert np.isfinite(ref).all() and not np.isnan(ref_lse).any()
    else:
        raise AssertionError(kind)


def scale_of(c: Case) -> float:
    return c.D**-0.5 if c.scale is None else c.scale


def run(c: Case, device, inputs=None, fallback: bool = False):
    """Runs the op; returns (out, lse or None, ref, ref_lse). fallback: the
    op through the GPU backends' dequantize fallback (dequantized_attention,
    which runs on any device) instead of the device's kernel."""
    q, kq, vq, mask, sinks = build(c) if inputs is None else inputs
    mode, bits, gs = c.fmt
    vmode, vbits, vgs = value_fmt(c)
    scale = scale_of(c)
    if fallback:
        _ext._set_dequantized_fallback(True)
    try:
        res = quant_sdpa(
            q, *kq, *vq, scale=scale, mask=mask, sinks=sinks,
            group_size=gs, bits=bits, mode=mode, return_lse=c.lse, stream=device,
            value_mode=vmode, value_bits=vbits, value_group_size=vgs, rotation=c.rotation,
        )  # fmt: skip
    finally:
        _ext._set_dequantized_fallback(False)
    out, lse = res if c.lse else (res, None)
    mx.eval(out, *([lse] if c.lse else []))
    ref, ref_lse = reference(c, q, kq, vq, mask, sinks)
    return out, lse, ref, ref_lse


def exact_scales(triple):
    """The affine triple with its scales and biases widened to float32, so
    that mx.dequantize computes scale * q + bias without rounding it to
    float16/bfloat16 (the kernels decode in float32; with large scores that
    rounding alone can exceed the float16 tolerance). The fp modes' uint8
    scales are left as they are."""
    w, s, b = triple
    if b is None:
        return triple
    return w, s.astype(F32), b.astype(F32)


def reference(c: Case, q, kq, vq, mask, sinks):
    """The float64 oracle of the case (computed on the CPU)."""
    mode, bits, gs = c.fmt
    with mx.stream(CPU):
        return oracle.reference(
            q, exact_scales(kq), exact_scales(vq), scale_of(c), gs, bits, mode, mask=mask, sinks=sinks,
            vfmt=value_fmt(c), rotation=c.rotation,
        )


def cache_dtype(c: Case):
    """mx.dequantize rounds affine values to the scales' dtype (that of the
    data quantized): the oracle is only that precise (see oracle.py). The
    CUDA tensor-core kernel decodes codebook (turbo) values into the cache's
    dtype as well. With a rotation the op rounds the rotated queries and the
    output before its rotation back to the queries' dtype."""
    float_scaled = ("affine", "turbo")
    if c.fmt[0] in float_scaled or value_fmt(c)[0] in float_scaled or c.rotation:
        return c.dtype
    return None


def tol_dtype(c: Case):
    cd = cache_dtype(c) or F32
    return max((c.dtype, cd), key=lambda d: oracle.RTOL[d])


def assert_matches(c: Case, out, lse, ref, ref_lse):
    assert out.shape == (c.B, c.Hq, c.Lq, c.D), (str(c), out.shape)
    assert out.dtype == c.dtype, (str(c), out.dtype)
    if np.isfinite(ref).all():
        oracle.assert_close(out, ref, tol_dtype(c), what=str(c))
    else:
        oracle.assert_close_nonfinite(out, ref, tol_dtype(c), what=str(c))
    empty = np.isneginf(ref_lse)
    if empty.any():
        # A row that sees no key (and has no sink) is exactly zero.
        o = oracle.to_numpy(out, np.float32)
        assert np.all(o[empty] == 0.0), f"{c}: fully masked rows are not zero"
    if lse is not None:
        assert lse.shape == (c.B, c.Hq, c.Lq) and lse.dtype == F32, (str(c), lse.shape, lse.dtype)
        oracle.assert_lse_close(lse, ref_lse, what=str(c), dtype=cache_dtype(c))


def check_case(c: Case, device, fallback: bool = False):
    out, lse, ref, ref_lse = run(c, device, fallback=fallback)
    assert_matches(c, out, lse, ref, ref_lse)
    return out, lse, ref, ref_lse
