"""``python -m mlx_qsdpa bench``: quant_sdpa against what MLX users run today.

For each context length it times, on one device and in one run:

* ``quant_sdpa``      -- this package, reading the packed cache directly;
* ``fp16_sdpa``       -- ``mx.fast.scaled_dot_product_attention`` on an
                         unquantized cache of the queries' dtype;
* ``qmm_path``        -- mlx-lm's quantized-cache attention
                         (``quantized_matmul`` -> softmax -> ``quantized_matmul``);
* ``dequant_sdpa``    -- ``mx.dequantize`` then ``mx.fast.scaled_dot_product_attention``.

Each timed evaluation runs ``--layers`` independent attention calls (one per
layer of a model, each with its own cache, so caches do not stay hot) in one
``mx.eval``; the reported time is the median over repeats divided by the
number of calls. With ``--chain`` each call's queries are the previous
call's output, so the calls run one after another as a model's layers do
(independent calls may overlap on a GPU, which favours kernels that leave
part of it idle). Effective bandwidth counts the bytes a call must read: the
packed K and V words plus scales and biases for the quantized methods, the
float K and V for fp16_sdpa.

A baseline that MLX cannot run on the device for the shape asked (MLX-CUDA's
``quantized_matmul`` has no kernel for some small shapes) is reported as
unavailable: ``n/a`` in the table with MLX's error as the note, and
``"unavailable": "<error>"`` with null timings in the JSON. The other
methods are timed as usual; a failure of ``quant_sdpa`` itself still fails
the run.

The table prints times with three significant digits in the unit that fits
(``412 us``, ``86.9 ms``, ``2.31 s``), and a legend of its columns. The
header names the device, the CPU's model and the CPU kernel variant of
quant_sdpa in use (``mlx_qsdpa.cpu_variant()``).

``--json FILE`` writes ``{"config", "device", "machine", "cpu",
"cpu_variant", "mlx", "date", "command", "rows"}``; each row has ``ctx``,
``method``, ``us_per_call`` (microseconds per call, a float),
``bytes_per_call``, ``gbps`` (1e9 bytes per second), ``speedup_of_quant_sdpa``
(the method's time over quant_sdpa's), ``max_abs_diff``, ``repeats`` (the
timed evaluations whose median gives the time), ``unavailable`` and
``check_unavailable``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, asdict
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from ._api import SUPPORTED_FORMATS, cpu_variant, dequantize, quant_sdpa, quantize, rotation_matrix

METHODS = ("quant_sdpa", "fp16_sdpa", "qmm_path", "dequant_sdpa")

# The modes mx.quantized_matmul knows (the codebook mode is this package's).
MX_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


# ---------------------------------------------------------------------------
# The baselines
# ---------------------------------------------------------------------------


def qmm_attention(q, kq, vq, scale, kfmt, vfmt):
    """mlx-lm's quantized-KV attention (models.base.quantized_scaled_dot_product_attention).
    kfmt, vfmt: (mode, bits, group_size) of the keys and of the values."""
    for mode, _, _ in (kfmt, vfmt):
        if mode not in MX_MODES:
            raise ValueError(f"mx.quantized_matmul has no mode {mode!r}")
    B, Hq, L, D = q.shape
    Hkv = kq[0].shape[1]
    G = Hq // Hkv
    q = q * scale
    kq = [x for x in kq if x is not None]
    vq = [x for x in vq if x is not None]
    if G > 1:
        q = q.reshape(B, Hkv, G, L, D)
        kq = [mx.expand_dims(x, -3) for x in kq]
        vq = [mx.expand_dims(x, -3) for x in vq]
    scores = mx.quantized_matmul(q, *kq, transpose=True, group_size=kfmt[2], bits=kfmt[1], mode=kfmt[0])
    scores = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *vq, transpose=False, group_size=vfmt[2], bits=vfmt[1], mode=vfmt[0])
    return out.reshape(B, Hq, L, D) if G > 1 else out


def dequant_attention(q, kq, vq, scale, kfmt, vfmt):
    """Dequantize (mx.dequantize, or ours for the codebook mode), then MLX's SDPA."""
    k = dequantize(*kq, group_size=kfmt[2], bits=kfmt[1], mode=kfmt[0], dtype=q.dtype)
    v = dequantize(*vq, group_size=vfmt[2], bits=vfmt[1], mode=vfmt[0], dtype=q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def rotated(attention, rotation):
    """A baseline on a rotated cache: the queries rotated, the output rotated back."""
    if rotation is None:
        return attention

    def run(q, kq, vq, scale, kfmt, vfmt):
        R = rotation_matrix(q.shape[-1])
        out = attention((q.astype(mx.float32) @ R.T).astype(q.dtype), kq, vq, scale, kfmt, vfmt)
        return (out.astype(mx.float32) @ R).astype(q.dtype)

    return run


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclass
class Config:
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    dim: int = 128
    lq: int = 1
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    dtype: str = "float16"
    value_bits: Optional[int] = None  # the values' format (None: the keys')
    value_group_size: Optional[int] = None
    value_mode: Optional[str] = None
    rotation: Optional[str] = None
    layers: int = 1
    chain: bool = False  # each call's queries are the previous call's output

    @property
    def kfmt(self):
        return (self.mode, self.bits, self.group_size)

    @property
    def vfmt(self):
        return (self.value_mode or self.mode, self.value_bits or self.bits, self.value_group_size or self.group_size)


@dataclass
class Row:
    ctx: int
    method: str
    us_per_call: float
    bytes_per_call: int
    gbps: float
    speedup_of_quant_sdpa: float  # time(method) / time(quant_sdpa)
    max_abs_diff: Optional[float] = None  # vs dequant_sdpa, for quant_sdpa only
    repeats: int = 0
    # Set (to the error MLX raised) when the method could not run here; the
    # timings are then None.
    unavailable: Optional[str] = None
    # Why max_abs_diff is None for quant_sdpa (dequant_sdpa could not run).
    check_unavailable: Optional[str] = None


class Progress:
    """A one-line progress bar on stderr (silent when not a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()

    def step(self, label: str):
        self.done += 1
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / max(self.total, 1))
        el = time.perf_counter() - self.t0
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {el:5.1f}s {label:<28}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def time_calls(fn: Callable[[], List[mx.array]], min_time: float, max_reps: int) -> (float, int):
    """Median seconds of one evaluation of fn() (after one warm-up)."""
    mx.eval(fn())
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > min_time:
            break
    return statistics.median(times), len(times)


def error_text(e: BaseException, limit: int = 200) -> str:
    """One line naming an exception, for the table and the JSON."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def format_time(seconds: float) -> str:
    """``seconds`` with three significant digits in the unit that fits:
    ``"412 us"``, ``"86.9 ms"``, ``"2.31 s"``."""
    t = float(f"{seconds:.3g}")  # rounded first, so that 999.7 us prints as 1.00 ms
    for unit, per_second in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if t * per_second >= 1.0:
            break
    else:
        unit, per_second = "ns", 1e9
    return f"{_sig3(t * per_second)} {unit}"


def _sig3(v: float) -> str:
    """``v`` with three significant digits, trailing zeros kept, no exponent (1401 stays 1401)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:.0f}" if v == 0 else str(v)
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}"


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (Linux: /proc/cpuinfo; macOS: sysctl)."""
    try:
        if platform.system() == "Linux":
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        elif platform.system() == "Darwin":
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    # Arm Linux has no "model name"; platform.processor() is often empty there.
    return platform.processor() or platform.machine() or "unknown"


def nbytes(arrays) -> int:
    return int(sum(a.nbytes for a in arrays if a is not None))


def run_context(cfg: Config, ctx: int, device, methods, min_time, max_reps, progress) -> List[Row]:
    dtype = DTYPES[cfg.dtype]
    scale = cfg.dim ** -0.5
    B, Hq, Hkv, D, Lq = cfg.batch, cfg.heads, cfg.kv_heads, cfg.dim, cfg.lq
    layers = []

    def ours(q, L):
        return quant_sdpa(
            q, *L["kq"], *L["vq"], scale=scale, group_size=cfg.group_size, bits=cfg.bits, mode=cfg.mode,
            value_mode=cfg.value_mode, value_bits=cfg.value_bits, value_group_size=cfg.value_group_size,
            rotation=cfg.rotation,
        )

    with mx.stream(device):
        for i in range(cfg.layers):
            key = mx.random.key(1000 + i)
            k1, k2, k3 = mx.random.split(key, 3)
            q = mx.random.normal((B, Hq, Lq, D), key=k1).astype(dtype)
            k = mx.random.normal((B, Hkv, ctx, D), key=k2).astype(dtype)
            v = mx.random.normal((B, Hkv, ctx, D), key=k3).astype(dtype)
            (km, kb, kg), (vm, vb, vg) = cfg.kfmt, cfg.vfmt
            kq = quantize(k, kg, kb, km, rotation=cfg.rotation)
            vq = quantize(v, vg, vb, vm, rotation=cfg.rotation)
            kq, vq = (tuple(kq) + (None,))[:3], (tuple(vq) + (None,))[:3]
            layer = {"q": q, "kq": tuple(kq), "vq": tuple(vq)}
            if "fp16_sdpa" in methods:
                layer["k"], layer["v"] = k, v
            mx.eval(q, *[a for a in kq if a is not None], *[a for a in vq if a is not None])
            if "fp16_sdpa" in methods:
                mx.eval(k, v)
            layers.append(layer)

        def over_layers(call):
            """One call per layer; chained, a call's queries are the previous output."""
            def run():
                outs = []
                for L in layers:
                    q = L["q"]
                    if cfg.chain and outs:
                        q = outs[-1] if outs[-1].dtype == q.dtype else outs[-1].astype(q.dtype)
                    outs.append(call(L, q))
                return outs
            return run

        qmm = rotated(qmm_attention, cfg.rotation)
        deq = rotated(dequant_attention, cfg.rotation)
        fns = {
            "quant_sdpa": over_layers(lambda L, q: ours(q, L)),
            "fp16_sdpa": over_layers(
                lambda L, q: mx.fast.scaled_dot_product_attention(q, L["k"], L["v"], scale=scale)),
            "qmm_path": over_layers(lambda L, q: qmm(q, L["kq"], L["vq"], scale, cfg.kfmt, cfg.vfmt)),
            "dequant_sdpa": over_layers(lambda L, q: deq(q, L["kq"], L["vq"], scale, cfg.kfmt, cfg.vfmt)),
        }
        packed = nbytes(layers[0]["kq"]) + nbytes(layers[0]["vq"])
        dense = B * Hkv * ctx * D * 2 * np.dtype(np.float16 if dtype != mx.float32 else np.float32).itemsize

        # Correctness at a glance: our output against dequantize + SDPA.
        diff, diff_unavailable = None, None
        if "quant_sdpa" in methods:
            L0 = layers[0]
            a = ours(L0["q"], L0)
            mx.eval(a)
            try:
                b = deq(L0["q"], L0["kq"], L0["vq"], scale, cfg.kfmt, cfg.vfmt)
                mx.eval(b)
            except Exception as e:  # the baseline, not ours: see the module docstring
                diff_unavailable = error_text(e)
            else:
                diff = float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item())

        times: Dict[str, (float, int)] = {}
        unavailable: Dict[str, str] = {}
        for m in methods:
            if m == "quant_sdpa":
                t, n = time_calls(fns[m], min_time, max_reps)
            else:
                try:
                    t, n = time_calls(fns[m], min_time, max_reps)
                except Exception as e:  # no kernel for this shape on this device, say
                    unavailable[m] = error_text(e)
                    progress.step(f"ctx={ctx} {m} n/a")
                    continue
            times[m] = (t / cfg.layers, n)
            progress.step(f"ctx={ctx} {m}")

    rows = []
    t_ours = times.get("quant_sdpa", (math.nan, 0))[0]
    for m in methods:
        b = dense if m == "fp16_sdpa" else packed
        if m in unavailable:
            rows.append(
                Row(ctx=ctx, method=m, us_per_call=None, bytes_per_call=b, gbps=None,
                    speedup_of_quant_sdpa=None, repeats=0, unavailable=unavailable[m])
            )
            continue
        t, n = times[m]
        rows.append(
            Row(ctx=ctx, method=m, us_per_call=t * 1e6, bytes_per_call=b, gbps=b / t / 1e9,
                speedup_of_quant_sdpa=t / t_ours if t_ours == t_ours else math.nan,
                max_abs_diff=diff if m == "quant_sdpa" else None, repeats=n,
                check_unavailable=diff_unavailable if m == "quant_sdpa" else None)
        )
    return rows


