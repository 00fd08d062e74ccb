"""mlx-lm drop-in (mlx_qsdpa.mlx_lm), end to end, without downloads.

Small randomly initialised models built with mlx-lm's own classes generate
greedily with a ``QuantizedKVCache``; with the patch every quantized
attention call goes through quant_sdpa, without it through mlx-lm's
``quantized_matmul`` path. The greedy tokens must agree for 64 steps and
the log-probabilities within ``LOGPROB_TOL``.

Why a tolerance at all, in float32: quant_sdpa accumulates the softmax in
float32 in another order than mlx-lm, so the attention outputs differ in
the last bits; keys and values of the next layers and tokens are computed
from them and then *quantized*, and a last-bit difference occasionally
moves an element across a rounding boundary, a full quantization step.
Over 64 steps that grows to ~1e-3 in the log-probabilities (measured over
these models with seeds 0-4, kv_bits 4 and 8: at most 4.3e-3). A wrong attention is far outside it: the models are
initialised so that a 2 % error in the softmax scale changes greedy tokens
within a few steps and the log-probabilities by ~3 (checked by
``test_the_comparison_can_fail``).

Devices: the models run on the suite's default device (QSDPA_DEVICE,
conftest.py), the reference run and the patched run alike, so the two
differ only in the attention. The reference attention (mlx-lm's
``quantized_matmul`` path, or dequantize + SDPA) runs on the CPU stream,
like every reference in this suite (see oracle.py): MLX-CUDA 0.32.4's
``quantized_matmul`` has no kernel for these models' shapes (head dim 64),
and its float32 matmuls run in TF32. The direct calls below make their
inputs on the CPU too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import re
import sys

import mlx.core as mx
import pytest

# Skipped only when mlx-lm is not installed; an installed but broken mlx-lm
# (any other ImportError) is an error, so that CI cannot skip by accident.
mlx_lm = pytest.importorskip(
    "mlx_lm", reason="mlx-lm is not installed (pip install 'mlx-qsdpa[mlx-lm]')", exc_type=ModuleNotFoundError
)

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import base, cache as cache_mod, gpt_oss, llama  # noqa: E402

import mlx_qsdpa.mlx_lm as qlm  # noqa: E402

STEPS = 64  # greedy decode steps compared
PROMPT = 150  # prompt tokens: more than two prefill chunks
CHUNK = 64  # prefill_step_size
VOCAB = 512
LOGPROB_TOL = 1e-2  # float32 models; see the module docstring
DEVICE = os.environ.get("QSDPA_DEVICE", "cpu").lower()  # the suite's device (conftest.py)


@contextlib.contextmanager
def reference_attention_on_cpu():
    """mlx-lm's own quantized-cache attention on the CPU stream (the rest of
    the model stays on the default device), for the reference runs. Installed
    in ``base`` only while unpatched, so that patch() never takes it for
    mlx-lm's function."""
    assert not qlm.is_patched()
    orig = base.quantized_scaled_dot_product_attention

    def on_cpu(*args, **kwargs):
        with mx.stream(mx.cpu):
            return orig(*args, **kwargs)

    base.quantized_scaled_dot_product_attention = on_cpu
    try:
        yield
    finally:
        base.quantized_scaled_dot_product_attention = orig


@pytest.fixture(autouse=True)
def _always_unpatched():
    """Every test starts and ends with mlx-lm's own functions."""
    qlm.unpatch()
    qlm.reset_stats()
    yield
    qlm.unpatch()


def _sharpen(model, factor=3.0):
    """Scale q/k projections so attention is peaked and position dependent.

    With mlx-lm's default init the attention of a random model is nearly
    uniform and greedy decoding falls into short token cycles that barely
    depend on it; scaled, the tokens vary and a small attention error
    changes them (test_the_comparison_can_fail).
    """
    for layer in model.layers:
        a = layer.self_attn
        a.q_proj.weight = a.q_proj.weight * factor
        a.k_proj.weight = a.k_proj.weight * factor


def make_llama(sliding_window=None, seed=0, dtype=mx.float32):
    """A 2-layer Llama with GQA (Hq=4, Hkv=2, D=64); with a window, layer 0 slides."""
    mx.random.seed(seed)
    layer_types = ["sliding_attention", "full_attention"] if sliding_window else None
    args = llama.ModelArgs(
        model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
        vocab_size=VOCAB, tie_word_embeddings=False, layer_types=layer_types,
        sliding_window=sliding_window,
    )
    model = llama.Model(args)
    _sharpen(model)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def make_gpt_oss(seed=0):
    """A 2-layer gpt-oss (sinks, sliding window 40 on layer 0, GQA 4/2, MoE 4 experts)."""
    mx.random.seed(seed)
    args = gpt_oss.ModelArgs(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
        hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=40,
    )
    model = gpt_oss.Model(args)
    _sharpen(model)
    for layer in model.layers:
        # mlx-lm initialises sinks to zeros; random sinks make them matter.
        layer.self_attn.sinks = 2.0 * mx.random.normal((args.num_attention_heads,))
    mx.eval(model.parameters())
    return model


