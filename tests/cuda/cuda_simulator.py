"""The CUDA simulator: csrc/backends/cuda/decode_mma.cuh and csrc/backends/cuda/decode_simt.cu on the
CPU, driven from Python.

The decode kernels are compiled unchanged by clang++ against the CUDA
compatibility layer of sim/include (QSDPA_CUDA_SIM swaps csrc/backends/cuda/ptx.cuh's
inline PTX for its models) and linked with the simulators' shared runtime
(tests/sim/runtime.cpp: fibers, 32-lane warps, barriers, checked
memory). One translation unit per tensor-core kernel instantiation (two
compile at a time), one for the generic kernels a library holds, and the
host side: the host's own launch plan (csrc/backends/cuda/launch_plan.cpp),
sim/call_runner.cpp, which runs a call through it as the host does, and a
generated unit that names the library's kernels. Libraries are cached in
build/cuda-sim/ under a hash of every input.

`Library.quant_sdpa` hands a call's operands (raw elements, element strides,
dtype and format names) to the C++ side, which builds the Call, chooses the
kernel, plans the launch and fills the kernel's Params with the host's
functions, and launches the grid (blocks one after another). `kernel_for`
asks the same plan, in a library without kernels, which kernel a call
needs, so that a test builds the libraries its calls run on.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SIM = Path(__file__).resolve().parent / "sim"
QSIM = ROOT / "tests" / "sim"

# The runtime, build helpers and errors both simulators share.
sys.path.insert(0, str(QSIM))
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
    symbolize,
)
BUILD = ROOT / "build" / "cuda-sim"

INCLUDES = [SIM / "include", RUNTIME_INCLUDE, SIM, ROOT, ROOT / "csrc"]
# -O1: the kernel units (every instantiation's whole kernel) compile in a
# few seconds each; the runtime's checks see every load and store.
KERNEL_FLAGS = [
    "-std=c++20",
    "-fPIC",
    "-O1",
    # No auto-vectorization (as the Metal simulator): the runtime checks that
    # every access is aligned to its size, which merged scalar accesses need
    # not be.
    "-fno-slp-vectorize",
    "-fno-vectorize",
    "-gline-tables-only",
    # DWARF 4: binutils' addr2line (simcore.symbolize) gives some rows of
    # clang's DWARF 5 line tables the file of the compile unit instead of
    # the kernel source's.
    "-gdwarf-4",
    "-fno-strict-aliasing",  # the kernels reinterpret registers (as CUDA allows)
    "-DQSDPA_CUDA_SIM=1",
    "-Wall",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-Wno-unused-variable",
    "-Wno-unused-function",
    "-fsanitize-coverage=func,inline-8bit-counters,trace-loads,trace-stores",
]
HOST_FLAGS = ["-std=c++20", "-fPIC", "-O1", "-g", "-Wall", "-Wextra"]

# The C++ spelling of the simulator's query dtype names.
CPP_TYPE = {"f16": "__half", "bf16": "__nv_bfloat16"}

# The simulated GPU, as the host would see it: its SM count and how many
# blocks of a decode kernel an SM holds (the occupancy API's answer for the
# tensor-core kernels at 128 registers per thread). The launch plan caps the
# tensor-core kernels' wave below that.
SM_COUNT = 132
BLOCKS_PER_SM = 4


@dataclass(frozen=True)
class Variant:
    """One instantiation MmaDecode<T, MODE, BITS, GS, D, NT>."""

    dtype: str  # "f16" or "bf16"
    mode: str
    bits: int
    gs: int
    D: int
    NT: int

    @property
    def name(self) -> str:
        return f"mma_{self.dtype}_{self.mode}{self.bits}g{self.gs}_d{self.D}_nt{self.NT}"

    def template_args(self) -> str:
        return f'{CPP_TYPE[self.dtype]}, qsim_cuda::mode_named("{self.mode}"), {self.bits}, {self.gs}, {self.D}, {self.NT}'

    def choice_test(self) -> str:
        """The C++ condition under which the host runs this kernel."""
        return (
            f'choice.kind == cu::KernelKind::Mma && c.q_type == qsim_cuda::elem_named("{self.dtype}") && '
            f'c.k.mode == qsim_cuda::mode_named("{self.mode}") && c.k.bits == {self.bits} && c.k.group_size == {self.gs} && '
            f"c.D == {self.D} && choice.row_tiles == {self.NT}"
        )


@dataclass(frozen=True)
class SimtVariant:
    """One instantiation of the generic kernel, qsdpa_decode_simt<MODE, BITS>
    (decode_simt.cu): every query dtype, group size and head dim up to 256,
    any strides; what the host runs where no tensor-core kernel applies."""

    mode: str
    bits: int

    @property
    def name(self) -> str:
        return f"simt_{self.mode}{self.bits}"

    def template_args(self) -> str:
        return f'qsim_cuda::mode_named("{self.mode}"), {self.bits}'

    def choice_test(self) -> str:
        return f'choice.kind == cu::KernelKind::Simt && c.k.mode == qsim_cuda::mode_named("{self.mode}") && c.k.bits == {self.bits}'


# ---------------------------------------------------------------------------
# Generated sources
# ---------------------------------------------------------------------------


def kernel_source(v: Variant, kernel_header: Path) -> str:
    return f"""// Generated by tests/cuda/cuda_simulator.py: do not edit.
