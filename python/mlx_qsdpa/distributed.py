"""Context-parallel attention: a quantized KV cache sharded along the sequence over ``mx.distributed``.

Every rank of a group holds some of the keys (its shard), computes
``quant_sdpa`` of the same queries over them with the lse, and one
``all_gather`` of ``(out, lse)`` -- ``B * Hq * Lq * (D + 1)`` float32 values
per call, 16.5 KB for a decode step of 32 heads of 128 -- gives every rank
the exact merge (:func:`mlx_qsdpa.merge_attention`). Nothing else crosses
the network: the cache never moves. ::

    # mlx.launch --hostfile hosts.json --python PYTHON -- script.py; every rank runs:
    import mlx.core as mx
    from mlx_qsdpa.distributed import sharded_quant_sdpa

    group = mx.distributed.init()
    # This rank's keys are positions [key_offset, key_offset + Lk) of the sequence.
    out = sharded_quant_sdpa(q, *k_shard, *v_shard, scale=D**-0.5, group=group,
                             mask="causal", key_offset=key_offset, query_offset=L - Lq)

    # mlx-lm: every full-attention layer's cache spread over the ranks.
    cache = mlx_qsdpa.distributed.make_cache(model, bits=4)
    mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)

    # mlx-lm's generate command, context-parallel:
    mlx.launch --hostfile hosts.json --python PYTHON -- -m mlx_qsdpa.distributed --model ... --kv-bits 4 --prompt ...

Each rank needs the queries: the model (its weights) is on every rank, and
every rank computes every token; only attention is split. Every rank merges
the same gathered values, so attention agrees to the bit; the rest of the
model must too (the same MLX on the same kind of machine), so that the ranks
sample the same tokens.
"""

from __future__ import annotations

import contextlib
import importlib
import numbers
import os
import sys
from typing import Any, List, Optional, Tuple, Union

# _api first: it checks the installed MLX before anything loads libmlx.
from ._api import quant_sdpa
from ._merge import _merge_stacked, _on
from .mlx_lm import QuantSDPAKVCache, _command_parser, _split, patch

import mlx.core as mx  # noqa: E402

__all__ = ["sharded_quant_sdpa", "all_merge_attention", "ContextParallelKVCache", "make_cache"]