def prompt_tokens(batch=None, seed=1):
    shape = (PROMPT,) if batch is None else (batch, PROMPT)
    return mx.random.randint(0, VOCAB, shape, key=mx.random.key(seed))


def generate(model, prompt, **kwargs):
    """mlx-lm's generate_step, greedy: (tokens, stacked log-probabilities)."""
    toks, lps = [], []
    for tok, lp in generate_step(prompt, model, max_tokens=STEPS, prefill_step_size=CHUNK, **kwargs):
        toks.append(tok)
        lps.append(lp)
    return toks, mx.stack(lps)


def quantized_cache(model, bits, group_size=64):
    return [cache_mod.QuantizedKVCache(group_size=group_size, bits=bits) for _ in model.layers]


def assert_same_generation(a, b, tol=LOGPROB_TOL):
    toks_a, lp_a = a
    toks_b, lp_b = b
    # The reference must not be degenerate, or equal tokens would prove little.
    assert len(toks_a) == STEPS and len({str(t) for t in toks_a}) > 16, "degenerate reference generation"
    assert toks_a == toks_b
    diff = float(mx.abs(lp_a - lp_b).max())
    assert diff <= tol, f"max |logprob difference| = {diff:.3g} > {tol}"


def assert_routed_only():
    s = qlm.stats()
    assert s["routed"] > 0 and s["fallback"] == 0, s


# ---------------------------------------------------------------------------
# Installing and removing the patch
# ---------------------------------------------------------------------------


def test_patch_rebinds_every_model_module_and_unpatch_restores():
    orig, orig_q = base.scaled_dot_product_attention, base.quantized_scaled_dot_product_attention
    assert llama.scaled_dot_product_attention is orig  # bound at import time
    qlm.patch()
    assert qlm.is_patched()
    for mod in (base, llama, gpt_oss):
        assert mod.scaled_dot_product_attention is qlm.scaled_dot_product_attention
    assert base.quantized_scaled_dot_product_attention is qlm.quantized_scaled_dot_product_attention
    # A model module imported while patched takes the replacement from base.
    name = "mlx_lm.models.qwen2"
    sys.modules.pop(name, None)
    qwen2 = importlib.import_module(name)
    assert qwen2.scaled_dot_product_attention is qlm.scaled_dot_product_attention
    qlm.patch()  # idempotent
    qlm.unpatch()
    assert not qlm.is_patched()
    for mod in (base, llama, gpt_oss, qwen2):
        assert mod.scaled_dot_product_attention is orig
    assert base.quantized_scaled_dot_product_attention is orig_q
    # Our own module keeps its functions (it is skipped when rebinding), and
    # a replacement captured while patched behaves as the original after.
    assert qlm.scaled_dot_product_attention is not orig
    q, kq, vq = _qkv()
    c = cache_mod.QuantizedKVCache(group_size=64, bits=4)
    with mx.stream(mx.cpu):  # mlx-lm's path, either way (see the module docstring)
        got = qlm.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.1, mask=None)
        assert mx.array_equal(got, orig(q * 1, kq, vq, c, scale=0.1, mask=None))
    assert qlm.stats() == {"routed": 0, "fallback": 0}
    qlm.unpatch()  # idempotent
    assert base.scaled_dot_product_attention is orig


def test_context_manager_nests():
    with qlm.patched():
        assert llama.scaled_dot_product_attention is qlm.scaled_dot_product_attention
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert not qlm.is_patched()
    qlm.patch()
    with qlm.patched():
        pass
    assert qlm.is_patched()  # it was on before the block: left on


# ---------------------------------------------------------------------------
# End to end: greedy generation agrees
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_llama_kv_bits_generation_matches(bits):
    """The path of ``mlx_lm.generate --kv-bits``: KVCache converted to QuantizedKVCache."""
    model = make_llama()
    prompt = prompt_tokens()
    kw = dict(kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
    with reference_attention_on_cpu():
        ref = generate(model, prompt, **kw)
    with qlm.patched():
        out = generate(model, prompt, **kw)
    assert_routed_only()
    assert_same_generation(ref, out)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64)])