def format_table(cfg: Config, device, rows: List[Row]) -> str:
    lines = [
        f"quant_sdpa bench on {device}, mlx {mx.__version__}",
        f"CPU: {cpu_model()} ({platform.machine()}); quant_sdpa's CPU kernel variant: {cpu_variant()}",
        f"B={cfg.batch} Hq={cfg.heads} Hkv={cfg.kv_heads} D={cfg.dim} Lq={cfg.lq} "
        f"{cfg.mode} bits={cfg.bits} gs={cfg.group_size}"
        f"{'' if cfg.vfmt == cfg.kfmt else ' (values: %s bits=%d gs=%d)' % cfg.vfmt}"
        f"{', rotation=' + cfg.rotation if cfg.rotation else ''} {cfg.dtype}, {cfg.layers} call(s) per eval"
        f"{', chained' if cfg.chain else ''}",
        "",
        f"{'ctx':>8} {'method':<13} {'time/call':>10} {'GB/s':>7} {'x vs ours':>10} {'reps':>5}  note",
    ]
    for r in rows:
        if r.unavailable is not None:
            lines.append(
                f"{r.ctx:>8} {r.method:<13} {'n/a':>10} {'n/a':>7} {'n/a':>10} {'-':>5}  unavailable: {r.unavailable}"
            )
            continue
        note = ""
        if r.max_abs_diff is not None:
            note = f"max|ours - dequant_sdpa| = {r.max_abs_diff:.2e}"
        elif r.check_unavailable is not None:
            note = f"max|ours - dequant_sdpa| n/a ({r.check_unavailable})"
        sp = "" if r.method == "quant_sdpa" else f"{_sig3(r.speedup_of_quant_sdpa)}x"
        lines.append(
            f"{r.ctx:>8} {r.method:<13} {format_time(r.us_per_call * 1e-6):>10} {_sig3(r.gbps):>7} {sp:>10} "
            f"{r.repeats:>5}  {note}"
        )
    lines += [
        "",
        "ctx: keys in the cache (context length).",
        "method: quant_sdpa = this package; fp16_sdpa = mx.fast.scaled_dot_product_attention on an "
        "unquantized cache; qmm_path = mlx-lm's quantized_matmul -> softmax -> quantized_matmul; "
        "dequant_sdpa = mx.dequantize, then mx.fast.scaled_dot_product_attention.",
        f"time/call: the median time of one timed evaluation divided by its {cfg.layers} call(s).",
        "GB/s: bytes the call must read (packed K/V + scales + biases; fp16_sdpa: its float K/V) / time.",
        "x vs ours: how many times longer the method takes than quant_sdpa.",
        "reps: how many timed evaluations (after one warm-up) the median is taken over.",
        "note: max|ours - dequant_sdpa| = the largest absolute difference between the outputs of "
        "quant_sdpa and dequant_sdpa on the same inputs.",
    ]
    if any(r.unavailable is not None for r in rows):
        lines.append("n/a: MLX could not run that baseline on this device for this shape (its error is the note).")
    return "\n".join(lines)