def all_merge_attention(
    out: mx.array,
    lse: mx.array,
    *,
    group: Optional[mx.distributed.Group] = None,
    return_lse: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Every rank's partial ``(out, lse)`` of the same queries, merged, on every rank.

    One ``all_gather`` of ``out`` (as float32) and ``lse`` packed into one
    array, then :func:`mlx_qsdpa.merge_attention`'s merge, which every rank
    computes on the same gathered values (so every rank gets the same bits).
    Every rank of ``group`` must call it, with arrays of the same shape.

    Args:
        out: this rank's ``[..., D]`` partial output (float16, bfloat16 or float32).
        lse: its natural-log softmax denominator, ``out.shape[:-1]``
            (``-inf`` where this rank's keys are not seen).
        group: the ranks (default: ``mx.distributed.init()``).
        return_lse: also return the merged ``lse`` (float32).
        stream: stream or device of the merge (default: the default device).

    Returns:
        ``out`` in ``out``'s dtype, or ``(out, lse)``.
    """
    if not isinstance(out, mx.array) or not isinstance(lse, mx.array):
        raise TypeError(
            f"[all_merge_attention] out and lse must be mx.array; got {type(out).__name__} and {type(lse).__name__}."
        )
    if out.ndim == 0 or lse.shape != out.shape[:-1]:
        raise ValueError(
            f"[all_merge_attention] lse must have the shape of out without its last axis; "
            f"out is {out.shape}, lse is {lse.shape}."
        )
    if out.dtype not in (mx.float16, mx.bfloat16, mx.float32) or lse.dtype != mx.float32:
        raise TypeError(
            "[all_merge_attention] out must be float16, bfloat16 or float32 and lse float32; "
            f"got {out.dtype} and {lse.dtype}."
        )
    group = mx.distributed.init() if group is None else group
    n = group.size()
    if n == 1:
        return (out, lse) if return_lse else out
    with _on(stream):
        packed = mx.concatenate([out.astype(mx.float32), lse[..., None]], axis=-1)
    gathered = mx.distributed.all_gather(packed, group=group).reshape(n, *packed.shape)
    with _on(stream):
        merged, merged_lse = _merge_stacked(gathered[..., :-1], gathered[..., -1], out.dtype)
    return (merged, merged_lse) if return_lse else merged


def sharded_quant_sdpa(
    queries: mx.array,
    keys: mx.array,
    key_scales: mx.array,
    key_biases: Optional[mx.array],
    values: mx.array,
    value_scales: mx.array,
    value_biases: Optional[mx.array],
    *,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    key_offset: Optional[int] = None,
    query_offset: Optional[int] = None,
    sinks: Optional[mx.array] = None,
    group: Optional[mx.distributed.Group] = None,
    return_lse: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
    **format_args: Any,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """``quant_sdpa`` over a cache whose keys are spread over the ranks of ``group``.

    Every rank calls it with the same queries and its own shard of the
    quantized keys and values (any number of keys, 0 included); every rank
    gets the attention over all the shards' keys.

    Args:
        queries, keys, ..., value_biases, scale: as :func:`mlx_qsdpa.quant_sdpa`,
            the keys and values being this rank's shard.
        mask: ``None`` (every query sees every key); ``"causal"``: query
            ``i`` sits at position ``query_offset + i`` of the sequence and
            this rank's key ``j`` at ``key_offset + j``, and sees it when
            ``key_offset + j <= query_offset + i`` (for a decode step,
            ``query_offset`` is the sequence's length minus ``Lq``); or an
            array: this shard's columns of the mask, as ``quant_sdpa`` takes it.
        key_offset, query_offset: the positions of the causal mask (integers;
            given with ``mask="causal"`` only).
        sinks: ``[Hq]`` sink logits, the same on every rank: rank 0 counts
            them, the others do not, so that each counts once.
        group: the ranks (default: ``mx.distributed.init()``).
        return_lse: also return the merged ``lse``.
        stream: stream or device of the attention and the merge.
        format_args: the keys' and values' format and rotation, passed to
            ``quant_sdpa`` as given (``group_size``, ``bits``, ``mode``,
            ``value_mode``, ``value_bits``, ``value_group_size``,
            ``rotation``, ``rotation_seed``).

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in the queries' dtype, or ``(out, lse)``,
        the same on every rank.
    """
    group = mx.distributed.init() if group is None else group
    kq, vq = (keys, key_scales, key_biases), (values, value_scales, value_biases)
    if isinstance(mask, str) and mask == "causal":
        kq, vq, mask = _causal_shard(queries, kq, vq, key_offset, query_offset)
    elif key_offset is not None or query_offset is not None:
        raise ValueError("[sharded_quant_sdpa] key_offset and query_offset are read with mask='causal' only.")
    out, lse = _partial(queries, kq, vq, scale, mask, sinks, group, stream, format_args)
    return all_merge_attention(out, lse, group=group, return_lse=return_lse, stream=stream)


def _partial(queries, kq, vq, scale, mask, sinks, group, stream, format_args):
    """This rank's ``(out, lse)``. Every rank passes the sinks to quant_sdpa,
    so that a bad one raises on every rank, not only on the rank that waits
    in all_gather for the others: ranks other than 0 as -inf logits, which
    count as no sink."""
    if isinstance(sinks, mx.array) and group.rank() != 0:
        sinks = mx.full(sinks.shape, -mx.inf, dtype=sinks.dtype)
    return quant_sdpa(
        queries, *kq, *vq, scale=scale, mask=mask, sinks=sinks, return_lse=True, stream=stream, **format_args
    )


def _causal_shard(queries, kq, vq, key_offset, query_offset):
    """The keys of this shard that some query sees, and their mask.

    Keys past the last query's position are seen by no query and are left
    out (views, read in place). The rest is seen by every query (mask None),
    or ends at the last query's position (quant_sdpa's bottom-right
    "causal"), or else needs a bool mask ``[Lq, Lk]``: a shard that ends
    among the queries' positions (not in a decode step).
    """
    for name, val in (("key_offset", key_offset), ("query_offset", query_offset)):
        if val is None:
            raise ValueError(
                f"[sharded_quant_sdpa] mask='causal' needs {name}: the position of this shard's first key "
                "(key_offset) and of the first query (query_offset) in the sequence."
            )
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise TypeError(f"[sharded_quant_sdpa] {name} must be an int; got {type(val).__name__}.")
    for name, val in (("queries", queries), ("keys", kq[0]), ("values", vq[0])):
        if not isinstance(val, mx.array) or val.ndim != 4:
            what = f"{val.ndim}-D array" if isinstance(val, mx.array) else type(val).__name__
            raise TypeError(f"[sharded_quant_sdpa] {name} must be a 4-D mx.array; got a {what}.")
    k0, q0 = int(key_offset), int(query_offset)
    Lq, Lk = queries.shape[2], kq[0].shape[2]
    seen = min(max(q0 + Lq - k0, 0), Lk)
    if seen < Lk:
        kq, vq = (tuple(None if a is None else a[..., :seen, :] for a in t) for t in (kq, vq))
    if seen == 0 or k0 + seen - 1 <= q0:
        mask = None
    elif k0 + seen == q0 + Lq:
        mask = "causal"
    else:
        mask = (k0 + mx.arange(seen))[None, :] <= (q0 + mx.arange(Lq))[:, None]
    return kq, vq, mask


# ---------------------------------------------------------------------------
# mlx-lm
# ---------------------------------------------------------------------------


class ContextParallelKVCache(QuantSDPAKVCache):
    """A :class:`~mlx_qsdpa.mlx_lm.QuantSDPAKVCache` spread over the ranks of ``group``.

    Each update (a prefill chunk of mlx-lm's ``prefill_step_size`` tokens,
    or a decoded token) is kept whole by one rank: the one holding the
    fewest tokens (the lowest rank on ties), which then owns the tail of the
    sequence. A long prompt is so split chunk by chunk across the ranks, and
    decoding keeps them balanced; the group holds ``size`` times the context
    one rank would. Every rank decides the same from the token counts alone.

    In attention, the rank that holds the queries' own tokens applies the
    model's causal mask (its newest keys are those tokens, all older keys
    are seen), the other ranks hold older keys only and need no mask; then
    :func:`all_merge_attention`. The model's sinks are counted by rank 0.
    ``offset`` is the whole sequence's length (what models read for their
    positions), ``local`` the rank's own tokens.

    Full attention only: sliding-window layers keep mlx-lm's own
    ``RotatingKVCache`` on every rank (:func:`make_cache`), which holds only
    the window. Saving, loading and trimming are not supported.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        mode: str = "affine",
        *,
        group: Optional[mx.distributed.Group] = None,
        **format_args: Any,
    ):
        super().__init__(bits, group_size, mode, **format_args)
        self.group = mx.distributed.init() if group is None else group
        self.local = QuantSDPAKVCache(bits, group_size, mode, **format_args)
        self.rank_lengths = [0] * self.group.size()  # tokens each rank holds
        self.holds_update = False  # whether this rank holds the last update's tokens
        self._last_output = None  # a value of the last attention output (see attention)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Stores ``keys, values [B, Hkv, n, D]`` if this rank takes them; returns this rank's tokens."""
        n = keys.shape[2]
        taker = min(range(len(self.rank_lengths)), key=lambda r: self.rank_lengths[r])
        self.rank_lengths[taker] += n
        self.offset += n
        self.holds_update = taker == self.group.rank()
        if self.holds_update:
            return self.local.update_and_fetch(keys, values)
        if self.local.empty():
            # No token here yet: quant_sdpa over zero keys gives zeros and lse
            # -inf. (The update's keys sliced after quantizing: mx.quantize
            # does not take zero rows in every mode.)
            kq, vq = self._quantize(keys, self.key_format), self._quantize(values, self.value_format)
            return tuple(a[..., :0, :] for a in kq), tuple(a[..., :0, :] for a in vq)
        return self.local.keys_and_values()

    def attention(self, queries, keys, values, scale, mask, sinks=None) -> mx.array:
        """Attention of ``queries`` over every rank's tokens (``keys, values``: this rank's)."""
        if mask is not None and not (isinstance(mask, str) and mask == "causal"):
            raise ValueError(
                "ContextParallelKVCache takes the masks its make_mask gives (None or 'causal'); "
                f"got {type(mask).__name__}."
            )
        (kw, ks, kb), (vw, vs, vb) = _split(keys, self.mode), _split(values, self.value_mode)
        fmt = dict(
            group_size=self.group_size, bits=self.bits, mode=self.mode, value_mode=self.value_mode,
            value_bits=self.value_bits, value_group_size=self.value_group_size,
            rotation=self.rotation, rotation_seed=self.rotation_seed,
        )
        local_mask = mask if self.holds_update else None
        out, lse = _partial(queries, (kw, ks, kb), (vw, vs, vb), scale, local_mask, sinks, self.group, None, fmt)
        out = all_merge_attention(out, lse, group=self.group)
        # After a prefill chunk mlx-lm evaluates the caches' states only, which
        # on a rank that did not take the chunk need none of its all_gathers:
        # that rank would skip them and pair its next all_gather with another
        # rank's earlier one. The state holds a value of every attention
        # output, so that every rank runs every layer's all_gather.
        self._last_output = mx.sum(out.reshape(-1)[:1])
        return out

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        if window_size is not None or return_array:
            raise ValueError(
                "ContextParallelKVCache serves full causal attention only; this model asks for "
                + ("a sliding window" if window_size is not None else "an array mask")
                + " (make_cache keeps sliding-window layers in mlx-lm's RotatingKVCache)."
            )
        return None if N == 1 else "causal"

    def keys_and_values(self):
        return self.local.keys_and_values()

    @property
    def state(self):
        """This rank's tokens, and a value of the last attention output (see ``attention``)."""
        last = () if self._last_output is None else (self._last_output,)
        return (*self.local.state, *last)

    @state.setter
    def state(self, v):
        raise ValueError("ContextParallelKVCache cannot be loaded from a saved prompt cache.")

    @property
    def meta_state(self):
        return super().meta_state

    @meta_state.setter
    def meta_state(self, v):
        raise ValueError("ContextParallelKVCache cannot be loaded from a saved prompt cache.")

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        return self.local.nbytes


