"""quant_sdpa on the CUDA simulator for a tests/qsdpa_case.py `Case`.

Builds the case's inputs as the oracle tests do (seeded, on the CPU), hands
their raw elements and element strides to cuda_simulator.Library as MLX
hands arrays to csrc/backends/cuda/quant_sdpa_cuda.cpp, and returns the output and
lse as mx arrays for qsdpa_case.assert_matches.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import oracle
import qsdpa_case
from cuda_simulator import Call, SimtVariant, Tensor, Variant, dense, kernel_for

KIND = {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32", mx.uint8: "u8"}


def raw(a: mx.array) -> np.ndarray:
    """An mx array's elements as NumPy with the same bits (16-bit floats as
    uint16: NumPy has no bfloat16)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.array(a)


def variant_of(c: qsdpa_case.Case, simt: bool = False) -> Variant | SimtVariant:
    """The kernel the host's launch plan picks for the case (with simt=True:
    the generic kernel, as the test override forces it)."""
    return kernel_for(call_of(c, qsdpa_case.build(c)), kernel="simt" if simt else None)


def broadcast_mask(m: np.ndarray, c: qsdpa_case.Case) -> Tensor:
    """A mask of any broadcastable shape as the strided [B, Hq, Lq, Lk] view
    MLX passes (zero strides along broadcast axes)."""
    m = np.ascontiguousarray(m)
    view = np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (c.B, c.Hq, c.Lq, c.Lk))
    return Tensor(m.reshape(-1), tuple(s // m.itemsize for s in view.strides), view.shape)


def padded_rows(a: np.ndarray, pad: int) -> Tensor:
    """A [B, H, L, W] array whose rows are `pad` elements apart in memory
    (a strided view, as a slice of a wider buffer gives)."""
    B, H, L, W = a.shape
    buf = np.zeros((B, H, L, W + pad), a.dtype)
    buf[..., :W] = a
    return Tensor(buf.reshape(-1), (H * L * (W + pad), L * (W + pad), W + pad, 1), a.shape)


def call_of(c: qsdpa_case.Case, inputs, *, row_pad: int = 0, q_pad: int = 0) -> Call:
    """The case's inputs as the simulator's Call. row_pad > 0: the packed
    K/V rows sit row_pad words apart (not adjacent); q_pad > 0: the query
    rows sit q_pad elements apart."""
    q, kq, vq, mask, sinks = inputs

    def triple(t):
        w, s, b = t
        words = padded_rows(raw(w), row_pad) if row_pad else dense(raw(w))
        return words, dense(raw(s)), None if b is None else dense(raw(b))

    mask_kind, mask_t = None, None
    if isinstance(mask, mx.array):
        if mask.dtype == mx.bool_:
            mask_kind, mask_t = "bool", broadcast_mask(np.array(mask).astype(np.uint8), c)
        else:
            mask_kind, mask_t = "additive", broadcast_mask(oracle.to_numpy(mask, np.float32), c)
    elif mask == "causal":
        mask_kind = "causal"
    mode, bits, gs = c.fmt
    return Call(
        q=padded_rows(raw(q), q_pad) if q_pad else dense(raw(q)),
        q_dtype=KIND[c.dtype],
        k=triple(kq),
        v=triple(vq),
        scale_dtypes=(KIND[kq[1].dtype], KIND[vq[1].dtype]),
        mode=mode,
        bits=bits,
        group_size=gs,
        Hkv=c.Hkv,
        Lk=c.Lk,
        scale=qsdpa_case.scale_of(c),
        mask_kind=mask_kind,
        mask=mask_t,
        sinks=None if sinks is None else dense(oracle.to_numpy(sinks, np.float32)),
        return_lse=c.lse,
        vfmt=None if c.vfmt is None else tuple(c.vfmt),
    )


def run_case(
    lib, c: qsdpa_case.Case, *, forced_splits: int = 0, inputs=None, row_pad: int = 0, q_pad: int = 0, simt: bool = False
):
    """Runs the case on the simulator as the host would: (out, lse, ref,
    ref_lse, plan). forced_splits > 0: that many key splits; row_pad, q_pad:
    call_of's; simt: the generic kernel, whatever the plan would pick."""
    inputs = qsdpa_case.build(c) if inputs is None else inputs
    call = call_of(c, inputs, row_pad=row_pad, q_pad=q_pad)
    out, lse, plan = lib.quant_sdpa(call, kernel="simt" if simt else None, splits=forced_splits)
    q, kq, vq, mask, sinks = inputs
    ref, ref_lse = qsdpa_case.reference(c, q, kq, vq, mask, sinks)
    out_mx = mx.array(out).astype(c.dtype)  # exact: the values are the kernel's c.dtype bits
    lse_mx = None if lse is None else mx.array(lse)
    return out_mx, lse_mx, ref, ref_lse, plan
