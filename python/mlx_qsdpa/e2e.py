"""``python -m mlx_qsdpa bench --e2e``: mlx-lm decoding at long context, with and without the patch.

An mlx-lm model -- a randomly initialised Llama-style model by default, or
the local checkpoint given with ``--model PATH`` -- reads its prompt into a
``QuantizedKVCache`` (``--bits``, ``--group-size``), then decodes greedily
with mlx-lm's own ``generate_step``:

* ``mlx-lm``      -- mlx-lm's attention over the quantized cache
                     (``quantized_matmul`` -> softmax -> ``quantized_matmul``);
* ``quant_sdpa``  -- the same model under ``mlx_qsdpa.mlx_lm.patched()``.

Both decode from the *same* cache: the prompt is read once (under the patch,
which is the faster prefill), and after each timed run the cache is trimmed
back to the prompt, so every run sees identical context. Runs alternate
between the two (``--repeats`` rounds) so that load from other processes
hits both alike; the table gives the median and the range.

tokens/s counts the steady state: the time from the first to the last
generated token of a run, over the tokens in between (the first token of a
run also pays for reading its input token and is left out).

The cache is quantized from the first token, unlike ``mlx_lm.generate``
whose default ``quantized_kv_start=5000`` keeps the first 5000 tokens in a
float cache until then; decoding reads a quantized cache either way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# The default model: a small Llama-style model whose attention has a real
# model's head geometry (D=64, 4 query heads per KV head). It is small so
# that an 8K prefill stays within about a minute on a 2-core CPU; with so
# few weights per layer the attention is a large share of a decode step, so
# the speedup is larger than with a full-size model (use --model for one).
DEFAULT_MODEL = dict(
    model_type="llama",
    hidden_size=512,
    num_hidden_layers=4,
    intermediate_size=1024,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=4096,
    tie_word_embeddings=False,
)
DEFAULT_CTX = "8192"
METHODS = ("mlx-lm", "quant_sdpa")


@dataclass
class E2ERow:
    ctx: int
    method: str
    tokens_per_s: float  # median over repeats
    ms_per_token: float
    min_tokens_per_s: float
    max_tokens_per_s: float
    repeats: int
    speedup: Optional[float] = None  # quant_sdpa tok/s over mlx-lm tok/s
    error: Optional[str] = None  # why a method could not run (e.g. sinks)
    runs_tokens_per_s: List[float] = field(default_factory=list)


def add_arguments(p: argparse.ArgumentParser):
    """The --e2e flags. --ctx, --bits, --group-size, --device, --json and
    --no-progress of the kernel bench apply too (--ctx: prompt lengths)."""
    g = p.add_argument_group("end to end (--e2e): mlx-lm decoding, patched vs not")
    g.add_argument("--e2e", action="store_true",
                   help="time mlx-lm decoding with and without mlx_qsdpa.mlx_lm (needs mlx-lm); "
                        "--ctx: prompt lengths (default 8192)")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="local mlx-lm model directory (default: a random Llama-style model)")
    g.add_argument("--head-dim", type=int, default=None,
                   help="head dimension of the random model (default 64; on MLX-CUDA 0.32.4 mlx-lm's own "
                        "quantized path raised for bfloat16 models at 64 and at 128)")
    g.add_argument("--model-dtype", default=None, choices=list(DTYPES),
                   help="dtype of the random model (default bfloat16; --model keeps its own unless given)")
    g.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per timed run (default 32)")
    g.add_argument("--repeats", type=int, default=2, help="timed runs per method, alternating (default 2)")
    g.add_argument("--prefill-step", type=int, default=2048,
                   help="prompt tokens per forward pass (mlx-lm's prefill_step_size)")
    g.add_argument("--seed", type=int, default=0)


def _status(enabled: bool, msg: str):
    if enabled:
        sys.stderr.write(f"\r{msg:<78}")
        sys.stderr.flush()


def build_model(path: Optional[str], dtype, seed: int, head_dim: Optional[int] = None):
    """(model, one-line description). A local directory is loaded with
    mlx-lm's load_model (nothing is downloaded); the random model takes
    head_dim (default DEFAULT_MODEL's)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    if path is not None:
        from mlx_lm.utils import load_model

        p = Path(path)
        if head_dim is not None:
            raise SystemExit("--head-dim applies to the random model only, not to --model")
        if not (p / "config.json").is_file():
            raise SystemExit(f"--model {path}: not a local mlx-lm model directory (no config.json)")
        model, config = load_model(p)
        if dtype is not None:
            model.set_dtype(dtype)
        desc = f"{p.name} ({config.get('model_type', '?')})"
    else:
        if head_dim is not None and (head_dim <= 0 or head_dim % 32 != 0):
            raise SystemExit(f"--head-dim must be a positive multiple of 32 (a quantization group); got {head_dim}")
        a = dict(DEFAULT_MODEL, head_dim=head_dim or DEFAULT_MODEL["head_dim"])
        mx.random.seed(seed)
        model = llama.Model(llama.ModelArgs(**a))
        model.set_dtype(dtype if dtype is not None else mx.bfloat16)
        desc = (
            f"random Llama-style model ({a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
            f"Hq={a['num_attention_heads']} Hkv={a['num_key_value_heads']} D={a['head_dim']}, "
            f"MLP {a['intermediate_size']}, vocab {a['vocab_size']})"
        )
    mx.eval(model.parameters())
    params = tree_flatten(model.parameters())
    n = sum(v.size for _, v in params)
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in params})
    return model, f"{desc}, {n / 1e6:.1f}M parameters, {'/'.join(dtypes)}"


