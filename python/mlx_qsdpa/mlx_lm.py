"""mlx-lm drop-in: route mlx-lm's quantized-KV attention through ``quant_sdpa``.

::

    import mlx_qsdpa.mlx_lm
    mlx_qsdpa.mlx_lm.patch()          # every mlx-lm model, from now on
    ...
    mlx_qsdpa.mlx_lm.unpatch()        # back to mlx-lm's own functions

    with mlx_qsdpa.mlx_lm.patched():  # or only inside a block
        mlx_lm.generate(model, tokenizer, prompt, kv_bits=4)

    python -m mlx_qsdpa.mlx_lm --model ... --kv-bits 4 --prompt ...
                                      # mlx-lm's generate command, patched

    # Formats mlx-lm's QuantizedKVCache cannot hold (codebook, rotated,
    # other bits for the values): a QuantSDPAKVCache per layer.
    cache = mlx_qsdpa.mlx_lm.make_cache(model, bits=3, mode="turbo", rotation="hadamard", value_bits=4)
    mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)

    python -m mlx_qsdpa.mlx_lm ... --kv-bits 3 --kv-mode turbo --kv-rotation hadamard --kv-value-bits 4

How mlx-lm (0.32) reaches its quantized attention: every model module does
``from .base import scaled_dot_product_attention`` and calls it with the
layer's cache; that function sends a cache with a ``bits`` attribute
(``QuantizedKVCache``) to ``base.quantized_scaled_dot_product_attention``
(``quantized_matmul`` -> softmax -> ``quantized_matmul``) and raises
``ValueError`` when such a call carries attention sinks (gpt-oss).

The model modules bind the name at import time, so replacing it in ``base``
alone would miss every model already imported. ``patch()`` therefore
replaces

* ``scaled_dot_product_attention`` in ``mlx_lm.models.base`` *and* in every
  loaded module that holds mlx-lm's function under that name (models
  imported later pick the replacement up from ``base``); this is what lets
  sinks through;
* ``quantized_scaled_dot_product_attention`` in the same way, for code that
  calls it directly or that kept a reference to the original
  ``scaled_dot_product_attention``.

A call is routed to ``quant_sdpa`` only when the op supports it (format,
head dimensions, mask, sinks: see ``_route``); everything else, and every
call with an unquantized cache, goes to mlx-lm's original function
unchanged. ``unpatch()`` puts the originals back wherever a replacement is
found, including modules imported while patched.

Differences from mlx-lm's quantized path, both deliberate: the softmax is
accumulated in float32 (mlx-lm scales the queries and multiplies in the
model's dtype), and a query row whose mask hides every key returns zeros
(mlx-lm fills masked scores with the dtype's minimum, which averages all
values). Such rows do not occur with the causal and sliding-window masks
that ``QuantizedKVCache`` builds.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import threading
from typing import Dict, Iterator, Optional

# _api first: it checks the installed MLX before anything loads libmlx.
from ._api import dequantize, is_supported_format, quant_sdpa, quantize

import mlx.core as mx  # noqa: E402

__all__ = [
    "patch", "unpatch", "patched", "is_patched", "stats", "reset_stats", "SUPPORTED_MLX_LM",
    "QuantSDPAKVCache", "make_cache",
]

# The mlx-lm versions whose attention entry points this module was written
# against and tested with (pyproject's [mlx-lm] extra pins the same range).
SUPPORTED_MLX_LM = ">=0.32,<0.33"

_SDPA = "scaled_dot_product_attention"
_QSDPA = "quantized_scaled_dot_product_attention"
# The parameters the replacements accept: patch() refuses an mlx-lm whose
# functions take others, rather than misroute their arguments.
_SDPA_PARAMS = ("queries", "keys", "values", "cache", "scale", "mask", "sinks")
_QSDPA_PARAMS = ("queries", "q_keys", "q_values", "scale", "mask", "group_size", "bits")

_FLOAT_TYPES = (mx.float16, mx.bfloat16, mx.float32)

_lock = threading.RLock()
# mlx-lm's functions, kept from the first patch() on: a replacement that
# someone captured (e.g. ``f = base.scaled_dot_product_attention`` while
# patched) must still work, as the original, after unpatch().
_orig_sdpa = None
_orig_qsdpa = None
_active = False
_stats = {"routed": 0, "fallback": 0}


# ---------------------------------------------------------------------------
# Which calls quant_sdpa takes
# ---------------------------------------------------------------------------


def _split(q: object, mode: str):
    """``(w, scales, biases-or-None)`` of a cache triple, or None if it is not one.

    ``QuantizedKVCache`` stores what ``mx.quantize`` returns: a triple for
    ``affine``, a pair for the fp modes.
    """
    if not isinstance(q, (tuple, list)) or not all(isinstance(a, mx.array) for a in q):
        return None
    if mode == "affine" and len(q) == 3:
        return q[0], q[1], q[2]
    if mode != "affine" and len(q) == 2:
        return q[0], q[1], None
    return None


def _mask_ok(mask, B: int, Hq: int, Lq: int, Lk: int) -> bool:
    """Whether quant_sdpa reads ``mask`` the way mx.fast.scaled_dot_product_attention does."""
    if mask is None:
        return True
    if isinstance(mask, str):
        # mlx-lm's "causal" is aligned bottom-right, as quant_sdpa's.
        return mask == "causal"
    if not isinstance(mask, mx.array):
        return False
    if mask.dtype != mx.bool_ and mask.dtype not in _FLOAT_TYPES:
        return False
    if mask.ndim > 4:
        return False
    # Broadcast from the right against [B, Hq, Lq, Lk]. A 4-D mask with Hkv
    # heads (which mlx-lm's quantized path, unlike mx.fast, would accept
    # for GQA) is not broadcastable and falls back.
    target = (B, Hq, Lq, Lk)
    return all(m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target)))


def _route(
    queries, q_keys, q_values, scale, mask, sinks, group_size, bits, mode,
    value_format=None, rotation=None, rotation_seed=0,
) -> Optional[mx.array]:
    """``quant_sdpa`` of the call, or None when the op does not support it.

    ``group_size, bits, mode`` are the keys' format; ``value_format`` is the
    values' ``(mode, bits, group_size)`` (default: the keys'). The checks
    mirror the op's own argument checks (csrc/ops.cpp), so a routed call
    cannot raise for a reason the original would not.
    """
    if not isinstance(queries, mx.array) or queries.ndim != 4 or queries.dtype not in _FLOAT_TYPES:
        return None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None
    key_format = (mode, bits, group_size)
    value_format = key_format if value_format is None else tuple(value_format)
    B, Hq, Lq, D = queries.shape
    parts = []
    for q, (m, b, g) in ((q_keys, key_format), (q_values, value_format)):
        if not isinstance(g, int) or not isinstance(b, int) or not isinstance(m, str):
            return None
        if not is_supported_format(m, b, g) or D % g != 0:
            return None
        split = _split(q, m)
        if split is None:
            return None
        w, s, bias = split
        # Values must share the queries' head dimension D (the op computes
        # [.., D] outputs); a cache with another value head dimension falls back.
        if w.ndim != 4 or w.dtype != mx.uint32 or w.shape[0] != B or w.shape[3] != D * b // 32:
            return None
        if s.shape != (*w.shape[:3], D // g):
            return None
        if bias is not None and (bias.shape != s.shape or bias.dtype != s.dtype):
            return None
        if m in ("affine", "turbo") and s.dtype not in _FLOAT_TYPES:
            return None
        parts.append(split)
    k, v = parts
    Hkv, Lk = k[0].shape[1], k[0].shape[2]
    if v[0].shape[1:3] != (Hkv, Lk) or Hkv == 0 or Hq % Hkv != 0:
        return None
    if not _mask_ok(mask, B, Hq, Lq, Lk):
        return None
    if sinks is not None:
        if not isinstance(sinks, mx.array) or sinks.shape != (Hq,) or sinks.dtype not in _FLOAT_TYPES:
            return None
    with _lock:
        _stats["routed"] += 1
    return quant_sdpa(
        queries, *k, *v, scale=float(scale), mask=mask, sinks=sinks,
        group_size=group_size, bits=bits, mode=mode,
        value_mode=value_format[0], value_bits=value_format[1], value_group_size=value_format[2],
        rotation=rotation, rotation_seed=rotation_seed,
    )


def _fallback():
    with _lock:
        _stats["fallback"] += 1


# ---------------------------------------------------------------------------
# The replacements
# ---------------------------------------------------------------------------


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``models.base.scaled_dot_product_attention``, quantized caches via quant_sdpa.

    A cache with a ``bits`` attribute (mlx-lm's own test for a quantized
    cache) is read by ``quant_sdpa`` when it supports the call, sinks
    included; a :class:`QuantSDPAKVCache` always is (see its ``attention``);
    anything else goes to mlx-lm's original function.
    """
    if isinstance(cache, QuantSDPAKVCache):
        # Only quant_sdpa reads this cache's formats: never mlx-lm's path.
        return cache.attention(queries, keys, values, scale, mask, sinks)
    if _active and hasattr(cache, "bits"):
        out = _route(
            queries, keys, values, scale, mask, sinks,
            getattr(cache, "group_size", None), getattr(cache, "bits", None),
            getattr(cache, "mode", "affine"),  # mlx-lm 0.32 caches are always affine
        )
        if out is not None:
            return out
        # Not counted here: the original calls base's (replaced)
        # quantized_scaled_dot_product_attention, which counts the fallback.
    return _orig_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def quantized_scaled_dot_product_attention(
    queries, q_keys, q_values, scale, mask, group_size=64, bits=8, **kwargs
):
    """mlx-lm's ``models.base.quantized_scaled_dot_product_attention`` via quant_sdpa.

    Keyword arguments a later mlx-lm may add (``mode``) are read if known and
    passed on to the original on fallback.
    """
    if _active:
        mode = kwargs.get("mode", "affine")
        out = _route(queries, q_keys, q_values, scale, mask, None, group_size, bits, mode)
        if out is not None:
            return out
        _fallback()
    return _orig_qsdpa(queries, q_keys, q_values, scale, mask, group_size=group_size, bits=bits, **kwargs)


