"""The README's snippets work as written: the Python one of "## Use" runs,
the C++ one compiles against the installed headers."""

import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_qsdpa

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
DEVICE = os.environ.get("QSDPA_DEVICE", "cpu").lower()  # the suite's device (conftest.py)


def section(title: str) -> str:
    """The README's lines from the heading ``title`` to the next heading of its
    level or above (lines in code blocks are not headings)."""
    lines = open(README, encoding="utf-8").read().splitlines()
    level = len(title.split(" ")[0])
    start = lines.index(title)
    in_code = False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(rf"#{{1,{level}}} ", lines[i]):
            return "\n".join(lines[start:i])
    return "\n".join(lines[start:])


def first_block(text: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def test_use_snippet_runs():
    code = first_block(section("## Use"), "python")
    assert "mx.eval(" in code  # MLX is lazy: without it nothing would run
    # On the suite's device; the snippet itself uses MLX's default device.
    prelude = "import mlx.core as mx\nmx.set_default_device(mx.gpu if %r == 'gpu' else mx.cpu)\n" % DEVICE
    r = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 32, 1, 128) (1, 32, 1)"


def test_cpp_snippet_compiles(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("clang++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    code = first_block(section("### C++"), "cpp")
    assert '#include "mlx/mlx.h"' in code and '#include "mlx_qsdpa/quant_sdpa.h"' in code
    src = tmp_path / "snippet.cpp"
    src.write_text(code)
    mlx_include = os.path.join(os.path.dirname(mx.__file__), "include")  # as MLX's CMake package sets it
    r = subprocess.run(
        [cxx, "-std=c++20", "-fsyntax-only", f"-I{mlx_qsdpa.include_dir()}", f"-I{mlx_include}", str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
