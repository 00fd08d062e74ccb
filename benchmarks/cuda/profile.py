"""Calls to profile under ncu: one quant_sdpa call per context length of
the issue's shape (B=1, Hq=32, Hkv=8, D=128, Lq=1, 4-bit affine gs64, fp16),
each evaluated on its own, after a warm-up."""

import sys

import mlx.core as mx

from mlx_qsdpa import quant_sdpa

ctxs = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "4096,32768,131072").split(",")]
lq = int(sys.argv[2]) if len(sys.argv) > 2 else 1
for ctx in ctxs:
    q = mx.random.normal((1, 32, lq, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, ctx, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, ctx, 128)).astype(mx.float16)
    kq = mx.quantize(k, group_size=64, bits=4)
    vq = mx.quantize(v, group_size=64, bits=4)
    mx.eval(q, kq, vq)
    for _ in range(3):
        mx.eval(quant_sdpa(q, *kq, *vq, scale=128**-0.5, group_size=64, bits=4))
    mx.synchronize()