# ---------------------------------------------------------------------------
# A cache in any format of format_table(), rotated, with its own value format
# ---------------------------------------------------------------------------


class QuantSDPAKVCache:
    """An mlx-lm KV cache stored with :func:`mlx_qsdpa.quantize`, read by ``quant_sdpa``.

    Like mlx-lm's ``QuantizedKVCache`` (same growth in steps of 256 tokens,
    trimming, masks), but in any format of :func:`mlx_qsdpa.format_table`
    -- the codebook mode ``"turbo"`` included -- with an optional rotation
    (``"hadamard"``, ``rotation_seed``) shared by keys and values, and a
    value format of its own (``value_bits``, ``value_mode``,
    ``value_group_size``; each defaults to the keys'). ::

        cache = mlx_qsdpa.mlx_lm.make_cache(model, bits=3, mode="turbo", rotation="hadamard", value_bits=4)
        mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)

    Only quant_sdpa can read these formats, so the cache works under
    :func:`patch` (``make_cache`` turns it on) and raises otherwise, rather
    than letting mlx-lm's ``quantized_matmul`` path misread it. A call that
    quant_sdpa does not take (a mask it cannot broadcast, a value head
    dimension other than the keys') is computed from the dequantized cache
    with ``mx.fast.scaled_dot_product_attention`` and counted as a fallback
    in :func:`stats`.
    """

    step = 256

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        mode: str = "affine",
        *,
        rotation: Optional[str] = None,
        rotation_seed: int = 0,
        value_bits: Optional[int] = None,
        value_mode: Optional[str] = None,
        value_group_size: Optional[int] = None,
    ):
        self.bits, self.group_size, self.mode = bits, group_size, mode
        self.value_bits = bits if value_bits is None else value_bits
        self.value_group_size = group_size if value_group_size is None else value_group_size
        self.value_mode = mode if value_mode is None else value_mode
        self.rotation, self.rotation_seed = rotation, rotation_seed
        for what, fmt in (("keys", self.key_format), ("values", self.value_format)):
            if not is_supported_format(*fmt):
                raise ValueError(
                    f"QuantSDPAKVCache: {what} format (mode, bits, group_size) = {fmt} is not in "
                    "mlx_qsdpa.format_table()."
                )
        if rotation not in (None, "hadamard"):
            raise ValueError(f"QuantSDPAKVCache: rotation must be None or 'hadamard'; got {rotation!r}.")
        self.keys = None
        self.values = None
        self.offset = 0

    @property
    def key_format(self):
        """``(mode, bits, group_size)`` of the keys."""
        return (self.mode, self.bits, self.group_size)

    @property
    def value_format(self):
        """``(mode, bits, group_size)`` of the values."""
        return (self.value_mode, self.value_bits, self.value_group_size)

    @classmethod
    def from_cache(cls, cache, **format_args) -> "QuantSDPAKVCache":
        """The tokens of a float cache (mlx-lm's ``KVCache``) quantized into a new cache."""
        out = cls(**format_args)
        if cache.keys is not None and cache.offset > 0:
            out.update_and_fetch(cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :])
        return out

    def _quantize(self, x, fmt):
        mode, bits, group_size = fmt
        return quantize(x, group_size, bits, mode, rotation=self.rotation, rotation_seed=self.rotation_seed)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Appends ``keys, values [B, Hkv, n, D]`` and returns the whole cache, quantized."""
        if not _active:
            raise RuntimeError(_NEEDS_PATCH)
        kq = self._quantize(keys, self.key_format)
        vq = self._quantize(values, self.value_format)
        B, H, n, _ = keys.shape
        prev = self.offset
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            size = (self.step + n - 1) // self.step * self.step

            def grow(stored, new):
                extra = [mx.zeros((B, H, size, p.shape[-1]), dtype=p.dtype) for p in new]
                if stored is None:
                    return tuple(extra)
                # After a trim the arrays hold stale tokens past the offset.
                return tuple(mx.concatenate([s[..., :prev, :], e], axis=2) for s, e in zip(stored, extra))

            self.keys, self.values = grow(self.keys, kq), grow(self.values, vq)
        self.offset += n
        for stored, new in ((self.keys, kq), (self.values, vq)):
            for s, p in zip(stored, new):
                s[..., prev : self.offset, :] = p
        return self.keys_and_values()

    def keys_and_values(self):
        if self.offset == self.keys[0].shape[2]:
            return self.keys, self.values
        return (
            tuple(a[..., : self.offset, :] for a in self.keys),
            tuple(a[..., : self.offset, :] for a in self.values),
        )

    def attention(self, queries, keys, values, scale, mask, sinks=None) -> mx.array:
        """``softmax(scale * q @ k.T + mask) @ v`` over ``keys, values`` (what
        ``update_and_fetch`` returned): quant_sdpa, or the dequantized cache
        when quant_sdpa does not take the call."""
        out = _route(
            queries, keys, values, scale, mask, sinks, self.group_size, self.bits, self.mode,
            self.value_format, self.rotation, self.rotation_seed,
        )
        if out is not None:
            return out
        _fallback()
        k = self._dequantize(keys, self.key_format, queries.dtype)
        v = self._dequantize(values, self.value_format, queries.dtype)
        return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask, sinks=sinks)

    def _dequantize(self, parts, fmt, dtype):
        mode, bits, group_size = fmt
        w, s, b = _split(parts, mode)
        return dequantize(
            w, s, b, group_size, bits, mode, rotation=self.rotation, rotation_seed=self.rotation_seed, dtype=dtype
        )

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys_and_values()

    @state.setter
    def state(self, v):
        if not v:
            self.keys, self.values, self.offset = None, None, 0
            return
        self.keys, self.values = tuple(v[0]), tuple(v[1])
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self):
        """The formats, as strings (mlx-lm's convention for a cache's non-array state)."""
        return tuple(
            str(x) for x in (*self.key_format, *self.value_format, self.rotation or "", self.rotation_seed)
        )

    @meta_state.setter
    def meta_state(self, v):
        self.mode, bits, gs, self.value_mode, vbits, vgs, rotation, seed = v
        self.bits, self.group_size = int(bits), int(gs)
        self.value_bits, self.value_group_size = int(vbits), int(vgs)
        self.rotation, self.rotation_seed = (rotation or None), int(seed)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def make_mask(self, *args, **kwargs):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in (*self.keys, *self.values))


_NEEDS_PATCH = (
    "QuantSDPAKVCache is read by quant_sdpa only: call mlx_qsdpa.mlx_lm.patch() first "
    "(make_cache() does), or mlx-lm's own attention would misread it."
)


def make_cache(
    model,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    *,
    rotation: Optional[str] = None,
    rotation_seed: int = 0,
    value_bits: Optional[int] = None,
    value_mode: Optional[str] = None,
    value_group_size: Optional[int] = None,
) -> list:
    """``model``'s prompt cache with every attention KV cache a :class:`QuantSDPAKVCache`; turns :func:`patch` on.

    Pass it as ``prompt_cache`` to ``mlx_lm.generate`` / ``stream_generate``
    / ``generate_step``. Sliding-window (rotating) caches become full caches
    too, whose masks still apply the window (as ``QuantizedKVCache`` does);
    other caches (SSM states) are kept.
    """
    from mlx_lm.models import cache as C

    fmt = dict(
        bits=bits, group_size=group_size, mode=mode, rotation=rotation, rotation_seed=rotation_seed,
        value_bits=value_bits, value_mode=value_mode, value_group_size=value_group_size,
    )
    out = [
        QuantSDPAKVCache(**fmt) if isinstance(c, (C.KVCache, C.RotatingKVCache)) else c
        for c in C.make_prompt_cache(model)
    ]
    patch()
    return out


# ---------------------------------------------------------------------------
# Installing them
# ---------------------------------------------------------------------------


def _base_module():
    try:
        from mlx_lm.models import base
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mlx_qsdpa.mlx_lm needs mlx-lm: pip install \"mlx-qsdpa[mlx-lm]\" "
            f"(mlx-lm{SUPPORTED_MLX_LM})."
        ) from e
    return base


def _check_signature(fn, expected, name):
    params = tuple(inspect.signature(fn).parameters)
    if params != expected:
        import mlx_lm

        raise RuntimeError(
            f"mlx_qsdpa.mlx_lm: mlx_lm.models.base.{name} takes {params}, expected {expected}; "
            f"this mlx-lm ({getattr(mlx_lm, '__version__', '?')}) is not one the patch supports "
            f"(mlx-lm{SUPPORTED_MLX_LM})."
        )


def _rebind(name: str, old, new) -> None:
    """Set ``module.name = new`` in every loaded module where it is ``old``.

    Reads ``module.__dict__`` rather than ``getattr`` so that lazy modules
    are not made to import anything. Skips this module, which defines the
    replacements under the same names.
    """
    me = sys.modules[__name__]
    for mod in list(sys.modules.values()):
        if mod is me:
            continue
        d = getattr(mod, "__dict__", None)
        if isinstance(d, dict) and d.get(name) is old:
            setattr(mod, name, new)


def is_patched() -> bool:
    """Whether mlx-lm's attention currently goes through quant_sdpa."""
    return _active


