"""The exact merge of partial attentions over disjoint key ranges (MLX ops)."""

from __future__ import annotations

import contextlib
from typing import Sequence, Tuple, Union

import mlx.core as mx

_FLOAT_TYPES = (mx.float16, mx.bfloat16, mx.float32)


def merge_attention(
    outs: Sequence[mx.array],
    lses: Sequence[mx.array],
    *,
    return_lse: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Attention over the union of disjoint key ranges, from each range's result.

    ``outs[i], lses[i] = quant_sdpa(..., return_lse=True)`` of the same
    queries over the ``i``-th range of keys (a chunk of a cache, a float tail
    next to a quantized body, a rank's shard): the result is the attention
    over all the keys, ``sum_i exp(lse_i - lse) * out_i`` with
    ``lse = log(sum_i exp(lse_i))``, computed in float32 as MLX ops (on
    ``stream``, any device, lazily).

    Masks apply per range: pass each call the columns of the mask for its
    keys. Attention sinks must be counted once: pass ``sinks`` to exactly
    one of the calls (any one; the merge is symmetric).

    Args:
        outs: the partial outputs, each ``[..., D]`` (``[B, Hq, Lq, D]`` from
            ``quant_sdpa``), all of one shape and one dtype (float16,
            bfloat16 or float32).
        lses: their natural-log softmax denominators, each ``outs[i].shape[:-1]``
            (float32 from ``quant_sdpa``; float16 and bfloat16 are read as
            float32). A part whose keys a row does not see has ``lse = -inf``
            there and weighs nothing (its output is not read).
        return_lse: also return the merged ``lse`` (float32).
        stream: stream or device to run on (default: the default device).

    Returns:
        ``out`` in the dtype of ``outs``, or ``(out, lse)``. A row that no
        part sees is zeros (``lse = -inf``); a row that is NaN in any part
        (``lse`` NaN, or +inf) is NaN, output and ``lse``, as in ``quant_sdpa``.

    Raises:
        TypeError: ``outs`` or ``lses`` not a list or tuple of ``mx.array``,
            or of another dtype.
        ValueError: empty lists, lists of different lengths, or shapes that
            do not agree.
    """
    _check(outs, lses)
    with _on(stream):
        out, lse = _merge_stacked(mx.stack(list(outs)), mx.stack(list(lses)), outs[0].dtype)
    return (out, lse) if return_lse else out


def _check(outs, lses) -> None:
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, mx.array) for p in parts):
            raise TypeError(f"[merge_attention] {name} must be a list or tuple of mx.array; got {_describe(parts)}.")
    if not outs:
        raise ValueError("[merge_attention] outs must hold at least one partial result; got an empty list.")
    if len(lses) != len(outs):
        raise ValueError(f"[merge_attention] lses must hold one lse per output: {len(outs)} outs, {len(lses)} lses.")
    shape, dtype = outs[0].shape, outs[0].dtype
    if dtype not in _FLOAT_TYPES:
        raise TypeError(f"[merge_attention] outs must be float16, bfloat16 or float32; got {dtype}.")
    if len(shape) == 0:
        raise ValueError("[merge_attention] outs must have at least one dimension (the head dimension D).")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != shape or o.dtype != dtype:
            raise ValueError(
                f"[merge_attention] outs must share one shape and dtype: outs[0] is {shape} {dtype}, "
                f"outs[{i}] is {o.shape} {o.dtype}."
            )
        if l.dtype not in _FLOAT_TYPES:
            raise TypeError(f"[merge_attention] lses must be float16, bfloat16 or float32; lses[{i}] is {l.dtype}.")
        if l.shape != shape[:-1]:
            raise ValueError(
                f"[merge_attention] lses[{i}] must have the shape of outs[{i}] without its last axis, "
                f"{shape[:-1]}; got {l.shape}."
            )


def _describe(parts) -> str:
    if isinstance(parts, (list, tuple)):
        kinds = sorted({type(p).__name__ for p in parts})
        return f"a {type(parts).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(parts).__name__


def _on(stream):
    return contextlib.nullcontext() if stream is None else mx.stream(stream)


def _merge_stacked(outs: mx.array, lses: mx.array, dtype: mx.Dtype) -> Tuple[mx.array, mx.array]:
    """The merge of ``outs [P, ..., D]`` by ``lses [P, ...]``: ``(out in dtype, lse float32)``.

    The same rules as the kernels' merge and finalisation
    (csrc/mlx_qsdpa/attention_math.h): the largest lse is the reference, a
    part with lse -inf weighs exactly nothing, a NaN or +inf lse poisons its
    row.
    """
    f32 = mx.float32
    lses = lses.astype(f32)
    empty = lses == -mx.inf
    poisoned = mx.any(mx.isnan(lses) | (lses == mx.inf), axis=0)
    # The max over the parts that are numbers; -inf where every part is empty.
    m = mx.max(mx.where(mx.isnan(lses), -mx.inf, lses), axis=0)
    m_ref = mx.where(m == -mx.inf, 0.0, m)
    w = mx.where(empty, 0.0, mx.exp(lses - m_ref))
    total = mx.sum(w, axis=0)
    # An empty part's output is zeros, but it is not read: a NaN there (a
    # masked key's NaN value) must not reach the merged row.
    acc = mx.sum(mx.where(empty[..., None], 0.0, w[..., None] * outs.astype(f32)), axis=0)
    seen = total > 0
    out = mx.where(seen[..., None], acc / mx.where(seen, total, 1.0)[..., None], 0.0)
    lse = mx.where(seen, m_ref + mx.log(mx.where(seen, total, 1.0)), -mx.inf)
    out = mx.where(poisoned[..., None], mx.nan, out)
    lse = mx.where(poisoned, mx.nan, lse)
    return out.astype(dtype), lse
