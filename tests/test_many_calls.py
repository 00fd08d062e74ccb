"""Many calls in one evaluation. On a CUDA GPU, the calls of one mx.eval
hold their split-K partials until the GPU has run them; these 24 calls need
~46 MB of partials (12800 keys in 25 splits of the plan's 512), more than
the 32 MB ring of the CUDA host code (csrc/backends/cuda/quant_sdpa_cuda.cpp),
so the later ones take the fallback memory while the earlier ones hold the
ring. Every output must match the oracle, whichever memory its call got.
Under the 100-split variant of benchmarks/cuda/run_gpu.sh tests_variants the
kernel's merge tree has three levels. On other devices: a batch of calls."""

import mlx.core as mx
import numpy as np

from mlx_qsdpa import quant_sdpa
import oracle
from qsdpa_case import F16

N_CALLS = 24


def test_many_calls_in_one_eval(device):
    B, Hq, Hkv, Lq, Lk, D = 1, 32, 8, 4, 12800, 128
    mode, bits, gs = "affine", 4, 64
    _, k, v = oracle.make_qkv(B, Hq, Hkv, 1, Lk, D, dtype=F16, seed=11)
    kq = oracle.quantize(k, gs, bits, mode)
    vq = oracle.quantize(v, gs, bits, mode)
    # All queries as one [B, Hq, N_CALLS * Lq, D] array for one oracle call
    # (no mask: every query row sees every key).
    q_all, _, _ = oracle.make_qkv(B, Hq, Hkv, N_CALLS * Lq, 1, D, dtype=F16, seed=12)
    with mx.stream(oracle.CPU):
        qs = oracle.evaluated(*[q_all[:, :, i * Lq : (i + 1) * Lq, :] for i in range(N_CALLS)])
    scale = D**-0.5
    with mx.stream(device):
        outs = [quant_sdpa(q, *kq, *vq, scale=scale, group_size=gs, bits=bits, mode=mode) for q in qs]
        mx.eval(outs)
    ref, _ = oracle.reference(q_all, kq, vq, scale, gs, bits, mode)
    for i, out in enumerate(outs):
        oracle.assert_close(out, ref[:, :, i * Lq : (i + 1) * Lq, :], F16, f"call {i}")
    # The calls differ (a mix-up of partials between calls would show).
    assert not np.allclose(oracle.to_numpy(outs[0]), oracle.to_numpy(outs[1]))
