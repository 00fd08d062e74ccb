"""Where a call's time goes on the GPU: host-side graph building, host-side
recording (mx.async_eval returns once every primitive's eval_gpu has run and
the work is submitted) and the wait for the GPU, per call, for quant_sdpa
and, as references, fp16 mx.fast.scaled_dot_product_attention and one
elementwise op (MLX's per-primitive floor).

    python benchmarks/cuda/overhead.py [ctx,...] [layers]

Shape of issue 4: B=1 Hq=32 Hkv=8 D=128 Lq=1, 4-bit affine gs64, float16.
Medians over repeats, microseconds per call."""

import statistics
import sys
import time

import mlx.core as mx

from mlx_qsdpa import quant_sdpa

ctxs = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "256,4096,32768,131072").split(",")]
n_layers = int(sys.argv[2]) if len(sys.argv) > 2 else 16
reps = 40


def measure(fn):
    mx.eval(fn())
    mx.synchronize()
    build, record, total = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = fn()
        t1 = time.perf_counter()
        mx.async_eval(outs)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        build.append(t1 - t0)
        record.append(t2 - t1)
        total.append(t3 - t0)
    per = lambda xs: statistics.median(xs) / n_layers * 1e6
    return per(build), per(record), per(total)


print(f"{'ctx':>7} {'method':<12} {'build':>7} {'record':>7} {'total':>7}  (us per call, {n_layers} calls per eval)")
for ctx in ctxs:
    layers = []
    for i in range(n_layers):
        q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        k = mx.random.normal((1, 8, ctx, 128)).astype(mx.float16)
        v = mx.random.normal((1, 8, ctx, 128)).astype(mx.float16)
        kq = mx.quantize(k, group_size=64, bits=4)
        vq = mx.quantize(v, group_size=64, bits=4)
        mx.eval(q, k, v, kq, vq)
        layers.append((q, k, v, kq, vq))
    methods = {
        "quant_sdpa": lambda: [
            quant_sdpa(q, *kq, *vq, scale=128**-0.5, group_size=64, bits=4) for q, _, _, kq, vq in layers
        ],
        "fp16_sdpa": lambda: [
            mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5) for q, k, v, _, _ in layers
        ],
        "q*2": lambda: [q * 2 for q, _, _, _, _ in layers],
    }
    for name, fn in methods.items():
        b, r, t = measure(fn)
        print(f"{ctx:>7} {name:<12} {b:7.1f} {r:7.1f} {t:7.1f}", flush=True)
    del layers