def make_quantized_cache(model, bits: int, group_size: int):
    """The model's cache with every attention KV cache a QuantizedKVCache.

    Rotating (sliding-window) caches become full QuantizedKVCaches too: mlx-lm
    cannot quantize them (to_quantized raises), and the window is still
    applied by the masks the model builds. Other caches (SSM states) stay.
    """
    from mlx_lm.models import cache as C

    out = []
    for c in C.make_prompt_cache(model):
        if isinstance(c, (C.KVCache, C.RotatingKVCache)):
            c = C.QuantizedKVCache(group_size=group_size, bits=bits)
        out.append(c)
    if not any(isinstance(c, C.QuantizedKVCache) for c in out):
        raise SystemExit("the model has no attention KV cache to quantize")
    if not C.can_trim_prompt_cache(out):
        raise SystemExit("the model's cache cannot be trimmed, so runs cannot share one prefilled cache")
    return out


def prefill(model, cache, tokens: mx.array, step: int, progress: bool, start: int, t0: float) -> None:
    """Read ``tokens`` (prompt positions ``start``...) into the cache in chunks,
    as mlx-lm's generate_step does."""
    n = tokens.size
    for i in range(0, n, step):
        model(tokens[i : i + step][None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        _status(progress, f"prefill: {start + min(i + step, n)} tokens, {time.perf_counter() - t0:.0f}s")


def _snapshot(cache):
    """Handles of their own to each QuantizedKVCache's arrays, to restore
    after a run that raised: the cache writes new keys into its arrays in
    place (lazily), so a run whose evaluation failed (MLX-CUDA has no
    quantized_matmul kernel for some shapes) leaves them depending on the
    failed graph, and every later read would fail again."""
    snap = []
    for c in cache:
        if hasattr(c, "bits") and isinstance(getattr(c, "keys", None), (tuple, list)):
            snap.append((c, tuple(mx.array(a) for a in c.keys), tuple(mx.array(a) for a in c.values)))
    return snap


def decode_run(model, cache, first: mx.array, n: int, stream) -> (float, List[int]):
    """Tokens/s of one greedy run of ``n`` tokens from ``first``; rewinds the cache."""
    from mlx_lm.generate import generate_step

    offsets = [c.offset for c in cache]
    snap = _snapshot(cache)
    stamps, toks = [], []
    try:
        for tok, _ in generate_step(first, model, prompt_cache=cache, max_tokens=n, stream=stream):
            stamps.append(time.perf_counter())
            toks.append(tok)
    except Exception:
        for c, keys, values in snap:
            c.keys, c.values = keys, values
        raise
    finally:
        # generate_step computes one token ahead; trim everything it added.
        for c, o in zip(cache, offsets):
            c.trim(c.offset - o)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), toks


def run(args: argparse.Namespace) -> dict:
    import mlx_lm

    from . import mlx_lm as qlm

    device = {"cpu": mx.cpu, "gpu": mx.gpu, None: mx.default_device()}[args.device]
    device = device if isinstance(device, mx.Device) else mx.Device(device)
    ctxs = sorted(int(c) for c in str(args.ctx or DEFAULT_CTX).split(",") if c.strip())
    if args.decode_tokens < 2 or args.repeats < 1:
        raise SystemExit("--decode-tokens must be >= 2 and --repeats >= 1")
    progress = not args.no_progress and sys.stderr.isatty()
    dtype = DTYPES[args.model_dtype] if args.model_dtype else None

    t0 = time.perf_counter()
    with mx.stream(device):
        stream = mx.new_stream(device)
        model, desc = build_model(args.model, dtype, args.seed, getattr(args, "head_dim", None))
        vocab = int(model(mx.array([[0]])).shape[-1])  # from the logits: any checkpoint's config
        cache = make_quantized_cache(model, args.bits, args.group_size)
        prompt = mx.random.randint(0, vocab, (ctxs[-1],), key=mx.random.key(args.seed + 1))

    rows: List[E2ERow] = []
    prefill_s = 0.0
    tokens_agree = []
    done = 0
    for ctx in ctxs:
        # The cache holds ctx - 1 prompt tokens; each run starts from token ctx - 1.
        t = time.perf_counter()
        with qlm.patched(), mx.stream(stream):
            prefill(model, cache, prompt[done : ctx - 1], args.prefill_step, progress, done, t0)
        prefill_s += time.perf_counter() - t
        done = ctx - 1
        first = prompt[ctx - 1 : ctx]

        rates = {m: [] for m in METHODS}
        errors = {m: None for m in METHODS}
        toks = {m: None for m in METHODS}
        for r in range(args.repeats + 1):  # round 0: warm-up, not timed
            for m in METHODS:
                if errors[m]:
                    continue
                _status(progress, f"ctx {ctx}: {m} run {r}/{args.repeats}, {time.perf_counter() - t0:.0f}s")
                qlm.reset_stats()
                try:
                    if m == "quant_sdpa":
                        with qlm.patched():
                            rate, tk = decode_run(model, cache, first, 2 if r == 0 else args.decode_tokens, stream)
                        if qlm.stats()["fallback"]:
                            errors[m] = f"{qlm.stats()['fallback']} attention calls fell back to mlx-lm"
                    else:
                        rate, tk = decode_run(model, cache, first, 2 if r == 0 else args.decode_tokens, stream)
                except Exception as e:
                    # mlx-lm's own path only: it rejects sinks over a quantized
                    # cache, and MLX-CUDA's quantized_matmul has no kernel for
                    # some shapes. A failure of quant_sdpa is not hidden.
                    if m == "quant_sdpa":
                        raise
                    errors[m] = f"mlx-lm raised: {e}"
                    continue
                if r > 0:
                    rates[m].append(rate)
                    toks[m] = tk
        if toks["mlx-lm"] and toks["quant_sdpa"]:
            a, b = toks["mlx-lm"], toks["quant_sdpa"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            tokens_agree.append((ctx, same, len(a)))
        med = {m: statistics.median(v) if v else None for m, v in rates.items()}
        for m in METHODS:
            v = rates[m]
            rows.append(
                E2ERow(
                    ctx=ctx, method=m,
                    tokens_per_s=med[m] if v else float("nan"),
                    ms_per_token=1e3 / med[m] if v else float("nan"),
                    min_tokens_per_s=min(v) if v else float("nan"),
                    max_tokens_per_s=max(v) if v else float("nan"),
                    repeats=len(v),
                    speedup=(med[m] / med["mlx-lm"]) if (m == "quant_sdpa" and v and med["mlx-lm"]) else None,
                    error=errors[m], runs_tokens_per_s=v,
                )
            )
    _status(progress, "")
    if progress:
        sys.stderr.write("\r")
    return {
        "device": str(device), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "platform": platform.platform(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
        "model": desc, "bits": args.bits, "group_size": args.group_size,
        "decode_tokens": args.decode_tokens, "prefill_step": args.prefill_step,
        "prefill_s": prefill_s, "prefill_tokens": ctxs[-1] - 1, "tokens_agree": tokens_agree,
        "total_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m mlx_qsdpa"] + sys.argv[1:]),
        "rows": [asdict(r) for r in rows],
    }


def format_table(res: dict) -> str:
    lines = [
        f"mlx-lm decode, end to end, on {res['device']} ({res['machine']}, mlx {res['mlx']}, mlx-lm {res['mlx_lm']})",
        f"model: {res['model']}",
        f"cache: QuantizedKVCache {res['bits']}-bit gs{res['group_size']}; {res['decode_tokens']} tokens per run, "
        f"greedy; prefill {res['prefill_tokens']} tokens in {res['prefill_s']:.1f} s (patched, chunks of {res['prefill_step']})",
        "",
        f"{'ctx':>7} {'attention':<11} {'tok/s':>8} {'ms/token':>9} {'range tok/s':>15} {'runs':>5} {'speedup':>8}",
    ]
    for r in res["rows"]:
        if r["error"] and not r["repeats"]:
            lines.append(f"{r['ctx']:>7} {r['method']:<11} {'-':>8} {'-':>9} {'':>15} {0:>5}  {r['error']}")
            continue
        rng = f"{r['min_tokens_per_s']:.2f}-{r['max_tokens_per_s']:.2f}"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        note = f"  {r['error']}" if r["error"] else ""
        lines.append(
            f"{r['ctx']:>7} {r['method']:<11} {r['tokens_per_s']:>8.2f} {r['ms_per_token']:>9.1f} {rng:>15} {r['repeats']:>5} {sp:>8}{note}"
        )
    lines.append("")
    lines.append("attention: mlx-lm = its quantized_matmul path (unpatched); quant_sdpa = under mlx_qsdpa.mlx_lm.patched().")
    lines.append("tok/s: median over runs (alternating), first token of each run excluded; speedup = quant_sdpa / mlx-lm.")
    for ctx, same, n in res["tokens_agree"]:
        what = f"all {n} agree" if same == n else f"first differ at token {same} of {n}"
        lines.append(f"greedy tokens at ctx {ctx}, mlx-lm vs quant_sdpa: {what}.")
    lines.append(f"total time {res['total_s']:.0f} s.")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        raise SystemExit('bench --e2e needs mlx-lm: pip install "mlx-qsdpa[mlx-lm]"')
    res = run(args)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
