"""Product code is not a lab: it reads no environment variable but the
documented settings, and its comments give reasons, not measurement logs.

Product code is every source file under csrc/ and python/ (the library, its
kernels, the bindings and the package). Test-only switches go through a
private entry point of the bindings (a leading underscore) that the tests
call; measurements, with their machine and date, go to
benchmarks/RESULTS.md."""

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("csrc", "python")
C_LIKE = {".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".metal", ".mm"}
PYTHON = {".py", ".pyi"}

# The environment variables product code may read, each a documented user
# setting (README, Settings).
ALLOWED_ENV = {"MLX_QSDPA_NUM_THREADS"}

GPU_NAME = re.compile(
    r"\b(?:[HAB]100|H200|H800|A800|A10G?|A30|A40|L40S?|V100|GB200|GH200|B200"
    r"|RTX ?\d{4}|Apple M[1-9]|M[1-9] (?:Pro|Max|Ultra))\b",
    re.IGNORECASE,
)
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d")
_NUM = r"\d[\d.,]*(?:\s*-\s*\d[\d.,]*)?"
_UNIT = r"(?:us|µs|ms|ns|s|sec|GB/s|TB/s)(?![\w/])"
BEFORE_AFTER = re.compile(
    rf"{_NUM}\s*{_UNIT}\s*(?:->|→)\s*{_NUM}|{_NUM}\s*(?:->|→)\s*{_NUM}\s*{_UNIT}"
)
COMMENT_RULES = (
    (GPU_NAME, "names a GPU"),
    (DATE, "carries a date"),
    (BEFORE_AFTER, "logs a before/after timing"),
)


def product_files(suffixes):
    return sorted(
        p
        for d in PRODUCT_DIRS
        for p in (ROOT / d).rglob("*")
        if p.is_file() and p.suffix in suffixes
    )


def split_c_source(text):
    """(code, comments) of C, C++, CUDA or MSL source: code keeps its string
    literals and has the comments blanked; comments are (line, text) pairs."""
    code, comments = [], []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            comments.append((line, text[i + 2 : end]))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            body = text[i:end]
            comments.append((line, body))
            line += body.count("\n")
            code.append("\n" * body.count("\n"))
            i = end
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            code.append(text[i : j + 1])
            i = j + 1
        else:
            if c == "\n":
                line += 1
            code.append(c)
            i += 1
    return "".join(code), comments


def python_comments(text):
    """(line, text) of every comment and docstring of a Python source."""
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


C_ENV_READ = re.compile(r"\b(?:secure_getenv|_wgetenv|getenv|GetEnvironmentVariable\w*)\s*\(\s*(\"[^\"]*\")?|\benviron\b")


def c_env_reads(code):
    """(line, variable or what reads one) for every environment access in C-like code."""
    out = []
    for m in C_ENV_READ.finditer(code):
        line = code.count("\n", 0, m.start()) + 1
        if m.group(1):
            name = m.group(1)[1:-1]
        elif m.group(0) == "environ":
            name = "environ"
        else:
            name = m.group(0).rstrip("( \t\n") + "(<expression>)"
        out.append((line, name))
    return out


def python_env_reads(text):
    """(line, variable or what reads one) for every environment access in Python."""
    tree = ast.parse(text)
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def literal(node):
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    out = []
    for node in ast.walk(tree):
        is_environ = (isinstance(node, ast.Attribute) and node.attr in ("environ", "environb")) or (
            isinstance(node, ast.Name) and node.id in ("environ", "environb")
        )
        is_getenv = isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Attribute) and node.func.attr in ("getenv", "getenvb"))
            or (isinstance(node.func, ast.Name) and node.func.id in ("getenv", "getenvb"))
        )
        if is_getenv:
            name = literal(node.args[0]) if node.args else None
        elif is_environ:
            up = parent.get(node)
            name = None
            if isinstance(up, ast.Subscript):
                name = literal(up.slice)
            elif isinstance(up, ast.Attribute) and isinstance(parent.get(up), ast.Call):
                call = parent[up]
                name = literal(call.args[0]) if call.args else None
        else:
            continue
        out.append((node.lineno, name or ast.unparse(node)))
    return sorted(out)