def patch() -> None:
    """Route mlx-lm's quantized-KV attention through ``quant_sdpa``.

    Idempotent. Raises ImportError without mlx-lm and RuntimeError for an
    mlx-lm whose attention functions do not have the expected parameters.
    """
    global _orig_sdpa, _orig_qsdpa, _active
    with _lock:
        if _active:
            return
        base = _base_module()
        sdpa, qsdpa = getattr(base, _SDPA), getattr(base, _QSDPA)
        _check_signature(sdpa, _SDPA_PARAMS, _SDPA)
        _check_signature(qsdpa, _QSDPA_PARAMS, _QSDPA)
        # Originals and flag are set before rebinding: a thread that picks
        # up a replacement must find them.
        _orig_sdpa, _orig_qsdpa, _active = sdpa, qsdpa, True
        _rebind(_SDPA, sdpa, scaled_dot_product_attention)
        _rebind(_QSDPA, qsdpa, quantized_scaled_dot_product_attention)


def unpatch() -> None:
    """Restore mlx-lm's own functions everywhere the replacements are bound. Idempotent."""
    global _active
    with _lock:
        if not _active:
            return
        _active = False
        _rebind(_SDPA, scaled_dot_product_attention, _orig_sdpa)
        _rebind(_QSDPA, quantized_scaled_dot_product_attention, _orig_qsdpa)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``patch()`` for the duration of a ``with`` block.

    Leaves the patch in place on exit if it was already on at entry.
    """
    was = is_patched()
    patch()
    try:
        yield
    finally:
        if not was:
            unpatch()


def stats() -> Dict[str, int]:
    """Quantized-cache attention calls since the last ``reset_stats()``.

    ``routed``: computed by quant_sdpa; ``fallback``: computed by mlx-lm's
    ``quantized_matmul`` path because quant_sdpa does not take the call.
    """
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    """Zero the counters of ``stats()``."""
    with _lock:
        _stats["routed"] = _stats["fallback"] = 0


# ---------------------------------------------------------------------------
# python -m mlx_qsdpa.mlx_lm
# ---------------------------------------------------------------------------

_COMMAND_DESCRIPTION = (
    "mlx-lm's generate command (python -m mlx_lm.generate, same arguments) with "
    "mlx_qsdpa.mlx_lm's patch on: mlx-lm's attention over a quantized KV cache "
    "runs through mlx_qsdpa's fused quant_sdpa instead of quantized_matmul -> "
    "softmax -> quantized_matmul. Nothing else changes."
)
_COMMAND_EPILOG = (
    "mlx-lm quantizes the KV cache only with --kv-bits, and only once the context "
    "passes --quantized-kv-start tokens (default 5000); pass --quantized-kv-start 0 "
    "to quantize, and so use quant_sdpa, from the first token. Any of --kv-mode, "
    "--kv-rotation, --kv-value-bits, --kv-value-mode, --kv-value-group-size makes the "
    "quantized cache a mlx_qsdpa.mlx_lm.QuantSDPAKVCache in that format (keys: "
    "--kv-bits, --kv-group-size, --kv-mode). The command ends by "
    "printing on stderr how many attention calls went through quant_sdpa."
)
_CACHE_FLAGS = ("kv_mode", "kv_rotation", "kv_value_bits", "kv_value_mode", "kv_value_group_size")


def _add_cache_arguments(parser) -> None:
    """The flags of a QuantSDPAKVCache, added to mlx-lm's generate parser."""
    from ._api import format_table

    modes = sorted({f.mode for f in format_table()})
    g = parser.add_argument_group("mlx_qsdpa cache formats (any of these: a QuantSDPAKVCache)")
    g.add_argument("--kv-mode", choices=modes, default=None,
                   help="format of the quantized keys (and values), with --kv-bits and --kv-group-size "
                        "(default affine)")
    g.add_argument("--kv-rotation", choices=["hadamard"], default=None,
                   help="rotate keys and values before quantizing (quant_sdpa rotates queries and output)")
    g.add_argument("--kv-rotation-seed", type=int, default=0, help="seed of the rotation's random signs")
    g.add_argument("--kv-value-bits", type=int, default=None, help="bits of the values (default --kv-bits)")
    g.add_argument("--kv-value-mode", choices=modes, default=None, help="format of the values (default --kv-mode)")
    g.add_argument("--kv-value-group-size", type=int, default=None,
                   help="group size of the values (default --kv-group-size)")


