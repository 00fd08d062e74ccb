"""Summarises Nsight Compute's per-SASS-line CSV (run_gpu.sh stalls): the
lines with the most warp stall samples, and the samples per opcode."""

import collections
import csv
import sys


def main(path: str) -> None:
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    rows = list(csv.reader(lines))
    # A "Kernel Name" line comes before the header.
    rows = rows[next((i for i, r in enumerate(rows) if r and r[0] == "Address"), 0):]
    if not rows:
        print("no CSV rows in", path)
        return
    head = rows[0]
    try:
        src = next(i for i, h in enumerate(head) if h.strip().lower() == "source")
        smp = next(i for i, h in enumerate(head) if "Warp Stall Sampling (All" in h)
    except StopIteration:
        print("no Source / Warp Stall Sampling columns")
        return
    addr = next((i for i, h in enumerate(head) if h.strip().lower() == "address"), None)
    body = []
    for r in rows[1:]:
        try:
            body.append((float(r[smp] or 0), r[addr] if addr is not None else "", r[src], r))
        except (ValueError, IndexError):
            continue
    total = sum(b[0] for b in body) or 1.0
    by_op = collections.Counter()
    for n, _, s, _ in body:
        op = s.split()[0] if s.split() else "?"
        if op.startswith("@"):
            op = s.split()[1] if len(s.split()) > 1 else op
        by_op[op.split(".")[0]] += n
    print(f"total samples {total:.0f}")
    print("by opcode:", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_op.most_common(20)))
    reasons = [i for i, h in enumerate(head) if h.startswith("stall_") and "Not Issued" not in h]
    by_reason = collections.Counter()
    for _, _, _, r in body:
        for i in reasons:
            try:
                by_reason[head[i]] += float(r[i] or 0)
            except (ValueError, IndexError):
                pass
    print("by reason:", ", ".join(f"{k[6:]} {100 * v / total:.1f}%" for k, v in by_reason.most_common(12)))
    for n, a, s, r in sorted(body, key=lambda b: -b[0])[:60]:
        extra = ", ".join(f"{head[i][6:]}={r[i]}" for i in reasons if i < len(r) and r[i] not in ("", "0"))
        print(f"{100 * n / total:5.1f}%  {a}  {s[:70]:70s} {extra[:200]}")


if __name__ == "__main__":
    main(sys.argv[1])
