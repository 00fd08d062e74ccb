"""MSL rules the simulator's C++ compiler does not enforce (msl_rules.py):
the real kernels keep them, and the check reports each kind of violation.

The simulator compiles the .metal sources as C++, so a construct that C++
accepts and the Metal compiler rejects (a static data member, recursion, a
pointer without an address space, a double literal, ...) would pass every
other test here and fail only on a Mac. These tests close that gap as far
as an AST check can; Apple's compiler itself is not available here.
"""

import re
import shutil
import subprocess
import sys

import pytest

import msl_rules
from metal_requirements import require
from metal_simulator import BUILD, ROOT, BuildError, find_clang

HERE = ROOT / "tests" / "metal"


@pytest.fixture(scope="module", autouse=True)
def clang():
    if not sys.platform.startswith("linux"):
        pytest.skip("on macOS Apple's Metal compiler checks the kernels itself")
    path = find_clang()
    require(path is not None, "clang++ not found (apt-get install clang)")
    return path


# Every .metal file of the repository but the violations.
SOURCES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in [*(ROOT / "csrc" / "backends" / "metal").glob("*.metal"), *HERE.rglob("*.metal")]
    if "msl_rules" not in p.relative_to(HERE if p.is_relative_to(HERE) else ROOT).parts
)


def test_sources_include_the_kernels():
    assert "csrc/backends/metal/quant_sdpa.metal" in SOURCES and len(SOURCES) >= 3, SOURCES


@pytest.mark.parametrize("source", SOURCES)
def test_kernels_keep_the_msl_rules(source):
    violations = msl_rules.check(ROOT / source)
    assert not violations, "MSL rule violations:\n" + "\n".join(map(str, violations))


def test_each_rule_is_reported():
    """violations.metal marks each violating line with `expect: <rule>`:
    exactly those (line, rule) pairs are reported."""
    src = HERE / "msl_rules" / "violations.metal"
    expected = set()
    for i, line in enumerate(src.read_text().splitlines(), 1):
        m = re.search(r"expect: ([\w-]+)", line)
        if m:
            expected.add((i, m.group(1)))
    violations = msl_rules.check(src)
    got = {(v.line, v.rule) for v in violations}
    assert all(v.file == "tests/metal/msl_rules/violations.metal" for v in violations), violations
    assert got == expected, (
        f"missed: {sorted(expected - got)}\nunexpected: {sorted(got - expected)}\n" + "\n".join(map(str, violations))
    )
    rules = {r for _, r in expected}
    assert rules == {
        "static-data", "address-space", "types", "forbidden", "recursion", "non-metal-calls", "msl-keyword", "includes",
    }  # fmt: skip