#include "{kernel_header}"
#include "call_runner.h"
#include "qsim/runtime.h"

namespace cu = mlx_qsdpa::cuda;

// One thread of the kernel; its Params live in buffer 0 (__grid_constant__:
// every thread reads the same block of parameters).
extern "C" void qsim_cuda_run_{v.name}(const qsim::ThreadContext& c) {{
  cu::qsdpa_decode_mma<{v.template_args()}>(*static_cast<const cu::Params*>(c.buffers[0]));
}}

extern "C" int qsim_cuda_smem_{v.name}() {{
  return cu::MmaDecode<{v.template_args()}>::kSmemBytes;
}}
"""


def simt_source(variants: list[SimtVariant], kernel_file: Path) -> str:
    """One unit for the generic kernels (decode_simt.cu defines the host's
    simt_kernel table, so it is included once)."""
    runs = "\n".join(
        f"""extern "C" void qsim_cuda_run_{v.name}(const qsim::ThreadContext& c) {{
  cu::qsdpa_decode_simt<{v.template_args()}>(*static_cast<const cu::Params*>(c.buffers[0]));
}}

extern "C" int qsim_cuda_smem_{v.name}() {{
  return cu::simt_kernel(qsim_cuda::mode_named("{v.mode}"), {v.bits}).smem_bytes;
}}
"""
        for v in variants
    )
    return f"""// Generated by tests/cuda/cuda_simulator.py: do not edit.
#include "{kernel_file}"
#include "call_runner.h"
#include "qsim/runtime.h"

namespace cu = mlx_qsdpa::cuda;

{runs}"""


def host_source(variants: list[Variant | SimtVariant]) -> str:
    """The runtime's kernel table and call_runner.h's kernel_for: the
    library's kernels by the launch plan's choice."""
    decls = "\n".join(
        f'extern "C" void qsim_cuda_run_{v.name}(const qsim::ThreadContext&);\nextern "C" int qsim_cuda_smem_{v.name}();'
        for v in variants
    )
    rows = "".join(f'\n      {{"{v.name}", qsim_cuda_run_{v.name}, kArgs, 1}},' for v in variants)
    lookup = "".join(
        f"""
  if ({v.choice_test()}) {{
    return LibraryKernel{{"{v.name}", qsim_cuda_smem_{v.name}()}};
  }}"""
        for v in variants
    )
    return f"""// Generated by tests/cuda/cuda_simulator.py: do not edit.
#include "call_runner.h"
#include "qsim/runtime.h"

namespace cu = mlx_qsdpa::cuda;

{decls}

namespace {{
const qsim::ArgumentInfo kArgs[] = {{{{qsim::ArgumentInfo::Buffer, 0, "params", nullptr, nullptr}}}};
}}

extern "C" const qsim::KernelInfo* qsim_kernel_table(int* n) {{
  static const qsim::KernelInfo table[] = {{{rows}
      {{nullptr, nullptr, nullptr, 0}}}};
  *n = int(sizeof(table) / sizeof(table[0])) - 1;
  return table;
}}

extern "C" const qsim::FunctionConstantInfo* qsim_function_constant_table(int* n) {{
  *n = 0;
  return nullptr;
}}

