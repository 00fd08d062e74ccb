"""Only the CPU kernel's dispatched variants use instructions beyond their target.

A library built with default settings must load and run on any x86-64-v2
CPU: AVX2 may appear only in the x86-64-v3 variant's functions, AVX-512 only
in the x86-64-v4 variant's, and the code around them (the op, the
dispatcher, the host code, everything outside the variants) stays at the
x86-64 baseline. An inline function shared by two variant builds would
show up here too: the linker keeps one copy, so an AVX-512 body could end
up called from baseline code (kernel.h explains the guard against it).

This disassembles the installed library (its symbols are kept for this) and
attributes every instruction to the function it is in.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import pytest

import mlx_qsdpa
from mlx_qsdpa import _ext

X86 = platform.machine().lower() in ("x86_64", "amd64")

# Variant name -> the namespace its functions live in (the C identifier of
# the name, as cmake/cpu_variants.cmake makes it).
NAMESPACES = {"x86-64-v2": "x86_64_v2", "x86-64-v3": "x86_64_v3", "x86-64-v4": "x86_64_v4"}

ZMM_OR_MASK = re.compile(r"%zmm\d+|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{%k")
EVEX_ONLY = re.compile(
    r"^(kmov|kand|kor|kxor|knot|kshift|ktest|kortest|vpternlog|vperm[it]2|vpcompress|vpexpand"
    r"|vcompress|vexpand|vpmov[dqw][bwd]|vpmovus|vpmovs[dqw]|vrndscale|vrcp14|vrsqrt14|vscalef"
    r"|vgetexp|vgetmant|vfixupimm|vrange|vreduce|vpabsq|vpmaxsq|vpmaxuq|vpminsq|vpminuq|vpsraq"
    r"|vpro[lr]|vcvt\w*u[sd]?[iq]|vcvtu|vpconflict|vplzcnt|vdbpsadbw|vpermw|vpermb)"
)
# VEX/EVEX instructions (every AVX-family mnemonic starts with 'v'; the few
# legacy 'v' mnemonics are excluded) and the other v3 extensions.
AVX = re.compile(r"^v(?!err|erw)[a-z0-9]+")
V3_SCALAR = re.compile(r"^(andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx"
                       r"|lzcnt|movbe)\b")
# SSSE3 / SSE4.1 / SSE4.2 / POPCNT: allowed in the v2 variant only.
ABOVE_V1 = re.compile(
    r"^(pshufb|palignr|phadd|phsub|pmaddubsw|pmulhrsw|psign|pabs[bwd]|pmulld|pmuldq|pminsd"
    r"|pmaxsd|pminud|pmaxud|pminsb|pmaxsb|pminuw|pmaxuw|blendp|blendvp|pblendw|pblendvb|pinsr[bdq]"
    r"|pextr[bdq]|extractps|insertps|ptest|round[ps][sd]|dpp[sd]|pmovzx|pmovsx|packusdw|pcmpeqq"
    r"|pcmpgtq|phminposuw|mpsadbw|movntdqa|crc32|pcmpestr|pcmpistr|popcnt)\b"
)


def library() -> str:
    d = os.path.dirname(mlx_qsdpa.__file__)
    for name in os.listdir(d):
        if name.startswith("libmlx_qsdpa") and ".so" in name or name.endswith(".dylib"):
            return os.path.join(d, name)
    pytest.fail(f"libmlx_qsdpa not found in {d}")


def functions(path: str, with_addresses: bool = False):
    """{demangled function name: [(mnemonic, operands), ...]} of the library's
    code ([(address, mnemonic, operands), ...] with_addresses)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        if os.environ.get("CI"):
            pytest.fail("objdump (binutils) is needed for the ISA check")
        pytest.skip("objdump (binutils) not found")
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", "-M", "att", path],
        check=True, capture_output=True, text=True).stdout
    funcs, current = {}, None
    head = re.compile(r"^[0-9a-f]+ <(.+)>:$")
    insn = re.compile(r"^\s+([0-9a-f]+):\s+(?:(?:rep[a-z]*|lock|notrack|bnd|data16|addr32)\s+)*([a-z][a-z0-9.]*)\s*(.*)$")
    for line in text.splitlines():
        m = head.match(line)
        if m:
            current = m.group(1)
            funcs.setdefault(current, [])
            continue
        m = insn.match(line)
        if m and current is not None:
            entry = (int(m.group(1), 16), m.group(2), m.group(3))
            funcs[current].append(entry if with_addresses else entry[1:])
    return funcs


