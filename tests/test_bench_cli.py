"""The bench CLI runs end to end on a tiny problem and reports sane rows.

No timing is asserted (timings belong in benchmarks/RESULTS.md); this checks
the command, the table (its header, units and legend), the JSON, and that
quant_sdpa's output agrees with dequantize + SDPA inside the benchmark. The bench runs on the suite's device
(QSDPA_DEVICE, conftest.py). A baseline MLX cannot run there (MLX-CUDA's
quantized_matmul has no kernel for some small shapes) is reported as n/a
with MLX's error; that report is checked on any device by making the
baseline fail on purpose.
"""

import json
import os
import subprocess
import sys

import pytest

import mlx_qsdpa
from mlx_qsdpa import bench
from mlx_qsdpa.__main__ import main

DEVICE = os.environ.get("QSDPA_DEVICE", "cpu").lower()  # the suite's device (conftest.py)
METHODS = ("quant_sdpa", "fp16_sdpa", "qmm_path", "dequant_sdpa")
SMALL = ["--ctx", "128,320", "--heads", "4", "--kv-heads", "2", "--dim", "64", "--layers", "2",
         "--min-time", "0", "--max-reps", "3", "--no-progress", "--device", DEVICE]  # fmt: skip


def _check_rows(rows, may_be_unavailable=()):
    """Every (ctx, method) once; timed rows sane; unavailable ones only among
    `may_be_unavailable`, with a reason and no timings."""
    assert {(row["ctx"], row["method"]) for row in rows} == {(c, m) for c in (128, 320) for m in METHODS}
    for row in rows:
        if row["unavailable"] is not None:
            assert row["method"] in may_be_unavailable, row
            assert row["unavailable"].strip(), row
            assert row["us_per_call"] is None and row["gbps"] is None and row["repeats"] == 0, row
            continue
        assert row["us_per_call"] > 0 and row["gbps"] > 0 and row["repeats"] >= 3
        if row["method"] == "quant_sdpa":
            # float16 output vs dequantize + fp16 SDPA
            assert row["max_abs_diff"] < 5e-3


def test_bench_small_run(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mlx_qsdpa", "bench", *SMALL, "--json", str(out_json)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for method in METHODS:
        assert method in r.stdout
    data = json.loads(out_json.read_text())
    # On the CPU every baseline runs; on a GPU, MLX-CUDA's quantized_matmul
    # may have no kernel for these shapes (then the row says so).
    _check_rows(data["rows"], may_be_unavailable=() if DEVICE == "cpu" else ("qmm_path",))
    # The header names the CPU and the kernel variant, as the JSON does.
    assert data["cpu"] == bench.cpu_model() and data["cpu_variant"] == mlx_qsdpa.cpu_variant()
    assert f"CPU: {data['cpu']} " in r.stdout
    assert f"CPU kernel variant: {data['cpu_variant']}" in r.stdout
    # Each timed row prints its time as the JSON's microseconds in a readable unit.
    table = {(int(line.split()[0]), line.split()[1]): line.split() for line in r.stdout.splitlines()
             if line.split()[:1] in (["128"], ["320"])}
    assert len(table) == len(data["rows"])
    for row in data["rows"]:
        if row["unavailable"] is None:
            cells = table[(row["ctx"], row["method"])]
            assert " ".join(cells[2:4]) == bench.format_time(row["us_per_call"] * 1e-6)
            assert cells[3] in ("ns", "us", "ms", "s") and len(cells[2].replace(".", "")) == 3
    # The legend explains every column of the table.
    header = next(line for line in r.stdout.splitlines() if line.split()[:2] == ["ctx", "method"])
    columns = ["ctx", "method", "time/call", "GB/s", "x vs ours", "reps", "note"]
    assert header.split() == ["ctx", "method", "time/call", "GB/s", "x", "vs", "ours", "reps", "note"]
    for column in columns:
        assert any(line.startswith(f"{column}: ") for line in r.stdout.splitlines()), column


@pytest.mark.parametrize(
    "seconds, text",
    [(0.0869, "86.9 ms"), (412e-6, "412 us"), (2.31, "2.31 s"), (0.0136, "13.6 ms"), (9.8634, "9.86 s"),
     (19.04e-6, "19.0 us"), (5.734e-6, "5.73 us"), (999.7e-6, "1.00 ms"), (0.99951, "1.00 s"),
     (626.8e-3, "627 ms"), (123.4, "123 s"), (1234.5, "1230 s"), (85e-9, "85.0 ns")],
)
def test_times_have_three_significant_digits(seconds, text):
    assert bench.format_time(seconds) == text


def test_cpu_model_from_the_os(monkeypatch):
    if sys.platform == "linux":
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            assert bench.cpu_model() == names[0]

    class Done:
        returncode, stdout = 0, "Apple M3 Max\n"

    calls = []
    monkeypatch.setattr(bench.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    assert bench.cpu_model() == "Apple M3 Max"
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]
    # Elsewhere, or when the OS says nothing: what platform knows.
    monkeypatch.setattr(bench.platform, "system", lambda: "Windows")
    monkeypatch.setattr(bench.platform, "processor", lambda: "Intel64 Family 6")
    assert bench.cpu_model() == "Intel64 Family 6"


def test_plot_without_matplotlib_fails_before_the_benchmark(monkeypatch, tmp_path):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_context", must_not_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib: pip install matplotlib .*mlx-qsdpa\[bench\]"):
        main(["bench", *SMALL, "--plot", str(tmp_path / "p.png")])
    assert not (tmp_path / "p.png").exists()


