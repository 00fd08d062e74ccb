"""``python -m mlx_qsdpa quality``: attention error of each K/V format at its true size.

For every row of the table, keys and values are quantized with
:func:`mlx_qsdpa.quantize` (rotation included), decoded with
:func:`mlx_qsdpa.dequantize` (the decoding the kernels implement; the oracle
tests hold them to it), and attention over them is compared with attention
over the unquantized float16 K/V, both computed in float64:

* ``rel err``: ``||out - ref||_F / ||ref||_F`` over every query row;
* ``cosine``: the mean over query rows of ``cos(out_row, ref_row)``;
* ``K only``: ``rel err`` with the keys quantized and the values exact;
* ``K recon``: ``||k_dequantized - k||_F / ||k||_F`` (for qjl rows: of the
  turbo part).

``bits/elem`` counts what the cache stores per element: the code bits plus
the scales (and biases) of a group spread over its elements -- affine: scale
and bias in the cache dtype (float16: 32 bits per group); mxfp4/mxfp8: an
8-bit scale per 32; nvfp4: an 8-bit scale per 16; turbo: one float16 scale
per group.

The K/V generators (no downloads; fixed seeds; ``--seed``; ``--generator``).
Both give keys ``D`` channels in RoPE pairs ``(c, c + D/2)``, heavy-tailed
token noise ``T[h, t, c] * n[h, t]`` -- ``T`` Student-t with 4 degrees of
freedom over ``sqrt(2)`` (unit variance), ``n[h, t] = exp(N(0, 0.5^2))`` a
per-token norm spread -- and ``--outlier-pairs`` outlier pairs, each with one
factor drawn uniformly in ``[10, 50]``. They differ in what an outlier is:

* ``bias`` (the default): an outlier is a per-channel offset shared by every
  token, ``K[h, t, c] = T[h, t, c] * n[h, t] + b[h, c]``, on one channel of
  each outlier pair (``b = +-factor``, random sign; pairs and channels drawn
  per head). This is the structure published for real key caches: KIVI
  (arXiv 2402.02750) finds keys with a few fixed outlier channels whose
  values are consistent across tokens; SageAttention (arXiv 2410.02367)
  removes them by subtracting the mean key over tokens, which leaves the
  softmax unchanged because the offset adds the same ``q.b`` to every logit;
  PolarQuant (arXiv 2502.00527) finds the outlier in one dimension of a RoPE
  pair. RoPE is not applied: an outlier pair of low frequency (where Jin et
  al., arXiv 2502.01563, find them) turns by little over the window, and a
  constant offset is the limit. An offset carries no logit information, so
  the logits come from the token noise of every channel.
* ``bias-q``: ``bias`` keys, and queries that also have an offset of
  ``+-factor`` (independent factor and sign) on the outlier channels of
  their head: Jin et al. find massive values in the queries on the same
  dimensions as in the keys. The query offsets weight the keys' token noise
  on those channels.
* ``zero-mean`` (the generator of earlier tables): ``K[h, t, c] = T[h, t, c]
  * s[c] * n[h, t]`` with ``s = 1`` except both channels of each outlier pair
  (the same pairs for every head), scaled by the pair's factor: the outlier
  channels are heavy-tailed noise of mean zero, and with isotropic queries
  they carry almost all of the logits' variance.

For all three, values ``V[h, t, c] = N(0, 1) * exp(N(0, 0.25^2))`` (per
token): close to Gaussian, as published (KIVI: values have no fixed outlier
channels). Queries are ``N(0, 1)`` in every channel (plus the offsets of
``bias-q``), times the one constant that makes the standard deviation of the
logits ``q.k / sqrt(D)`` over the keys of a query row, averaged over the
rows, equal to ``--logit-std`` (default 2: attention neither uniform nor
one-hot; ``zero-mean`` uses the standard deviation over all logits, as
before). Q, K and V are rounded to float16 (the unquantized cache); the
softmax scale is ``1/sqrt(D)``.

``qjl`` rows are an experiment, not a format of the op: TurboQuant's 1-bit
QJL residual on the keys. Keys are turbo with one bit less, plus the signs
of ``m = D - 16`` Gaussian projections of the residual ``r = k - k_turbo``
and the norm ``||r||`` in float16 (``m + 16 = D`` bits per key: one bit per
element, so a ``qjl`` row of ``b`` bits is exactly as large as turbo ``b``);
the logits use the unbiased estimator ``q.k_turbo + ||r|| sqrt(pi/2)/m
<S q, sign(S r)>``. Values are turbo with ``b`` bits.

``--model-steps N`` adds, for each format that is a cache format, how a
random mlx-lm model's next-token logits change with the cache in that format
(:func:`random_model`; float16, teacher-forced over N decode steps on the
tokens the float16 cache generates greedily): the top-1 agreement and the
relative logit error ``||logits - ref||_F / ||ref - mean_vocab(ref)||_F``.
The same measures for a float32 copy of the model (float32 cache) against the
float16 one give the noise floor: a difference below it is rounding, not
quantization.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np

from ._api import dequantize, quantize

import mlx.core as mx  # noqa: E402

# float16 scales and biases (the cache's dtype); the fp modes' 8-bit scales.
_FLOAT_SCALE_BITS = 16
_FP_SCALE_BITS = 8


@dataclass(frozen=True)
class Fmt:
    """A row: keys in (mode, bits, group_size); values too, except for qjl."""

    mode: str
    bits: int
    group_size: int
    rotation: Optional[str] = None
    qjl: bool = False  # keys: turbo (bits - 1) + 1-bit QJL residual

    @property
    def name(self) -> str:
        if self.mode in ("affine", "turbo"):
            base = f"{self.mode}{self.bits - 1 if self.qjl else self.bits}"
        else:
            base = self.mode  # the fp modes' names carry their bits
        if self.mode in ("affine", "turbo"):
            base += f" gs{self.group_size}"
        if self.rotation:
            base += " +hadamard"
        if self.qjl:
            base += " +qjl"
        return base


def bits_per_element(mode: str, bits: int, group_size: int) -> float:
    """What one element of a cache in this format costs, scales and biases included."""
    if mode == "affine":
        return bits + 2 * _FLOAT_SCALE_BITS / group_size
    if mode == "turbo":
        return bits + _FLOAT_SCALE_BITS / group_size
    if mode in ("mxfp4", "mxfp8", "nvfp4"):
        return bits + _FP_SCALE_BITS / group_size
    raise ValueError(f"no byte count for mode {mode!r}")


def fmt_bits(f: Fmt) -> float:
    """bits per element of a row: for qjl, turbo(bits-1) + one bit per element (see the module docstring)."""
    if f.qjl:
        return bits_per_element("turbo", f.bits - 1, f.group_size) + 1.0
    return bits_per_element(f.mode, f.bits, f.group_size)


def default_formats() -> List[Fmt]:
    rows = []
    for rot in (None, "hadamard"):
        for bits in (2, 3, 4, 8):
            for gs in (32, 64):
                rows.append(Fmt("affine", bits, gs, rot))
    for mode, bits, gs in (("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)):
        rows.append(Fmt(mode, bits, gs))
        if mode != "mxfp8":
            rows.append(Fmt(mode, bits, gs, "hadamard"))
    for bits in (2, 3, 4):
        for gs in (32, 64, 128):
            rows.append(Fmt("turbo", bits, gs, "hadamard"))
    for bits in (2, 3, 4):
        rows.append(Fmt("turbo", bits, 64))
    for bits in (3, 4):
        for gs in (64, 128):
            rows.append(Fmt("turbo", bits, gs, "hadamard", qjl=True))
    return rows


# ---------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------


GENERATORS = ("bias", "bias-q", "zero-mean")


def generate_qkv(heads: int, keys: int, queries: int, D: int, outlier_pairs: int, logit_std: float, seed: int,
                 generator: str = "bias"):
    """``(q [H, Lq, D], k [H, Lk, D], v [H, Lk, D])`` float16 NumPy arrays (the generators of the module docstring)."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}; got {generator!r}")
    if D % 2 or outlier_pairs > D // 2:
        raise ValueError(f"D={D} must be even and hold {outlier_pairs} RoPE pairs")
    if generator == "zero-mean":
        return _generate_zero_mean(heads, keys, queries, D, outlier_pairs, logit_std, seed)
    rng = np.random.default_rng(seed)
    t = rng.standard_t(4, size=(heads, keys, D)) / math.sqrt(2.0)
    k = t * np.exp(rng.normal(0.0, 0.5, size=(heads, keys, 1)))
    v = rng.standard_normal((heads, keys, D)) * np.exp(rng.normal(0.0, 0.25, size=(heads, keys, 1)))
    q = rng.standard_normal((heads, queries, D))
    for h in range(heads):
        pairs = rng.choice(D // 2, size=outlier_pairs, replace=False)
        channels = pairs + (D // 2) * rng.integers(0, 2, size=outlier_pairs)
        k[h, :, channels] += (rng.choice([-1.0, 1.0], size=outlier_pairs)
                              * rng.uniform(10.0, 50.0, size=outlier_pairs))[:, None]
        if generator == "bias-q":
            q[h, :, channels] += (rng.choice([-1.0, 1.0], size=outlier_pairs)
                                  * rng.uniform(10.0, 50.0, size=outlier_pairs))[:, None]
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    logits = np.einsum("hqd,hkd->hqk", q, k16.astype(np.float64)) / math.sqrt(D)
    q *= logit_std / logits.std(axis=-1).mean()
    return q.astype(np.float16), k16, v16


def _generate_zero_mean(heads: int, keys: int, queries: int, D: int, outlier_pairs: int, logit_std: float,
                        seed: int):
    rng = np.random.default_rng(seed)
    s = np.ones(D)
    pairs = rng.choice(D // 2, size=outlier_pairs, replace=False)
    for c, m in zip(pairs, rng.uniform(10.0, 50.0, size=outlier_pairs)):
        s[c] = s[c + D // 2] = m
    t = rng.standard_t(4, size=(heads, keys, D)) / math.sqrt(2.0)
    k = t * s * np.exp(rng.normal(0.0, 0.5, size=(heads, keys, 1)))
    v = rng.standard_normal((heads, keys, D)) * np.exp(rng.normal(0.0, 0.25, size=(heads, keys, 1)))
    q = rng.standard_normal((heads, queries, D))
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    logits = np.einsum("hqd,hkd->hqk", q, k16.astype(np.float64)) / math.sqrt(D)
    q *= logit_std / logits.std()
    return q.astype(np.float16), k16, v16


# ---------------------------------------------------------------------------
# Decoding and attention
# ---------------------------------------------------------------------------


def roundtrip(x: np.ndarray, mode: str, bits: int, group_size: int, rotation: Optional[str], seed: int = 0) -> np.ndarray:
    """``x`` float16 -> quantize -> dequantize, as float64 (on the CPU)."""
    with mx.stream(mx.cpu):
        parts = quantize(mx.array(x), group_size, bits, mode, rotation=rotation, rotation_seed=seed)
        w, s = parts[0], parts[1]
        b = parts[2] if len(parts) == 3 else None
        y = dequantize(w, s, b, group_size, bits, mode, rotation=rotation, rotation_seed=seed, dtype=mx.float32)
        return np.array(y).astype(np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, logits: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``softmax(logits / sqrt(D)) @ v``; ``logits`` are the raw ``q.k``."""
    return np.einsum("hqk,hkd->hqd", _softmax(logits / math.sqrt(q.shape[-1])), v)


def qk(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.einsum("hqd,hkd->hqk", q, k)


def qjl_logits(q: np.ndarray, k: np.ndarray, k_mse: np.ndarray, seed: int) -> np.ndarray:
    """``q.k`` estimated from ``k_mse`` and a 1-bit QJL sketch of ``k - k_mse``.

    ``S`` is ``[m, D]`` with ``m = D - 16`` i.i.d. N(0, 1) entries; per key
    the sketch stores ``sign(S r)`` (m bits) and ``||r||`` in float16. For
    Gaussian ``s``, ``E[sign(s.r) s.q] = sqrt(2/pi) (r.q) / ||r||``, hence
    the unbiased ``||r|| sqrt(pi/2) / m <S q, sign(S r)>``.
    """
    D = q.shape[-1]
    m = D - 16
    S = np.random.default_rng(seed + 0x5EED).standard_normal((m, D))
    r = k - k_mse
    signs = np.where(r @ S.T >= 0, 1.0, -1.0)  # [H, Lk, m]
    norms = np.linalg.norm(r, axis=-1).astype(np.float16).astype(np.float64)  # [H, Lk]
    sketch = np.einsum("hqm,hkm->hqk", q @ S.T, signs)
    return qk(q, k_mse) + norms[:, None, :] * math.sqrt(math.pi / 2) / m * sketch


def errors(out: np.ndarray, ref: np.ndarray):
    """(relative Frobenius error, mean cosine over rows)."""
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    cos = np.sum(out * ref, axis=-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    return rel, float(cos.mean())


@dataclass
class Row:
    format: str
    mode: str
    bits: int
    group_size: int
    rotation: Optional[str]
    qjl: bool
    bits_per_element: float
    rel_err: float
    cosine: float
    rel_err_k_only: float
    key_rel_err: float
    top1_agreement: Optional[float] = None
    logit_rel_err: Optional[float] = None


def measure(formats: List[Fmt], q, k, v, seed: int) -> List[Row]:
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    ref = attention(q64, qk(q64, k64), v64)
    rows = []
    for f in formats:
        if f.qjl:
            kd = roundtrip(k, "turbo", f.bits - 1, f.group_size, f.rotation, seed)
            logits = qjl_logits(q64, k64, kd, seed)
            vd = roundtrip(v, "turbo", f.bits, f.group_size, f.rotation, seed)
        else:
            kd = roundtrip(k, f.mode, f.bits, f.group_size, f.rotation, seed)
            logits = qk(q64, kd)
            vd = roundtrip(v, f.mode, f.bits, f.group_size, f.rotation, seed)
        rel, cos = errors(attention(q64, logits, vd), ref)
        rel_k, _ = errors(attention(q64, logits, v64), ref)
        k_recon = float(np.linalg.norm(kd - k64) / np.linalg.norm(k64))
        rows.append(Row(f.name, f.mode, f.bits, f.group_size, f.rotation, f.qjl, fmt_bits(f), rel, cos, rel_k, k_recon))
    return rows


# ---------------------------------------------------------------------------
# A random mlx-lm model: next-token agreement with the float16 cache
# ---------------------------------------------------------------------------

MODEL = dict(
    model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
    num_attention_heads=4, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-5,
    vocab_size=512, tie_word_embeddings=False, attention_bias=True,
)

# mlx-lm's init draws projection weights from U(-1/sqrt(n), 1/sqrt(n)), so q
# and k of a unit-RMS input have variance 1/3 per element and q.k/sqrt(D)
# has standard deviation 1/3; scaled by sqrt(6) each, it has 2, the table's
# --logit-std default. Unscaled, attention is nearly uniform and barely
# matters to the tokens.
_QK_SCALE = math.sqrt(6.0)


def random_model(seed: int, outlier_pairs: int, generator: str = "bias"):
    """A float16 random Llama (``MODEL``) whose key cache has the outliers of ``generator``.

    ``q_proj`` and ``k_proj`` are scaled by ``_QK_SCALE``. The attention
    biases are zero except, per KV head, for ``outlier_pairs`` RoPE pairs
    drawn from the lowest-frequency quarter (where Jin et al. find the
    massive values; over the prompt and the decode steps they turn by at most
    a quarter of a radian): ``bias`` gives one channel of each pair a
    ``k_proj`` bias of +-U(10, 50) times the keys' standard deviation;
    ``bias-q`` also gives each query head of the group a ``q_proj`` bias of
    the same kind there; ``zero-mean`` has no biases and scales the
    ``k_proj`` rows of both channels of each pair by a factor in [10, 50] and
    the matching ``q_proj`` rows by its inverse (``q.k`` is unchanged).
    """
    from mlx_lm.models import llama

    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}; got {generator!r}")
    mx.random.seed(seed)
    args = llama.ModelArgs(**MODEL)
    model = llama.Model(args)
    rng = np.random.default_rng(seed)
    D, Hq, Hkv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
    key_std = _QK_SCALE / math.sqrt(3.0)
    for layer in model.layers:
        a = layer.self_attn
        k_scale, q_scale = np.ones((Hkv, D)), np.ones((Hq, D))
        k_bias, q_bias = np.zeros((Hkv, D)), np.zeros((Hq, D))
        for h in range(Hkv):
            pairs = rng.choice(np.arange(3 * D // 8, D // 2), size=outlier_pairs, replace=False)
            heads = slice(h * (Hq // Hkv), (h + 1) * (Hq // Hkv))
            for c in pairs:
                factor = rng.uniform(10.0, 50.0)
                if generator == "zero-mean":
                    k_scale[h, [c, c + D // 2]] = factor
                    q_scale[heads, [c, c + D // 2]] = 1.0 / factor
                    continue
                ch = c + (D // 2) * rng.integers(0, 2)
                k_bias[h, ch] = rng.choice([-1.0, 1.0]) * factor * key_std
                if generator == "bias-q":
                    q_bias[heads, ch] = (rng.choice([-1.0, 1.0], size=Hq // Hkv)
                                         * rng.uniform(10.0, 50.0, size=Hq // Hkv) * key_std)
        a.k_proj.weight = a.k_proj.weight * _QK_SCALE * mx.array(k_scale.reshape(-1, 1), dtype=mx.float32)
        a.q_proj.weight = a.q_proj.weight * _QK_SCALE * mx.array(q_scale.reshape(-1, 1), dtype=mx.float32)
        a.k_proj.bias = mx.array(k_bias.reshape(-1), dtype=mx.float32)
        a.q_proj.bias = mx.array(q_bias.reshape(-1), dtype=mx.float32)
        a.v_proj.bias = mx.zeros_like(a.v_proj.bias)
        a.o_proj.bias = mx.zeros_like(a.o_proj.bias)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def _teacher_forced_logits(model, cache, prompt: mx.array, tokens: List[int]) -> mx.array:
    logits = [model(prompt[None], cache=cache)[0, -1]]
    for t in tokens[:-1]:
        logits.append(model(mx.array([[t]]), cache=cache)[0, -1])
        mx.eval(logits[-1])
    return mx.stack(logits).astype(mx.float32)


def logit_agreement(got: mx.array, ref: mx.array):
    """(top-1 agreement, relative logit error) of logits ``got`` against ``ref``, both ``[steps, vocab]``."""
    agree = float(mx.mean(mx.argmax(got, axis=-1) == mx.argmax(ref, axis=-1)))
    spread = ref - mx.mean(ref, axis=-1, keepdims=True)
    rel = float(mx.sqrt(mx.sum(mx.square(got - ref)) / mx.sum(mx.square(spread))))
    return agree, rel


def model_agreement(formats: List[Fmt], steps: int, seed: int, outlier_pairs: int, generator: str = "bias",
                    progress=None):
    """``({format name: (top-1 agreement, relative logit error)}, noise floor)`` over ``steps`` decode steps.

    The noise floor is the same pair for a float32 copy of the model, with a
    float32 cache, against the float16 model.
    """
    from mlx_lm.models import cache as C

    from . import mlx_lm as qlm

    model = random_model(seed, outlier_pairs, generator)
    prompt = mx.random.randint(0, MODEL["vocab_size"], (64,), key=mx.random.key(seed + 1))
    with mx.stream(mx.cpu):
        cache = C.make_prompt_cache(model)
        y = prompt
        ref, tokens = [], []
        for i in range(steps):
            logits = model(y[None], cache=cache)[0, -1].astype(mx.float32)
            tok = int(mx.argmax(logits))
            ref.append(logits)
            tokens.append(tok)
            y = mx.array([tok])
        ref = mx.stack(ref)
        model32 = random_model(seed, outlier_pairs, generator)
        model32.set_dtype(mx.float32)
        floor = logit_agreement(_teacher_forced_logits(model32, C.make_prompt_cache(model32), prompt, tokens), ref)
        out = {}
        with qlm.patched():
            for f in formats:
                if f.qjl:
                    continue
                if progress:
                    progress(f"model: {f.name}")
                cache = qlm.make_cache(model, bits=f.bits, group_size=f.group_size, mode=f.mode, rotation=f.rotation)
                out[f.name] = logit_agreement(_teacher_forced_logits(model, cache, prompt, tokens), ref)
    return out, floor


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dim", type=int, default=128, help="D (default 128)")
    p.add_argument("--heads", type=int, default=8, help="KV heads, each with its own keys and queries (default 8)")
    p.add_argument("--keys", type=int, default=2048, help="keys (tokens) per head (default 2048)")
    p.add_argument("--queries", type=int, default=32, help="query rows per head (default 32)")
    p.add_argument("--generator", choices=GENERATORS, default="bias",
                   help="what the keys' outlier channels are: a per-channel offset shared by all tokens "
                        "(bias, the default), the same with query offsets on those channels (bias-q), or "
                        "zero-mean noise scaled 10-50x (zero-mean, earlier tables' generator)")
    p.add_argument("--outlier-pairs", type=int, default=4,
                   help="RoPE channel pairs with an outlier of 10-50x, per head (default 4)")
    p.add_argument("--logit-std", type=float, default=2.0,
                   help="standard deviation of q.k/sqrt(D) the queries are scaled to (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-steps", type=int, default=0, metavar="N",
                   help="also the next-token agreement of a random mlx-lm model over N teacher-forced "
                        "decode steps per format (needs mlx-lm; 200 takes a few minutes on 2 cores)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _ratio(rows: List[Row], a: str, b: str) -> Optional[float]:
    by = {r.format: r for r in rows}
    if a in by and b in by:
        return by[a].rel_err / by[b].rel_err
    return None


def acceptance(rows: List[Row]) -> List[str]:
    """The issue's two checks, for each group size the table has both rows of."""
    lines = []
    for gs in (32, 64):
        r = _ratio(rows, f"affine4 gs{gs} +hadamard", f"affine4 gs{gs}")
        if r is not None:
            lines.append(f"affine4 gs{gs} +hadamard / affine4 gs{gs}: rel err ratio {r:.3f} "
                         f"({'<=' if r <= 0.5 else '>'} 0.5: {'yes' if r <= 0.5 else 'NO'})")
        r = _ratio(rows, f"turbo3 gs{gs} +hadamard", f"affine4 gs{gs}")
        if r is not None:
            lines.append(f"turbo3 gs{gs} +hadamard / affine4 gs{gs}: rel err ratio {r:.3f} "
                         f"(no worse: {'yes' if r <= 1.0 else 'NO'})")
    return lines


_GENERATOR_TEXT = {
    "bias": "keys Student-t(4) noise with a log-normal(0.5) token norm plus a per-channel offset of +-U(10, 50) "
            "shared by all tokens on one channel of {outlier_pairs} RoPE pairs; queries N(0, 1); ",
    "bias-q": "keys Student-t(4) noise with a log-normal(0.5) token norm plus a per-channel offset of +-U(10, 50) "
              "shared by all tokens on one channel of {outlier_pairs} RoPE pairs; queries N(0, 1) plus an offset "
              "of +-U(10, 50) on the same channels; ",
    "zero-mean": "keys Student-t(4) with {outlier_pairs} RoPE pairs scaled 10-50x and a log-normal(0.5) token "
                 "norm; queries N(0, 1); ",
}
for _k in _GENERATOR_TEXT:
    _GENERATOR_TEXT[_k] += ("values Gaussian with a log-normal(0.25) token norm, logit std {logit_std}, "
                            "seed {seed}.")


def format_table(res: dict) -> str:
    model = any(r["top1_agreement"] is not None for r in res["rows"])
    head = "| format | bits/elem | rel err | cosine | rel err, K only | K recon |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if model:
        head += f" top-1 agree ({res['model_steps']} steps) | rel logit err |"
        sep += "---:|---:|"
    lines = [head, sep]
    for r in res["rows"]:
        line = (f"| {r['format']} | {r['bits_per_element']:.3f} | {r['rel_err']:.4f} | {r['cosine']:.5f} "
                f"| {r['rel_err_k_only']:.4f} | {r['key_rel_err']:.4f} |")
        if model:
            if r["top1_agreement"] is None:
                line += " - | - |"
            else:
                line += f" {r['top1_agreement']:.3f} | {r['logit_rel_err']:.4f} |"
        lines.append(line)
    g = res["generator"]
    lines += ["", f"K/V ({g['generator']} generator): {g['heads']} heads x {g['keys']} keys, D={g['head_dim']}, "
                  f"{g['queries']} queries per head; {_GENERATOR_TEXT[g['generator']].format(**g)}"]
    lines += res["acceptance"]
    if model:
        lines.append(f"model: {res['model']}")
        top1, rel = res["model_noise_floor"]
        lines.append(f"noise floor (float32 copy of the model and cache vs float16): top-1 agree {top1:.3f}, "
                     f"rel logit err {rel:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace, progress=None) -> dict:
    t0 = time.perf_counter()
    formats = [f for f in default_formats() if args.head_dim % f.group_size == 0]
    q, k, v = generate_qkv(args.heads, args.keys, args.queries, args.head_dim, args.outlier_pairs,
                           args.logit_std, args.seed, args.generator)
    rows = measure(formats, q, k, v, args.seed)
    model_desc, floor = None, None
    if args.model_steps > 0:
        agree, floor = model_agreement(formats, args.model_steps, args.seed, args.outlier_pairs, args.generator,
                                       progress)
        for r in rows:
            if r.format in agree:
                r.top1_agreement, r.logit_rel_err = agree[r.format]
        m = MODEL
        model_desc = (
            f"random float16 Llama ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
            f"Hq={m['num_attention_heads']} Hkv={m['num_key_value_heads']} D={m['head_dim']}, vocab {m['vocab_size']}), "
            f"q/k projections scaled by sqrt(6), {args.outlier_pairs} low-frequency outlier RoPE pairs per KV head "
            f"({args.generator}); 64-token prompt, {args.model_steps} steps teacher-forced on the float16 cache's "
            f"greedy tokens"
        )
    return {
        "generator": dict(generator=args.generator, head_dim=args.head_dim, heads=args.heads, keys=args.keys,
                          queries=args.queries, outlier_pairs=args.outlier_pairs, logit_std=args.logit_std,
                          seed=args.seed),
        "rows": [asdict(r) for r in rows],
        "acceptance": acceptance(rows),
        "model_steps": args.model_steps,
        "model": model_desc,
        "model_noise_floor": floor,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "mlx": mx.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "total_s": time.perf_counter() - t0,
    }


def main(args: argparse.Namespace) -> int:
    if args.model_steps > 0:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise SystemExit('quality --model-steps needs mlx-lm: pip install "mlx-qsdpa[mlx-lm]"')

    def progress(msg):
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{msg:<60}")
            sys.stderr.flush()

    res = run(args, progress)
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 60 + "\r")
    print(format_table(res))
    print(f"total time {res['total_s']:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
