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
from ._api import is_supported_format, quant_sdpa

import mlx.core as mx  # noqa: E402

__all__ = ["patch", "unpatch", "patched", "is_patched", "stats", "reset_stats", "SUPPORTED_MLX_LM"]

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


def _route(queries, q_keys, q_values, scale, mask, sinks, group_size, bits, mode) -> Optional[mx.array]:
    """``quant_sdpa`` of the call, or None when the op does not support it.

    The checks mirror the op's own argument checks (csrc/ops.cpp), so a
    routed call cannot raise for a reason the original would not.
    """
    if not isinstance(queries, mx.array) or queries.ndim != 4 or queries.dtype not in _FLOAT_TYPES:
        return None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None
    if not isinstance(group_size, int) or not isinstance(bits, int) or not isinstance(mode, str):
        return None
    if not is_supported_format(mode, bits, group_size):
        return None
    k = _split(q_keys, mode)
    v = _split(q_values, mode)
    if k is None or v is None:
        return None
    B, Hq, Lq, D = queries.shape
    if D % group_size != 0:
        return None
    packed = D * bits // 32
    for w, s, b in (k, v):
        # Values must share the queries' head dimension D (the op computes
        # [.., D] outputs); a cache with another value head dimension falls back.
        if w.ndim != 4 or w.dtype != mx.uint32 or w.shape[0] != B or w.shape[3] != packed:
            return None
        if s.shape != (*w.shape[:3], D // group_size):
            return None
        if b is not None and (b.shape != s.shape or b.dtype != s.dtype):
            return None
        if mode == "affine" and s.dtype not in _FLOAT_TYPES:
            return None
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
    included; anything else goes to mlx-lm's original function.
    """
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
    "to quantize, and so use quant_sdpa, from the first token. The command ends by "
    "printing on stderr how many attention calls went through quant_sdpa."
)


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

    def our_arg_parser():
        parser = setup_arg_parser()
        parser.prog = "python -m mlx_qsdpa.mlx_lm"
        parser.description = _COMMAND_DESCRIPTION
        parser.epilog = _COMMAND_EPILOG
        parsers.append(parser)
        return parser

    # generate.main() builds its parser through this module-level name.
    generate.setup_arg_parser = our_arg_parser
    patch()
    try:
        generate.main()
    finally:
        generate.setup_arg_parser = setup_arg_parser
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