def make_cache(
    model,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    *,
    group: Optional[mx.distributed.Group] = None,
    **format_args: Any,
) -> list:
    """``model``'s prompt cache with every full-attention KV cache a :class:`ContextParallelKVCache`.

    Turns :func:`mlx_qsdpa.mlx_lm.patch` on. Sliding-window layers keep
    mlx-lm's ``RotatingKVCache`` (each rank holds the whole window, a few
    thousand tokens at most), other caches (SSM states) are kept too.
    ``format_args``: ``rotation``, ``rotation_seed``, ``value_bits``,
    ``value_mode``, ``value_group_size`` of :class:`~mlx_qsdpa.mlx_lm.QuantSDPAKVCache`.
    """
    from mlx_lm.models import cache as C

    group = mx.distributed.init() if group is None else group
    out = [
        ContextParallelKVCache(bits, group_size, mode, group=group, **format_args) if type(c) is C.KVCache else c
        for c in C.make_prompt_cache(model)
    ]
    patch()
    return out


# ---------------------------------------------------------------------------
# python -m mlx_qsdpa.distributed
# ---------------------------------------------------------------------------

_COMMAND_DESCRIPTION = (
    "mlx-lm's generate command (same arguments), context-parallel: run it on every rank with "
    "mlx.launch. Every rank loads the model; every full-attention layer's KV cache is a "
    "mlx_qsdpa.distributed.ContextParallelKVCache quantized in the --kv-* format, spread over "
    "the ranks, so the ranks together hold N times the context. Rank 0 prints the output."
)
_COMMAND_EPILOG = (
    "Example: mlx.launch --hostfile hosts.json -- -m mlx_qsdpa.distributed --model ... "
    "--kv-bits 4 --prompt -. The cache is quantized from the first token (--quantized-kv-start "
    "is not read); --max-kv-size, --prompt-cache-file and --draft-model are not supported."
)