def test_unavailable_baseline_is_reported(tmp_path, capsys, monkeypatch):
    # The qmm baseline raises as MLX-CUDA's quantized_matmul does for a shape
    # it has no kernel for (the bench calls and evaluates it in one place, so
    # an error from building the graph and one from evaluating it take the
    # same path).
    def fail(*args, **kwargs):
        raise RuntimeError("[quantized_matmul] no kernel for this shape (injected by the test)")

    monkeypatch.setattr(bench, "qmm_attention", fail)
    out_json = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    _check_rows(rows, may_be_unavailable=("qmm_path",))
    qmm = [row for row in rows if row["method"] == "qmm_path"]
    assert all(
        row["unavailable"] == "RuntimeError: [quantized_matmul] no kernel for this shape (injected by the test)"
        for row in qmm
    )
    # Every other method was timed.
    assert all(row["unavailable"] is None for row in rows if row["method"] != "qmm_path")
    table = [line.split() for line in out.splitlines() if line.split()[:2] in (["128", "qmm_path"], ["320", "qmm_path"])]
    assert len(table) == 2
    for line in table:
        assert line[2:5] == ["n/a", "n/a", "n/a"] and "unavailable:" in line
    assert "n/a: MLX could not run that baseline" in out


def test_a_failure_of_quant_sdpa_is_not_hidden(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("quant_sdpa broke (injected by the test)")

    monkeypatch.setattr(bench, "quant_sdpa", broken)
    with pytest.raises(RuntimeError, match="injected by the test"):
        main(["bench", *SMALL])


@pytest.mark.parametrize("chain", [False, True])
def test_chained_calls_feed_each_output_to_the_next(tmp_path, capsys, monkeypatch, chain):
    # --chain: within one evaluation, call i + 1's queries are call i's
    # output (the calls then run one after another, as a model's layers do);
    # without it every call gets its own layer's queries.
    seen = []  # (queries, output) of each quant_sdpa call
    real = bench.quant_sdpa

    def recording(q, *args, **kwargs):
        out = real(q, *args, **kwargs)
        seen.append((q, out))
        return out

    monkeypatch.setattr(bench, "quant_sdpa", recording)
    out_json = tmp_path / "bench.json"
    argv = ["bench", *SMALL, "--ctx", "128", "--layers", "3", "--methods", "quant_sdpa,fp16_sdpa", "--json", str(out_json)]
    assert main(argv + (["--chain"] if chain else [])) == 0
    data = json.loads(out_json.read_text())
    assert data["config"]["chain"] is chain and data["config"]["layers"] == 3
    assert ("chained" in capsys.readouterr().out) is chain
    # The bench's own correctness call (one), then evaluations of 3 calls.
    assert len(seen) % 3 == 1
    runs = [seen[i : i + 3] for i in range(1, len(seen), 3)]
    assert len(runs) >= 3
    for run in runs:
        assert (run[1][0] is run[0][1]) is chain
        assert (run[2][0] is run[1][1]) is chain
    assert all(row["us_per_call"] > 0 for row in data["rows"])


def test_bench_rejects_unknown_method():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_qsdpa", "bench", "--methods", "nope"], capture_output=True, text=True
    )
    assert r.returncode != 0
    assert "unknown method" in (r.stdout + r.stderr)
