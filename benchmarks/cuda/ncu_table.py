"""ncu's kernel durations (--metrics gpu__time_duration.sum) of a
profile.py run as one line per context length:

    python benchmarks/cuda/ncu_table.py NCU_OUTPUT CTXS CALLS LABEL

prints `LABEL ctx=N grid=(x, y, z) us: t1 t2 ...` with the calls in order
(the process's first call is cold; compare the others). The kernels are
matched to calls by their order: profile.py runs CALLS calls per context,
one kernel each."""

import re
import sys

path, ctxs, calls, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
grids, times = [], []
for line in open(path, errors="replace"):
    m = re.search(r"qsdpa_\w+<.*?\(Params\) \(([\d, ]+)\)x", line)
    if m:
        grids.append(m.group(1))
    m = re.search(r"gpu__time_duration\.sum\s+(\w+)\s+([\d.,]+)", line)
    if m:
        t = float(m.group(2).replace(",", ""))
        times.append(t / 1000 if m.group(1) == "ns" else t * 1000 if m.group(1) == "ms" else t)
ctx_list = ctxs.split(",")
if len(times) != len(ctx_list) * calls:
    print(f"{label} expected {len(ctx_list) * calls} kernels, found {len(times)}")
for i, ctx in enumerate(ctx_list):
    ts = times[i * calls:(i + 1) * calls]
    grid = grids[i * calls] if i * calls < len(grids) else "?"
    print(f"{label} ctx={ctx} grid=({grid}) us: " + " ".join(f"{t:.2f}" for t in ts))
