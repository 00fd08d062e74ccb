"""A call's timeline from a -DQSDPA_DEBUG_TIMELINE=1 build's prints
(csrc/backends/cuda/debug_timeline.cuh; `run_gpu.sh timeline`):

    python benchmarks/cuda/timeline.py PRINTS_FILE

Per call (calls are told apart by gaps of 100 us between blocks' starts):
the blocks' start skew and each phase of a block's life: its first keys,
the end of its stream, the epilogue's steps (the four warps joined, the
rows' max and sum reduced, the warps' outputs summed) and its written
partial (median and max over blocks), when the last partial was written,
and the merge's levels after that: when the last block arrived at each
level and when its merge step was done (and, from builds of 2026-11-29h
on, how a step splits into the count-in's barrier and atomic, the second
barrier, the loads and the rest). Times in us from the call's first block start
(%globaltimer); cycles are the block's SM clock."""

import statistics
import sys


POINTS = ("start", "first", "streamed", "joined", "reduced", "summed", "partial")  # debug_timeline.cuh's order


def parse(path):
    blocks, merges = [], []
    n = len(POINTS)
    for line in open(path, errors="replace"):
        f = line.split()
        if len(f) < 2 or f[0] != "qsdpa-tl":
            continue
        if f[1] == "B" and len(f) == 7 + 2 * n - 1:
            x, y, z, sm, keys = map(int, f[2:7])
            b = dict(x=x, y=y, z=z, sm=sm, keys=keys)
            b.update(zip(POINTS, map(int, f[7:7 + n])))
            b.update(zip(["c_" + q for q in POINTS[1:]], map(int, f[7 + n:])))
            blocks.append(b)
        elif f[1] == "M" and len(f) in (9, 12):  # 12: with enter, counted and loaded (2026-11-29h)
            x, y, z, level, last = map(int, f[2:7])
            m = dict(x=x, y=y, z=z, level=level, last=bool(last), arrive=int(f[7]), done=int(f[8]))
            if len(f) == 12:
                m.update(enter=int(f[9]), counted=int(f[10]), loaded=int(f[11]))
            merges.append(m)
    return blocks, merges


def calls_of(blocks, merges, gap_ns=100_000):
    blocks = sorted(blocks, key=lambda b: b["start"])
    calls, cur = [], []
    for b in blocks:
        if cur and b["start"] - cur[-1]["start"] > gap_ns:
            calls.append(cur)
            cur = []
        cur.append(b)
    if cur:
        calls.append(cur)
    out = []
    for bs in calls:
        t0 = bs[0]["start"]
        t1 = max(max(b["partial"] for b in bs), t0) + 1_000_000
        ms = [m for m in merges if t0 <= m["arrive"] <= t1]
        out.append((bs, ms))
    return out


def us(ns):
    return ns / 1000.0


def med_max(xs):
    return f"{us(statistics.median(xs)):6.2f} {us(max(xs)):6.2f}" if xs else "     -      -"


def report(bs, ms):
    t0 = min(b["start"] for b in bs)
    grid_x = max(b["x"] for b in bs) + 1
    keys = sorted({b["keys"] for b in bs})
    lines = [f"call: {len(bs)} blocks (grid x {grid_x}), keys per block {keys[0]}..{keys[-1]}, "
             f"{len({b['sm'] for b in bs})} SMs"]
    lines.append(f"  block starts spread over        {us(max(b['start'] for b in bs) - t0):6.2f} us")
    lines.append("  per block (median, max; us)     med    max")
    phases = (("start", "first", "start -> first keys"), ("first", "streamed", "first keys -> streamed"),
              ("streamed", "joined", "streamed -> warps joined"), ("joined", "reduced", "joined -> rows reduced"),
              ("reduced", "summed", "reduced -> outputs summed"), ("summed", "partial", "summed -> partial written"),
              ("streamed", "partial", "streamed -> partial written"), ("start", "partial", "start -> partial written"))
    for a, z, name in phases:
        got = [b for b in bs if b[a] and b[z]]
        lines.append(f"    {name:<27}{med_max([b[z] - b[a] for b in got])}")
    cyc = [b["c_partial"] for b in bs]
    lines.append(f"    cycles start -> partial    {statistics.median(cyc):8.0f} {max(cyc):8.0f}")
    last_partial = max(b["partial"] for b in bs)
    lines.append(f"  first / last partial written at {us(min(b['partial'] for b in bs) - t0):6.2f} / "
                 f"{us(last_partial - t0):6.2f} us")
    end = last_partial
    for level in sorted({m["level"] for m in ms}):
        at = [m for m in ms if m["level"] == level]
        lasts = [m for m in at if m["last"]]
        done = max((m["done"] for m in lasts), default=0)
        lines.append(f"  merge level {level}: {len(at)} arrivals, {len(lasts)} merge steps; last arrival at "
                     f"{us(max(m['arrive'] for m in at) - t0):6.2f} us, last step done at {us(done - t0):6.2f} us; "
                     f"a step (arrival -> done) {med_max([m['done'] - m['arrive'] for m in lasts])}")
        end = max(end, done)
        timed = [m for m in lasts if m.get("loaded")]
        if timed:  # where a step's time goes (the blocks that merged at this level)
            parts = (("enter", "counted", "barrier + counter atomic"), ("counted", "arrive", "second barrier"),
                     ("arrive", "loaded", "loads in registers"), ("loaded", "done", "compute, stores, barrier"))
            lines.append("    " + "; ".join(f"{name} {med_max([m[z] - m[a] for m in timed]).split()[0]}"
                                          for a, z, name in parts) + " (median us)")
    lines.append(f"  call: first block start -> last work done {us(end - t0):6.2f} us "
                 f"(after the last partial: {us(end - last_partial):6.2f} us)")
    return "\n".join(lines)


def main():
    blocks, merges = parse(sys.argv[1])
    if not blocks:
        print("no qsdpa-tl lines (was the build made with -DQSDPA_DEBUG_TIMELINE=1?)")
        return 1
    for bs, ms in calls_of(blocks, merges):
        print(report(bs, ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
