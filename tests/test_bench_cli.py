"""The bench CLI runs end to end on a tiny problem and reports sane rows.

No timing is asserted (timings belong in benchmarks/RESULTS.md); this checks
the command, the table, the JSON, and that quant_sdpa's output agrees with
dequantize + SDPA inside the benchmark.
"""

import json
import subprocess
import sys


def test_bench_small_run(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "mlx_qsdpa", "bench", "--ctx", "128,320", "--heads", "4", "--kv-heads", "2",
        "--dim", "64", "--layers", "2", "--min-time", "0", "--max-reps", "3", "--no-progress",
        "--json", str(out_json),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for method in ("quant_sdpa", "fp16_sdpa", "qmm_path", "dequant_sdpa"):
        assert method in r.stdout
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert {(row["ctx"], row["method"]) for row in rows} == {
        (c, m) for c in (128, 320) for m in ("quant_sdpa", "fp16_sdpa", "qmm_path", "dequant_sdpa")
    }
    for row in rows:
        assert row["us_per_call"] > 0 and row["gbps"] > 0 and row["repeats"] >= 3
        if row["method"] == "quant_sdpa":
            # float16 output vs dequantize + fp16 SDPA
            assert row["max_abs_diff"] < 5e-3


def test_bench_rejects_unknown_method():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_qsdpa", "bench", "--methods", "nope"], capture_output=True, text=True
    )
    assert r.returncode != 0
    assert "unknown method" in (r.stdout + r.stderr)