def innermost_loops(insns):
    """(first, last) addresses of the loops of a function that contain no
    other loop, from its backward jumps."""
    if not insns:
        return []
    lo, hi = insns[0][0], insns[-1][0]
    loops = []
    for addr, mnem, ops in insns:
        m = re.match(r"([0-9a-f]+) <", ops)
        if mnem.startswith("j") and m and lo <= int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    return [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def variant_of(name: str):
    for variant, ns in NAMESPACES.items():
        if f"::{ns}::" in name:
            return variant
    return None


def violations(insns, allowed: str):
    """Instructions above `allowed` ("x86-64", "x86-64-v2" or "x86-64-v3")."""
    bad = []
    for mnem, ops in insns:
        if allowed != "x86-64-v4" and (ZMM_OR_MASK.search(ops) or EVEX_ONLY.match(mnem)):
            bad.append(f"{mnem} {ops} (AVX-512)")
        elif allowed in ("x86-64", "x86-64-v2") and (AVX.match(mnem) or "%ymm" in ops or V3_SCALAR.match(mnem)):
            bad.append(f"{mnem} {ops} (AVX/AVX2/BMI/FMA)")
        elif allowed == "x86-64" and ABOVE_V1.match(mnem):
            bad.append(f"{mnem} {ops} (SSSE3/SSE4/POPCNT)")
    return bad


@pytest.mark.skipif(not X86, reason="the x86-64 variants are only built on x86-64")
def test_only_the_variants_use_their_instruction_sets():
    compiled = [name for name, _ in _ext.cpu_variants()]
    if compiled == ["native"]:
        pytest.skip("built with MLX_QSDPA_NATIVE_CPU=ON: one -march=native variant, not portable")
    assert compiled == ["x86-64-v4", "x86-64-v3", "x86-64-v2"]
    funcs = functions(library())
    seen = {v: 0 for v in NAMESPACES}
    problems = []
    for name, insns in funcs.items():
        variant = variant_of(name)
        if variant is not None:
            seen[variant] += 1
        allowed = variant or "x86-64"
        bad = violations(insns, allowed)
        if bad:
            problems.append(f"{name} [{allowed}]: {bad[0]} (+{len(bad) - 1} more)")
    assert not problems, "instructions above the function's target:\n" + "\n".join(problems[:20])
    # Each variant is there, and was really compiled for its target.
    assert all(seen.values()), seen
    def uses(variant, pattern):
        return any(re.search(pattern, f"{m} {o}") for n, ins in funcs.items()
                   if variant_of(n) == variant for m, o in ins)
    assert uses("x86-64-v3", r"vfmadd\w+ .*%ymm"), "the v3 variant has no AVX2 FMA code"
    assert uses("x86-64-v4", r"%zmm"), "the v4 variant has no AVX-512 code"
    assert not uses("x86-64-v2", r"^v"), "the v2 variant has AVX code"


@pytest.mark.skipif(not X86, reason="x86-64 only")
def test_the_check_finds_avx_outside_the_variants():
    """The classifier itself: AVX2/AVX-512 lines are caught where they are not allowed."""
    assert violations([("vfmadd231ps", "%ymm1,%ymm2,%ymm3")], "x86-64")
    assert violations([("vaddss", "%xmm1,%xmm2,%xmm3")], "x86-64-v2")
    assert violations([("vmovaps", "%zmm1,%zmm2")], "x86-64-v3")
    assert violations([("vmovaps", "%ymm1,%ymm2{%k1}")], "x86-64-v3")
    assert violations([("shlx", "%eax,%ebx,%ecx")], "x86-64-v2")
    assert violations([("pshufb", "%xmm1,%xmm2")], "x86-64")
    assert not violations([("pshufb", "%xmm1,%xmm2")], "x86-64-v2")
    assert not violations([("vfmadd231ps", "%ymm1,%ymm2,%ymm3")], "x86-64-v3")
    assert not violations([("addps", "%xmm1,%xmm2"), ("movss", "(%rax),%xmm0")], "x86-64")


# A whole vector register stored to the stack inside a loop is read back
# there (a spill, or a vector built in memory): a stack round trip per
# iteration. (Scalar spills through vector registers, movq/movd/movss, are
# not vector round trips.)
VECTOR_STORE_TO_STACK = re.compile(r"%[xyz]mm\d+,\s*-?(0x[0-9a-f]+)?\(%rsp\)")
WHOLE_VECTOR_MOVE = re.compile(r"^v?mov(aps|apd|ups|upd|dqa|dqu)(8|16|32|64)?$|^v?pextr|^v?extract")
# SSE4 (x86-64-v2) has no per-lane shifts: its 3/5/6-bit value decoder, whose
# lanes straddle words, is scalarised through the stack. 3/5/6-bit caches on
# pre-AVX2 CPUs are the one case left (the 3-bit codebook's value decoder,
# mode 4, too). Its 3-bit codebook key decoder holds a run's three word
# vectors, two level tables and the byte-index constants of pshufb at once:
# more than SSE's 16 registers, so a few spill.
ROUND_TRIP_ALLOWED = re.compile(r"x86_64_v2::.*(decode_values<[04], [356],|decode_keys<4, 3,)")


@pytest.mark.skipif(not X86, reason="x86-64 only")
def test_no_stack_round_trips_in_the_kernels_inner_loops():
    """No innermost loop of a variant stores a vector register to the stack
    (GCC's vector extensions spill whole vectors when a vector type is wider
    than the target's registers, or a lane permutation has no register form)."""
    if [name for name, _ in _ext.cpu_variants()] == ["native"]:
        pytest.skip("built with MLX_QSDPA_NATIVE_CPU=ON: the x86-64 variants are not built")
    funcs = functions(library(), with_addresses=True)
    problems, loops = [], 0
    for name, insns in funcs.items():
        if variant_of(name) is None or ROUND_TRIP_ALLOWED.search(name):
            continue
        for first, last in innermost_loops(insns):
            loops += 1
            bad = [f"{m} {o}" for a, m, o in insns
                   if first <= a <= last and WHOLE_VECTOR_MOVE.match(m) and VECTOR_STORE_TO_STACK.search(o)]
            if bad:
                problems.append(f"{name}: {bad[:2]}")
    assert loops > 100, loops
    assert not problems, "vector stack round trips in inner loops:\n" + "\n".join(problems[:20])
