"""quant_sdpa in the Metal simulator: the op's inputs as the GPU sees them.

``run_quant_sdpa`` takes the same arrays as ``mlx_qsdpa.quant_sdpa`` (as
strided views over NumPy buffers, so that a prefix of a longer cache is
passed in place, as MLX passes it to Metal), uploads them, and lets the
plan runner (sim/plan_runner.cpp) execute the launches that
csrc/backends/metal/dispatch_plan.cpp plans, exactly as eval_gpu encodes them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

import mlx_qsdpa
from metal_simulator import Library, SimulatorError

OPERANDS = [
    "queries",
    "keys",
    "key_scales",
    "key_biases",
    "values",
    "value_scales",
    "value_biases",
    "mask",
    "sinks",
    "out",
    "lse",
    "partial_out",
    "partial_stats",
]
# Every (mode, bits, group_size) the op takes, and each format's name in
# kernel names, from the format table (formats.h).
FORMATS = list(mlx_qsdpa.SUPPORTED_FORMATS)
KERNEL_TOKENS = {(f.mode, f.bits): f.kernel_name for f in mlx_qsdpa.format_table()}
# Head dims of the decode kernels (quant_sdpa.metal): every format has 64,
# 96, 128 and 256; 80 is a multiple of no group size but 16, so only the
# formats with 16-element groups have it.
HEAD_DIMS = (64, 80, 96, 128, 256)


def head_dims(mode: str, bits: int) -> tuple[int, ...]:
    """The head dims quant_sdpa.metal has a decode kernel of (mode, bits) for."""
    (row,) = [f for f in mlx_qsdpa.format_table() if (f.mode, f.bits) == (mode, bits)]
    return tuple(D for D in HEAD_DIMS if D != 80 or 16 in row.group_sizes)


# formats.h's qsdpa::ElemType and attention_math.h's qsdpa::MaskKind.
ELEM_TYPES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2, mx.uint8: 3}
MASK_KINDS = {None: 0, "causal": 1, "bool": 2, "additive": 3}


@dataclass
class View:
    """A strided view: `base` is the whole buffer (raw bits), strides and the
    offset are in elements."""

    base: np.ndarray
    offset: int
    shape: tuple
    strides: tuple

    @property
    def byte_offset(self) -> int:
        return self.offset * self.base.itemsize


def raw(a: mx.array) -> np.ndarray:
    """The bits of an evaluated mx array as NumPy (16-bit floats as uint16)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.array(a)


