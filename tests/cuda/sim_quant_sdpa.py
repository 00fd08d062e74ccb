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
from cuda_simulator import SimtVariant, Tensor, Variant, dense

KIND = {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32", mx.uint8: "u8"}


def raw(a: mx.array) -> np.ndarray:
    """An mx array's elements as NumPy with the same bits (16-bit floats as
    uint16: NumPy has no bfloat16)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.array(a)


def mma_kernel_exists(c: qsdpa_case.Case) -> bool:
    """Whether mma_kernel() has a tensor-core kernel for the case's query
    dtype, format and head dim (decode_mma.cuh's instantiations)."""
    mode, bits, gs = c.fmt
    return (
        c.dtype in (mx.float16, mx.bfloat16)
        and c.D in (64, 128, 256)
        and (mode != "affine" or (bits in (2, 4, 8) and gs <= c.D))
    )


def variant_of(c: qsdpa_case.Case, simt: bool = False) -> Variant | SimtVariant:
    """The kernel the host picks for the case (quant_sdpa_cuda.cpp): the
    tensor-core kernel where one exists (the cases' caches are laid out as
    it needs), with 8-row blocks where the G * Lq rows of a kv head fit in
    one, else 16; the generic kernel otherwise, or with simt=True (as
    QSDPA_CUDA_KERNEL=simt forces it)."""
    mode, bits, gs = c.fmt
    if simt or not mma_kernel_exists(c):
        return SimtVariant(mode, bits)
    rows = (c.Hq // c.Hkv) * c.Lq
    return Variant(KIND[c.dtype], mode, bits, gs, c.D, 1 if rows <= 8 else 2)


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


def run_case(
    lib, c: qsdpa_case.Case, *, forced_splits: int = 0, inputs=None, row_pad: int = 0, q_pad: int = 0, simt: bool = False
):
    """Runs the case on the simulator: (out, lse, ref, ref_lse, plan).
    row_pad > 0: the packed K/V rows sit row_pad words apart (not adjacent);
    q_pad > 0: the query rows sit q_pad elements apart; simt: the generic
    kernel, whatever the host would pick."""
    q, kq, vq, mask, sinks = qsdpa_case.build(c) if inputs is None else inputs
    v = variant_of(c, simt)

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
    sinks_t = None if sinks is None else dense(oracle.to_numpy(sinks, np.float32))
    out, lse, plan = lib.run_quant_sdpa(
        v,
        q=padded_rows(raw(q), q_pad) if q_pad else dense(raw(q)),
        q_shape=tuple(q.shape),
        q_dtype=KIND[c.dtype],
        scale_dtypes=(KIND[kq[1].dtype], KIND[vq[1].dtype]),
        group_size=c.fmt[2],
        k=triple(kq),
        v=triple(vq),
        Hkv=c.Hkv,
        Lk=c.Lk,
        scale=qsdpa_case.scale_of(c),
        mask_kind=mask_kind,
        mask=mask_t,
        sinks=sinks_t,
        return_lse=c.lse,
        forced_splits=forced_splits,
    )
    ref, ref_lse = qsdpa_case.reference(c, q, kq, vq, mask, sinks)
    out_mx = mx.array(out).astype(c.dtype)  # exact: the values are the kernel's c.dtype bits
    lse_mx = None if lse is None else mx.array(lse)
    return out_mx, lse_mx, ref, ref_lse, plan
