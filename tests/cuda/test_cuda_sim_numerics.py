"""The CUDA simulator's scalar semantics against exact references: fp16 and
bf16 conversions (round to nearest even), __hsub2 / __hfma2 / __hmul2 with
one rounding of the exact result (ties and underflow included), PTX prmt
(default mode, sign replication), lop3 and max.NaN. The kernel's results rest on
these; a double rounding or a wrong tie would shift outputs by an ulp only,
below the oracle tests' tolerances. (Checked: rounding through float
first, a double rounding, fails the bf16 case.)
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import cuda_simulator as sim  # noqa: E402

HALF = (11, -14, Fraction(65504))
BF16 = (8, -126, Fraction(2) ** 127 * (2 - Fraction(1, 2**7)))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    clang = sim.find_clang()
    if clang is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("clang++ not found (required on CI)")
        pytest.skip("clang++ not found")
    out = tmp_path_factory.mktemp("probe") / "libprobe.so"
    cmd = [clang, *sim.HOST_FLAGS, "-shared", *[f"-I{d}" for d in sim.INCLUDES], str(sim.SIM / "probe_numerics.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(out))
    for name in ("probe_f2h", "probe_f2bf"):
        getattr(lib, name).argtypes = [ctypes.c_float]
        getattr(lib, name).restype = ctypes.c_uint16
    for name in ("probe_h2", "probe_bf2"):
        getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_uint16, ctypes.c_uint16, ctypes.c_uint16]
        getattr(lib, name).restype = ctypes.c_uint32
    lib.probe_fp4_pair.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_int]
    lib.probe_fp4_pair.restype = ctypes.c_uint32
    lib.probe_e2m1.argtypes = [ctypes.c_uint32]
    lib.probe_e2m1.restype = ctypes.c_float
    lib.probe_fmax_nan.argtypes = [ctypes.c_float, ctypes.c_float]
    lib.probe_fmax_nan.restype = ctypes.c_uint32
    for name in ("probe_byte_perm", "probe_lop3"):
        getattr(lib, name).argtypes = [ctypes.c_uint32] * (3 if name == "probe_byte_perm" else 4)
        getattr(lib, name).restype = ctypes.c_uint32
    return lib


def round_exact(x: Fraction, fmt) -> float:
    """x rounded once to nearest even in the format (precision, emin, max)."""
    p, emin, max_finite = fmt
    if x == 0:
        return 0.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    ulp = Fraction(2) ** (max(e, emin) - (p - 1))
    scaled = a / ulp
    n = scaled.numerator // scaled.denominator
    rem = scaled - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = n * ulp
    if r > max_finite:
        return float("inf") if x > 0 else float("-inf")
    return float(r) if x > 0 else -float(r)


def half_value(bits: int) -> float:
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def bf16_value(bits: int) -> float:
    return float(np.array([bits << 16], np.uint32).view(np.float32)[0])


def values(rng, n, value):
    """Finite 16-bit values from random bits (subnormals included)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32)
    return [b for b in bits.tolist() if np.isfinite(value(b))]


@pytest.mark.parametrize("fmt_name", ["half", "bf16"])
def test_single_rounding_ops(probe, fmt_name):
    rng = np.random.default_rng(7)
    fmt, value, fn = (HALF, half_value, probe.probe_h2) if fmt_name == "half" else (BF16, bf16_value, probe.probe_bf2)
    vals = values(rng, 6000, value)
    # Operands of similar magnitude make ties common: also draw a, b, c from
    # a narrow exponent range.
    narrow = [b for b in vals if 0.25 <= abs(value(b)) < 64]
    bad = []
    for i in range(3000):
        pool = narrow if i % 2 else vals
        a, b, c = (pool[j] for j in rng.integers(0, len(pool), size=3))
        fa, fb, fc = Fraction(value(a)), Fraction(value(b)), Fraction(value(c))
        for op, lo, hi in (
            (0, fa - fb, fb - fa),
            (1, fa * fb + fc, fb * fa + fc),
            (2, fa * fb, fb * fa),
        ):
            got = fn(op, a, b, c)
            for lane, exact in ((0, lo), (1, hi)):
                g = value((got >> (16 * lane)) & 0xFFFF)
                want = round_exact(exact, fmt)
                if not (g == want or (np.isnan(g) and np.isnan(want))):
                    bad.append((op, lane, value(a), value(b), value(c), g, want))
    assert not bad, bad[:5]


