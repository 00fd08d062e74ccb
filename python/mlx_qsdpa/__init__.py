"""mlx-qsdpa: fused scaled-dot-product attention over a quantized KV cache.

Pass the cache exactly as ``mx.quantize`` returns it (and as mlx-lm's
``QuantizedKVCache`` stores it)::

    import mlx.core as mx
    from mlx_qsdpa import quant_sdpa

    k_q, k_s, k_b = mx.quantize(keys, group_size=64, bits=4)
    v_q, v_s, v_b = mx.quantize(values, group_size=64, bits=4)
    out = quant_sdpa(q, k_q, k_s, k_b, v_q, v_s, v_b, scale=D**-0.5)
"""

from ._api import quant_sdpa, is_supported_format, SUPPORTED_FORMATS, cpu_variant, cpu_variants
from . import fast
from ._ext import gpu_backend, mlx_build_version, version as _version

__version__ = _version()

__all__ = [
    "quant_sdpa",
    "is_supported_format",
    "SUPPORTED_FORMATS",
    "fast",
    "gpu_backend",
    "mlx_build_version",
    "cpu_variant",
    "cpu_variants",
    "cmake_dir",
    "include_dir",
]


def cmake_dir() -> str:
    """The directory of the installed CMake package (``find_package(mlx_qsdpa)``)."""
    import os

    return os.path.join(os.path.dirname(__file__), "share", "cmake", "mlx_qsdpa")


def include_dir() -> str:
    """The directory of the installed C++ headers."""
    import os

    return os.path.join(os.path.dirname(__file__), "include")
