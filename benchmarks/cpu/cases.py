"""CPU timings the bench CLI does not cover: the prefill case of issue 20
(causal), every format at one context, and each CPU kernel variant this
machine runs.

    python benchmarks/cpu/cases.py            # all three tables
    python benchmarks/cpu/cases.py --ctx 4096 # a shorter context

Wall time per call, median of `--reps` timed calls after one warm-up, with
the CPU model and the kernel variant printed first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

import mlx_qsdpa
from mlx_qsdpa import _ext, quant_sdpa
from mlx_qsdpa.bench import cpu_model

# One format of each decode path the CPU kernel has (a selection of the
# table, not a copy of it).
FORMATS = [("affine", 4, 64), ("affine", 8, 64), ("affine", 3, 64), ("mxfp4", 4, 32),
           ("nvfp4", 4, 16), ("mxfp8", 8, 32)]


def inputs(B, Hq, Hkv, Lq, Lk, D, dtype, fmt):
    mode, bits, gs = fmt
    q = mx.random.normal((B, Hq, Lq, D)).astype(dtype)
    k = mx.random.normal((B, Hkv, Lk, D)).astype(dtype)
    v = mx.random.normal((B, Hkv, Lk, D)).astype(dtype)
    kq = list(mx.quantize(k, group_size=gs, bits=bits, mode=mode))
    vq = list(mx.quantize(v, group_size=gs, bits=bits, mode=mode))
    if mode != "affine":
        kq, vq = kq[:2] + [None], vq[:2] + [None]
    mx.eval(q, *[a for a in kq + vq if a is not None])
    return q, kq, vq


def timed(fn, reps):
    mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def call(q, kq, vq, fmt, mask=None):
    mode, bits, gs = fmt
    D = q.shape[-1]
    return lambda: quant_sdpa(q, *kq, *vq, scale=D**-0.5, mask=mask, group_size=gs, bits=bits, mode=mode)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    default = _ext.cpu_variant()
    print(f"CPU: {cpu_model()}; variants {_ext.cpu_variants()}; mlx {mx.__version__}, mlx_qsdpa {mlx_qsdpa.__version__}")

    print(f"\nformats, decode at {args.ctx} keys (B=1 Hq=32 Hkv=8 D=128 Lq=1, float16), variant {default}")
    for fmt in FORMATS:
        q, kq, vq = inputs(1, 32, 8, 1, args.ctx, 128, mx.float16, fmt)
        print(f"  {fmt[0]:6s} bits={fmt[1]} gs={fmt[2]:3d}: {1e3 * timed(call(q, kq, vq, fmt), args.reps):7.2f} ms")

    print(f"\nvariants, affine 4-bit gs64 at {args.ctx} keys")
    q, kq, vq = inputs(1, 32, 8, 1, args.ctx, 128, mx.float16, FORMATS[0])
    for name, ok in _ext.cpu_variants():
        if ok:
            _ext._set_cpu_variant(name)
            print(f"  {name:10s}: {1e3 * timed(call(q, kq, vq, FORMATS[0]), args.reps):7.2f} ms")
    _ext._set_cpu_variant(None)

    print("\nprefill (issue 20): Lq=2048 over Lk=8192, Hq=16 Hkv=4 D=64, causal, bfloat16, affine 4-bit gs64")
    q, kq, vq = inputs(1, 16, 4, 2048, 8192, 64, mx.bfloat16, FORMATS[0])
    for name, ok in _ext.cpu_variants():
        if ok:
            _ext._set_cpu_variant(name)
            print(f"  {name:10s}: {timed(call(q, kq, vq, FORMATS[0], 'causal'), 3):6.3f} s")
    _ext._set_cpu_variant(None)


if __name__ == "__main__":
    main()