@pytest.mark.parametrize("fmt_name", ["half", "bf16"])
def test_conversions_round_to_nearest_even(probe, fmt_name):
    rng = np.random.default_rng(3)
    fmt, value, fn = (HALF, half_value, probe.probe_f2h) if fmt_name == "half" else (BF16, bf16_value, probe.probe_f2bf)
    scale = 2.0 ** rng.integers(-30 if fmt_name == "half" else -140, 20, size=4000)
    xs = (rng.normal(size=4000) * scale).astype(np.float32).tolist()
    xs += [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65519.0, 65520.0, 2.0**-25, 3 * 2.0**-26]  # ties, overflow, underflow
    for x in xs:
        got = value(fn(x))
        want = round_exact(Fraction(float(np.float32(x))), fmt)
        assert got == want, (x, got, want)


def test_prmt_and_lop3(probe):
    rng = np.random.default_rng(5)
    for _ in range(2000):
        x, y, s, c = (int(v) for v in rng.integers(0, 1 << 32, size=4, dtype=np.uint64))
        s &= 0xFFFF
        bytes8 = x.to_bytes(4, "little") + y.to_bytes(4, "little")
        want = 0
        for n in range(4):
            sel = (s >> (4 * n)) & 0xF
            b = bytes8[sel & 7]
            if sel & 8:
                b = 0xFF if b & 0x80 else 0
            want |= b << (8 * n)
        assert probe.probe_byte_perm(x, y, s) == want
        lut = int(rng.integers(0, 256))
        want3 = 0
        for i in range(32):
            idx = ((x >> i) & 1) << 2 | ((y >> i) & 1) << 1 | ((c >> i) & 1)
            want3 |= ((lut >> idx) & 1) << i
        assert probe.probe_lop3(x, y, c, lut) == want3
    # The kernel's immediate: (a & b) | c.
    assert probe.probe_lop3(0xF0F0F0F0, 0xFF00FF00, 0x0000000F, 0xEA) == 0xF000F00F


@pytest.mark.parametrize("fmt_name", ["half", "bf16"])
def test_fp4_pair_is_formats_e2m1(probe, fmt_name):
    """The tensor-core kernel's float-free e2m1 decode (MmaFormat::fp4_pair)
    gives formats.h's fp4_e2m1_to_float exactly, as T bits, for every code
    pair at every position of a word, whatever the other codes."""
    bf16 = fmt_name == "bf16"
    value = bf16_value if bf16 else half_value
    rng = np.random.default_rng(7)
    for shift in (0, 4, 8, 12):
        for lo in range(16):
            for hi in range(16):
                other = int(rng.integers(0, 2**32)) & ~((0xF << shift) | (0xF << (shift + 16))) & 0xFFFFFFFF
                x = other | (lo << shift) | (hi << (shift + 16))
                r = probe.probe_fp4_pair(int(bf16), x, shift)
                for half, code in ((r & 0xFFFF, lo), (r >> 16, hi)):
                    want = probe.probe_e2m1(code)
                    got = value(half)
                    assert got == want and np.signbit(got) == np.signbit(want), (shift, code, got, want)



def test_max_nan(probe):
    """PTX max.NaN.f32 (the poisoned rows' max): the canonical NaN where
    either operand is NaN, else the larger, +0 over -0."""
    nan, inf = float("nan"), float("inf")
    bits = lambda x: int(np.float32(x).view(np.uint32))
    for a, b, want in (
        (nan, 1.0, None), (1.0, nan, None), (nan, -inf, None), (-inf, nan, None), (nan, inf, None),
        (1.0, 2.0, 2.0), (2.0, 1.0, 2.0), (-inf, 3.0, 3.0), (inf, 3.0, inf), (-inf, -inf, -inf),
        (-0.0, 0.0, 0.0), (0.0, -0.0, 0.0),
    ):  # fmt: skip
        got = probe.probe_fmax_nan(a, b)
        assert got == (0x7FFFFFFF if want is None else bits(want)), (a, b, hex(got))
