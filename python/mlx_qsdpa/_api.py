"""Python-facing signature of the op; the checks and the work are in C++."""

from __future__ import annotations

import numbers
import operator
from typing import List, NamedTuple, Optional, Tuple, Union

from . import _build_info
from ._mlx_check import load_extension

# First: it checks the installed MLX before anything loads libmlx.
_ext = load_extension(_build_info)

import mlx.core as mx  # noqa: E402



class FormatInfo(NamedTuple):
    """A row of the format table (``csrc/mlx_qsdpa/formats.h``)."""

    mode: str  #: the ``mode`` of ``mx.quantize``: "affine", "mxfp4", ...
    bits: int  #: bits per element
    group_sizes: Tuple[int, ...]  #: the group sizes the op accepts
    kernel_name: str  #: the format's name in kernel names ("affine4", "mxfp4", ...)
    has_biases: bool  #: whether ``mx.quantize`` returns biases for it
    float_scales: bool  #: scales in the cache's float dtype (else uint8 codes)


def format_table() -> Tuple[FormatInfo, ...]:
    """Every K/V format ``quant_sdpa`` accepts, one row per (mode, bits)."""
    return _FORMAT_TABLE


_FORMAT_TABLE = tuple(FormatInfo(m, b, tuple(g), t, bool(h), bool(f)) for m, b, g, t, h, f in _ext.format_table())

#: (mode, bits, group_size) triples that ``quant_sdpa`` accepts: those that
#: ``mx.quantize`` (MLX 0.32.4) produces, from the format table.
SUPPORTED_FORMATS = tuple((f.mode, f.bits, g) for f in _FORMAT_TABLE for g in f.group_sizes)


def is_supported_format(mode: str, bits: int, group_size: int) -> bool:
    """Whether ``quant_sdpa`` accepts K/V quantized with these parameters."""
    return bool(_ext.is_supported_format(mode, bits, group_size))


def gpu_backend() -> str:
    """``"metal"``, ``"cuda"`` or ``"none"``: the GPU kernels compiled into this build."""
    return _ext.gpu_backend()


def mlx_build_version() -> str:
    """The version of MLX the extension was compiled against."""
    return _ext.mlx_build_version()


def cpu_variant() -> str:
    """The CPU kernel variant in use.

    One of ``"x86-64-v2"``, ``"x86-64-v3"``, ``"x86-64-v4"``,
    ``"arm64-neon"``, ``"generic"`` (portable code) or ``"native"``
    (compiled for the build machine), chosen when the extension loads among
    the variants compiled in.
    """
    return _ext.cpu_variant()


def cpu_variants() -> List[Tuple[str, bool]]:
    """The CPU kernel variants compiled in, best first, each with whether this CPU can run it."""
    return [(str(name), bool(ok)) for name, ok in _ext.cpu_variants()]