def env_violations():
    found = []
    for path in product_files(C_LIKE):
        code, _ = split_c_source(path.read_text(encoding="utf-8"))
        found += [(path, line, name) for line, name in c_env_reads(code)]
    for path in product_files(PYTHON):
        found += [(path, line, name) for line, name in python_env_reads(path.read_text(encoding="utf-8"))]
    return [
        f"{p.relative_to(ROOT)}:{line}: reads {name}" for p, line, name in found if name not in ALLOWED_ENV
    ]


def comment_violations():
    found = []
    for path in product_files(C_LIKE | PYTHON):
        text = path.read_text(encoding="utf-8")
        comments = split_c_source(text)[1] if path.suffix in C_LIKE else python_comments(text)
        for line, comment in comments:
            for rule, what in COMMENT_RULES:
                m = rule.search(comment)
                if m:
                    at = line + comment.count("\n", 0, m.start())
                    found.append(f"{path.relative_to(ROOT)}:{at}: {what}: {m.group(0)!r}")
    return found


def test_product_code_reads_only_documented_settings():
    bad = env_violations()
    assert not bad, "environment variables outside " + str(sorted(ALLOWED_ENV)) + ":\n" + "\n".join(bad)


def test_product_comments_carry_no_measurement_logs():
    bad = comment_violations()
    assert not bad, "comments with GPU names, dates or before/after timings:\n" + "\n".join(bad)


# The checks themselves, on samples: a guard that cannot fail guards nothing.


def test_the_env_checks_see_reads():
    code, _ = split_c_source(
        'int n = atoi(std::getenv("MLX_QSDPA_NUM_THREADS"));\n'
        "// getenv(\"IN_A_COMMENT\")\n"
        'const char* v = getenv(name); auto s = "// not a comment";\n'
        'if (secure_getenv("QSDPA_X")) {}\n'
    )
    assert [name for _, name in c_env_reads(code)] == [
        "MLX_QSDPA_NUM_THREADS",
        "getenv(<expression>)",
        "QSDPA_X",
    ]
    py = (
        "import os\nfrom os import environ, getenv\n"
        'a = os.environ.get("A")\nb = os.environ["B"]\nc = os.getenv("C")\n'
        "d = environ\ne = getenv(key)\n# os.environ['COMMENT']\n"
    )
    assert [name for _, name in python_env_reads(py)] == ["A", "B", "C", "environ", "getenv(key)"]


def test_the_comment_rules_see_logs():
    samples = {
        "one call on an H200: 19.1 us": GPU_NAME,
        "measured on the h100": GPU_NAME,
        "an Apple M3 Max": GPU_NAME,
        "(2026-11-29f timeline)": DATE,
        "4K 12.0-12.5 -> 11.0-11.1 us": BEFORE_AFTER,
        "32K 27.4 µs → 25.3 µs": BEFORE_AFTER,
        "1.7 ms->1.2": BEFORE_AFTER,
    }
    for text, rule in samples.items():
        assert rule.search(text), text
    for reason in (
        "keys along the vector lanes (sm_90 bulk copies need 16-byte alignment)",
        "row r -> query head r / G",
        "2 -> 4 stages",
        "returns (m, l) -> finalize_row",
        "the first 256 keys",
    ):
        assert not any(rule.search(reason) for rule, _ in COMMENT_RULES), reason
    _, comments = split_c_source('int a; // H200 today\n/* 2026-11-29\n */ char* s = "// no";\n')
    assert comments == [(1, " H200 today"), (2, "/* 2026-11-29\n */")]
    assert [line for line, _ in python_comments('"""Doc, 2026-11-29."""\nx = "# no"  # H100\n')] == [2, 1]