def plot(rows: List[Row], cfg: Config, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = [(r.ctx, r.us_per_call) for r in rows if r.method == m and r.us_per_call is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (keys)")
    ax.set_ylabel("µs per attention call")
    ax.set_title(f"{cfg.mode} {cfg.bits}-bit gs{cfg.group_size}, Hq={cfg.heads} Hkv={cfg.kv_heads} D={cfg.dim}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--ctx", default=None, help="comma-separated context lengths (default: 2048,8192 on the CPU; 4096,16384,32768,131072 on a GPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128, help="head dimension D")
    p.add_argument("--lq", type=int, default=1, help="query tokens per call (1 = decoding)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--mode", default="affine", choices=list(dict.fromkeys(m for m, _, _ in SUPPORTED_FORMATS)))
    p.add_argument("--value-bits", type=int, default=None, help="the values' bits (default: --bits)")
    p.add_argument("--value-group-size", type=int, default=None, help="the values' group size (default: --group-size)")
    p.add_argument("--value-mode", default=None, choices=list(dict.fromkeys(m for m, _, _ in SUPPORTED_FORMATS)),
                   help="the values' mode (default: --mode)")
    p.add_argument("--rotation", default=None, choices=["hadamard"],
                   help="quantize K/V after a randomized Hadamard rotation (seed 0)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default: MLX's default device")
    p.add_argument("--layers", type=int, default=None, help="attention calls per mx.eval (default: 1 on the CPU, 16 on a GPU)")
    p.add_argument("--chain", action="store_true",
                   help="each call's queries are the previous call's output: the calls of an eval run "
                        "one after another, as a model's layers do (default: independent calls)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--min-time", type=float, default=None, help="seconds to spend timing each method at least (default 1 CPU, 0.5 GPU)")
    p.add_argument("--max-reps", type=int, default=None,
                   help="evaluations per method at most (default 50 CPU, 5000 GPU: there --min-time decides)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--plot", default=None, help='write a PNG plot to this file (needs matplotlib: pip install "mlx-qsdpa[bench]")')
    p.add_argument("--no-progress", action="store_true")
    from . import e2e

    e2e.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "e2e", False):
        from . import e2e

        return e2e.main(args)
    if args.plot:
        # Before the benchmark, which may run for minutes.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                '--plot needs matplotlib: pip install matplotlib (or pip install "mlx-qsdpa[bench]")'
            ) from None
    device = {"cpu": mx.cpu, "gpu": mx.gpu, None: mx.default_device()}[args.device]
    if isinstance(device, mx.Device):
        dev = device
    else:
        dev = mx.Device(device)
    on_gpu = dev.type == mx.DeviceType.gpu
    if args.ctx is None:
        ctxs = [4096, 16384, 32768, 131072] if on_gpu else [2048, 8192]
    else:
        ctxs = [int(c) for c in str(args.ctx).split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    cfg = Config(
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, lq=args.lq,
        bits=args.bits, group_size=args.group_size, mode=args.mode, dtype=args.dtype,
        value_bits=args.value_bits, value_group_size=args.value_group_size, value_mode=args.value_mode,
        rotation=args.rotation,
        layers=args.layers if args.layers else (16 if on_gpu else 1), chain=args.chain,
    )
    min_time = args.min_time if args.min_time is not None else (0.5 if on_gpu else 1.0)
    # On a GPU an evaluation of 16 calls takes well under a millisecond, so a
    # fixed count of 50 is a burst of a few ms whose median varies by up to a
    # third between runs of the same build. The median over --min-time of
    # evaluations is steadier.
    max_reps = args.max_reps if args.max_reps is not None else (5000 if on_gpu else 50)
    progress = Progress(len(ctxs) * len(methods), enabled=not args.no_progress and sys.stderr.isatty())
    rows: List[Row] = []
    for ctx in ctxs:
        rows += run_context(cfg, ctx, dev, methods, min_time, max_reps, progress)
    print(format_table(cfg, dev, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": asdict(cfg), "device": str(dev), "machine": platform.platform(),
                 "cpu": cpu_model(), "cpu_variant": cpu_variant(), "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "command": " ".join(sys.argv), "rows": [asdict(r) for r in rows]},
                f, indent=2,
            )
    if args.plot:
        plot(rows, cfg, args.plot)
        print(f"plot written to {args.plot}")
    return 0
