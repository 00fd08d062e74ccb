"""Quick GPU check of both CUDA kernels against the float64 oracle.

A compact sweep (formats x head dims x dtypes x GQA/Lq x masks, sinks, lse,
strided views, long contexts) that prints one line per failing case and a
summary; the test override kernel="simt" (mlx_qsdpa._ext) is toggled
in-process to run the generic kernel on the same cases as the tensor-core
one. Run from the repo root:
    PYTHONPATH=build/cuda/pkg:tests python benchmarks/cuda/smoke.py
"""

import itertools
import os
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import oracle  # noqa: E402
from mlx_qsdpa import SUPPORTED_FORMATS, _ext, quant_sdpa  # noqa: E402

DEVICE = mx.cpu if os.environ.get("SMOKE_DEVICE") == "cpu" else mx.gpu

FORMATS = list(SUPPORTED_FORMATS)


def case(fmt, D, dtype, Hq, Hkv, Lq, Lk, mask=None, sinks=False, B=1, seed=0, prefix=0):
    # Inputs and the oracle on the CPU: MLX 0.32.4's CUDA quantize/dequantize
    # have no 1-bit kernels (they leave the output unwritten).
    with mx.stream(mx.cpu):
        return _case(fmt, D, dtype, Hq, Hkv, Lq, Lk, mask, sinks, B, seed, prefix)


def _case(fmt, D, dtype, Hq, Hkv, Lq, Lk, mask, sinks, B, seed, prefix):
    mode, bits, gs = fmt
    q, k, v = oracle.make_qkv(B, Hq, Hkv, Lq, Lk + prefix, D, dtype=dtype, seed=seed)
    kq = oracle.quantize(k, gs, bits, mode)
    vq = oracle.quantize(v, gs, bits, mode)
    if prefix:  # a view of a longer preallocated cache
        kq = tuple(None if a is None else a[:, :, :Lk, :] for a in kq)
        vq = tuple(None if a is None else a[:, :, :Lk, :] for a in vq)
    sk = mx.random.normal((Hq,), key=mx.random.key(seed + 7)) if sinks else None
    m_arg = mask
    if mask == "bool":
        m_arg = mx.random.uniform(shape=(B, Hq, Lq, Lk), key=mx.random.key(seed + 3)) > 0.3
    scale = D ** -0.5
    out, lse = quant_sdpa(q, *kq, *vq, scale=scale, mask=m_arg, sinks=sk, return_lse=True,
                                   group_size=gs, bits=bits, mode=mode, stream=DEVICE)
    mx.eval(out, lse)
    ref, ref_lse = oracle.reference(q, kq, vq, scale, gs, bits, mode, mask=m_arg, sinks=sk)
    o = np.array(out.astype(mx.float32)).astype(np.float64)
    err = np.abs(o - ref).max() / max(np.abs(ref).max(), 1e-6)
    fin = np.isfinite(ref_lse)
    lerr = np.abs(np.array(lse)[fin] - ref_lse[fin]).max() if fin.any() else 0.0
    ok = np.isfinite(o).all() and err <= oracle.RTOL[dtype] and lerr <= 2e-2 and \
        np.array_equal(np.isneginf(np.array(lse)), np.isneginf(ref_lse))
    return ok, err, lerr


def main():
    failures, total = 0, 0
    dts = [mx.float16, mx.bfloat16, mx.float32]
    plan = []
    for i, (fmt, D) in enumerate(itertools.product(FORMATS, (64, 80, 96, 128, 256))):
        if D % fmt[2]:
            continue
        plan.append(dict(fmt=fmt, D=D, dtype=dts[i % 3], Hq=8, Hkv=2, Lq=1 + i % 5, Lk=37 + 29 * i % 300,
                         mask=[None, "causal", "bool"][i % 3], sinks=i % 4 == 0, seed=i))
    a4 = ("affine", 4, 64)
    for dt in dts:
        plan += [dict(fmt=a4, D=128, dtype=dt, Hq=32, Hkv=8, Lq=1, Lk=33000, seed=1),
                 dict(fmt=a4, D=128, dtype=dt, Hq=32, Hkv=8, Lq=4, Lk=5000, mask="causal", seed=2),
                 dict(fmt=a4, D=128, dtype=dt, Hq=4, Hkv=1, Lq=32, Lk=700, mask="causal", sinks=True, seed=3),
                 dict(fmt=("mxfp4", 4, 32), D=128, dtype=dt, Hq=8, Hkv=8, Lq=1, Lk=9000, B=2, seed=4),
                 dict(fmt=("affine", 8, 32), D=64, dtype=dt, Hq=12, Hkv=4, Lq=3, Lk=3000, prefix=100, seed=5),
                 dict(fmt=a4, D=128, dtype=dt, Hq=4, Hkv=2, Lq=1, Lk=1, seed=6),
                 dict(fmt=a4, D=64, dtype=dt, Hq=4, Hkv=2, Lq=4, Lk=2, mask="causal", seed=8),
                 dict(fmt=a4, D=128, dtype=dt, Hq=4, Hkv=2, Lq=3, Lk=2, mask="causal", sinks=True, seed=7)]
    cuda = hasattr(_ext, "_set_cuda_test_overrides")  # a CUDA build
    for kernel in ("auto", "simt") if cuda else ("auto",):
        if cuda:
            _ext._set_cuda_test_overrides(kernel=None if kernel == "auto" else kernel)
        for c in plan:
            total += 1
            try:
                ok, err, lerr = case(**c)
            except Exception as e:  # noqa: BLE001
                ok, err, lerr = False, float("nan"), repr(e)
            if not ok:
                failures += 1
                c2 = dict(c)
                c2["dtype"] = str(c["dtype"]).split(".")[-1]
                print(f"FAIL kernel={kernel} {c2} err={err} lse_err={lerr}", flush=True)
    if cuda:
        _ext._set_cuda_test_overrides()
    print(f"smoke: {total - failures} passed, {failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