def _cache_converter(args):
    """mlx-lm's ``maybe_quantize_kv_cache`` making QuantSDPAKVCaches in the
    format of ``args``, or None when no flag of ``_CACHE_FLAGS`` was given."""
    if all(getattr(args, f) is None for f in _CACHE_FLAGS):
        return None
    if args.kv_bits is None:
        raise SystemExit("--kv-mode, --kv-rotation and --kv-value-* need --kv-bits (the keys' bits)")
    fmt = dict(
        mode=args.kv_mode or "affine", rotation=args.kv_rotation, rotation_seed=args.kv_rotation_seed,
        value_bits=args.kv_value_bits, value_mode=args.kv_value_mode, value_group_size=args.kv_value_group_size,
    )
    QuantSDPAKVCache(bits=args.kv_bits, group_size=args.kv_group_size, **fmt)  # a bad format fails here

    def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
        from mlx_lm.models.cache import KVCache

        if kv_bits is None:
            return
        for i, c in enumerate(prompt_cache):
            # Exactly KVCache: its subclasses (chunked caches) keep their own rules.
            if type(c) is KVCache and c.offset >= quantized_kv_start:
                prompt_cache[i] = QuantSDPAKVCache.from_cache(c, bits=kv_bits, group_size=kv_group_size, **fmt)

    return maybe_quantize_kv_cache


