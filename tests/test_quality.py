"""``python -m mlx_qsdpa quality``: byte accounting, rows, and what the table measures, at small sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlx_qsdpa import quality as Q
from mlx_qsdpa.__main__ import main


def test_bits_per_element_counts_scales_and_biases():
    # affine: float16 scale + bias per group; turbo: one float16 scale per
    # group; mxfp4/mxfp8: an 8-bit scale per 32; nvfp4: an 8-bit scale per 16.
    assert Q.bits_per_element("affine", 4, 64) == 4.5
    assert Q.bits_per_element("affine", 2, 32) == 3.0
    assert Q.bits_per_element("turbo", 3, 64) == 3.25
    assert Q.bits_per_element("turbo", 4, 128) == 4.125
    assert Q.bits_per_element("mxfp4", 4, 32) == 4.25
    assert Q.bits_per_element("mxfp8", 8, 32) == 8.25
    assert Q.bits_per_element("nvfp4", 4, 16) == 4.5
    # A qjl row of b bits costs what turbo b costs: turbo (b - 1) plus D - 16
    # sign bits and a float16 norm per key of D elements.
    assert Q.fmt_bits(Q.Fmt("turbo", 3, 64, "hadamard", qjl=True)) == Q.bits_per_element("turbo", 3, 64)


def test_the_table_has_every_row_the_issue_asks_for():
    names = {f.name for f in Q.default_formats()}
    for bits in (2, 3, 4, 8):
        for gs in (32, 64):
            assert f"affine{bits} gs{gs}" in names
    for bits in (2, 3, 4):
        assert f"affine{bits} gs64 +hadamard" in names
        assert f"turbo{bits} gs64" in names  # without rotation, for contrast
        for gs in (32, 64, 128):
            assert f"turbo{bits} gs{gs} +hadamard" in names
    assert {"mxfp4", "nvfp4", "mxfp8", "mxfp4 +hadamard"} <= names
    assert "turbo2 gs64 +hadamard +qjl" in names and "turbo3 gs64 +hadamard +qjl" in names


def test_generator_has_outlier_pairs_and_is_deterministic():
    q, k, v = Q.generate_qkv(2, 256, 8, 64, 3, 2.0, seed=5)
    assert q.dtype == k.dtype == v.dtype == np.float16
    assert q.shape == (2, 8, 64) and k.shape == v.shape == (2, 256, 64)
    rms = np.sqrt((k.astype(np.float64) ** 2).mean(axis=(0, 1)))
    big = np.flatnonzero(rms > 5 * np.median(rms))
    assert len(big) == 6  # 3 RoPE pairs (c, c + D/2)
    assert set(big[big < 32] + 32) == set(big[big >= 32])
    logits = np.einsum("hqd,hkd->hqk", q.astype(np.float64), k.astype(np.float64)) / 8.0
    assert abs(logits.std() - 2.0) < 0.05
    q2, k2, v2 = Q.generate_qkv(2, 256, 8, 64, 3, 2.0, seed=5)
    assert np.array_equal(q, q2) and np.array_equal(k, k2) and np.array_equal(v, v2)


def test_qjl_estimator_is_unbiased():
    # Averaged over many sketches, q.k_mse + the QJL term recovers q.k.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 64))
    k = rng.standard_normal((1, 8, 64))
    k_mse = k + 0.3 * rng.standard_normal(k.shape)
    exact = Q.qk(q, k)
    est = np.mean([Q.qjl_logits(q, k, k_mse, seed) for seed in range(400)], axis=0)
    resid = np.abs(Q.qk(q, k_mse) - exact).mean()
    assert np.abs(est - exact).mean() < 0.2 * resid


def test_rotation_lowers_the_key_error_on_outlier_keys():
    # The mechanism behind rotated formats, with a real margin: on keys with
    # outlier channels, Hadamard-rotated affine 4-bit reconstructs the keys
    # better than plain affine 4-bit, and turbo without the rotation (whose
    # codebook assumes near-normal coordinates) is far worse than with it.
    q, k, v = Q.generate_qkv(2, 256, 8, 128, 4, 2.0, seed=0)
    rows = {r.format: r for r in Q.measure(
        [Q.Fmt("affine", 4, 64), Q.Fmt("affine", 4, 64, "hadamard"),
         Q.Fmt("turbo", 3, 64), Q.Fmt("turbo", 3, 64, "hadamard")], q, k, v, seed=0)}
    assert rows["affine4 gs64 +hadamard"].key_rel_err < 0.85 * rows["affine4 gs64"].key_rel_err
    assert rows["turbo3 gs64 +hadamard"].rel_err < 0.7 * rows["turbo3 gs64"].rel_err
    for r in rows.values():
        assert 0 < r.rel_err < 1 and 0 < r.cosine <= 1 and r.rel_err_k_only <= r.rel_err * 1.5


def test_more_bits_less_error():
    q, k, v = Q.generate_qkv(2, 256, 8, 64, 2, 2.0, seed=1)
    errs = [r.rel_err for r in Q.measure([Q.Fmt("affine", b, 64, "hadamard") for b in (2, 3, 4, 8)], q, k, v, 0)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.05


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "q.json"
    argv = ["quality", "--head-dim", "64", "--heads", "1", "--keys", "64", "--queries", "4", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("| format | bits/elem | rel err | cosine | rel err, K only | K recon |")
    res = json.loads(path.read_text())
    names = [r["format"] for r in res["rows"]]
    # D=64 has no group of 128.
    assert "affine4 gs64 +hadamard" in names and not any("gs128" in n for n in names)
    assert all(f"| {n} |" in out for n in names)
    assert any(line.startswith("affine4 gs64 +hadamard / affine4 gs64: rel err ratio") for line in out.splitlines())
    assert all(math.isfinite(r["rel_err"]) for r in res["rows"])


def test_command_model_steps(tmp_path, capsys):
    pytest.importorskip("mlx_lm", exc_type=ModuleNotFoundError)
    path = tmp_path / "q.json"
    argv = ["quality", "--head-dim", "128", "--heads", "1", "--keys", "64", "--queries", "4",
            "--model-steps", "4", "--json", str(path)]
    assert main(argv) == 0
    res = json.loads(path.read_text())
    by = {r["format"]: r for r in res["rows"]}
    assert by["turbo2 gs64 +hadamard +qjl"]["top1_agreement"] is None  # not a cache format
    assert 0.0 <= by["affine8 gs64"]["top1_agreement"] <= 1.0
    assert by["affine8 gs64"]["mean_abs_logit_diff"] < by["affine2 gs64"]["mean_abs_logit_diff"]
    assert "top-1 agree (4 steps)" in capsys.readouterr().out
