"""Metal Shading Language rules that the simulator's host compiler does not
enforce, checked on clang's AST of a .metal file.

The simulator compiles the kernels as C++ (sim/include/qsim_metal/compat.h), so
anything C++ allows and MSL does not would pass it and only fail in Apple's
Metal compiler, on a user's Mac. This module compiles the .metal file the
same way (C++14, the language MSL is based on, with `__METAL_VERSION__`
defined so that shared headers take their MSL branch), dumps clang's AST,
and walks every declaration that comes from our own files (not from the
compatibility header or the C++ library behind it), rejecting:

* static-data: a static data member (`static constexpr int k = ..` in a
  struct); a `static` or `thread_local` variable in a function; a
  program-scope variable outside the `constant` address space; a reference
  to a program-scope variable outside it.
* address-space: a pointer or reference declared without an address space
  (device, constant, threadgroup or thread); a kernel pointer argument in
  `thread` space.
* types: double, long double, long long, __int128, wchar_t/char16_t/
  char32_t (an unsuffixed floating literal is a double), std:: types,
  function pointers, variadic functions.
* forbidden: what the MSL specification lists among the C++14 features
  it does not support (exceptions, new/delete, typeid, dynamic_cast,
  noexcept, goto, register, thread_local, lambdas, virtual functions,
  derived classes), and inline asm.
* recursion: a cycle in the call graph of our functions.
* non-metal-calls: a call to anything that is not ours or MSL's (the
  compatibility header stands for <metal_stdlib>): the C/C++ library,
  compiler builtins.
* msl-keyword: a declaration named with an MSL keyword (kernel, vertex,
  fragment, half, ...), which C++ accepts.
* includes: an include other than <metal_stdlib> and our own headers.

Some violations are compile errors of the check's compile rather than
reports: variable-length arrays (-Werror=vla), and, since `threadgroup` is a
real address space there (it is a qualifier without address-space rules in
the simulator build), a thread or device pointer converted to a threadgroup
one and a `threadgroup` variable declared in a function (valid MSL, but the
simulator only models threadgroup memory passed as a kernel argument). The
rules are deliberately conservative (e.g. `auto` deducing a thread pointer
is rejected: write `thread T*`). tests/metal/msl_rules/violations.metal
holds one violation of each rule and test_metal_msl_rules.py checks that
each is reported, and that the real kernels have none.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from metal_simulator import BUILD, ROOT, RUNTIME_INCLUDE, SIM, BuildError, find_clang, parse_metal

# The simulator's files (the Metal front end and the shared runtime): the
# compatibility header stands for <metal_stdlib>, none of it is ours.
SIMULATOR_DIRS = (SIM, RUNTIME_INCLUDE.parent)
MSL_LIBRARY_DIRS = (SIM / "include", RUNTIME_INCLUDE)

# Flags of the check's compile: MSL's C++14 base, the Metal branch of the
# shared headers, the compatibility header as a system header (its own
# C++17 and libstdc++ use is not ours to check).
FLAGS = [
    "-std=c++14",
    "-D__METAL_VERSION__=310",
    "-DQSIM_MSL_RULES",  # compat.h: threadgroup an address space, `thread` visible in the AST
    "-Wno-unknown-attributes",
    "-Wno-ignored-attributes",
    "-Werror=vla",
    "-fsyntax-only",
    "-fno-color-diagnostics",
]

# Functions the compatibility header's versions of MSL macros call
# (INFINITY, NAN, HUGE_VALF expand to these on the host).
BUILTINS_OF_MSL_MACROS = {"__builtin_inff", "__builtin_nanf", "__builtin_huge_valf"}

MSL_KEYWORDS = {
    "kernel", "vertex", "fragment", "visible", "stitchable", "device", "constant", "thread",
    "threadgroup", "threadgroup_imageblock", "ray_data", "object_data", "half", "bfloat",
    "sampler", "patch", "texture", "uint", "ushort", "uchar", "ulong", "metal", "as_type",
}  # fmt: skip

ADDRESS_SPACE = re.compile(r"\b(device|constant|threadgroup|thread)\b|address_space\(")
FORBIDDEN_TYPE = re.compile(r"\b(double|long long|__int128|wchar_t|char16_t|char32_t)\b")
FORBIDDEN_NODES = {
    "CXXThrowExpr": "throw (MSL has no exceptions)",
    "CXXTryStmt": "try/catch (MSL has no exceptions)",
    "CXXNewExpr": "new (MSL has no dynamic allocation)",
    "CXXDeleteExpr": "delete (MSL has no dynamic allocation)",
    "CXXTypeidExpr": "typeid (MSL has no RTTI)",
    "CXXDynamicCastExpr": "dynamic_cast (MSL has no RTTI)",
    "CXXNoexceptExpr": "noexcept operator (not in MSL)",
    "GotoStmt": "goto (not in MSL)",
    "IndirectGotoStmt": "goto (not in MSL)",
    "LabelStmt": "label (MSL has no goto)",
    "LambdaExpr": "lambda expression (not in MSL)",
    "GCCAsmStmt": "inline asm",
    "MSAsmStmt": "inline asm",
    "VAArgExpr": "va_arg (MSL has no variadic functions)",
    "CXXStdInitializerListExpr": "std::initializer_list (no C++ library in MSL)",
    "BlockExpr": "block (not MSL)",
}
FUNCTION_KINDS = {"FunctionDecl", "CXXMethodDecl", "CXXConstructorDecl", "CXXConversionDecl", "CXXDestructorDecl"}
RECORD_KINDS = {"CXXRecordDecl", "ClassTemplateSpecializationDecl", "ClassTemplatePartialSpecializationDecl"}
SCOPE_KINDS = {"TranslationUnitDecl", "NamespaceDecl", "LinkageSpecDecl"}


@dataclass
class Violation:
    rule: str
    file: str
    line: int
    message: str

    def __str__(self):
        return f"{self.file}:{self.line}: [{self.rule}] {self.message}"


@dataclass
class Node:
    kind: str
    text: str  # the line after the kind
    depth: int
    locs: list  # (file, line) of each printed location, resolved
    parent: Node | None = None
    children: list = field(default_factory=list)

    @property
    def id(self) -> str | None:
        m = re.match(r"\s*(0x[0-9a-f]+)", self.text)
        return m.group(1) if m else None

    @property
    def types(self) -> list[str]:
        return re.findall(r"'([^']*)'", self.text)

    @property
    def type(self) -> str:
        t = self.types
        return t[0] if t else ""

    @property
    def name(self) -> str:
        """The declared name: the last word before the type."""
        head = re.sub(r"\b0x[0-9a-f]+\b", " ", self.text.split("'", 1)[0])
        words = re.findall(r"[A-Za-z_~][\w~]*(?:[^\s\w]+)?", _strip_locations(head))
        flags = {"used", "referenced", "implicit", "constexpr", "inline", "invalid", "prev", "parent",
                 "struct", "class", "union", "definition", "cinit", "callinit", "listinit", "static", "extern"}  # fmt: skip
        names = [w for w in words if w not in flags]
        return names[-1] if names else ""

    @property
    def implicit(self) -> bool:
        return "implicit" in self.text.split("'", 1)[0].split()

    def flags(self) -> set[str]:
        tail = self.text.rsplit("'", 1)[-1] if "'" in self.text else self.text
        return set(tail.split())

    def walk(self):
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children))


_LOC = re.compile(
    r"<invalid sloc>|<built-in>:\d+:\d+|<scratch space>:\d+:\d+|<command line>:\d+:\d+"
    r"|\bline:(\d+):\d+|\bcol:\d+|(?:Spelling=)?([^\s<>,]+):(\d+):\d+"
)


def _strip_locations(head: str) -> str:
    head = re.sub(r"<[^'>]*>", " ", head)  # the range (and <Spelling=...>)
    return _LOC.sub(" ", head)


def parse_ast_dump(text: str) -> Node:
    """The tree of clang's -ast-dump, each node with its resolved locations
    (the dump prints a file name only when it changes)."""
    last_file, last_line = None, 0
    root = None
    stack: list[Node] = []
    for raw in text.splitlines():
        m = re.match(r"^((?:[| `]-|[| ] )*)(\S+)(.*)$", raw)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        kind, rest = m.group(2), m.group(3)
        locs = []
        head = rest.split("'", 1)[0]
        for t in _LOC.finditer(head):
            s = t.group(0)
            if s.startswith("<"):
                continue
            if t.group(1):
                last_line = int(t.group(1))
            elif s.startswith("col:"):
                pass
            else:
                last_file, last_line = t.group(2), int(t.group(3))
            locs.append((last_file, last_line))
        node = Node(kind, rest, depth, locs)
        while stack and stack[-1].depth >= depth:
            stack.pop()
        if stack:
            node.parent = stack[-1]
            stack[-1].children.append(node)
        else:
            root = node
        stack.append(node)
    if root is None:
        raise BuildError("empty AST dump")
    return root


class Checker:
    def __init__(self, metal: Path, root: Node, kernels: set[str]):
        self.metal = metal
        self.root = root
        self.kernels = kernels
        self.violations: list[Violation] = []
        self.ours_cache: dict[str, bool] = {}
        self.functions: dict[str, Node] = {}  # id -> declaration
        self.globals: dict[str, Node] = {}  # id -> program-scope variable
        self.alias: dict[str, str] = {}  # redeclaration -> first declaration
        for n in root.walk():
            if n.kind in FUNCTION_KINDS and n.id:
                self.functions[n.id] = n
                prev = re.search(r"\bprev (0x[0-9a-f]+)", n.text)
                if prev:
                    self.alias[n.id] = prev.group(1)
            elif n.kind == "VarDecl" and n.parent is not None and n.parent.kind in SCOPE_KINDS and n.id:
                self.globals[n.id] = n

    def canonical(self, fid: str) -> str:
        seen = set()
        while fid in self.alias and fid not in seen:
            seen.add(fid)
            fid = self.alias[fid]
        return fid

    # Which files are ours ---------------------------------------------------

    def is_ours(self, file: str | None) -> bool:
        if file is None:
            return False
        if file not in self.ours_cache:
            p = Path(file)
            p = (ROOT / p if not p.is_absolute() else p).resolve()
            self.ours_cache[file] = _is_ours_path(p)
        return self.ours_cache[file]

    def is_msl_library(self, file: str | None) -> bool:
        if file is None:
            return False
        p = Path(file)
        p = (ROOT / p if not p.is_absolute() else p).resolve()
        return any(p.is_relative_to(d) for d in MSL_LIBRARY_DIRS)

    def where(self, n: Node) -> tuple[str, int]:
        node = n
        while node is not None:
            ours = [loc for loc in node.locs if self.is_ours(loc[0])]
            if ours:
                # A declaration at its name, a statement where it begins.
                f, line = ours[-1] if node.kind.endswith("Decl") else ours[0]
                p = Path(f)
                p = (ROOT / p if not p.is_absolute() else p).resolve()
                return str(p.relative_to(ROOT)), line
            node = node.parent
        return "?", 0

    def report(self, rule: str, n: Node, message: str) -> None:
        f, line = self.where(n)
        if not any((x.file, x.line, x.rule) == (f, line, rule) for x in self.violations):
            self.violations.append(Violation(rule, f, line, message))

    # The walk ------------------------------------------------------------

    def our_top_level(self):
        """Declarations at namespace scope that come from our files."""
        stack = [self.root]
        while stack:
            n = stack.pop()
            for c in n.children:
                if c.kind in SCOPE_KINDS:
                    stack.append(c)
                elif any(self.is_ours(f) for f, _ in c.locs):
                    yield c

    def run(self) -> list[Violation]:
        for top in self.our_top_level():
            self.check_tree(top)
        self.check_recursion()
        return self.violations

    def check_tree(self, top: Node) -> None:
        # Nodes below a template instantiation carry types whose `thread`
        # sugar deduction dropped: the address-space rule reads the
        # template's pattern instead.
        def walk(n: Node, in_function: bool, instantiated: bool):
            if n.implicit:
                return  # compiler-generated (implicit constructors, ...)
            instantiated = instantiated or (
                n.kind in FUNCTION_KINDS and any(c.kind == "TemplateArgument" for c in n.children)
            ) or n.kind == "ClassTemplateSpecializationDecl"
            self.check_node(n, in_function, instantiated)
            for c in n.children:
                walk(c, in_function or n.kind in FUNCTION_KINDS, instantiated)

        walk(top, False, False)

    def check_node(self, n: Node, in_function: bool, instantiated: bool) -> None:
        k = n.kind
        if k in FORBIDDEN_NODES:
            self.report("forbidden", n, FORBIDDEN_NODES[k])
        if k in FUNCTION_KINDS:
            if "virtual" in n.flags() or any(c.kind == "Overrides:" for c in n.children):
                self.report("forbidden", n, f"virtual function '{n.name}' (not in MSL)")
            if "..." in n.type:
                self.report("types", n, f"variadic function '{n.name}' (not in MSL)")
        if k in RECORD_KINDS and any(c.kind in ("public", "protected", "private") for c in n.children):
            self.report("forbidden", n, f"'{n.name}' has a base class (MSL has no derived classes)")
        for t in n.types:
            if FORBIDDEN_TYPE.search(t):
                what = FORBIDDEN_TYPE.search(t).group(1)
                hint = " (an unsuffixed floating literal is a double: write 1.0f)" if k == "FloatingLiteral" else ""
                self.report("types", n, f"type '{t}' uses {what}, which MSL does not have{hint}")
            if "std::" in t and t != "std::nullptr_t":  # nullptr is MSL
                self.report("types", n, f"type '{t}' is from the C++ library (not in MSL)")
        if k in ("VarDecl", "ParmVarDecl", "FieldDecl"):
            self.check_declaration(n, in_function, instantiated)
        if k in ("VarDecl", "ParmVarDecl", "FieldDecl", "FunctionDecl", "CXXRecordDecl"):
            if n.name in MSL_KEYWORDS:
                self.report("msl-keyword", n, f"'{n.name}' is an MSL keyword: the Metal compiler rejects this name")
        if k == "DeclRefExpr":
            m = re.search(r"\bVar (0x[0-9a-f]+) '(\w+)'", n.text)
            if m and m.group(1) in self.globals:
                g = self.globals[m.group(1)]
                if not self.is_constant(g.type):
                    self.report("static-data", n, f"reads program-scope variable '{m.group(2)}', which is not in the constant address space")
            m = re.search(r"\b(?:Function|CXXMethod) (0x[0-9a-f]+) '([^']+)'", n.text)
            if m:
                self.check_callee(n, m.group(1), m.group(2))
        if k == "ImplicitCastExpr" and "<FunctionToPointerDecay>" in n.text:
            p = n.parent
            if p is None or p.kind not in ("CallExpr", "CXXOperatorCallExpr", "CXXMemberCallExpr") or p.children[0] is not n:
                self.report("types", n, "a function used as a pointer (MSL has no function pointers)")
        if k == "UnaryOperator" and "'&'" in n.text and n.children and n.children[0].kind == "DeclRefExpr":
            if re.search(r"\b(?:Function|CXXMethod) 0x", n.children[0].text):
                self.report("types", n, "the address of a function (MSL has no function pointers)")

    @staticmethod
    def is_constant(t: str) -> bool:
        return bool(re.search(r"\bconstant\b|address_space\(2\)", t))

    def check_declaration(self, n: Node, in_function: bool, instantiated: bool) -> None:
        name, t, flags = n.name, n.type, n.flags()
        if n.kind == "VarDecl":
            parent = n.parent.kind if n.parent else ""
            if parent in RECORD_KINDS:
                self.report(
                    "static-data", n,
                    f"static data member '{name}': MSL allows program-scope data only in the constant address space, "
                    "and an ODR-used static constexpr member needs a definition under C++14; use a constexpr function or an enum",
                )  # fmt: skip
            elif parent in SCOPE_KINDS:
                if not self.is_constant(t):
                    self.report("static-data", n, f"program-scope variable '{name}' ('{t}') is not in the constant address space")
            elif in_function:
                if "static" in flags:
                    self.report("static-data", n, f"static local variable '{name}' (not in MSL)")
            if "register" in flags:
                self.report("forbidden", n, f"register variable '{name}' (not in MSL)")
            if flags & {"tls", "tls_dynamic"}:
                self.report("static-data", n, f"thread_local variable '{name}' (not in MSL)")
        if re.search(r"\(\s*[*&]\s*\)\s*\(", t):
            self.report("types", n, f"'{name}' has function pointer type '{t}' (MSL has no function pointers)")
            return
        declarators = len(re.findall(r"&&|[*&]", t))
        if not declarators:
            return
        spaces = len(ADDRESS_SPACE.findall(t))
        function = n.parent if n.kind == "ParmVarDecl" else None
        if function is not None and function.kind == "FunctionDecl" and function.name in self.kernels:
            if not re.search(r"\b(device|constant|threadgroup)\b|address_space\([123]\)", t):
                self.report("address-space", n, f"kernel argument '{name}' ('{t}') must be in device, constant or threadgroup memory")
            return
        if not instantiated and spaces < declarators:
            self.report(
                "address-space", n,
                f"'{name}' has type '{t}' without an address space on each pointer/reference level "
                "(MSL needs device, constant, threadgroup or thread)",
            )  # fmt: skip

    def check_callee(self, n: Node, fid: str, name: str) -> None:
        decl = self.functions.get(fid)
        files = [f for f, _ in decl.locs] if decl is not None else []
        if any(self.is_ours(f) for f in files) or any(self.is_msl_library(f) for f in files):
            return
        if name in BUILTINS_OF_MSL_MACROS:
            return
        where = files[-1] if files else "a compiler builtin"
        self.report("non-metal-calls", n, f"calls '{name}' ({where}), which is neither ours nor part of <metal_stdlib>")

    def check_recursion(self) -> None:
        graph: dict[str, set[str]] = {}
        names: dict[str, str] = {}
        definition: dict[str, Node] = {}
        for fid, f in self.functions.items():
            if not any(self.is_ours(loc[0]) for loc in f.locs) or not any(c.kind == "CompoundStmt" for c in f.children):
                continue
            me = self.canonical(fid)
            names[me] = f.name
            definition[me] = f
            edges = graph.setdefault(me, set())
            for n in f.walk():
                for m in re.finditer(r"\b(?:Function|CXXMethod) (0x[0-9a-f]+) '", n.text):
                    edges.add(self.canonical(m.group(1)))
                if n.kind == "MemberExpr":
                    m = re.search(r" [.>]\S+ (0x[0-9a-f]+)", n.text)
                    if m:
                        edges.add(self.canonical(m.group(1)))
        # Tarjan's strongly connected components, iteratively.
        index, low, on_stack, stack, counter = {}, {}, set(), [], [0]
        reported = set()

        def strongconnect(v):
            work = [(v, iter(sorted(graph.get(v, ()))))]
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on_stack.add(v)
            while work:
                node, it = work[-1]
                advanced = False
                for w in it:
                    if w not in graph:
                        continue
                    if w not in index:
                        index[w] = low[w] = counter[0]
                        counter[0] += 1
                        stack.append(w)
                        on_stack.add(w)
                        work.append((w, iter(sorted(graph.get(w, ())))))
                        advanced = True
                        break
                    if w in on_stack:
                        low[node] = min(low[node], index[w])
                if advanced:
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1 or node in graph.get(node, ()):
                        key = frozenset(comp)
                        if key not in reported:
                            reported.add(key)
                            comp.sort(key=lambda c: names[c])
                            cycle = " -> ".join(names[c] for c in comp)
                            self.report("recursion", definition[comp[0]], f"recursive call cycle: {cycle} (MSL has no recursion)")

        for v in list(graph):
            if v not in index:
                strongconnect(v)


def _stub_dir() -> Path:
    stub = BUILD / "parse-stubs"
    stub.mkdir(parents=True, exist_ok=True)
    for h in ("metal_stdlib", "metal_simdgroup", "metal_math", "metal_integer", "metal_compute"):
        (stub / h).write_text("// empty: the simulator reads kernel signatures without the MSL headers\n")
    return stub


def _rel(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _preprocess(clang: str, metal: Path, include_dirs: list[Path]) -> str:
    """-E with an empty <metal_stdlib>, with line markers, paths relative
    to the repository (run from its root)."""
    cmd = [clang, "-E", "-x", "c++", "-std=c++14", "-D__METAL_VERSION__=310", f"-I{_stub_dir()}"]
    cmd += [f"-I{_rel(d)}" for d in include_dirs] + [_rel(metal)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise BuildError(f"preprocessing {metal} failed:\n{r.stderr}")
    return r.stdout


def _is_ours_path(p: Path) -> bool:
    return p.is_relative_to(ROOT) and not any(p.is_relative_to(d) for d in SIMULATOR_DIRS)


def _is_ours(f: str) -> bool:
    return _is_ours_path((ROOT / f).resolve())


def _fold_foreign_headers(text: str) -> str:
    """-E output with every header that one of our files includes from
    elsewhere (the C++ library: a rule violation, reported by
    check_includes) put back as an #include, so that the compile, which
    also includes the compatibility header and its C++ library, sees each
    header once, behind its include guard."""
    out, skipping, stack = [], None, []
    for line in text.splitlines(keepends=True):
        m = re.match(r'^# \d+ "([^"]*)"((?: \d)*)$', line)
        if m:
            f, flags = m.group(1), m.group(2).split()
            if "1" in flags:
                if skipping is None and stack and _is_ours(stack[-1]) and not _is_ours(f) and not f.startswith("<"):
                    skipping = len(stack)
                    out.append(f'#include "{(ROOT / f).resolve()}"\n')
                stack.append(f)
            elif "2" in flags:
                while stack and stack[-1] != f:
                    stack.pop()
                if skipping is not None and len(stack) <= skipping:
                    skipping = None
                    line = line.split('"')[0] + f'"{f}"\n'  # its "entered" marker is gone
            elif not stack:
                stack.append(f)
        if skipping is None:
            out.append(line)
    return "".join(out)


def check_includes(preprocessed: str) -> list[Violation]:
    """What our files include: <metal_stdlib> (a stub here) and our own
    headers only, nothing from the host's C or C++ library. Read from the
    preprocessor's line markers (who entered which file)."""
    stub = _stub_dir()
    ours = _is_ours
    out, stack = [], []
    for m in re.finditer(r'^# (\d+) "([^"]*)"((?: \d)*)$', preprocessed, flags=re.M):
        f, flags = m.group(2), m.group(3).split()
        if "1" in flags:  # entering f from the file on top of the stack
            includer = stack[-1] if stack else None
            if includer and ours(includer) and not ours(f) and not (ROOT / f).resolve().is_relative_to(stub):
                src = (ROOT / includer).resolve()
                line = next(
                    (i + 1 for i, text in enumerate(src.read_text().splitlines())
                     if re.match(r"\s*#\s*include", text) and Path(f).name in text),
                    0,
                )  # fmt: skip
                rel = str(src.relative_to(ROOT))
                out.append(Violation("includes", rel, line, f"includes {Path(f).name}: MSL code may include <metal_stdlib> and our own headers only"))
            stack.append(f)
        elif "2" in flags:  # back in f
            while stack and stack[-1] != f:
                stack.pop()
        elif not stack and not f.startswith("<"):
            stack.append(f)
    return out


