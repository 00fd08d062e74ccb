"""Type stubs of the compiled core (nanobind module ``mlx_qsdpa._ext``)."""

from typing import List, Optional, Tuple, Union

import mlx.core as mx

def quant_sdpa(
    queries: mx.array,
    keys: mx.array,
    key_scales: mx.array,
    key_biases: Optional[mx.array],
    values: mx.array,
    value_scales: mx.array,
    value_biases: Optional[mx.array],
    scale: float,
    mask_mode: str,
    mask_arr: Optional[mx.array],
    sinks: Optional[mx.array],
    group_size: int,
    bits: int,
    mode: str,
    value_mode: Optional[str],
    value_bits: Optional[int],
    value_group_size: Optional[int],
    rotation: Optional[str],
    rotation_seed: int,
    return_lse: bool,
    stream: Union[None, mx.Stream, mx.Device],
) -> Union[mx.array, Tuple[mx.array, mx.array]]: ...
def quantize(
    x: mx.array,
    group_size: int,
    bits: int,
    mode: str,
    rotation: Optional[str],
    rotation_seed: int,
    stream: Union[None, mx.Stream, mx.Device],
) -> Tuple[mx.array, ...]:
    """The C++ quantize; use mlx_qsdpa.quantize."""
def dequantize(
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array],
    group_size: int,
    bits: int,
    mode: str,
    rotation: Optional[str],
    rotation_seed: int,
    dtype: Optional[mx.Dtype],
    stream: Union[None, mx.Stream, mx.Device],
) -> mx.array:
    """The C++ dequantize; use mlx_qsdpa.dequantize."""
def rotation_matrix(D: int, seed: int) -> mx.array:
    """The C++ rotation_matrix; use mlx_qsdpa.rotation_matrix."""
def _set_dequantized_fallback(on: bool) -> None:
    """Tests only: route every call through the GPU backends' dequantize fallback, on any device."""
def is_supported_format(mode: str, bits: int, group_size: int) -> bool: ...
def format_table() -> List[Tuple[str, int, Tuple[int, ...], str, bool, bool]]:
    """The format table (formats.h): (mode, bits, group_sizes, kernel_token, has_biases, float_scales) per row."""
def version() -> str:
    """The version of mlx-qsdpa."""
def mlx_build_version() -> str:
    """The version of MLX the extension was compiled against."""
def gpu_backend() -> str:
    """'metal', 'cuda' or 'none': the GPU kernels compiled into this build."""
def cpu_variant() -> str:
    """The CPU kernel variant in use, chosen at load time among those compiled in:
    'x86-64-v2', 'x86-64-v3', 'x86-64-v4', 'arm64-neon', 'generic' or 'native'."""
def cpu_variants() -> List[Tuple[str, bool]]:
    """The CPU kernel variants compiled in, best first, each with whether this CPU can run it."""
def _set_cpu_variant(name: Optional[str]) -> None:
    """Tests only: run the CPU kernel variant `name` (None: the automatic choice)."""
def _set_metal_test_blocks(blocks: int) -> None:
    """Tests only, Metal builds only: split every call's keys into ``blocks`` blocks
    (the 2-pass kernels from 2 on) as far as the key length allows; 0 restores the
    plan's own choice. Raises RuntimeError in builds without the Metal backend."""
def _set_cuda_test_overrides(kernel: Optional[str] = None, splits: int = 0, workspace: Optional[str] = None) -> None:
    """Tests and tuning only: how later CUDA calls launch. kernel="simt" runs the generic
    kernel wherever the tensor-core one would; splits > 0 fixes the key split count (clamped
    as the plan's own); workspace="pool" takes the split-K memory from the stream-ordered
    pool instead of the rings. Each call replaces all three; no arguments restore the plan.

    Only in extensions built with the CUDA backend (``gpu_backend() == "cuda"``); absent
    elsewhere.
    """
def _decode_table(what: str) -> List[float]: ...
def _unpack_row(words: List[int], bits: int) -> List[int]: ...