def _why_none_routed(kv_bits: Optional[int], quantized_kv_start: int, fallback: int) -> str:
    """Why a generate run sent no attention call to quant_sdpa, most likely."""
    if kv_bits is None:
        return (
            "no --kv-bits was given, so mlx-lm kept a float KV cache, whose attention "
            "is mx.fast.scaled_dot_product_attention; add e.g. --kv-bits 4."
        )
    if fallback:
        return (
            f"quant_sdpa does not take this model's quantized-KV attention calls "
            f"(all {fallback} went to mlx-lm's own path; see mlx_qsdpa.mlx_lm._route)."
        )
    if quantized_kv_start > 0:
        return (
            f"mlx-lm keeps the first --quantized-kv-start tokens ({quantized_kv_start}; "
            "default 5000) in a float cache and quantizes it only once the context passes "
            "that, which this run did not; pass --quantized-kv-start 0 to quantize from "
            "the first token."
        )
    return "mlx-lm made no attention call over a quantized cache (a model without attention layers?)."


def _command_parser(setup_arg_parser, prog, description, epilog, made=None):
    """A stand-in for mlx-lm's ``setup_arg_parser``: its parser under our
    command's name and help, with the cache flags added (every parser made is
    appended to ``made`` when given)."""

    def our_arg_parser():
        parser = setup_arg_parser()
        parser.prog = prog
        parser.description = description
        parser.epilog = epilog
        _add_cache_arguments(parser)
        if made is not None:
            made.append(parser)
        return parser

    return our_arg_parser