def test_llama_sliding_window_generation_matches(bits, group_size):
    """Window masks (bool arrays from QuantizedKVCache.make_mask), prefill and decode."""
    model = make_llama(sliding_window=40)
    prompt = prompt_tokens()
    with reference_attention_on_cpu():
        ref = generate(model, prompt, prompt_cache=quantized_cache(model, bits, group_size))
    with qlm.patched():
        out = generate(model, prompt, prompt_cache=quantized_cache(model, bits, group_size))
    assert_routed_only()
    assert_same_generation(ref, out)


def _reference_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """Sinks over a quantized cache as mlx-lm does them over a float cache:
    mx.dequantize, then mx.fast.scaled_dot_product_attention (on the CPU)."""
    with mx.stream(mx.cpu):
        if hasattr(cache, "bits"):
            q = dict(group_size=cache.group_size, bits=cache.bits, dtype=queries.dtype)
            keys, values = mx.dequantize(*keys, **q), mx.dequantize(*values, **q)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


@pytest.mark.parametrize("bits", [4, 8])
def test_gpt_oss_sinks_generation_matches(bits, monkeypatch):
    """Sinks, which mlx-lm rejects for quantized caches, go through quant_sdpa."""
    model = make_gpt_oss()
    prompt = prompt_tokens()
    with pytest.raises(ValueError, match="sinks"):
        generate(model, prompt, prompt_cache=quantized_cache(model, bits))
    with monkeypatch.context() as m:
        m.setattr(gpt_oss, "scaled_dot_product_attention", _reference_sdpa)
        ref = generate(model, prompt, prompt_cache=quantized_cache(model, bits))
    with qlm.patched():
        out = generate(model, prompt, prompt_cache=quantized_cache(model, bits))
    assert_routed_only()
    assert_same_generation(ref, out)


