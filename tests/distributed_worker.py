"""One rank of tests/test_distributed_launch.py's run (mlx.launch, ring backend).

``python distributed_worker.py OUTDIR [MODEL_DIR]`` under ``mlx.launch -n 2``:
every rank computes

* ``sharded_quant_sdpa`` of each case of ``OP_CASES`` over its shard of the
  case's cache (the inputs are the seeded ones of qsdpa_case.build, the same
  in every process);
* greedy generations of random mlx-lm models (test_mlx_lm's) with the
  context-parallel cache of ``mlx_qsdpa.distributed.make_cache``, and with a
  tensor-parallel model (``model.shard(group)``) over mlx-lm's
  ``QuantizedKVCache`` under ``mlx_qsdpa.mlx_lm.patch()``;
* ``python -m mlx_qsdpa.distributed`` (its function, in this process) on the
  saved model of MODEL_DIR with the prompt of MODEL_DIR/prompt.txt;

and writes what it got to ``OUTDIR/rank<r>.npz``. The test compares that
with the single-process results and the float64 oracle.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import NamedTuple, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from qsdpa_case import BF16, F16, F32, Case, build, scale_of, value_fmt  # noqa: E402


class OpCase(NamedTuple):
    case: Case
    cut: int  # rank 0 holds keys [0, cut), rank 1 keys [cut, Lk)


# Every mode of the format table, the three kinds of shard under the causal
# mask (every key seen, the shard ending at the last query, a shard ending
# among the queries: a bool mask), an empty shard, sinks, an array mask cut
# into its shards' columns, a rotation with another value format.
OP_CASES = (
    OpCase(Case(Hq=8, Hkv=2, Lq=1, Lk=1000, D=128, fmt=("affine", 4, 64), dtype=F16, mask="causal", sinks="f32", seed=1), 613),
    OpCase(Case(Hq=4, Hkv=2, Lq=8, Lk=300, D=64, fmt=("affine", 8, 32), dtype=BF16, mask="causal", seed=2), 296),
    OpCase(Case(Hq=4, Hkv=1, Lq=8, Lk=300, D=64, fmt=("mxfp4", 4, 32), dtype=F16, mask="causal", sinks="f32", seed=3), 0),
    OpCase(Case(B=2, Hq=4, Hkv=2, Lq=3, Lk=300, D=64, fmt=("nvfp4", 4, 16), dtype=F32, seed=4), 150),
    OpCase(Case(Hq=4, Hkv=2, Lq=3, Lk=300, D=64, fmt=("mxfp8", 8, 32), dtype=F16, mask="causal", seed=5), 299),
    OpCase(Case(Hq=4, Hkv=2, Lq=1, Lk=200, D=128, fmt=("turbo", 3, 64), vfmt=("affine", 4, 64), rotation="hadamard",
                dtype=F16, mask="causal", seed=6), 40),
    OpCase(Case(Hq=4, Hkv=2, Lq=4, Lk=256, D=64, fmt=("affine", 2, 32), dtype=F32, mask="bool:1HQK", seed=7), 100),
    OpCase(Case(B=2, Hq=8, Hkv=2, Lq=4, Lk=500, D=128, fmt=("affine", 4, 64), dtype=F16, mask="causal", sinks="f16", seed=8), 200),
)


def shard(c: Case, cut: int, rank: int) -> Tuple[int, int]:
    """The key range [a, b) that ``rank`` holds (2 ranks)."""
    return (0, cut) if rank == 0 else (cut, c.Lk)


def format_args(c: Case) -> dict:
    mode, bits, gs = c.fmt
    vmode, vbits, vgs = value_fmt(c)
    return dict(
        group_size=gs, bits=bits, mode=mode, value_mode=vmode, value_bits=vbits, value_group_size=vgs,
        rotation=c.rotation,
    )


def shard_inputs(c: Case, a: int, b: int, inputs):
    """The case's inputs with keys, values and an array mask cut to keys [a, b)."""
    q, kq, vq, mask, sinks = inputs
    with mx.stream(mx.cpu):
        kq, vq = (tuple(None if t is None else t[..., a:b, :] for t in x) for x in (kq, vq))
        if isinstance(mask, mx.array):
            mask = mask[..., a:b]
        mx.eval(*[t for t in (*kq, *vq) if t is not None], *([mask] if isinstance(mask, mx.array) else []))
    return q, kq, vq, mask, sinks