def test_static_constexpr_member_in_a_shared_header_is_reported():
    """The review's case: formats.h with its PackGeometry (static constexpr
    data members) visible to MSL is reported at formats.h."""
    work = BUILD / "msl-rules-work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "mlx_qsdpa").mkdir(parents=True)
    formats = (ROOT / "csrc" / "mlx_qsdpa" / "formats.h").read_text()
    guarded = re.search(r"#if !defined\(__METAL_VERSION__\)\n(// [^\n]*\n)*template <int BITS>\nstruct PackGeometry.*?#endif\n", formats, re.S)
    assert guarded, "formats.h no longer keeps PackGeometry out of MSL"
    block = guarded.group(0)
    unguarded = block.split("\n", 1)[1].rsplit("#endif", 1)[0]
    (work / "mlx_qsdpa" / "formats.h").write_text(formats.replace(block, unguarded))
    # The other shared headers as they are (attention_math.h includes formats.h).
    for header in (ROOT / "csrc" / "mlx_qsdpa").glob("*.h"):
        if header.name != "formats.h":
            shutil.copy(header, work / "mlx_qsdpa" / header.name)
    try:
        violations = msl_rules.check(ROOT / "csrc" / "backends" / "metal" / "quant_sdpa.metal", [work, ROOT / "csrc" / "backends" / "metal"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hits = [v for v in violations if v.rule == "static-data"]
    assert len(hits) == 2 and all(v.file.endswith("mlx_qsdpa/formats.h") for v in hits), violations
    assert {re.search(r"'(\w+)'", v.message).group(1) for v in hits} == {"kPackElems", "kPackBytes"}


def test_attention_math_is_checked_as_msl():
    """attention_math.h is held to the MSL rules as formats.h is: a double
    in it (a shared-header slip that C++ and CUDA accept) is reported at
    attention_math.h."""
    work = BUILD / "msl-rules-work-attention-math"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "csrc" / "mlx_qsdpa", work / "mlx_qsdpa")
    path = work / "mlx_qsdpa" / "attention_math.h"
    text = path.read_text()
    anchor = "QSDPA_FUNC float max_nan(float a, float b) {\n  return"
    assert text.count(anchor) == 1, "attention_math.h changed: update the anchor"
    path.write_text(text.replace(anchor, "QSDPA_FUNC float max_nan(float a, float b) {\n  return (double)a < 0.0 ? a :"))
    try:
        violations = msl_rules.check(ROOT / "csrc" / "backends" / "metal" / "quant_sdpa.metal", [work, ROOT / "csrc" / "backends" / "metal"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert violations, "a double in attention_math.h went unreported"
    assert all(v.rule == "types" and v.file.endswith("mlx_qsdpa/attention_math.h") for v in violations), violations


NOT_MSL = {
    # Clang accepts variable-length arrays in C++ as an extension; MSL does not.
    "runtime_sized_array": ("float tmp[n];\n  tmp[0] = 1.0f;\n  out[tid] = tmp[0];", "variable length array"),
    # The simulator's threadgroup is a qualifier that converts from thread
    # memory; in MSL (and in the check's compile) it is an address space.
    "thread_pointer_as_threadgroup": (
        "float x = 1.0f;\n  threadgroup float* p = &x;\n  out[tid] = p[0] + tg[0];",
        r"cannot initialize a variable of type 'threadgroup float \*' with an rvalue of type 'float \*'",
    ),
    # Valid MSL, but the simulator models only threadgroup memory passed as
    # a kernel argument: such a variable would be thread-private there.
    "threadgroup_local": (
        "threadgroup float buf[4];\n  buf[0] = 1.0f;\n  out[tid] = buf[0] + tg[0];",
        "automatic variable qualified with an address space",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_MSL))
def test_not_msl_fails_the_check(case):
    body, error = NOT_MSL[case]
    work = BUILD / f"msl-rules-work-{case}"
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"{case}.metal"
    src.write_text(
        "#include <metal_stdlib>\n"
        "[[kernel]] void k(device float* out [[buffer(0)]], constant int& n [[buffer(1)]],\n"
        "                  threadgroup float* tg [[threadgroup(0)]], uint tid [[thread_position_in_grid]]) {\n"
        f"  {body}\n"
        "}\n"
    )
    try:
        with pytest.raises(BuildError, match=error):
            msl_rules.check(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_pack_geometry_is_unchanged_for_cpp(clang):
    """formats.h's C++/CUDA PackGeometry keeps its static constexpr members
    and values; the Metal branch has only the constexpr functions."""
    checks = "\n".join(
        f"static_assert(qsdpa::PackGeometry<{b}>::kPackElems == {e} && qsdpa::PackGeometry<{b}>::kPackBytes == {y}"
        f" && qsdpa::pack_elems({b}) == {e} && qsdpa::pack_bytes({b}) == {y}, \"bits {b}\");"
        for b, e, y in [(1, 32, 4), (2, 16, 4), (3, 8, 3), (4, 8, 4), (5, 8, 5), (6, 4, 3), (8, 4, 4)]
    )
    code = '#include "mlx_qsdpa/formats.h"\n#include <type_traits>\n' + checks + (
        "\nstatic_assert(std::is_same<decltype(qsdpa::PackGeometry<4>::kPackElems), const int>::value, \"type\");"
        "\nconst int& odr_use = qsdpa::PackGeometry<3>::kPackBytes;\n"
    )
    for std in ("c++14", "c++17"):
        r = subprocess.run(
            [clang, f"-std={std}", "-fsyntax-only", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}", "-x", "c++", "-"],
            input=code, capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