def check(metal: Path, include_dirs: list[Path] | None = None) -> list[Violation]:
    """The MSL rule violations of `metal` and everything of ours it includes."""
    clang = find_clang()
    if clang is None:
        raise BuildError("clang++ not found (apt-get install clang)")
    metal = Path(metal).resolve()
    include_dirs = include_dirs or [ROOT / "csrc", ROOT / "csrc" / "backends" / "metal", metal.parent]
    _, kernels = parse_metal(clang, metal, include_dirs)
    # The source with our macros expanded and MSL's words intact (an empty
    # <metal_stdlib>; line markers keep the original files and lines), the
    # attribute [[threadgroup(i)]] renamed so that `threadgroup` can be an
    # address space, then compiled against the compatibility header.
    preprocessed = _preprocess(clang, metal, include_dirs)
    source = _fold_foreign_headers(preprocessed)
    source = re.sub(r"\[\[(\s*)threadgroup(\s*)\(", r"[[\1qsim_threadgroup_index\2(", source)
    cmd = [clang, *FLAGS, "-isystem", str(SIM.relative_to(ROOT) / "include"), "-isystem", str(RUNTIME_INCLUDE.relative_to(ROOT))]
    cmd += ["-include", "qsim_metal/compat.h"]
    cmd += ["-x", "c++", "-", "-Xclang", "-ast-dump"]
    r = subprocess.run(cmd, input=source, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise BuildError(f"{metal.name} does not compile as MSL-flavoured C++14:\n{r.stderr}")
    root = parse_ast_dump(r.stdout)
    violations = check_includes(preprocessed)
    violations += Checker(metal, root, {k.name for k in kernels}).run()
    return violations
