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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

import oracle
from mlx_qsdpa import quant_sdpa

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
    return f"affine{bits}g{gs}" if mode == "affine" else mode


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


def quantized(x, c: Case, layout: str):
    """mx.quantize of x [B, H, L, D] (x may be longer than c.Lk along L for
    the prefix layouts), returned as views [B, H, c.Lk, *] in `layout`."""
    mode, bits, gs = c.fmt
    if layout in ("seq_major", "seq_major_prefix"):
        stored = mx.contiguous(mx.swapaxes(x, 1, 2))  # [B, L, H, D]
        triple = oracle.quantize(stored, gs, bits, mode)
        return tuple(
            None if a is None else mx.swapaxes(a[:, : c.Lk], 1, 2) for a in triple
        )
    triple = oracle.quantize(x, gs, bits, mode)
    return tuple(None if a is None else a[..., : c.Lk, :] for a in triple)


def build(c: Case):
    """Inputs of the case: (q, kq triple, vq triple, mask, sinks), made on the CPU."""
    with mx.stream(CPU):
        return oracle.evaluated(*_build(c))


def _build(c: Case):
    mode, bits, gs = c.fmt
    rows = c.Lk + (EXTRA_ROWS if c.layout.endswith("prefix") else 0)
    q, k, v = oracle.make_qkv(c.B, c.Hq, c.Hkv, c.Lq, rows, c.D, dtype=c.dtype, seed=c.seed)
    if c.q_layout == "seq_major":
        stored = mx.contiguous(mx.swapaxes(q, 1, 2))
        mx.eval(stored)
        q = mx.swapaxes(stored, 1, 2)
    kq = quantized(k, c, c.layout)
    vq = quantized(v, c, c.layout)
    rng = np.random.default_rng(1000 + c.seed)
    mask = make_mask(c.mask, c, rng)
    sinks = None
    if c.sinks:
        sinks = mx.array(rng.normal(size=(c.Hq,)).astype(np.float32) * 2.0)
        sinks = sinks.astype(DTYPE_BY_NAME[c.sinks])
    return q, kq, vq, mask, sinks


def scale_of(c: Case) -> float:
    return c.D**-0.5 if c.scale is None else c.scale


def run(c: Case, device, inputs=None):
    """Runs the op; returns (out, lse or None, ref, ref_lse)."""
    q, kq, vq, mask, sinks = build(c) if inputs is None else inputs
    mode, bits, gs = c.fmt
    scale = scale_of(c)
    res = quant_sdpa(
        q, *kq, *vq, scale=scale, mask=mask, sinks=sinks,
        group_size=gs, bits=bits, mode=mode, return_lse=c.lse, stream=device,
    )  # fmt: skip
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
            q, exact_scales(kq), exact_scales(vq), scale_of(c), gs, bits, mode, mask=mask, sinks=sinks
        )


def cache_dtype(c: Case):
    """mx.dequantize rounds affine values to the scales' dtype (that of the
    data quantized): the oracle is only that precise (see oracle.py)."""
    return c.dtype if c.fmt[0] == "affine" else None


def tol_dtype(c: Case):
    cd = cache_dtype(c) or F32
    return max((c.dtype, cd), key=lambda d: oracle.RTOL[d])


def assert_matches(c: Case, out, lse, ref, ref_lse):
    assert out.shape == (c.B, c.Hq, c.Lq, c.D), (str(c), out.shape)
    assert out.dtype == c.dtype, (str(c), out.dtype)
    oracle.assert_close(out, ref, tol_dtype(c), what=str(c))
    empty = np.isneginf(ref_lse)
    if empty.any():
        # A row that sees no key (and has no sink) is exactly zero.
        o = oracle.to_numpy(out, np.float32)
        assert np.all(o[empty] == 0.0), f"{c}: fully masked rows are not zero"
    if lse is not None:
        assert lse.shape == (c.B, c.Hq, c.Lq) and lse.dtype == F32, (str(c), lse.shape, lse.dtype)
        oracle.assert_lse_close(lse, ref_lse, what=str(c), dtype=cache_dtype(c))


def check_case(c: Case, device):
    out, lse, ref, ref_lse = run(c, device)
    assert_matches(c, out, lse, ref, ref_lse)
    return out, lse, ref, ref_lse
