"""Calls to profile under ncu: three quant_sdpa calls per context length
(the first call of the process is cold), each evaluated on its own. The
default shape is the issue's (B=1, Hq=32, Hkv=8, D=128, Lq=1, 4-bit affine
gs64, fp16; --dtype bfloat16 for a bf16 cache and queries).

    python benchmarks/cuda/profile.py [CTXS [LQ]] [--batch B] [--bits N] [--mode M] [--group-size GS] [--dtype float16|bfloat16]

benchmarks/cuda/ncu_table.py turns ncu's durations of such a run into a
table (it needs the same CTXS and --calls)."""

import argparse

import mlx.core as mx

from mlx_qsdpa import quant_sdpa

ap = argparse.ArgumentParser()
ap.add_argument("ctxs", nargs="?", default="4096,32768,131072")
ap.add_argument("lq", nargs="?", type=int, default=1)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--mode", default="affine")
ap.add_argument("--group-size", type=int, default=64)
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
args = ap.parse_args()
dtype = getattr(mx, args.dtype)

for ctx in [int(c) for c in args.ctxs.split(",")]:
    q = mx.random.normal((args.batch, 32, args.lq, 128)).astype(dtype)
    k = mx.random.normal((args.batch, 8, ctx, 128)).astype(dtype)
    v = mx.random.normal((args.batch, 8, ctx, 128)).astype(dtype)
    kq = mx.quantize(k, group_size=args.group_size, bits=args.bits, mode=args.mode)
    vq = mx.quantize(v, group_size=args.group_size, bits=args.bits, mode=args.mode)
    if args.mode != "affine":
        kq, vq = (kq[0], kq[1], None), (vq[0], vq[1], None)
    mx.eval(q, *[a for a in (*kq, *vq) if a is not None])
    for _ in range(args.calls):
        mx.eval(quant_sdpa(q, *kq, *vq, scale=128**-0.5, group_size=args.group_size, bits=args.bits, mode=args.mode))
    mx.synchronize()
