"""``mlx_qsdpa.fast``: the op under the name MLX uses for its fused kernels."""

from ._api import quant_sdpa

__all__ = ["quant_sdpa"]