def quant_sdpa(
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
    sinks: Optional[mx.array] = None,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    return_lse: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
    value_mode: Optional[str] = None,
    value_bits: Optional[int] = None,
    value_group_size: Optional[int] = None,
    rotation: Optional[str] = None,
    rotation_seed: int = 0,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Scaled-dot-product attention over a quantized K/V cache, fused.

    Computes ``softmax(scale * q @ k.T + mask) @ v`` where ``k`` and ``v``
    are ``mx.dequantize(...)`` of the given quantized arrays, without ever
    materialising them: the packed words are read, decoded in registers and
    fed to an online softmax in float32.

    Args:
        queries: ``[B, Hq, Lq, D]``, float16, bfloat16 or float32.
        keys, key_scales, key_biases: ``mx.quantize(k, group_size, bits, mode)``
            of keys ``[B, Hkv, Lk, D]``; ``key_biases`` is ``None`` for the fp
            modes. Views along the sequence axis of a larger cache
            (``cache[..., :Lk, :]``) are read in place.
        values, value_scales, value_biases: the same for the values.
        scale: multiplies ``q @ k.T`` (typically ``D ** -0.5``); a Python
            or NumPy real number.
        mask: ``None``; ``"causal"`` (aligned bottom-right: query ``i`` sees
            keys ``j <= Lk - Lq + i``); a bool array (True = attend) or an
            additive float array, broadcastable to ``[B, Hq, Lq, Lk]``.
        sinks: ``None`` or ``[Hq]`` logits of a virtual key with a zero value
            (attention sinks, as ``mx.fast.scaled_dot_product_attention``).
        group_size, bits, mode: the quantization of the keys (and of the
            values unless ``value_*`` say otherwise): affine with bits
            1/2/3/4/5/6/8 and group_size 32/64/128; ``"mxfp4"`` (32),
            ``"mxfp8"`` (32), ``"nvfp4"`` (16); the codebook mode
            ``"turbo"`` (bits 2/3/4, group_size 32/64/128) of
            :func:`quantize`. ``group_size`` and ``bits`` are Python or NumPy
            integers. :func:`format_table` lists every format.
        return_lse: also return ``lse`` ``[B, Hq, Lq]`` float32, the natural
            log of the softmax denominator (sink included), so attention over
            disjoint key ranges can be merged exactly.
        stream: stream or device to run on (default: the default device).
        value_mode, value_bits, value_group_size: the values' format where it
            differs from the keys' (each defaults to the keys' setting).
        rotation: ``None`` or ``"hadamard"``: K and V were quantized by
            :func:`quantize` with this rotation and ``rotation_seed``; the op
            rotates the queries the same way and rotates the output back
            (one ``D x D`` product per query and output row; the cache is
            read once, as without rotation).
        rotation_seed: the seed given to :func:`quantize`.

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in the queries' dtype, or ``(out, lse)``.
        A query row that sees no key returns zeros (and ``lse = -inf``).

    Raises:
        ValueError: shapes that do not agree, an unsupported format, a mask
            that does not broadcast, biases given or missing for the mode.
        TypeError: arguments of the wrong dtype or Python type.
    """
    if mask is None:
        mask_mode, mask_arr = "", None
    elif isinstance(mask, str):
        if mask != "causal":
            raise ValueError(
                f"[quant_sdpa] mask must be None, 'causal' or an mx.array; got the string {mask!r}."
            )
        mask_mode, mask_arr = "causal", None
    elif isinstance(mask, mx.array):
        mask_mode, mask_arr = "array", mask
    else:
        raise TypeError(
            "[quant_sdpa] mask must be None, 'causal' or an mx.array; "
            f"got {type(mask).__name__}."
        )
    # One cheap test for the common case (this runs once per attention call
    # and layer); the slow checks convert NumPy scalars and name what is
    # wrong.
    A = mx.array
    if not (
        type(scale) in _REALS
        and type(group_size) is int
        and type(bits) is int
        and type(mode) is str
        and type(rotation_seed) is int
        and (value_bits is None or type(value_bits) is int)
        and (value_group_size is None or type(value_group_size) is int)
        and (value_mode is None or type(value_mode) is str)
        and (rotation is None or type(rotation) is str)
        and isinstance(queries, A)
        and isinstance(keys, A)
        and isinstance(key_scales, A)
        and isinstance(values, A)
        and isinstance(value_scales, A)
        and (key_biases is None or isinstance(key_biases, A))
        and (value_biases is None or isinstance(value_biases, A))
        and (sinks is None or isinstance(sinks, A))
    ):
        scale, group_size, bits, mode = _check_types(
            scale, group_size, bits, mode,
            queries, keys, key_scales, key_biases, values, value_scales, value_biases, sinks,
        )
        value_bits = None if value_bits is None else _as_int("value_bits", value_bits)
        value_group_size = None if value_group_size is None else _as_int("value_group_size", value_group_size)
        rotation_seed = _as_int("rotation_seed", rotation_seed)
        _check_str("value_mode", value_mode)
        _check_str("rotation", rotation)
    return _ext.quant_sdpa(
        queries,
        keys,
        key_scales,
        key_biases,
        values,
        value_scales,
        value_biases,
        float(scale),
        mask_mode,
        mask_arr,
        sinks,
        int(group_size),
        int(bits),
        mode,
        value_mode,
        value_bits,
        value_group_size,
        rotation,
        int(rotation_seed),
        bool(return_lse),
        stream,
    )


def quantize(
    x: mx.array,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    rotation: Optional[str] = None,
    rotation_seed: int = 0,
    *,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, ...]:
    """Quantizes ``x [..., D]`` in any format of :func:`format_table`.

    Returns what ``mx.quantize`` returns: ``(w, scales, biases)`` for
    ``"affine"``, ``(w, scales)`` for the fp modes and for ``"turbo"``.
    ``"turbo"`` stores each element as the index of the nearest level of the
    Lloyd-Max codebook of a standard normal variable (bits 2, 3 or 4), and one
    scale per group in ``x``'s dtype (the least-squares fit of the group to
    its levels): meant for rotated vectors, whose coordinates are close to
    normal. With ``rotation="hadamard"``, ``x`` is first multiplied by the
    transpose of :func:`rotation_matrix` ``(D, rotation_seed)``; pass the same
    rotation and seed to :func:`quant_sdpa` and :func:`dequantize`.

    Runs as MLX ops on ``stream`` (any device), lazily like ``mx.quantize``.
    """
    group_size, bits = _as_int("group_size", group_size), _as_int("bits", bits)
    rotation_seed = _as_int("rotation_seed", rotation_seed)
    _check_str("mode", mode)
    _check_str("rotation", rotation)
    if not isinstance(x, mx.array):
        raise TypeError(f"[quantize] x must be an mx.array; got {type(x).__name__}.")
    return tuple(_ext.quantize(x, group_size, bits, mode, rotation, rotation_seed, stream))


def dequantize(
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    rotation: Optional[str] = None,
    rotation_seed: int = 0,
    dtype: Optional[mx.Dtype] = None,
    *,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Inverts :func:`quantize`: the values, rotated back if ``rotation`` is given.

    ``dtype`` defaults to the scales' dtype (``bfloat16`` for the modes with
    8-bit scales, as ``mx.dequantize``).
    """
    group_size, bits = _as_int("group_size", group_size), _as_int("bits", bits)
    rotation_seed = _as_int("rotation_seed", rotation_seed)
    _check_str("mode", mode)
    _check_str("rotation", rotation)
    for name, val in (("w", w), ("scales", scales)):
        if not isinstance(val, mx.array):
            raise TypeError(f"[dequantize] {name} must be an mx.array; got {type(val).__name__}.")
    if biases is not None and not isinstance(biases, mx.array):
        raise TypeError(f"[dequantize] biases must be an mx.array or None; got {type(biases).__name__}.")
    return _ext.dequantize(w, scales, biases, group_size, bits, mode, rotation, rotation_seed, dtype, stream)


