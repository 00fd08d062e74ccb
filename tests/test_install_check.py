"""The import-time check of the installed MLX (mlx_qsdpa/_mlx_check.py) and
``python -m mlx_qsdpa info``.

The extension runs only with the libmlx it was built against. These tests
simulate other installs without installing anything: in-process by
replacing what _mlx_check reads (the installed versions, the build's
record), and in fresh processes through a ``sitecustomize`` that makes
``importlib.metadata`` report other versions and makes chosen imports fail
as they do with a wrong or missing libmlx."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import types

import mlx.core as mx
import pytest

import mlx_qsdpa
from mlx_qsdpa import _build_info, _ext, _mlx_check

BUILT = types.SimpleNamespace(
    version="0.1.0", mlx_version="0.32.4", mlx_backend="mlx-cpu", mlx_backend_version="0.32.4", gpu_backend="none"
)


def installed(monkeypatch, versions, libmlx):
    """Make _mlx_check see ``versions`` ({distribution: version or None})
    and ``libmlx`` ((name, version) of the distribution that ships it)."""
    monkeypatch.setattr(_mlx_check, "installed_version", lambda dist: versions.get(dist))
    monkeypatch.setattr(_mlx_check, "libmlx_distribution", lambda: libmlx)


# ---------------------------------------------------------------------------
# The build's record
# ---------------------------------------------------------------------------


def test_build_info_records_this_install():
    # What CMake wrote agrees with the extension, the package metadata and
    # the MLX the suite runs with (the suite runs against a matching install).
    assert _build_info.version == _ext.version() == importlib.metadata.version("mlx-qsdpa") == mlx_qsdpa.__version__
    assert _build_info.mlx_version == mx.__version__ == _ext.mlx_build_version() == importlib.metadata.version("mlx")
    assert _build_info.gpu_backend == _ext.gpu_backend() == mlx_qsdpa.gpu_backend()
    assert (_build_info.mlx_backend, _build_info.mlx_backend_version) == _mlx_check.libmlx_distribution()
    if sys.platform == "linux":
        # On Linux libmlx comes from a backend distribution, never from `mlx`.
        assert _build_info.mlx_backend in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13"), _build_info.mlx_backend
    assert _mlx_check.mismatch(_build_info) is None


# ---------------------------------------------------------------------------
# The messages, in-process
# ---------------------------------------------------------------------------


def test_matching_install_passes(monkeypatch):
    installed(monkeypatch, {"mlx": "0.32.4", "mlx-cpu": "0.32.4"}, ("mlx-cpu", "0.32.4"))
    assert _mlx_check.mismatch(BUILT) is None


@pytest.mark.parametrize("other", ["0.31.2", "0.32.3"])
def test_other_mlx_version_is_named_with_the_fix(monkeypatch, other):
    installed(monkeypatch, {"mlx": other, "mlx-cpu": other}, ("mlx-cpu", other))
    msg = _mlx_check.mismatch(BUILT)
    assert msg is not None
    assert "built against mlx 0.32.4 (libmlx from mlx-cpu 0.32.4)" in msg
    assert f"mlx {other} (libmlx from mlx-cpu {other}) is installed" in msg
    assert 'pip install "mlx[cpu]==0.32.4"' in msg
    assert "--no-build-isolation --no-deps --no-cache-dir --force-reinstall --no-binary mlx-qsdpa mlx-qsdpa" in msg


def test_backend_of_another_version_is_a_mismatch(monkeypatch):
    # mlx itself matches; the library it loads does not.
    installed(monkeypatch, {"mlx": "0.32.4", "mlx-cpu": "0.32.3"}, ("mlx-cpu", "0.32.3"))
    msg = _mlx_check.mismatch(BUILT)
    assert msg is not None and "mlx 0.32.4 (libmlx from mlx-cpu 0.32.3) is installed" in msg


def test_another_backend_is_a_mismatch(monkeypatch):
    # Built with the CPU wheel's libmlx, run with the CUDA one.
    installed(monkeypatch, {"mlx": "0.32.4", "mlx-cuda-13": "0.32.4"}, ("mlx-cuda-13", "0.32.4"))
    msg = _mlx_check.mismatch(BUILT)
    assert msg is not None and "(libmlx from mlx-cuda-13 0.32.4) is installed" in msg
    assert 'pip install "mlx[cpu]==0.32.4"' in msg


@pytest.mark.parametrize(
    "backend, requirement",
    [("mlx-cuda-13", "mlx[cuda13]==0.32.4"), ("mlx-cuda-12", "mlx[cuda12]==0.32.4"),
     ("mlx-metal", "mlx==0.32.4"), ("mlx", "mlx==0.32.4"), ("", "mlx==0.32.4")],
)
def test_fix_installs_the_backend_it_was_built_with(monkeypatch, backend, requirement):
    built = types.SimpleNamespace(**{**vars(BUILT), "mlx_backend": backend})
    installed(monkeypatch, {"mlx": "0.31.2", backend: "0.31.2"}, (backend or "mlx-cpu", "0.31.2"))
    msg = _mlx_check.mismatch(built)
    assert msg is not None and f'pip install "{requirement}"' in msg


def test_mlx_without_backend_names_the_cpu_extra(monkeypatch):
    # Linux, `pip install mlx-qsdpa` without [cpu]: plain mlx, no libmlx.
    installed(monkeypatch, {"mlx": "0.32.4"}, ("", ""))
    msg = _mlx_check.mismatch(BUILT)
    assert msg is not None and "without a backend" in msg
    assert 'pip install "mlx-qsdpa[cpu]"' in msg and "mlx[cuda13]==0.32.4" in msg


def test_versions_no_distribution_records_are_not_compared(monkeypatch):
    # An MLX on PYTHONPATH or built in place: the extension's import decides.
    built = types.SimpleNamespace(**{**vars(BUILT), "mlx_backend": "", "mlx_backend_version": ""})
    installed(monkeypatch, {}, ("", ""))
    assert _mlx_check.mismatch(built) is None


@pytest.mark.parametrize("argv0, expected", [("-m", True), ("/venv/bin/mlx-qsdpa", True), ("x.py", False), ("", False)])
def test_only_the_command_imports_without_the_extension(monkeypatch, argv0, expected):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert mlx_qsdpa._is_the_command() is expected


# ---------------------------------------------------------------------------
# Fresh processes with a simulated install
# ---------------------------------------------------------------------------

# Made into tmp/sitecustomize.py (tmp on PYTHONPATH), with CONFIG set:
# "versions" replaces what importlib.metadata.version returns (null: not
# installed, hidden from distributions() too); "fail" makes importing a
# module raise ImportError with that message.
SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.metadata as md
    import sys

    _version, _distributions = md.version, md.distributions

    def version(name):
        if name in CONFIG["versions"]:
            if CONFIG["versions"][name] is None:
                raise md.PackageNotFoundError(name)
            return CONFIG["versions"][name]
        return _version(name)

    def distributions(**kwargs):
        for d in _distributions(**kwargs):
            if CONFIG["versions"].get(d.metadata["Name"], "") is not None:
                yield d

    class Fail:
        def find_spec(self, name, path=None, target=None):
            if name in CONFIG["fail"]:
                raise ImportError(CONFIG["fail"][name])
            return None

    md.version, md.distributions = version, distributions
    sys.meta_path.insert(0, Fail())
    """
)

