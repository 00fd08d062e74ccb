"""The README's recipe for an nvfp4 cache quantized with a global scale:
fold gk / 2688 into `scale` and multiply the output by gv / 2688."""

import mlx.core as mx
import numpy as np

import oracle
from mlx_qsdpa import quant_sdpa


def test_nvfp4_global_scale_recipe(device):
    q, k, v = oracle.make_qkv(2, 4, 2, 3, 150, 64, mx.float32, seed=7)
    # The inputs and the reference on the CPU (oracle.py); the op on the test device.
    with mx.stream(oracle.CPU):
        gk, gv = mx.abs(k).max(), mx.abs(v).max() * 0.5
        kq = mx.quantize(k, group_size=16, bits=4, mode="nvfp4", global_scale=gk)
        vq = mx.quantize(v, group_size=16, bits=4, mode="nvfp4", global_scale=gv)
        oracle.evaluated(kq, vq)
        deq = lambda w, g: np.array(
            mx.dequantize(*w, group_size=16, bits=4, mode="nvfp4", global_scale=g, dtype=mx.float32)
        ).astype(np.float64)
        ref, _ = oracle.attention64(np.array(q).astype(np.float64), deq(kq, gk), deq(vq, gv), 0.125, mask="causal")
    out = quant_sdpa(
        q, kq[0], kq[1], None, vq[0], vq[1], None, scale=0.125 * gk.item() / 2688,
        mask="causal", group_size=16, bits=4, mode="nvfp4", stream=device,
    ) * (gv.item() / 2688)
    oracle.assert_close(out, ref, mx.float32, "nvfp4 with global scales")