def greedy_batch(model, prompts, cache, steps=STEPS, chunk=CHUNK):
    """Greedy decoding of a batch of equal-length prompts (what QuantizedKVCache
    supports for B > 1; mlx-lm's BatchGenerator has no quantized cache)."""
    L = prompts.shape[1]
    for i in range(0, L - 1, chunk):
        model(prompts[:, i : min(i + chunk, L - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    y = prompts[:, L - 1 :]
    toks, lps = [], []
    for _ in range(steps):
        logits = model(y, cache=cache)[:, -1, :]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = mx.argmax(lp, axis=-1)[:, None]
        mx.eval(y, lp)
        toks.append(y[:, 0].tolist())
        lps.append(lp)
    return toks, mx.stack(lps)


def test_batch_generation_matches():
    model = make_llama(sliding_window=40)
    prompts = prompt_tokens(batch=3)
    with reference_attention_on_cpu():
        ref = greedy_batch(model, prompts, quantized_cache(model, 4))
    with qlm.patched():
        out = greedy_batch(model, prompts, quantized_cache(model, 4))
    assert_routed_only()
    assert_same_generation(ref, out)
    # The rows are different sequences, not one repeated.
    rows = list(zip(*ref[0]))
    assert len(set(rows)) == 3


def _float32_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Attention over the dequantized cache in float32 (on the CPU), rounded to the queries' dtype."""
    with mx.stream(mx.cpu):
        q = dict(group_size=cache.group_size, bits=cache.bits, dtype=mx.float32)
        k, v = mx.dequantize(*keys, **q), mx.dequantize(*values, **q)
        if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
            mask = mask.astype(mx.float32)
        out = mx.fast.scaled_dot_product_attention(
            queries.astype(mx.float32), k, v, scale=scale, mask=mask, sinks=sinks
        )
        return out.astype(queries.dtype)


def test_bfloat16_model_at_least_as_accurate(monkeypatch):
    """A bfloat16 model (what mlx-lm checkpoints are), teacher-forced so that
    every run sees the same tokens. In bfloat16 the whole model rounds (and
    the cache quantization amplifies it), so neither path matches a float32
    attention closely; the patched logits must be at least as close to it as
    mlx-lm's own (measured, seeds 0-2: mean error 0.6x of mlx-lm's)."""
    model = make_llama(sliding_window=40, dtype=mx.bfloat16)
    prompts = prompt_tokens(batch=1)
    forced = mx.random.randint(0, VOCAB, (1, 16), key=mx.random.key(7))

    def run():
        cache = quantized_cache(model, 4)
        model(prompts, cache=cache)
        out = []
        for i in range(forced.shape[1]):
            out.append(model(forced[:, i : i + 1], cache=cache)[:, -1, :].astype(mx.float32))
        return mx.stack(out)

    with reference_attention_on_cpu():
        theirs = run()
    with qlm.patched():
        ours = run()
    assert_routed_only()
    with monkeypatch.context() as m:
        m.setattr(llama, "scaled_dot_product_attention", _float32_attention)
        ref = run()
    err_ours = float(mx.abs(ours - ref).mean())
    err_theirs = float(mx.abs(theirs - ref).mean())
    assert err_ours <= err_theirs, (err_ours, err_theirs)
    assert float(mx.abs(ours - ref).max()) <= 0.15 * float(mx.abs(ref).max())


def test_the_comparison_can_fail():
    """A 2 % error in the attention scale is caught by the same comparison."""
    model = make_llama()
    prompt = prompt_tokens()
    kw = dict(kv_bits=4, quantized_kv_start=0)
    with reference_attention_on_cpu():
        ref = generate(model, prompt, **kw)
    route = qlm._route

    def wrong(queries, q_keys, q_values, scale, *rest):
        return route(queries, q_keys, q_values, scale * 1.02, *rest)

    with qlm.patched():
        qlm._route = wrong
        try:
            out = generate(model, prompt, **kw)
        finally:
            qlm._route = route
    with pytest.raises(AssertionError):
        assert_same_generation(ref, out)


# ---------------------------------------------------------------------------
# Fallback to mlx-lm for what quant_sdpa does not take
# ---------------------------------------------------------------------------


def _qkv(B=1, Hq=4, Hkv=2, L=1, Lk=70, Dk=64, Dv=64, bits=4, group_size=64):
    """Queries and a quantized cache for direct calls, made on the CPU (like
    every test input, see oracle.py). The calls pass ``q * 1``: mlx-lm's
    quantized path does ``queries *= scale``, which scales the caller's
    array in place (MLX arrays update in place)."""
    with mx.stream(mx.cpu):
        keys = mx.random.key(3)
        k1, k2, k3 = mx.random.split(keys, 3)
        q = mx.random.normal((B, Hq, L, Dk), key=k1)
        kq = mx.quantize(mx.random.normal((B, Hkv, Lk, Dk), key=k2), group_size=group_size, bits=bits)
        vq = mx.quantize(mx.random.normal((B, Hkv, Lk, Dv), key=k3), group_size=group_size, bits=bits)
        mx.eval(q, kq, vq)
    return q, kq, vq


def test_value_head_dim_other_than_key_falls_back():
    # Hq == Hkv: mlx-lm's own function reshapes GQA outputs to the key head
    # dimension and cannot take Dv != Dk with GQA either.
    # The fallback is mlx-lm's own path: both calls on the CPU (see the
    # module docstring); which path a call takes does not depend on the device.
    q, kq, vq = _qkv(Hq=2, Hkv=2, Dk=128, Dv=64)
    c = cache_mod.QuantizedKVCache(group_size=64, bits=4)
    with mx.stream(mx.cpu):
        want = base.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.1, mask=None)
        with qlm.patched():
            got = base.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.1, mask=None)
    assert qlm.stats() == {"routed": 0, "fallback": 1}
    assert mx.array_equal(want, got)


def test_per_kv_head_mask_falls_back():
    """A [B, Hkv, L, Lk] mask is valid for mlx-lm's quantized path but not
    broadcastable to [B, Hq, L, Lk]: mlx-lm's function handles it."""
    q, kq, vq = _qkv(L=3)
    mask = mx.greater(mx.random.uniform(shape=(1, 2, 3, 70), key=mx.random.key(5), stream=mx.cpu), 0.3, stream=mx.cpu)
    c = cache_mod.QuantizedKVCache(group_size=64, bits=4)
    with mx.stream(mx.cpu):  # the fallback: mlx-lm's own path, as above
        want = base.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.1, mask=mask)
        with qlm.patched():
            got = base.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.1, mask=mask)
    assert qlm.stats()["fallback"] >= 1 and qlm.stats()["routed"] == 0
    assert mx.array_equal(want, got)


def test_masks_as_mlx_lm_passes_them():
    """Direct calls with each mask kind mlx-lm builds agree with its function
    (the reference, mlx-lm's quantized_matmul path, run on the CPU)."""
    q, kq, vq = _qkv(L=5, Lk=70)
    c = cache_mod.QuantizedKVCache(group_size=64, bits=4)
    with mx.stream(mx.cpu):
        window = base.create_causal_mask(5, offset=65, window_size=16)  # [5, 70] bool
        additive = mx.where(window, 0.0, -1e9).astype(mx.float32)
        masks = (None, "causal", window, additive, window[None, None])
        mx.eval(window, additive, masks[-1])
    for mask in masks:
        with mx.stream(mx.cpu):
            want = base.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.125, mask=mask)
        with qlm.patched():
            got = base.scaled_dot_product_attention(q * 1, kq, vq, c, scale=0.125, mask=mask)
        assert float(mx.abs(want - got).max()) < 1e-5, mask if isinstance(mask, str) else "array"
    assert qlm.stats() == {"routed": 5, "fallback": 0}