def run_op_case(oc: OpCase, rank: int, group) -> Tuple[np.ndarray, np.ndarray]:
    from mlx_qsdpa.distributed import sharded_quant_sdpa

    c = oc.case
    a, b = shard(c, oc.cut, rank)
    q, kq, vq, mask, sinks = shard_inputs(c, a, b, build(c))
    offsets = dict(key_offset=a, query_offset=c.Lk - c.Lq) if mask == "causal" else {}
    out, lse = sharded_quant_sdpa(
        q, *kq, *vq, scale=scale_of(c), mask=mask, sinks=sinks, group=group, return_lse=True,
        **offsets, **format_args(c),
    )
    mx.eval(out, lse)
    return np.array(out.astype(F32)), np.array(lse)


# ---------------------------------------------------------------------------
# mlx-lm
# ---------------------------------------------------------------------------


def generate_context_parallel(make_model, group, bits: int = 4):
    """Greedy tokens and log-probabilities with every full-attention layer's
    cache spread over the ranks, and the token count each rank held."""
    import test_mlx_lm as t
    import mlx_qsdpa.distributed as dist
    import mlx_qsdpa.mlx_lm as qlm

    model = make_model()
    cache = dist.make_cache(model, bits=bits, group=group)
    try:
        toks, lps = t.generate(model, t.prompt_tokens(), prompt_cache=cache)
    finally:
        qlm.unpatch()
    sharded = [c for c in cache if isinstance(c, dist.ContextParallelKVCache)]
    return np.array(toks), np.array(lps), np.array(sharded[0].rank_lengths)


def generate_tensor_parallel(group, bits: int = 4):
    """Greedy generation of a Llama sharded over the ranks by mlx-lm
    (``model.shard``), its quantized attention through the patch."""
    import test_mlx_lm as t
    import mlx_qsdpa.mlx_lm as qlm

    model = t.make_llama()
    model.shard(group)
    mx.eval(model.parameters())
    qlm.reset_stats()
    with qlm.patched():
        toks, lps = t.generate(model, t.prompt_tokens(), kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
    s = qlm.stats()
    return np.array(toks), np.array(lps), np.array([s["routed"], s["fallback"]])


def main(outdir: str, model_dir: Optional[str]) -> None:
    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    assert group.size() == 2, group.size()
    results = {}
    for i, oc in enumerate(OP_CASES):
        results[f"op{i}_out"], results[f"op{i}_lse"] = run_op_case(oc, rank, group)
    if importlib.util.find_spec("mlx_lm") is None:  # the test skips its checks
        np.savez(os.path.join(outdir, f"rank{rank}.npz"), **results)
        return
    import test_mlx_lm as t

    for name, make in (("llama", t.make_llama), ("gpt_oss", t.make_gpt_oss)):
        toks, lps, lengths = generate_context_parallel(make, group)
        results[f"cp_{name}_tokens"], results[f"cp_{name}_logprobs"] = toks, lps
        results[f"cp_{name}_rank_lengths"] = lengths
    toks, lps, stats = generate_tensor_parallel(group)
    results["tp_tokens"], results["tp_logprobs"], results["tp_stats"] = toks, lps, stats
    finish()
    if model_dir is not None:
        with open(os.path.join(model_dir, "prompt.txt")) as f:
            results["command_stdout"], results["command_stderr"] = map(np.array, run_generate_command(model_dir, f.read()))
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **results)


def finish() -> None:
    """Waits for the last step before exiting. mlx-lm's generate_step leaves
    the step after its last token evaluating on its stream; a rank that
    exits meanwhile cuts the other's collectives of that step short."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)


def run_generate_command(model_dir: str, prompt: str) -> Tuple[str, str]:
    """``python -m mlx_qsdpa.distributed`` run in this rank: (stdout, stderr)."""
    import contextlib
    import io

    import mlx_qsdpa.distributed as dist

    argv, sys.argv = sys.argv, ["mlx_qsdpa.distributed", *GENERATE_ARGS, "--model", model_dir, "--prompt", prompt]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            dist._generate_command()
    finally:
        sys.argv = argv
    return out.getvalue(), err.getvalue()


GENERATE_ARGS = ("--kv-bits", "4", "--max-tokens", "24", "--ignore-chat-template", "--prefill-step-size", "64")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
