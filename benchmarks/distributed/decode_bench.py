"""Context-parallel decode on this machine: 1 rank vs N ranks started by mlx.launch.

    python benchmarks/distributed/decode_bench.py                      # 1 and 2 ranks
    python benchmarks/distributed/decode_bench.py --ranks 1,2 --ctx 4096,65536 --layers 4

A decode token of an attention-only model: ``--layers`` layers, each a
``sharded_quant_sdpa`` over its own cache of ``ctx`` tokens (B=1, Hq=32,
Hkv=8, D=128, float16 queries, 4-bit affine gs64), the next layer's queries
being the previous layer's output, so that the layers' all_gathers run one
after the other as in a model. Each rank holds ``ctx / N`` tokens (a
contiguous shard). For each context it prints, medians of ``--reps``
evaluations after one warm-up (and the fastest, where noted: on a loaded
machine the median mostly measures waiting for a core):

* ``token``: one token through all the layers, evaluated once;
* ``attn/layer``: ``token / layers``;
* ``local/layer``: the rank's own quant_sdpa alone (no all_gather, no merge);
* ``gather/layer``: one all_gather of the packed (out, lse) a layer sends
  (``Hq * (D + 1)`` float32 values per rank), chained ``layers`` times,
  per gather: the communication cost of a layer.

The driver (no ``--worker``) runs 1 rank as a plain process and N > 1
ranks with ``mlx.launch -n N`` (ring backend, 127.0.0.1), each rank with
``MLX_QSDPA_NUM_THREADS = cores / N`` so that the ranks share the cores
rather than oversubscribe them. Ranks on one machine share its cores and
memory bandwidth: the numbers show the cost of the split and of the
communication, not the speedup of ranks on separate machines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import time

B, HQ, HKV, D, GS, BITS = 1, 32, 8, 128, 64, 4


def _timed(fn, reps):
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def worker(args) -> None:
    """One rank: times every context, prints one JSON line (rank 0)."""
    import mlx.core as mx

    from mlx_qsdpa import quant_sdpa
    from mlx_qsdpa.distributed import sharded_quant_sdpa

    group = mx.distributed.init(backend="ring", strict=True) if args.ranks > 1 else mx.distributed.init()
    rank, n = group.rank(), group.size()
    assert n == args.ranks, (n, args.ranks)
    rows = []
    for ctx in args.ctx:
        local = ctx // n
        key_offset = rank * local
        caches = []
        for layer in range(args.layers):
            key = mx.random.key(1000 * layer + rank)
            k, v = mx.random.normal((2, B, HKV, local, D), key=key).astype(mx.float16)
            caches.append((mx.quantize(k, group_size=GS, bits=BITS), mx.quantize(v, group_size=GS, bits=BITS)))
            mx.eval(caches[-1])
        q0 = mx.random.normal((B, HQ, 1, D), key=mx.random.key(7)).astype(mx.float16)
        scale = D**-0.5

        def token():
            q = q0
            for kq, vq in caches:
                q = sharded_quant_sdpa(
                    q, *kq, *vq, scale=scale, mask="causal", key_offset=key_offset, query_offset=ctx - 1,
                    group=group, group_size=GS, bits=BITS,
                )
            return q

        def local_only():
            q = q0
            for kq, vq in caches:
                q = quant_sdpa(q, *kq, *vq, scale=scale, group_size=GS, bits=BITS)
            return q

        packed = mx.zeros((B, HQ, 1, D + 1), dtype=mx.float32)

        def gathers():
            x = packed
            for _ in range(args.layers):
                x = mx.distributed.all_gather(x, group=group)[:B] + 1
            return x

        t_token, t_token_min = _timed(token, args.reps)
        t_local, _ = _timed(local_only, args.reps)
        t_gather, t_gather_min = _timed(gathers, args.reps) if n > 1 else (0.0, 0.0)
        rows.append(dict(ctx=ctx, tokens_per_rank=local, token_s=t_token, token_min_s=t_token_min,
                         local_layer_s=t_local / args.layers, gather_layer_s=t_gather / args.layers,
                         gather_layer_min_s=t_gather_min / args.layers))
        del caches
    if rank == 0:
        print("RESULT " + json.dumps(dict(ranks=n, rows=rows)), flush=True)


def _launcher() -> str:
    path = os.path.join(sysconfig.get_path("scripts"), "mlx.launch")
    return path if os.path.exists(path) else "mlx.launch"


def _run(n: int, args) -> dict:
    worker_args = ["--worker", "--ranks", str(n), "--ctx", ",".join(map(str, args.ctx)),
                   "--layers", str(args.layers), "--reps", str(args.reps)]
    threads = str(max(1, (os.cpu_count() or 1) // n))
    if n == 1:
        cmd = [sys.executable, os.path.abspath(__file__), *worker_args]
        env = dict(os.environ, MLX_QSDPA_NUM_THREADS=threads)
    else:
        cmd = [_launcher(), "-n", str(n), "--backend", "ring", "--starting-port", str(args.port),
               "--env", f"MLX_QSDPA_NUM_THREADS={threads}", "--python", sys.executable, "--",
               os.path.abspath(__file__), *worker_args]
        env = None
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=args.timeout, env=env)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def _fmt_ms(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2", help="rank counts, comma separated (default 1,2)")
    ap.add_argument("--ctx", default="4096,16384,65536", help="total contexts, comma separated")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--port", type=int, default=32323, help="the ring backend's first port")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run before it counts as hung")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ctx = [int(c) for c in args.ctx.split(",")]
    if args.worker:
        args.ranks = int(args.ranks)
        worker(args)
        return

    import mlx.core as mx

    import mlx_qsdpa
    from mlx_qsdpa.bench import cpu_model

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"# CPU: {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), kernel variant "
          f"{mlx_qsdpa.cpu_variant()}, MLX {mx.__version__}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# B={B} Hq={HQ} Hkv={HKV} D={D} float16, {BITS}-bit affine gs{GS}, {args.layers} layers, "
          f"medians of {args.reps}")
    print("| ranks | ctx | tokens/rank | token (min) | attn/layer | local/layer | gather/layer (min) |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(r) for r in args.ranks.split(",")):
        res = _run(n, args)
        for row in res["rows"]:
            gather = f"{_fmt_ms(row['gather_layer_s'])} ({_fmt_ms(row['gather_layer_min_s'])})" if n > 1 else "-"
            print(f"| {n} | {row['ctx']} | {row['tokens_per_rank']} | {_fmt_ms(row['token_s'])} "
                  f"({_fmt_ms(row['token_min_s'])}) | "
                  f"{_fmt_ms(row['token_s'] / args.layers)} | {_fmt_ms(row['local_layer_s'])} | {gather} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