def test_float_cache_is_left_to_mlx_lm():
    q, _, _ = _qkv()
    k = mx.random.normal((1, 2, 70, 64), stream=mx.cpu)
    with qlm.patched():
        out = base.scaled_dot_product_attention(q, k, k, cache_mod.KVCache(), scale=0.1, mask=None)
    assert qlm.stats() == {"routed": 0, "fallback": 0}
    assert mx.array_equal(out, mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1))


# ---------------------------------------------------------------------------
# bench --e2e on a local model directory (the --model path)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt_oss"])
def test_bench_e2e_with_local_model(kind, tmp_path, capsys):
    from mlx_lm.utils import save_config, save_model

    from mlx_qsdpa.__main__ import main

    model = make_llama(sliding_window=40) if kind == "llama" else make_gpt_oss()
    save_model(tmp_path, model)
    save_config(dataclasses.asdict(model.args), tmp_path / "config.json")
    argv = ["bench", "--e2e", "--model", str(tmp_path), "--ctx", "100,200", "--decode-tokens", "4",
            "--repeats", "1", "--prefill-step", "64", "--no-progress",
            "--device", DEVICE]  # the suite's device (conftest)
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("100 ", "200 "))]
    assert [(r[0], r[1]) for r in rows] == [("100", "mlx-lm"), ("100", "quant_sdpa"), ("200", "mlx-lm"), ("200", "quant_sdpa")]
    assert all(float(r[2]) > 0 for r in rows if r[1] == "quant_sdpa")
    if kind == "gpt_oss":
        # mlx-lm cannot decode gpt-oss over a quantized cache; the patch can.
        assert "mlx-lm raised: Quantized SDPA does not support attention sinks." in out
    elif DEVICE == "gpu" and "mlx-lm raised: [quantized_matmul] No implementation" in out:
        # MLX-CUDA 0.32.4 has no quantized_matmul kernel for this model's
        # shapes: the bench reports mlx-lm's path as failed and still times
        # quant_sdpa (checked above), on the same cache.
        assert all(r[2] == "-" for r in rows if r[1] == "mlx-lm")
    else:
        assert all(float(r[2]) > 0 for r in rows) and "x" in rows[1][-1]
        assert "greedy tokens at ctx 200, mlx-lm vs quant_sdpa: all 4 agree." in out


def test_bench_e2e_random_model_head_dim(tmp_path, capsys):
    # --head-dim sets the random model's head dimension (MLX-CUDA runs
    # mlx-lm's own quantized path for 128, not for the default 64); with
    # --model it is refused.
    from mlx_qsdpa.__main__ import main

    argv = ["bench", "--e2e", "--head-dim", "128", "--ctx", "100", "--decode-tokens", "4", "--repeats", "1",
            "--prefill-step", "64", "--no-progress", "--device", DEVICE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Hq=16 Hkv=4 D=128" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("100 ")]
    assert [r[1] for r in rows] == ["mlx-lm", "quant_sdpa"]
    assert float(rows[1][2]) > 0
    with pytest.raises(SystemExit, match="random model only"):
        main(["bench", "--e2e", "--head-dim", "128", "--model", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="multiple of 32"):
        main(["bench", "--e2e", "--head-dim", "48", "--ctx", "100", "--no-progress"])


def test_bench_e2e_reports_a_failing_mlx_lm_path(tmp_path, capsys, monkeypatch):
    """mlx-lm's path failing while evaluated (as MLX-CUDA's quantized_matmul
    does for shapes it has no kernel for) is reported, and quant_sdpa is
    still timed on the same cache: the failed run's lazy writes into the
    cache are undone, or every later read would fail again."""
    from mlx_lm.utils import save_config, save_model

    from mlx_qsdpa.__main__ import main

    orig = base.quantized_scaled_dot_product_attention

    @functools.wraps(orig)  # the signature patch() checks
    def fails_when_evaluated(*args, **kwargs):
        poison = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)[0, 0]  # singular: raises in eval
        return orig(*args, **kwargs) + 0 * poison

    monkeypatch.setattr(base, "quantized_scaled_dot_product_attention", fails_when_evaluated)
    model = make_llama()
    save_model(tmp_path, model)
    save_config(dataclasses.asdict(model.args), tmp_path / "config.json")
    argv = ["bench", "--e2e", "--model", str(tmp_path), "--ctx", "100,200", "--decode-tokens", "4",
            "--repeats", "2", "--prefill-step", "64", "--no-progress", "--device", DEVICE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("100 ", "200 "))]
    assert [(r[0], r[1]) for r in rows] == [("100", "mlx-lm"), ("100", "quant_sdpa"), ("200", "mlx-lm"), ("200", "quant_sdpa")]
    assert all(r[2] == "-" and "mlx-lm raised:" in " ".join(r) for r in rows if r[1] == "mlx-lm")
    assert all(float(r[2]) > 0 and r[5] == "2" for r in rows if r[1] == "quant_sdpa")
    assert "LU factorization failed" in out


