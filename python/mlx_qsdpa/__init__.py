"""mlx-qsdpa: fused scaled-dot-product attention over a quantized KV cache.

Pass the cache exactly as ``mx.quantize`` returns it (and as mlx-lm's
``QuantizedKVCache`` stores it)::

    import mlx.core as mx
    from mlx_qsdpa import quant_sdpa

    k_q, k_s, k_b = mx.quantize(keys, group_size=64, bits=4)
    v_q, v_s, v_b = mx.quantize(values, group_size=64, bits=4)
    out = quant_sdpa(q, k_q, k_s, k_b, v_q, v_s, v_b, scale=D**-0.5)

The compiled extension runs only with the MLX it was built against: importing
the package with another one raises ImportError naming both and the fix
(``python -m mlx_qsdpa info`` shows them).
"""

import os
import sys

from . import _build_info
from ._mlx_check import load_extension

__version__ = _build_info.version

__all__ = [
    "quant_sdpa",
    "merge_attention",
    "quantize",
    "dequantize",
    "rotation_matrix",
    "is_supported_format",
    "SUPPORTED_FORMATS",
    "format_table",
    "FormatInfo",
    "fast",
    "gpu_backend",
    "mlx_build_version",
    "cpu_variant",
    "cpu_variants",
    "cmake_dir",
    "include_dir",
]


def _is_the_command() -> bool:
    """Whether this process runs ``python -m mlx_qsdpa`` or the ``mlx-qsdpa`` script.

    ``python -m`` imports the package before it runs ``__main__`` (with
    ``sys.argv[0] == "-m"`` meanwhile), so the command's ``info`` could not
    report a broken install if the import raised.
    """
    arg0 = (getattr(sys, "argv", None) or [""])[0]
    return arg0 == "-m" or os.path.basename(arg0) == "mlx-qsdpa"


# Checks the installed MLX before the extension is loaded: see _mlx_check.py.
try:
    load_extension(_build_info)
except ImportError as e:
    if not _is_the_command():
        raise
    # The command reports the error (``info``) or exits with it; every
    # public name not defined below (they all need the extension) raises it.
    _load_error = e

    def __getattr__(name):
        if name in __all__:
            raise ImportError(str(_load_error)) from _load_error
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

else:
    _load_error = None
    from ._api import (
        SUPPORTED_FORMATS,
        FormatInfo,
        format_table,
        cpu_variant,
        cpu_variants,
        gpu_backend,
        is_supported_format,
        mlx_build_version,
        quant_sdpa,
        quantize,
        dequantize,
        rotation_matrix,
    )
    from ._merge import merge_attention
    from . import fast


def cmake_dir() -> str:
    """The directory of the installed CMake package (``find_package(mlx_qsdpa)``)."""
    return os.path.join(os.path.dirname(__file__), "share", "cmake", "mlx_qsdpa")


def include_dir() -> str:
    """The directory of the installed C++ headers."""
    return os.path.join(os.path.dirname(__file__), "include")