UNDEFINED = "/x/mlx_qsdpa/_ext.so: undefined symbol: _ZN3mlx4core5array4initIPKfEEvT_"
NO_LIBMLX = "libmlx.so: cannot open shared object file: No such file or directory"


def run(tmp_path, args, versions=None, fail=None):
    (tmp_path / "sitecustomize.py").write_text(
        f"CONFIG = {json.dumps({'versions': versions or {}, 'fail': fail or {}})!r}\n"
        "import json\nCONFIG = json.loads(CONFIG)\n" + SITECUSTOMIZE
    )
    # tmp_path first (its sitecustomize), then the path that found the
    # package under test (a dev build's PYTHONPATH, for one).
    path = [str(tmp_path)] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_simulation_without_changes_imports(tmp_path):
    r = run(tmp_path, ["-c", "import mlx_qsdpa; print(mlx_qsdpa.quant_sdpa.__name__)"])
    assert r.returncode == 0 and r.stdout.strip() == "quant_sdpa", r.stderr
    r = run(tmp_path, ["-m", "mlx_qsdpa", "info"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "match:          yes" in r.stdout
    assert f"CPU kernel variant: {mlx_qsdpa.cpu_variant()}" in r.stdout
    assert "default device" in r.stdout


OTHER_MLX = {"mlx": "0.31.2", _build_info.mlx_backend or "mlx": "0.31.2"}


def test_import_with_another_mlx_raises_the_explanation(tmp_path):
    r = run(tmp_path, ["-c", "import mlx_qsdpa"], versions=OTHER_MLX)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()
    assert any(line.startswith("ImportError: mlx_qsdpa ") for line in last), r.stderr
    assert f"built against mlx {_build_info.mlx_version}" in r.stderr and "mlx 0.31.2" in r.stderr
    assert f"=={_build_info.mlx_version}\"" in r.stderr and "--no-binary mlx-qsdpa" in r.stderr


def test_info_reports_another_mlx_without_loading_the_extension(tmp_path):
    r = run(tmp_path, ["-m", "mlx_qsdpa", "info"], versions=OTHER_MLX)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"mlx-qsdpa {_build_info.version}" in r.stdout
    assert f"built against:  mlx {_build_info.mlx_version}" in r.stdout
    assert "installed:      mlx 0.31.2" in r.stdout
    assert "match:          NO" in r.stdout
    assert f"GPU backend compiled in: {_build_info.gpu_backend}" in r.stdout
    assert "extension:      cannot be loaded:" in r.stdout and "pip install" in r.stdout


def test_other_commands_exit_with_the_explanation(tmp_path):
    r = run(tmp_path, ["-m", "mlx_qsdpa", "bench"], versions=OTHER_MLX)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "mlx 0.31.2" in r.stderr and "pip install" in r.stderr
    # The C++ package's location needs no extension.
    r = run(tmp_path, ["-m", "mlx_qsdpa", "--cmake-dir"], versions=OTHER_MLX)
    assert r.returncode == 0 and r.stdout.strip() == mlx_qsdpa.cmake_dir()


def test_the_command_imports_the_package_without_the_extension(tmp_path):
    # As under `python -m mlx_qsdpa` (sys.argv[0] is "-m" while the package
    # is imported): the import succeeds, names that need the extension raise
    # the explanation, the rest work.
    code = (
        "import sys; sys.argv[0] = '-m'\n"
        "import mlx_qsdpa\n"
        "print(mlx_qsdpa.__version__, mlx_qsdpa.cmake_dir() != '')\n"
        "try:\n"
        "    mlx_qsdpa.quant_sdpa\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "try:\n"
        "    mlx_qsdpa.nothing\n"
        "except AttributeError as e:\n"
        "    print('AttributeError')\n"
    )
    r = run(tmp_path, ["-c", code], versions=OTHER_MLX)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{_build_info.version} True"
    assert lines[1].startswith(f"ImportError: mlx_qsdpa {_build_info.version} was built against mlx ")
    assert lines[-1] == "AttributeError"


def test_failing_extension_is_explained_and_chained(tmp_path):
    # Versions that no check catches, and the extension still fails to load
    # (as it does against another libmlx): the original error is chained.
    r = run(tmp_path, ["-c", "import mlx_qsdpa"], fail={"mlx_qsdpa._ext": UNDEFINED})
    assert r.returncode != 0
    assert f"ImportError: {UNDEFINED}" in r.stderr  # the original ...
    assert "direct cause of the following exception" in r.stderr  # ... chained
    assert "ImportError: mlx_qsdpa: its compiled extension failed to load" in r.stderr
    assert "An undefined symbol means that the libmlx it found is not the one it was built against." in r.stderr
    r = run(tmp_path, ["-m", "mlx_qsdpa", "info"], fail={"mlx_qsdpa._ext": UNDEFINED})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "match:          yes" in r.stdout and "extension:      cannot be loaded:" in r.stdout
    assert UNDEFINED in r.stdout


@pytest.mark.skipif(not _build_info.mlx_backend or _build_info.mlx_backend == "mlx",
                    reason="libmlx comes with mlx itself in this install")
def test_mlx_without_backend_names_the_fix(tmp_path):
    # Plain `mlx` (Linux, no [cpu] extra): its backend distribution is
    # missing and `import mlx.core` cannot load libmlx.
    versions = {_build_info.mlx_backend: None}
    fail = {"mlx.core": NO_LIBMLX}
    for args in (["-c", "import mlx_qsdpa"], ["-m", "mlx_qsdpa", "bench"]):
        r = run(tmp_path, args, versions=versions, fail=fail)
        assert r.returncode != 0
        assert "MLX is installed without a backend" in r.stderr, r.stderr
        assert 'pip install "mlx-qsdpa[cpu]"' in r.stderr
    r = run(tmp_path, ["-m", "mlx_qsdpa", "info"], versions=versions, fail=fail)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "(no distribution ships libmlx)" in r.stdout and 'pip install "mlx-qsdpa[cpu]"' in r.stdout


def test_failing_mlx_core_import_names_the_fix(tmp_path):
    # The metadata looks right, but libmlx is missing all the same (as with
    # an MLX whose backend was deleted by hand): caught at `import mlx.core`.
    r = run(tmp_path, ["-c", "import mlx_qsdpa"], fail={"mlx.core": NO_LIBMLX})
    assert r.returncode != 0
    assert f"ImportError: {NO_LIBMLX}" in r.stderr and "direct cause of the following exception" in r.stderr
    assert 'pip install "mlx-qsdpa[cpu]"' in r.stderr