def _generate_command() -> int:
    """``python -m mlx_qsdpa.mlx_lm``: mlx-lm's generate command with the patch on.

    Reads ``sys.argv`` as mlx-lm's command does; its ``--help`` says what
    this command is, and its end reports on stderr how many calls went
    through quant_sdpa (and why none did, when none did).
    """
    # The module: the package's attribute of that name is its generate() function.
    generate = importlib.import_module("mlx_lm.generate")

    setup_arg_parser = generate.setup_arg_parser
    parsers = []
    our_arg_parser = _command_parser(
        setup_arg_parser, "python -m mlx_qsdpa.mlx_lm", _COMMAND_DESCRIPTION, _COMMAND_EPILOG, parsers
    )

    converter = _cache_converter(our_arg_parser().parse_known_args()[0])
    maybe_quantize = generate.maybe_quantize_kv_cache
    # generate.main() builds its parser, and generate_step converts its
    # cache, through these module-level names.
    generate.setup_arg_parser = our_arg_parser
    if converter is not None:
        generate.maybe_quantize_kv_cache = converter
    patch()
    try:
        generate.main()
    finally:
        generate.setup_arg_parser = setup_arg_parser
        generate.maybe_quantize_kv_cache = maybe_quantize
    # On stderr, so that the command's output stays mlx-lm's.
    s = stats()
    print(
        f"mlx_qsdpa: {s['routed']} quantized-KV attention calls through quant_sdpa, "
        f"{s['fallback']} through mlx-lm's own path",
        file=sys.stderr,
    )
    if s["routed"] == 0:
        args, _ = parsers[-1].parse_known_args()
        why = _why_none_routed(args.kv_bits, args.quantized_kv_start, s["fallback"])
        print(f"mlx_qsdpa: no call went through quant_sdpa: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy of it, so that
    # there is one patch state.
    import mlx_qsdpa.mlx_lm as _this

    sys.exit(_this._generate_command())