namespace qsim_cuda {{

LibraryKernel kernel_for(const mlx_qsdpa::Call& c, const cu::KernelChoice& choice) {{
  (void)c;
  (void)choice;{lookup}
  return LibraryKernel{{nullptr, 0}};
}}

}} // namespace qsim_cuda
"""


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def build_library(variants: list[Variant | SimtVariant], *, kernel_dir: Path | None = None, defines: tuple[str, ...] = (), tag: str = "decode") -> Path:
    """A simulator library holding `variants` (cached; none: a library that
    only plans). kernel_dir: a copy of csrc/backends/cuda to compile instead
    (the mutant tests' edited kernels); defines: extra -D flags (the
    simulator's own mutants)."""
    clang = find_clang()
    if clang is None:
        raise BuildError("clang++ not found: the CUDA simulator needs clang (apt-get install clang)")
    variants = sorted(set(variants), key=lambda v: v.name)
    cuda_dir = Path(kernel_dir) if kernel_dir else ROOT / "csrc" / "backends" / "cuda"
    inputs = [Path(__file__).resolve(), *runtime_inputs(), ROOT / "csrc" / "call.h", cuda_dir / "launch_plan.cpp"]
    inputs += sorted((ROOT / "csrc" / "mlx_qsdpa").glob("*.h"))
    inputs += [p for p in cuda_dir.glob("*") if p.suffix in (".h", ".cuh")]
    if any(isinstance(v, SimtVariant) for v in variants):
        inputs.append(cuda_dir / "decode_simt.cu")
    inputs += [p for p in SIM.rglob("*") if p.is_file()]
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    extra = version + repr(KERNEL_FLAGS + HOST_FLAGS) + repr([v.name for v in variants]) + repr(defines) + str(cuda_dir)
    key = hash_inputs(inputs, extra)
    lib_name = f"libqsim_cuda_{tag}.so"

    def make(work: Path):
        incs = [f"-I{d}" for d in INCLUDES]
        if kernel_dir:
            # The copy's headers first: "backends/cuda/..." includes of the
            # host units and the kernel's own relative includes resolve there.
            incs = [f"-I{cuda_dir.parent.parent}"] + incs
        jobs, objs = [], []

        def job(flags, src: Path, obj: str):
            jobs.append([clang, *flags, *incs, "-c", str(src), "-o", str(work / obj)])
            objs.append(work / obj)

        kernel_flags = KERNEL_FLAGS + [f"-D{d}" for d in defines]
        simt = [v for v in variants if isinstance(v, SimtVariant)]
        if simt:
            src = work / "simt.cpp"
            src.write_text(simt_source(simt, cuda_dir / "decode_simt.cu"))
            job(kernel_flags, src, "simt.o")
        for v in variants:
            if isinstance(v, Variant):
                src = work / f"{v.name}.cpp"
                src.write_text(kernel_source(v, cuda_dir / "decode_mma.cuh"))
                job(kernel_flags, src, f"{v.name}.o")
        host = work / "host.cpp"
        host.write_text(host_source(variants))
        job(HOST_FLAGS, host, "host.o")
        job(HOST_FLAGS, SIM / "call_runner.cpp", "call_runner.o")
        job(HOST_FLAGS, cuda_dir / "launch_plan.cpp", "launch_plan.o")
        job(HOST_FLAGS, RUNTIME_SOURCE, "runtime.o")
        compile_all(jobs)
        compile_all([[clang, "-shared", "-Wl,-Bsymbolic", "-o", str(work / lib_name), *map(str, objs)]])
        return (work / lib_name,)

    return cached_library(BUILD, tag, key, lib_name, make)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


@dataclass
class Tensor:
    """A device buffer's contents: raw little-endian elements and their
    element strides (a strided view of `data`, as MLX hands arrays over)."""

    data: np.ndarray  # the underlying elements, 1-D
    strides: tuple[int, ...]
    shape: tuple[int, ...]
    offset: int = 0  # elements


def dense(a: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(a)
    return Tensor(a.reshape(-1), tuple(s // a.itemsize for s in a.strides), a.shape)


@dataclass
class Call:
    """One quant_sdpa call as MLX hands it to the host: the operands (the
    queries [B, Hq, Lq, D]; the keys' and values' packed words, scales and
    biases, None for the modes without biases), their dtype names ("f32", "f16",
    "bf16", "u8"), the keys' and values' formats, the mask kind (None, "causal", "bool",
    "additive") and array, the sinks."""

    q: Tensor
    q_dtype: str
    k: tuple[Tensor, Tensor, Tensor | None]
    v: tuple[Tensor, Tensor, Tensor | None]
    scale_dtypes: tuple[str, str]  # of K's and V's scales (and biases)
    mode: str  # the keys' format (mode, bits, group_size)
    bits: int
    group_size: int
    Hkv: int
    Lk: int
    scale: float
    mask_kind: str | None = None
    mask: Tensor | None = None
    sinks: Tensor | None = None
    return_lse: bool = True
    # The values' format (mode, bits, group_size); None: the keys'.
    vfmt: tuple[str, int, int] | None = None

    @property
    def value_format(self) -> tuple[str, int, int]:
        return self.vfmt or (self.mode, self.bits, self.group_size)


@dataclass
class Plan:
    """The host's launch plan of a call (launch_plan.h's LaunchPlan)."""

    kernel: str  # the library kernel: a Variant's or SimtVariant's name ("" where the library lacks it)
    mma: bool  # the tensor-core kernel (else the generic one)
    row_tiles: int
    rows_per_block: int
    n_splits: int
    keys_per_split: int
    grid: tuple[int, int, int]
    smem: int
    partial_o_bytes: int
    partial_ml_bytes: int
    counters: int


N_INFO = 12  # call_runner.cpp's Info


class Library:
    def __init__(self, path: Path):
        self.path = Path(path)
        lib = load_runtime(self.path)  # the runtime's entry points
        self.lib = lib
        lib.qsim_cuda_error.restype = ctypes.c_char_p
        lib.qsim_cuda_quant_sdpa.argtypes = [ctypes.c_char_p] * 6 + [
            ctypes.POINTER(ctypes.c_int32),  # dims
            ctypes.c_float,  # scale
            ctypes.POINTER(ctypes.c_int64),  # strides
            ctypes.c_int64,  # sink_stride
            ctypes.POINTER(ctypes.c_int64),  # buffers
            ctypes.POINTER(ctypes.c_int64),  # offsets
            ctypes.POINTER(ctypes.c_int32),  # device
            ctypes.POINTER(ctypes.c_int32),  # overrides
            ctypes.c_int,  # run
            ctypes.POINTER(ctypes.c_int64),  # info
            ctypes.c_char_p,  # kernel_name
            ctypes.c_int,
        ]

    def schedule(self, schedule: str):
        """A context: launches under `schedule` ("descending", "random:SEED";
        tests/metal/README.md) inside it, ascending after."""
        return scheduled(self.lib, schedule)

    def alloc(self, nbytes: int, name: str, contents: np.ndarray | None = None) -> int:
        """A buffer; with contents it starts written, else unwritten (reads
        of bytes the kernel did not write are reported)."""
        bid = self.lib.qsim_alloc(max(int(nbytes), 1), int(contents is not None), name.encode())
        if bid < 0:
            raise SimulatorError(self.lib.qsim_last_error().decode())
        if contents is not None:
            raw = np.ascontiguousarray(contents).view(np.uint8).reshape(-1)
            ctypes.memmove(self.lib.qsim_data(bid), raw.ctypes.data, raw.nbytes)
        return bid

    def poison(self, bid: int, nbytes: int) -> None:
        """Fills an unwritten buffer with 0xff bytes (NaN as fp16, bf16 and
        fp32) without marking it written: an output element the kernel
        never writes reads back as NaN."""
        ctypes.memset(self.lib.qsim_data(bid), 0xFF, nbytes)

    def read(self, bid: int, dtype, count: int) -> np.ndarray:
        buf = (ctypes.c_char * (np.dtype(dtype).itemsize * count)).from_address(self.lib.qsim_data(bid))
        return np.frombuffer(bytes(buf), dtype=dtype).copy()

    def quant_sdpa(
        self, call: Call, *, kernel: str | None = None, splits: int = 0, run: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray | None, Plan]:
        """quant_sdpa through the host's launch plan and the kernel it
        chooses (kernel="simt": the generic one, as the test override
        forces it; splits > 0: that many key splits). Returns the output
        [B, Hq, Lq, D] as float32 (converted from the query dtype's bits),
        the lse [B, Hq, Lq] (or None) and the plan; with run=False only the
        plan (the library need not hold the kernel)."""
        self.lib.qsim_reset()
        B, Hq, Lq, D = call.q.shape
        (kw, ks, kb), (vw, vs, vb) = call.k, call.v
        operands = [call.q, kw, ks, kb, vw, vs, vb, call.mask, call.sinks]  # call_runner.cpp's Operand order
        names = ["q", "k_words", "k_scales", "k_biases", "v_words", "v_scales", "v_biases", "mask", "sinks"]
        buffers, offsets, strides = [], [], []
        for t, name in zip(operands, names):
            if t is None:
                buffers.append(-1)
                offsets.append(0)
            else:
                buffers.append(self.alloc(t.data.nbytes, name, t.data))
                offsets.append(t.offset * t.data.itemsize)
            if name != "sinks":
                strides += list(t.strides) if t is not None else [0] * 4
        n_rows = B * Hq * Lq
        out_item = 4 if call.q_dtype == "f32" else 2
        out_id = self.alloc(n_rows * D * out_item, "out")
        self.poison(out_id, n_rows * D * out_item)
        lse_id = -1
        if call.return_lse:
            lse_id = self.alloc(n_rows * 4, "lse")
            self.poison(lse_id, n_rows * 4)
        buffers += [out_id, lse_id]
        offsets += [0, 0]

        def arr(ctype, values):
            return (ctype * len(values))(*values)

        info = (ctypes.c_int64 * N_INFO)()
        name = ctypes.create_string_buffer(128)
        v_mode, v_bits, v_gs = call.value_format
        status = self.lib.qsim_cuda_quant_sdpa(
            call.mode.encode(),
            v_mode.encode(),
            call.q_dtype.encode(),
            call.scale_dtypes[0].encode(),
            call.scale_dtypes[1].encode(),
            (call.mask_kind or "").encode(),
            arr(ctypes.c_int32, [B, Hq, call.Hkv, Lq, call.Lk, D, call.bits, call.group_size, v_bits, v_gs]),
            call.scale,
            arr(ctypes.c_int64, strides),
            call.sinks.strides[0] if call.sinks is not None else 0,
            arr(ctypes.c_int64, buffers),
            arr(ctypes.c_int64, offsets),
            arr(ctypes.c_int32, [SM_COUNT, BLOCKS_PER_SM]),
            arr(ctypes.c_int32, [int(kernel == "simt"), splits]),
            int(run),
            info,
            name,
            len(name),
        )
        if status == 1:
            raise SimulatorError(symbolize(self.lib.qsim_last_error().decode()))
        if status != 0:
            raise SimulatorError(self.lib.qsim_cuda_error().decode())
        plan = Plan(name.value.decode(), bool(info[0]), *info[1:5], tuple(info[5:8]), *info[8:12])
        if not run:
            return None, None, plan

        if call.q_dtype == "f32":
            out = self.read(out_id, np.float32, n_rows * D).reshape(B, Hq, Lq, D)
        else:
            bits = self.read(out_id, np.uint16, n_rows * D).reshape(B, Hq, Lq, D)
            if call.q_dtype == "f16":
                out = bits.view(np.float16).astype(np.float32)
            else:
                out = (bits.astype(np.uint32) << 16).view(np.float32)
        lse = self.read(lse_id, np.float32, n_rows).reshape(B, Hq, Lq) if call.return_lse else None
        return out, lse, plan

    def plan(self, call: Call, *, kernel: str | None = None, splits: int = 0) -> Plan:
        """The host's launch plan of the call (nothing is launched)."""
        return self.quant_sdpa(call, kernel=kernel, splits=splits, run=False)[2]


@functools.lru_cache(maxsize=None)
def planner() -> Library:
    """A library without kernels: the host's plan only."""
    return Library(build_library([], tag="plan"))


def kernel_for(call: Call, *, kernel: str | None = None) -> Variant | SimtVariant:
    """The kernel the host runs for the call (its launch plan's choice; with
    kernel="simt" the generic one, as the test override forces it), as the
    instantiation a simulator library must hold."""
    plan = planner().plan(call, kernel=kernel)
    if not plan.mma:
        return SimtVariant(call.mode, call.bits)
    return Variant(call.q_dtype, call.mode, call.bits, call.group_size, call.q.shape[3], plan.row_tiles)


def require_clang() -> None:
    """Skips the calling test where the simulator cannot run (no clang, not
    Linux); on CI (CI=true) a missing clang fails it instead."""
    import os

    import pytest

    if find_clang() is None:
        reason = "clang++ not found: the CUDA simulator needs clang (apt-get install clang)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " (required on CI)")
        pytest.skip(reason)
    if not sys.platform.startswith("linux"):
        pytest.skip("the simulator's runtime runs on Linux")
