"""The Metal simulator: build and Python interface.

A .metal file is compiled, unchanged, by clang++ as C++ against the
Metal-compatibility header (sim/include, where ``<metal_stdlib>`` lives),
together with generated trampolines that bind each kernel's arguments the
way Metal does (by the ``[[buffer(i)]]``, ``[[threadgroup(i)]]``,
``[[function_constant(c)]]`` and built-in attributes, read from the
preprocessed source), and linked with the simulators' shared runtime
(tests/sim/runtime.cpp), which executes dispatches on the CPU and reports
misuse. The result is a shared library driven through ctypes (``Library``).

Libraries are cached in build/metal-sim/ under a hash of every input, so a
test session compiles each one once, and not at all when nothing changed.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# The runtime and build helpers both simulators share.
sys.path.insert(0, str(ROOT / "tests" / "sim"))
from simcore import (  # noqa: E402
    RUNTIME_INCLUDE,
    RUNTIME_SOURCE,
    BuildError,
    SimulatorError,
    cached_library,
    compile_all,
    find_clang,
    hash_inputs,
    load_runtime,
    runtime_inputs,
    scheduled,
    set_schedule,
    symbolize,
)

SIM = Path(__file__).resolve().parent / "sim"
BUILD = ROOT / "build" / "metal-sim"

# Kernel sources, compiled with the memory-access instrumentation the
# runtime's checks rely on.
KERNEL_FLAGS = [
    "-std=c++17",
    "-fPIC",
    "-O2",
    # No auto-vectorization: an access is then one of the kernel's own
    # scalars or vectors, whose alignment the runtime checks (the SLP
    # vectorizer merged four uint stores into one 16-byte store at a 4-byte
    # offset).
    "-fno-slp-vectorize",
    "-fno-vectorize",
    "-gline-tables-only",
    # DWARF 4: binutils' addr2line (simcore.symbolize) gives some rows of
    # clang's DWARF 5 line tables the file of the compile unit instead of
    # the kernel source's.
    "-gdwarf-4",
    "-fms-extensions",  # `threadgroup` is the __unaligned qualifier (qsim_metal/compat.h)
    "-D__METAL_VERSION__=310",
    "-Wall",
    "-Wno-unknown-attributes",
    "-Wno-unused-variable",
    "-fsanitize-coverage=func,inline-8bit-counters,trace-loads,trace-stores",
]
HOST_FLAGS = ["-std=c++17", "-fPIC", "-O2", "-g", "-Wall", "-Wextra"]

BUILTINS = {
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "thread_index_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "simdgroup_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroups_per_threadgroup",
    "threads_per_simdgroup",
}


# ---------------------------------------------------------------------------
# Reading the kernels' interface from the source
# ---------------------------------------------------------------------------


@dataclass
class Param:
    decl_type: str  # as written, e.g. "const device uchar*"
    name: str
    kind: str  # "buffer", "threadgroup" or "builtin"
    index: str = ""  # the attribute's index expression
    builtin: str = ""
    function_constant: str = ""  # gating constant, if any


@dataclass
class Kernel:
    name: str
    params: list[Param] = field(default_factory=list)


@dataclass
class Constant:
    ctype: str
    name: str
    index: str


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise BuildError("unbalanced parentheses in a kernel signature")


def _parse_param(text: str, kernel: str) -> Param:
    attrs = []
    for group in re.findall(r"\[\[(.*?)\]\]", text, flags=re.S):
        attrs += [a.strip() for a in _split_top_level(group)]
    decl = re.sub(r"\[\[.*?\]\]", "", text, flags=re.S).strip()
    m = re.match(r"^(.*?)(\w+)$", decl, flags=re.S)
    if not m:
        raise BuildError(f"kernel {kernel}: cannot read parameter '{text.strip()}'")
    p = Param(decl_type=" ".join(m.group(1).split()), name=m.group(2), kind="")
    for a in attrs:
        am = re.match(r"^(\w+)\s*(?:\((.*)\))?$", a, flags=re.S)
        if not am:
            raise BuildError(f"kernel {kernel}: cannot read attribute '{a}'")
        aname, arg = am.group(1), (am.group(2) or "").strip()
        if aname == "buffer":
            p.kind, p.index = "buffer", arg
        elif aname == "threadgroup":
            p.kind, p.index = "threadgroup", arg
        elif aname == "function_constant":
            p.function_constant = arg
        elif aname in BUILTINS:
            p.kind, p.builtin = "builtin", aname
        else:
            raise BuildError(f"kernel {kernel}: parameter '{p.name}' has attribute '{aname}', which the simulator does not support")
    if not p.kind:
        raise BuildError(f"kernel {kernel}: parameter '{p.name}' has no [[buffer]], [[threadgroup]] or built-in attribute")
    return p


def _preprocess_for_parsing(clang: str, metal: Path, include_dirs: list[Path]) -> str:
    """The source with our macros expanded but MSL's words intact: a stub
    <metal_stdlib> (empty) stands in for the compatibility header."""
    stub = BUILD / "parse-stubs"
    stub.mkdir(parents=True, exist_ok=True)
    for h in ("metal_stdlib", "metal_simdgroup", "metal_math", "metal_integer", "metal_compute"):
        (stub / h).write_text("// empty: the simulator reads kernel signatures without the MSL headers\n")
    cmd = [clang, "-E", "-P", "-x", "c++", "-std=c++17", "-D__METAL_VERSION__=310", f"-I{stub}"]
    cmd += [f"-I{d}" for d in include_dirs] + [str(metal)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BuildError(f"preprocessing {metal} failed:\n{r.stderr}")
    return r.stdout


def parse_metal(clang: str, metal: Path, include_dirs: list[Path]) -> tuple[list[Constant], list[Kernel]]:
    text = _preprocess_for_parsing(clang, metal, include_dirs)
    constants = [
        Constant(t, n, i.strip())
        for t, n, i in re.findall(
            r"\bconstant\s+(bool|int|uint)\s+(\w+)\s*\[\[\s*function_constant\s*\(([^)]*)\)\s*\]\]\s*;", text
        )
    ]
    kernels = []
    for m in re.finditer(r"\[\[\s*kernel\s*\]\]\s*void\s+(\w+)\s*\(", text):
        before = text[max(0, m.start() - 200) : m.start()].rstrip()
        if re.search(r"template\s*<[^;{}]*>\s*$", before):
            raise BuildError(
                f"kernel {m.group(1)} is a template: instantiations with [[host_name]] are not C++; "
                "write non-template [[kernel]] functions (e.g. through a macro)"
            )
        close = _matching_paren(text, m.end() - 1)
        params = [_parse_param(p, m.group(1)) for p in _split_top_level(text[m.end() : close])]
        kernels.append(Kernel(m.group(1), params))
    if not kernels:
        raise BuildError(f"no [[kernel]] function in {metal}")
    return constants, kernels


def generate_trampolines(metal: Path, constants: list[Constant], kernels: list[Kernel]) -> str:
    """C++ that runs one thread of each kernel with its arguments bound."""
    out = [
        f"// Generated by tests/metal/metal_simulator.py from {metal.name}: do not edit.",
        "#include <metal_stdlib>",
        f'#include "{metal}"',
        "",
        "namespace {",
    ]
    for k in kernels:
        args, infos = [], []
        for p in k.params:
            if p.kind == "buffer":
                enabled = f"(bool){p.function_constant}" if p.function_constant else "true"
                ptr = f"qsim::buffer_argument(qsim_c, (int)({p.index}), {enabled})"
                if p.decl_type.endswith("&"):
                    args.append(f"*({p.decl_type[:-1].strip()}*){ptr}")
                else:
                    args.append(f"({p.decl_type}){ptr}")
                fc = f'"{p.function_constant}"' if p.function_constant else "nullptr"
                en = f"(const bool*)&{p.function_constant}" if p.function_constant else "nullptr"
                infos.append(f'{{qsim::ArgumentInfo::Buffer, (int)({p.index}), "{p.name}", {fc}, {en}}}')
            elif p.kind == "threadgroup":
                args.append(f"({p.decl_type})qsim::threadgroup_argument(qsim_c, (int)({p.index}))")
                infos.append(f'{{qsim::ArgumentInfo::Threadgroup, (int)({p.index}), "{p.name}", nullptr, nullptr}}')
            else:
                args.append(f"qsim::builtin_value<{p.decl_type}>(qsim_c, qsim::Builtin::{p.builtin})")
        out.append(f"void qsim_run_{k.name}(const qsim::ThreadContext& qsim_c) {{")
        out.append(f"  {k.name}(\n      " + ",\n      ".join(args) + ");")
        out.append("}")
        if infos:
            out.append(f"const qsim::ArgumentInfo qsim_args_{k.name}[] = {{\n    " + ",\n    ".join(infos) + "};")
    out.append("} // namespace")
    out.append("")
    entries = []
    for k in kernels:
        has_args = any(p.kind in ("buffer", "threadgroup") for p in k.params)
        n = sum(p.kind in ("buffer", "threadgroup") for p in k.params)
        table = f"qsim_args_{k.name}" if has_args else "nullptr"
        entries.append(f'{{"{k.name}", qsim_run_{k.name}, {table}, {n}}}')
    out.append('extern "C" const qsim::KernelInfo* qsim_kernel_table(int* n) {')
    out.append("  static const qsim::KernelInfo table[] = {\n      " + ",\n      ".join(entries) + "};")
    out.append("  *n = sizeof(table) / sizeof(table[0]);")
    out.append("  return table;")
    out.append("}")
    out.append('extern "C" const qsim::FunctionConstantInfo* qsim_function_constant_table(int* n) {')
    if constants:
        rows = [
            f'{{(int)({c.index}), qsim::FunctionConstantInfo::{"Bool" if c.ctype == "bool" else "Int"}, (void*)&{c.name}, "{c.name}"}}'
            for c in constants
        ]
        out.append("  static const qsim::FunctionConstantInfo table[] = {\n      " + ",\n      ".join(rows) + "};")
        out.append("  *n = sizeof(table) / sizeof(table[0]);")
        out.append("  return table;")
    else:
        out.append("  *n = 0;")
        out.append("  return nullptr;")
    out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def build_library(metal: Path, *, plan_runner: bool = False) -> Path:
    """Compiles `metal` into a simulator library (cached); with plan_runner,
    also links csrc/backends/metal/dispatch_plan.cpp and sim/plan_runner.cpp."""
    clang = find_clang()
    if clang is None:
        raise BuildError("clang++ not found: the Metal simulator needs clang (apt-get install clang)")
    metal = Path(metal).resolve()
    include_dirs = [ROOT / "csrc", ROOT / "csrc" / "backends" / "metal", metal.parent]
    inputs = [metal, Path(__file__).resolve(), *(ROOT / "csrc" / "mlx_qsdpa").glob("*.h")]
    inputs += list((ROOT / "csrc" / "backends" / "metal").glob("*.h")) + list(metal.parent.glob("*.h"))
    inputs += [p for p in SIM.rglob("*") if p.is_file()] + runtime_inputs()
    if plan_runner:
        inputs += list((ROOT / "csrc" / "backends" / "metal").glob("dispatch_plan.*")) + [ROOT / "csrc" / "call.h"]
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    key = hash_inputs(inputs, version + repr(KERNEL_FLAGS + HOST_FLAGS) + str(plan_runner))
    lib_name = f"libqsim_{metal.stem}.so"

    def make(work: Path):
        constants, kernels = parse_metal(clang, metal, include_dirs)
        gen = work / f"{metal.stem}_trampolines.cpp"
        gen.write_text(generate_trampolines(metal, constants, kernels))
        sim_incs = [f"-I{SIM / 'include'}", f"-I{RUNTIME_INCLUDE}"]
        incs = sim_incs + [f"-I{d}" for d in include_dirs]
        jobs = [
            [clang, *KERNEL_FLAGS, *incs, "-c", str(gen), "-o", str(work / "kernels.o")],
            [clang, *HOST_FLAGS, f"-I{RUNTIME_INCLUDE}", "-c", str(RUNTIME_SOURCE), "-o", str(work / "runtime.o")],
        ]
        objs = [work / "kernels.o", work / "runtime.o"]
        if plan_runner:
            host_incs = [f"-I{RUNTIME_INCLUDE}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'backends' / 'metal'}"]
            jobs.append([clang, *HOST_FLAGS, *host_incs, "-c", str(SIM / "plan_runner.cpp"), "-o", str(work / "plan_runner.o")])
            jobs.append(
                [clang, *HOST_FLAGS, *host_incs, "-c", str(ROOT / "csrc" / "backends" / "metal" / "dispatch_plan.cpp"), "-o", str(work / "dispatch_plan.o")]
            )
            objs += [work / "plan_runner.o", work / "dispatch_plan.o"]
        compile_all(jobs)
        compile_all([[clang, "-shared", "-Wl,-Bsymbolic", "-o", str(work / lib_name), *map(str, objs)]])
        return work / lib_name, gen  # the generated trampolines are kept for reading reports

    return cached_library(BUILD, metal.stem, key, lib_name, make)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


class Library:
    """A compiled simulator library (ctypes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lib = load_runtime(self.path)

    def kernel_names(self) -> list[str]:
        n = self.lib.qsim_kernel_names(None, 0)
        buf = ctypes.create_string_buffer(n)
        self.lib.qsim_kernel_names(buf, n)
        return buf.value.decode().split()

    def function_constants(self) -> dict[int, tuple[str, str]]:
        """{index: (type, name)} of the library's function constants."""
        n = self.lib.qsim_function_constants(None, 0)
        buf = ctypes.create_string_buffer(n)
        self.lib.qsim_function_constants(buf, n)
        rows = [line.split() for line in buf.value.decode().splitlines()]
        return {int(i): (t, name) for i, t, name in rows}

    def error(self) -> str:
        return symbolize(self.lib.qsim_last_error().decode())

    # Schedules and the race detector ------------------------------------

    def set_schedule(self, schedule: str) -> None:
        """The order of the threads' turns in the launches that follow:
        "ascending" (the default), "descending" or "random:SEED"."""
        set_schedule(self.lib, schedule)

    def schedule(self, schedule: str):
        """A context: launches under `schedule` inside it, ascending after."""
        return scheduled(self.lib, schedule)

    def set_race_detector(self, on: bool) -> None:
        """The race detector on threadgroup memory (on by default)."""
        self.lib.qsim_set_race_detector(int(on))

    # Buffers -------------------------------------------------------------

    def alloc(self, nbytes: int, name: str, initialized: bool) -> int:
        bid = self.lib.qsim_alloc(int(nbytes), int(initialized), name.encode())
        if bid < 0:
            raise SimulatorError(self.error())
        return bid

    def upload(self, array: np.ndarray, name: str) -> int:
        """A buffer holding a copy of `array` (an input: fully initialized)."""
        a = np.ascontiguousarray(array)
        bid = self.alloc(a.nbytes, name, True)
        if a.nbytes:
            ctypes.memmove(self.lib.qsim_data(bid), a.ctypes.data, a.nbytes)
        return bid

    def download(self, bid: int, dtype, count: int) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        if out.nbytes:
            ctypes.memmove(out.ctypes.data, self.lib.qsim_data(bid), out.nbytes)
        return out

    def bytes_read(self, bid: int) -> int:
        """Bytes the kernels have loaded from buffer `bid`."""
        return self.lib.qsim_bytes_read(bid)

    def free(self, bid: int) -> None:
        self.lib.qsim_free(bid)

    # Launches ------------------------------------------------------------

    def launch(self, kernel: str, *, constants: dict, buffers: dict, grid, threads, threadgroup_memory: int = 0) -> None:
        """dispatch_threadgroups(grid, threads); buffers: {index: id or (id, byte offset)}."""
        ci = list(constants.keys())
        cv = [int(v) for v in constants.values()]
        bi, bb, bo = [], [], []
        for idx, b in buffers.items():
            bid, off = b if isinstance(b, tuple) else (b, 0)
            bi.append(idx)
            bb.append(bid)
            bo.append(off)

        def arr(ctype, values):
            return (ctype * max(len(values), 1))(*values)

        status = self.lib.qsim_launch(
            kernel.encode(),
            len(ci),
            arr(ctypes.c_int, ci),
            arr(ctypes.c_int64, cv),
            len(bi),
            arr(ctypes.c_int, bi),
            arr(ctypes.c_int64, bb),
            arr(ctypes.c_int64, bo),
            arr(ctypes.c_uint32, list(grid)),
            arr(ctypes.c_uint32, list(threads)),
            int(threadgroup_memory),
        )
        if status:
            raise SimulatorError(self.error())