# ``python -m mlx_lm.generate`` with mlx-lm's quantized attention on the CPU
# stream (reference_attention_on_cpu, in a fresh process).
_GENERATE_REF = """
import runpy
import mlx.core as mx
from mlx_lm.models import base
orig = base.quantized_scaled_dot_product_attention
def on_cpu(*args, **kwargs):
    with mx.stream(mx.cpu):
        return orig(*args, **kwargs)
base.quantized_scaled_dot_product_attention = on_cpu
runpy.run_module("mlx_lm.generate", run_name="__main__", alter_sys=True)
"""


def _saved_model(path):
    """make_llama() saved as an mlx-lm model directory with a word-level
    tokenizer (words t0..t511, t0 the end of text); returns a prompt."""
    import json

    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = make_llama()
    save_model(path, model)
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    save_config({**config, "eos_token_id": 0}, path / "config.json")
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t0", "unk_token": "t1"})
    )
    return " ".join(f"t{2 + (i * 37) % (VOCAB - 2)}" for i in range(PROMPT))


def test_generate_command_patched(tmp_path):
    """``python -m mlx_qsdpa.mlx_lm`` is mlx-lm's generate command, patched:
    same text as ``python -m mlx_lm.generate`` on a saved model with a
    word-level tokenizer. Both run on MLX's default device; the reference
    command's quantized attention runs on the CPU stream, as in the tests
    above (``_GENERATE_REF``)."""
    import subprocess

    prompt = _saved_model(tmp_path)
    args = ["--model", str(tmp_path), "--prompt", prompt, "--kv-bits", "4", "--quantized-kv-start", "0",
            "--max-tokens", "24", "--ignore-chat-template"]
    texts = []
    for cmd in (["-c", _GENERATE_REF], ["-m", "mlx_qsdpa.mlx_lm"]):
        r = subprocess.run([sys.executable, *cmd, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        texts.append(r.stdout.split("==========")[1].strip())
    # The patched command reports its calls on stderr: some, all routed.
    assert re.search(r"mlx_qsdpa: [1-9][0-9]* quantized-KV attention calls through quant_sdpa, 0 through", r.stderr)
    assert "no call went through quant_sdpa" not in r.stderr
    assert len(set(texts[0].split())) > 8
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    "kv_args, why",
    [([], "no --kv-bits was given, so mlx-lm kept a float KV cache"),
     (["--kv-bits", "4"], "mlx-lm keeps the first --quantized-kv-start tokens (5000; default 5000) in a float "
                          "cache and quantizes it only once the context passes that, which this run did not; "
                          "pass --quantized-kv-start 0 to quantize from the first token.")],
)
def test_generate_command_says_why_no_call_was_routed(tmp_path, kv_args, why):
    # The two ways a first run sends nothing to quant_sdpa: no quantized
    # cache asked for, or a context shorter than --quantized-kv-start.
    import subprocess

    prompt = _saved_model(tmp_path)
    args = ["--model", str(tmp_path), "--prompt", prompt, *kv_args, "--max-tokens", "4", "--ignore-chat-template"]
    r = subprocess.run([sys.executable, "-m", "mlx_qsdpa.mlx_lm", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "mlx_qsdpa: 0 quantized-KV attention calls through quant_sdpa, 0 through mlx-lm's own path" in r.stderr
    assert f"mlx_qsdpa: no call went through quant_sdpa: {why}" in r.stderr


def test_why_no_call_was_routed_when_all_fell_back():
    why = qlm._why_none_routed(kv_bits=4, quantized_kv_start=0, fallback=3)
    assert "all 3 went to mlx-lm's own path" in why
    assert "no attention call over a quantized cache" in qlm._why_none_routed(4, 0, 0)


def test_generate_command_help_says_what_it_is():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "mlx_qsdpa.mlx_lm", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert text.startswith("usage: python -m mlx_qsdpa.mlx_lm ")
    assert "mlx-lm's generate command (python -m mlx_lm.generate, same arguments) with mlx_qsdpa.mlx_lm's patch on" in text
    assert "runs through mlx_qsdpa's fused quant_sdpa" in text
    assert "pass --quantized-kv-start 0 to quantize, and so use quant_sdpa, from the first token" in text
    assert "--kv-bits KV_BITS" in text  # mlx-lm's own arguments


# ---------------------------------------------------------------------------
# QuantSDPAKVCache: formats mlx-lm's QuantizedKVCache cannot hold
# ---------------------------------------------------------------------------

# (keys' bits, group size, mode; rotation; values' bits, mode, group size)
CACHE_FORMATS = {
    "turbo3+hadamard": dict(bits=3, mode="turbo", rotation="hadamard"),
    "k-affine8/v-turbo3": dict(bits=8, mode="affine", value_bits=3, value_mode="turbo", rotation="hadamard"),
    "k-turbo4/v-affine4-gs32": dict(bits=4, mode="turbo", rotation="hadamard", value_mode="affine", value_group_size=32),
    "affine4+hadamard": dict(bits=4, rotation="hadamard"),
    "k-mxfp4/v-affine8": dict(bits=4, mode="mxfp4", group_size=32, value_bits=8, value_mode="affine", value_group_size=64),
}


@contextlib.contextmanager
def dequantized_reference():
    """QuantSDPAKVCache's own fallback for every call: its cache dequantized
    (mlx_qsdpa.dequantize), then mx.fast.scaled_dot_product_attention on the CPU."""
    route = qlm._route
    qlm._route = lambda *args: None
    try:
        with mx.stream(mx.cpu):
            yield
    finally:
        qlm._route = route


@pytest.mark.parametrize("name", list(CACHE_FORMATS))
def test_quant_sdpa_cache_generation_matches_dequantized(name):
    """Generation with make_cache() in codebook, rotated and mixed K/V
    formats: every call through quant_sdpa, greedy tokens and
    log-probabilities as with the dequantized cache (same tolerance and
    reason as for QuantizedKVCache, module docstring)."""
    model = make_llama(sliding_window=40)
    prompt = prompt_tokens()
    fmt = CACHE_FORMATS[name]
    with dequantized_reference():
        ref = generate(model, prompt, prompt_cache=qlm.make_cache(model, **fmt))
    assert qlm.stats()["routed"] == 0
    qlm.reset_stats()
    cache = qlm.make_cache(model, **fmt)
    out = generate(model, prompt, prompt_cache=cache)
    assert_routed_only()
    assert_same_generation(ref, out)
    assert all(isinstance(c, qlm.QuantSDPAKVCache) for c in cache)
    # The prompt and every yielded token (generate_step feeds the last one
    # in while it computes one token ahead).
    assert cache[0].offset == PROMPT + STEPS


def test_quant_sdpa_cache_agrees_with_float_cache():
    """Teacher-forced on the float cache's greedy tokens over 48 steps, the
    mean |log-probability difference| from the float cache stays within
    0.25 for turbo4 +hadamard and 0.15 for affine8 keys / turbo4 values
    (measured, seeds 0-2: at most 0.171 and 0.088; affine8 both: 0.011),
    and 2-bit turbo keys without rotation are more than twice as far (0.43).
    These models are built to be sensitive (``_sharpen``): their next-token
    agreement at 4 bits is only 0.42-0.56 (asymmetric: 0.60-0.81)."""
    model = make_llama()
    prompt = prompt_tokens()
    toks, ref = generate(model, prompt)
    steps = 48

    def teacher_forced(cache):
        out = [model(prompt[None], cache=cache)[0, -1]]
        for t in toks[: steps - 1]:
            out.append(model(mx.array([[int(t)]]), cache=cache)[0, -1])
        lp = mx.stack(out)
        return lp - mx.logsumexp(lp, axis=-1, keepdims=True)

    diff = {}
    for name, fmt in {"turbo4": dict(bits=4, mode="turbo", rotation="hadamard"),
                      "k8v4": dict(bits=8, value_bits=4, value_mode="turbo", rotation="hadamard"),
                      "turbo2": dict(bits=2, mode="turbo")}.items():
        diff[name] = float(mx.mean(mx.abs(teacher_forced(qlm.make_cache(model, **fmt)) - ref[:steps])))
    assert qlm.stats()["fallback"] == 0
    assert diff["turbo4"] <= 0.25 and diff["k8v4"] <= 0.15, diff
    assert diff["turbo2"] > 2 * diff["turbo4"], diff


def test_quant_sdpa_cache_state_trim_and_offsets():
    """As QuantizedKVCache: the state moves to a fresh cache of the same
    format, trim rewinds the offset, and tokens written after a trim replace
    the trimmed ones (also across the 256-token growth step)."""
    fmt = CACHE_FORMATS["k-turbo4/v-affine4-gs32"]
    qlm.patch()
    with mx.stream(mx.cpu):
        kv = lambda n, s: (mx.random.normal((1, 2, n, 64), key=mx.random.key(s)),  # noqa: E731
                           mx.random.normal((1, 2, n, 64), key=mx.random.key(s + 100)))
        q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(9))
        a = qlm.QuantSDPAKVCache(**fmt)
        a.update_and_fetch(*kv(250, 1))
        assert a.offset == 250 and a.size() == 250 and a.keys[0].shape[2] == 256
        b = qlm.QuantSDPAKVCache()
        b.meta_state, b.state = a.meta_state, a.state
        assert (b.key_format, b.value_format, b.rotation) == (a.key_format, a.value_format, a.rotation)
        assert b.offset == 250 and a.nbytes == sum(x.nbytes for x in (*a.keys, *a.values))

        # a: 10 stray tokens, trimmed, then 20 more (grows past 256); b: the 20 directly.
        a.update_and_fetch(*kv(10, 2))
        assert a.trim(10) == 10 and a.offset == 250
        ka, va = a.update_and_fetch(*kv(20, 3))
        kb, vb = b.update_and_fetch(*kv(20, 3))
        assert a.offset == b.offset == 270 and ka[0].shape[2] == 270
        for x, y in zip((*ka, *va), (*kb, *vb)):
            assert mx.array_equal(x, y)
        oa = a.attention(q, ka, va, scale=0.125, mask=None)
        ob = b.attention(q, kb, vb, scale=0.125, mask=None)
        assert mx.array_equal(oa, ob)
        assert a.trim(1000) == 270 and a.offset == 0
        assert qlm.QuantSDPAKVCache().empty() and qlm.QuantSDPAKVCache().nbytes == 0


def test_quant_sdpa_cache_needs_the_patch_and_a_known_format():
    c = qlm.QuantSDPAKVCache(bits=3, mode="turbo")
    k = mx.zeros((1, 2, 4, 64))
    with pytest.raises(RuntimeError, match="call mlx_qsdpa.mlx_lm.patch"):
        c.update_and_fetch(k, k)
    with pytest.raises(ValueError, match="values format"):
        qlm.QuantSDPAKVCache(bits=4, value_bits=5, value_mode="turbo")
    with pytest.raises(ValueError, match="rotation"):
        qlm.QuantSDPAKVCache(rotation="fourier")


def test_quant_sdpa_cache_falls_back_for_other_value_head_dims():
    # Dv != Dk: quant_sdpa does not take it; the cache computes it from its
    # dequantized arrays instead of ever reaching mlx-lm's quantized path.
    qlm.patch()
    with mx.stream(mx.cpu):
        c = qlm.QuantSDPAKVCache(bits=4, mode="turbo", rotation="hadamard")
        k = mx.random.normal((1, 2, 8, 128), key=mx.random.key(1))
        v = mx.random.normal((1, 2, 8, 64), key=mx.random.key(2))
        q = mx.random.normal((1, 2, 1, 128), key=mx.random.key(3))
        kq, vq = c.update_and_fetch(k, v)
        out = base.scaled_dot_product_attention(q, kq, vq, c, scale=0.1, mask=None)
    assert out.shape == (1, 2, 1, 64)
    assert qlm.stats() == {"routed": 0, "fallback": 1}
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1, stream=mx.cpu)
    assert float(mx.abs(out - want).max()) < 0.5 * float(mx.abs(want).max())


def test_generate_command_cache_flags(tmp_path):
    """--kv-mode / --kv-rotation / --kv-value-bits make the converted cache a
    QuantSDPAKVCache: the command generates, through quant_sdpa only."""
    import subprocess

    prompt = _saved_model(tmp_path)
    args = ["--model", str(tmp_path), "--prompt", prompt, "--kv-bits", "3", "--kv-mode", "turbo",
            "--kv-rotation", "hadamard", "--kv-value-bits", "4", "--kv-value-mode", "affine",
            "--quantized-kv-start", "0", "--max-tokens", "12", "--ignore-chat-template"]
    r = subprocess.run([sys.executable, "-m", "mlx_qsdpa.mlx_lm", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"mlx_qsdpa: [1-9][0-9]* quantized-KV attention calls through quant_sdpa, 0 through", r.stderr)
    assert len(r.stdout.split("==========")[1].split()) >= 6
    r = subprocess.run([sys.executable, "-m", "mlx_qsdpa.mlx_lm", "--model", str(tmp_path), "--prompt", "t2",
                        "--kv-mode", "turbo"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "need --kv-bits" in r.stderr
