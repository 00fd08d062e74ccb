"""What the Metal and CUDA simulators share: the runtime (runtime.cpp and
include/qsim/ next to this file), finding clang, the library cache keyed by
a hash of every input, parallel compiles, symbolized reports and the typed
ctypes entry points of the runtime.

Each front end (tests/metal/metal_simulator.py, tests/cuda/cuda_simulator.py)
adds its own language layer and kernel table on top and imports this module
by putting tests/sim on sys.path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIM = Path(__file__).resolve().parent
RUNTIME_SOURCE = SIM / "runtime.cpp"
RUNTIME_INCLUDE = SIM / "include"


# The runtime's schedules (qsim_set_schedule): how the threads of a
# threadgroup take turns. A schedule is named "ascending", "descending" or
# "random:SEED".
SCHEDULE_CODES = {"ascending": 0, "descending": 1, "random": 2}


def schedule_code(schedule: str) -> tuple[int, int]:
    """(code, seed) of a schedule name, for qsim_set_schedule."""
    name, _, seed = schedule.partition(":")
    if name not in SCHEDULE_CODES or bool(seed) != (name == "random") or (seed and not seed.isdigit()):
        raise ValueError(f"schedule {schedule!r}: expected 'ascending', 'descending' or 'random:SEED'")
    return SCHEDULE_CODES[name], int(seed or 0)


def set_schedule(lib: ctypes.CDLL, schedule: str) -> None:
    """Runs the launches that follow on a library under `schedule`."""
    code, seed = schedule_code(schedule)
    if lib.qsim_set_schedule(code, seed):
        raise ValueError(f"the runtime refused schedule {schedule!r}")


@contextlib.contextmanager
def scheduled(lib: ctypes.CDLL, schedule: str):
    """A library's launches under `schedule` inside the block, ascending
    after it."""
    set_schedule(lib, schedule)
    try:
        yield
    finally:
        set_schedule(lib, "ascending")


class SimulatorError(RuntimeError):
    """A launch the simulator refused or stopped, with its report."""


class BuildError(RuntimeError):
    """The simulator could not compile a library."""


def find_clang() -> str | None:
    """clang++ (QSIM_CXX overrides): the simulators need clang."""
    explicit = os.environ.get("QSIM_CXX")
    if explicit:
        return explicit
    for name in ["clang++"] + [f"clang++-{v}" for v in range(20, 13, -1)]:
        path = shutil.which(name)
        if path:
            return path
    return None


def runtime_inputs() -> list[Path]:
    """The runtime's files, for a library's cache key."""
    return [RUNTIME_SOURCE, *(p for p in RUNTIME_INCLUDE.rglob("*") if p.is_file()), Path(__file__).resolve()]


def hash_inputs(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(set(paths)):
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def compile_all(jobs: list[list[str]]) -> None:
    """Runs the compiles, two at a time (CI machines have two cores)."""
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, list[str]]] = []
    errors = []
    while pending or running:
        while pending and len(running) < 2:
            cmd = pending.pop(0)
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd))
        proc, cmd = running.pop(0)
        output, _ = proc.communicate()
        if proc.returncode:
            errors.append(f"$ {' '.join(cmd)}\n{output}")
    if errors:
        raise BuildError("\n".join(errors))


def cached_library(build_dir: Path, stem: str, key: str, lib_name: str, make) -> Path:
    """The library built for `key` in build_dir/<stem>-<key>/, made when
    missing by make(work), which compiles into the scratch directory `work`
    and returns the files to keep (the library, named lib_name, first).
    Older builds of the same stem are removed (a process that loaded one
    keeps its mapping)."""
    out_dir = build_dir / f"{stem}-{key}"
    lib = out_dir / lib_name
    if lib.exists():
        return lib
    build_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=build_dir))
    try:
        built, *extra = make(work)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in extra:
            shutil.copy(f, out_dir / Path(f).name)
        os.replace(built, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in build_dir.glob(f"{stem}-*"):
        if old.is_dir() and old != out_dir and len(old.name) == len(out_dir.name):
            shutil.rmtree(old, ignore_errors=True)
    return lib


def symbolize(message: str) -> str:
    """Appends source lines to the "[pc lib+0x...]" marks of a report."""
    tool = shutil.which("addr2line")

    def repl(m: re.Match) -> str:
        if not tool:
            return m.group(0)
        lib, off = m.group(1), int(m.group(2), 16)
        # The mark is a return address: the access is just before it.
        r = subprocess.run([tool, "-e", lib, "-i", "-p", "-C", "-f", hex(off - 1)], capture_output=True, text=True)
        where = r.stdout.strip().splitlines()
        if r.returncode or not where or "??" in where[0]:
            return m.group(0)
        first = where[0]
        loc = first.split(" at ")[-1]
        return f" at {Path(loc.split(':')[0]).name}:{loc.split(':')[-1].split()[0]}"

    return re.sub(r" \[pc (\S+)\+0x([0-9a-f]+)\]", repl, message)


def load_runtime(path: Path) -> ctypes.CDLL:
    """A simulator library with the runtime's entry points typed (launch.h);
    both simulators' drivers load theirs through this."""
    lib = ctypes.CDLL(str(path))
    lib.qsim_last_error.restype = ctypes.c_char_p
    lib.qsim_alloc.restype = ctypes.c_int64
    lib.qsim_alloc.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_char_p]
    lib.qsim_free.argtypes = [ctypes.c_int64]
    lib.qsim_data.restype = ctypes.c_void_p
    lib.qsim_data.argtypes = [ctypes.c_int64]
    lib.qsim_bytes_read.restype = ctypes.c_int64
    lib.qsim_bytes_read.argtypes = [ctypes.c_int64]
    lib.qsim_kernel_names.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.qsim_function_constants.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.qsim_set_threadgroup_limit.argtypes = [ctypes.c_int64]
    lib.qsim_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
    lib.qsim_set_race_detector.argtypes = [ctypes.c_int]
    lib.qsim_launch.argtypes = [
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_int64,
    ]
    return lib