def _generate_command() -> int:
    """``python -m mlx_qsdpa.distributed``: mlx-lm's generate with context-parallel caches."""
    generate = importlib.import_module("mlx_lm.generate")
    group = mx.distributed.init()

    our_arg_parser = _command_parser(
        generate.setup_arg_parser, "python -m mlx_qsdpa.distributed", _COMMAND_DESCRIPTION, _COMMAND_EPILOG
    )

    args, _ = our_arg_parser().parse_known_args()
    if args.kv_bits is None:
        raise SystemExit("python -m mlx_qsdpa.distributed needs --kv-bits (the cache's quantization)")
    for flag in ("max_kv_size", "prompt_cache_file", "draft_model"):
        if getattr(args, flag) is not None:
            raise SystemExit(f"python -m mlx_qsdpa.distributed does not support --{flag.replace('_', '-')}")
    fmt = dict(
        bits=args.kv_bits, group_size=args.kv_group_size, mode=args.kv_mode or "affine",
        rotation=args.kv_rotation, rotation_seed=args.kv_rotation_seed, value_bits=args.kv_value_bits,
        value_mode=args.kv_value_mode, value_group_size=args.kv_value_group_size,
    )
    QuantSDPAKVCache(**fmt)  # a bad format fails here, before the model loads
    caches: List[list] = []

    def make_prompt_cache(model, max_kv_size=None):
        caches.append(make_cache(model, group=group, **fmt))
        return caches[-1]

    def maybe_quantize_kv_cache(*args, **kwargs):
        """The caches are quantized from the start."""

    saved = {n: getattr(generate, n) for n in ("setup_arg_parser", "make_prompt_cache", "maybe_quantize_kv_cache")}
    generate.setup_arg_parser = our_arg_parser
    generate.make_prompt_cache = make_prompt_cache
    generate.maybe_quantize_kv_cache = maybe_quantize_kv_cache
    # Every rank computes the same tokens; one prints them.
    quiet = open(os.devnull, "w") if group.rank() != 0 else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            generate.main()
        # generate_step leaves the step after the last token evaluating: a
        # rank that exits before it ends cuts the other ranks' all_gathers short.
        mx.synchronize(generate.generation_stream)
    finally:
        for name, fn in saved.items():
            setattr(generate, name, fn)
        if quiet:
            quiet.close()
    sharded = [c for c in caches[-1] if isinstance(c, ContextParallelKVCache)] if caches else []
    if group.rank() == 0 and sharded:
        sys.stdout.flush()
        print(
            f"mlx_qsdpa: context-parallel over {group.size()} rank(s): "
            f"tokens held per rank {sharded[0].rank_lengths} (of {sharded[0].offset})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy of it.
    import mlx_qsdpa.distributed as _this

    sys.exit(_this._generate_command())