def whole(a: mx.array) -> View:
    """A row-contiguous array as a view of itself."""
    b = raw(a)
    return View(b.reshape(-1), 0, b.shape, tuple(s // b.itemsize for s in b.strides))


def derived(a: mx.array, make_view) -> View:
    """make_view(numpy array) as a view of a's buffer (no copy): a prefix of
    a longer cache, a transposed layout, any slice or axis permutation."""
    full = raw(a)
    v = make_view(full)
    assert np.shares_memory(v, full)
    offset = (v.__array_interface__["data"][0] - full.__array_interface__["data"][0]) // full.itemsize
    return View(full.reshape(-1), offset, v.shape, tuple(s // full.itemsize for s in v.strides))


def broadcast(a: np.ndarray, shape) -> View:
    """a broadcast to `shape`: zero strides on the broadcast axes."""
    a = np.ascontiguousarray(a)
    b = np.broadcast_to(a, shape)
    return View(a.reshape(-1), 0, tuple(shape), tuple(s // a.itemsize for s in b.strides))


class QuantSDPASim:
    """The simulator library of csrc/backends/metal/quant_sdpa.metal with its plan runner."""

    def __init__(self, lib: Library):
        self.lib = lib
        c = lib.lib
        c.qsim_quant_sdpa.argtypes = [
            ctypes.POINTER(ctypes.c_int32),
            ctypes.c_float,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int32),
        ]
        c.qsim_plan_error.restype = ctypes.c_char_p
        c.qsim_describe_plan.argtypes = [
            ctypes.POINTER(ctypes.c_int32),
            ctypes.c_float,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        c.qsim_choose_key_split.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_int32)]
        c.qsim_gpu_core_estimate.argtypes = [ctypes.c_char_p]
        c.qsim_kernels_cover.argtypes = [ctypes.c_int] * 8
        c.qsim_decode_kernel_name.argtypes = [ctypes.c_int] * 3 + [ctypes.c_char_p, ctypes.c_int]
        c.qsim_quant_mode.argtypes = [ctypes.c_char_p]
        # The QuantMode of each mode of the format table, as the C++ table has it.
        self.modes = {f.mode: c.qsim_quant_mode(f.mode.encode()) for f in mlx_qsdpa.format_table()}
        assert -1 not in self.modes.values(), self.modes

    # The plan functions -------------------------------------------------

    def choose_key_split(self, threadgroups, Lk, D, gpu_cores):
        out = (ctypes.c_int32 * 2)()
        self.lib.lib.qsim_choose_key_split(threadgroups, Lk, D, gpu_cores, out)
        return out[0], out[1]

    def gpu_core_estimate(self, arch: str) -> int:
        return self.lib.lib.qsim_gpu_core_estimate(arch.encode())

    def kernels_cover(self, mode, bits, group_size, D, Lq, vfmt=None) -> bool:
        """Coverage of keys of (mode, bits, group_size) and values of vfmt
        (mode, bits, group_size; None: the keys' format)."""
        vmode, vbits, vgs = vfmt or (mode, bits, group_size)
        return bool(self.lib.lib.qsim_kernels_cover(self.modes[mode], bits, group_size, self.modes[vmode], vbits, vgs, D, Lq))

    def decode_kernel_name(self, mode, bits, D) -> str:
        buf = ctypes.create_string_buffer(128)
        self.lib.lib.qsim_decode_kernel_name(self.modes[mode], bits, D, buf, 128)
        return buf.value.decode()

    def _dims(self, shape, *, mode, bits, group_size, query_dtype, scale_dtype, mask_mode, sinks, return_lse, gpu_cores, force_blocks,
              value_scale_dtype=None, sink_stride=1, vfmt=None):  # fmt: skip
        B, Hq, Hkv, Lq, Lk, D = shape
        value_scale_dtype = value_scale_dtype or scale_dtype
        vmode, vbits, vgs = vfmt or (mode, bits, group_size)
        return (ctypes.c_int32 * 21)(
            B, Hq, Hkv, Lq, Lk, D,
            self.modes[mode], bits, group_size,
            ELEM_TYPES[query_dtype], ELEM_TYPES.get(scale_dtype, 0), ELEM_TYPES.get(value_scale_dtype, 0),
            MASK_KINDS[mask_mode], int(sinks), int(return_lse), gpu_cores, force_blocks, sink_stride,
            self.modes[vmode], vbits, vgs,
        )  # fmt: skip

    def describe_plan(self, shape, *, scale=1.0, strides=None, **kw) -> tuple[dict, list[dict]]:
        dims = self._dims(shape, **kw)
        st = (ctypes.c_int64 * 32)(*(strides or [0] * 32))
        n = self.lib.lib.qsim_describe_plan(dims, scale, st, None, 0)
        if n < 0:
            raise ValueError(self.lib.lib.qsim_plan_error().decode())
        buf = ctypes.create_string_buffer(n)
        self.lib.lib.qsim_describe_plan(dims, scale, st, buf, n)
        lines = buf.value.decode().splitlines()
        head = dict(kv.split("=") for kv in lines[0].split())
        launches = [dict(kv.split("=", 1) for kv in line.split()) for line in lines[1:]]
        return {k: int(v) for k, v in head.items()}, launches

    # Running --------------------------------------------------------------

    def run(
        self,
        q: View,
        q_dtype,
        k: tuple,
        v: tuple,
        *,
        shape,
        scale: float,
        group_size: int,
        bits: int,
        mode: str,
        scale_dtype=None,
        value_scale_dtype=None,
        mask_mode=None,
        mask: View | None = None,
        sinks: View | np.ndarray | None = None,
        return_lse: bool = False,
        gpu_cores: int = 16,
        force_blocks: int = 0,
        vfmt=None,
    ):
        """Runs the plan. k, v: (words, scales, biases-or-None) Views; vfmt:
        the values' (mode, bits, group_size), None: the keys' format.
        Returns (out as float32 [B, Hq, Lq, D], lse or None, (blocks,
        keys_per_block, launches)); self.bytes_read then holds the bytes the
        kernels loaded from each input operand."""
        B, Hq, Hkv, Lq, Lk, D = shape
        lib = self.lib
        ids = [-1] * len(OPERANDS)
        offsets = [0] * len(OPERANDS)
        strides = [0] * 32
        owned = []

        def put(name, view: View, stride_slot=None):
            bid = lib.upload(view.base, name)
            owned.append(bid)
            ids[OPERANDS.index(name)] = bid
            offsets[OPERANDS.index(name)] = view.byte_offset
            if stride_slot is not None:
                strides[stride_slot * 4 : stride_slot * 4 + 4] = view.strides

        put("queries", q, 0)
        for name, slot, view in (
            ("keys", 1, k[0]), ("key_scales", 2, k[1]), ("key_biases", 3, k[2]),
            ("values", 4, v[0]), ("value_scales", 5, v[1]), ("value_biases", 6, v[2]),
        ):  # fmt: skip
            if view is not None:
                put(name, view, slot)
        if mask is not None:
            put("mask", mask, 7)
        sink_stride = 1
        if sinks is not None:
            if not isinstance(sinks, View):
                sinks = View(np.asarray(sinks, np.float32), 0, (Hq,), (1,))
            put("sinks", sinks)
            sink_stride = sinks.strides[0]
        out_elem = np.float32 if q_dtype == mx.float32 else np.uint16
        n_out = B * Hq * Lq * D
        out_id = lib.alloc(n_out * np.dtype(out_elem).itemsize, "out", False)
        owned.append(out_id)
        ids[OPERANDS.index("out")] = out_id
        lse_id = -1
        if return_lse:
            lse_id = lib.alloc(B * Hq * Lq * 4, "lse", False)
            owned.append(lse_id)
            ids[OPERANDS.index("lse")] = lse_id

        dims = self._dims(
            shape, mode=mode, bits=bits, group_size=group_size, query_dtype=q_dtype,
            scale_dtype=scale_dtype, value_scale_dtype=value_scale_dtype, mask_mode=mask_mode,
            sinks=sinks is not None, return_lse=return_lse, gpu_cores=gpu_cores, force_blocks=force_blocks,
            sink_stride=sink_stride, vfmt=vfmt,
        )  # fmt: skip
        info = (ctypes.c_int32 * 3)()
        try:
            status = lib.lib.qsim_quant_sdpa(
                dims,
                scale,
                (ctypes.c_int64 * 32)(*strides),
                (ctypes.c_int64 * len(ids))(*ids),
                (ctypes.c_int64 * len(offsets))(*offsets),
                info,
            )
            if status == 2:
                raise ValueError(lib.lib.qsim_plan_error().decode())
            if status:
                raise SimulatorError(lib.error())
            raw_out = lib.download(out_id, out_elem, n_out)
            lse = lib.download(lse_id, np.float32, B * Hq * Lq).reshape(B, Hq, Lq) if return_lse else None
            self.bytes_read = {name: lib.bytes_read(ids[i]) for i, name in enumerate(OPERANDS[:9]) if ids[i] >= 0}
        finally:
            for bid in owned:
                lib.free(bid)
        if q_dtype == mx.float16:
            out = raw_out.view(np.float16).astype(np.float32)
        elif q_dtype == mx.bfloat16:
            out = (raw_out.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw_out
        return out.reshape(B, Hq, Lq, D), lse, tuple(info)