def rotation_matrix(D: int, seed: int = 0) -> mx.array:
    """The ``[D, D]`` float32 orthogonal matrix ``R`` of ``rotation="hadamard"``.

    ``R = H @ diag(s)``: ``s_j = -1`` where the top bit of the ``j``-th output
    of SplitMix64 seeded with ``seed`` (as uint32) is set, else ``+1``; ``H``
    is block diagonal with normalized Sylvester-Hadamard blocks, one per
    power of two in ``D``, largest first (``D=128``: one block; ``D=80``:
    64 and 16). Rows are rotated as ``x @ R.T`` and restored as ``y @ R``.
    """
    return _ext.rotation_matrix(_as_int("D", D), _as_int("seed", seed))


_REALS = (float, int)


def _check_types(
    scale, group_size, bits, mode,
    queries, keys, key_scales, key_biases, values, value_scales, value_biases, sinks,
) -> Tuple[float, int, int, str]:
    """``(scale, group_size, bits, mode)`` as Python scalars, or a TypeError
    naming the first argument of a wrong type.

    Takes what MLX's own functions take: any real number for ``scale``
    (NumPy's ``float32`` included), any integer for ``group_size`` and
    ``bits`` (NumPy's ``int64`` included, through ``__index__``), never a
    bool.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            "[quant_sdpa] scale must be a float (a Python or NumPy real number); "
            f"got {type(scale).__name__}."
        )
    group_size, bits = _as_int("group_size", group_size), _as_int("bits", bits)
    if not isinstance(mode, str):
        raise TypeError(f"[quant_sdpa] mode must be a str; got {type(mode).__name__}.")
    arrays = (
        ("queries", queries),
        ("keys", keys),
        ("key_scales", key_scales),
        ("values", values),
        ("value_scales", value_scales),
    )
    for name, val in arrays:
        if not isinstance(val, mx.array):
            raise TypeError(f"[quant_sdpa] {name} must be an mx.array; got {type(val).__name__}.")
    for name, val in (("key_biases", key_biases), ("value_biases", value_biases), ("sinks", sinks)):
        if val is not None and not isinstance(val, mx.array):
            raise TypeError(
                f"[quant_sdpa] {name} must be an mx.array or None; got {type(val).__name__}."
            )
    return float(scale), group_size, bits, str(mode)


def _check_str(name: str, val) -> None:
    if val is not None and not isinstance(val, str):
        raise TypeError(f"[quant_sdpa] {name} must be a str or None; got {type(val).__name__}.")


def _as_int(name: str, val) -> int:
    """``val`` as an int if it is an integer (a bool is not), else a TypeError naming ``name``."""
    if not isinstance(val, bool):
        try:
            return operator.index(val)
        except TypeError:
            pass
    raise TypeError(
        f"[quant_sdpa] {name} must be an int (a Python or NumPy integer); got {type(val).__name__}."
    )
