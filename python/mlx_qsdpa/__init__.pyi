from typing import Optional, Tuple, Union

import mlx.core as mx

from . import fast as fast

__version__: str
SUPPORTED_FORMATS: Tuple[Tuple[str, int, int], ...]

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
) -> Union[mx.array, Tuple[mx.array, mx.array]]: ...
def is_supported_format(mode: str, bits: int, group_size: int) -> bool: ...
def gpu_backend() -> str: ...
def mlx_build_version() -> str: ...
def cmake_dir() -> str: ...
def include_dir() -> str: ...
