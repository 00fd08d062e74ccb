"""The MLX that mlx-qsdpa was built against, and the MLX installed now.

The compiled extension links libmlx and loads only next to the libmlx it was
compiled against; with another one, loading it fails with an "undefined
symbol" error that names neither version (or, with no libmlx at all, with
"libmlx.so: cannot open shared object file"). ``load_extension`` compares
the installed distributions with what the build recorded
(``mlx_qsdpa/_build_info.py``) before it loads the extension, and turns
each of these failures into an ImportError that names both sides and the
fix.

On Linux and macOS libmlx comes in a distribution of its own: ``mlx-cpu``
(``mlx[cpu]``), ``mlx-cuda-12`` / ``mlx-cuda-13`` (``mlx[cuda13]``),
``mlx-metal``; ``mlx`` holds only the Python bindings. Which one it is, is
read from the distributions' file lists.

This file uses the standard library only: CMake runs it as a script at
build time to record the installed MLX (see CMakeLists.txt).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Optional, Tuple

# libmlx as MLX's wheels install it: site-packages/mlx/lib/<name>.
_LIBMLX = ("libmlx.so", "libmlx.dylib")


def installed_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def libmlx_distribution() -> Tuple[str, str]:
    """``(name, version)`` of the installed distribution that ships libmlx.

    ``("", "")`` when none does: plain ``mlx`` on Linux (no backend), or an
    MLX built in place whose library no distribution lists. Reads every
    distribution's file list, so it is called only at build time, by
    ``info`` and when something is wrong.
    """
    for dist in importlib.metadata.distributions():
        for f in dist.files or ():
            if f.name in _LIBMLX and tuple(f.parts[-3:-1]) == ("mlx", "lib"):
                name = dist.metadata["Name"].lower().replace("_", "-")
                return name, dist.version
    return "", ""


def describe(mlx_version: Optional[str], backend: str, backend_version: Optional[str]) -> str:
    """``mlx 0.32.4 (libmlx from mlx-cpu 0.32.4)``, as the messages name an MLX."""
    text = f"mlx {mlx_version}" if mlx_version else "no mlx distribution"
    if backend and backend != "mlx":
        text += f" (libmlx from {backend} {backend_version})"
    elif not backend:
        text += " (no distribution ships libmlx)"
    return text


def built_against(built) -> str:
    """The MLX the extension was built against, from ``_build_info``."""
    return describe(built.mlx_version, built.mlx_backend, built.mlx_backend_version)


def installed() -> str:
    """The MLX installed now, as ``describe`` writes it."""
    name, version = libmlx_distribution()
    return describe(installed_version("mlx"), name, version)


def _requirement(built) -> str:
    """The pip requirement of the MLX the extension was built against."""
    backend = built.mlx_backend
    extra = ""
    if backend == "mlx-cpu":
        extra = "[cpu]"
    elif backend.startswith("mlx-cuda-"):
        extra = "[cuda" + backend[len("mlx-cuda-"):] + "]"
    return f"mlx{extra}=={built.mlx_version}"


def fix(built) -> str:
    """The two ways out of a mismatch, as the messages end."""
    return (
        "Either install the MLX it was built against:\n"
        f'    pip install "{_requirement(built)}"\n'
        "or rebuild mlx-qsdpa from source against the installed MLX (this needs\n"
        "nanobind, scikit-build-core and a C++ compiler; --no-build-isolation makes\n"
        "the build use the installed MLX, --no-deps keeps pip from replacing it):\n"
        "    pip install --no-build-isolation --no-deps --no-cache-dir --force-reinstall "
        "--no-binary mlx-qsdpa mlx-qsdpa\n"
        "    (or, in a checkout of mlx-qsdpa: pip install --no-build-isolation --no-deps "
        "--force-reinstall .)\n"
        "`python -m mlx_qsdpa info` shows both sides."
    )


def no_backend(built, cause: str) -> str:
    """The message for an MLX without libmlx (plain ``mlx`` on Linux)."""
    return (
        f"mlx_qsdpa: MLX is installed without a backend: {cause}. On Linux the `mlx` "
        "distribution holds only MLX's Python bindings; libmlx comes with a backend "
        "distribution, which plain `pip install mlx` (and `pip install mlx-qsdpa` "
        "without an extra) does not install. Install MLX's CPU backend with:\n"
        '    pip install "mlx-qsdpa[cpu]"\n'
        f'or MLX\'s CUDA build (pip install "mlx[cuda13]=={built.mlx_version}", then rebuild '
        "mlx-qsdpa against it: see \"Building for MLX's CUDA build\" in its README)."
    )


def mismatch(built) -> Optional[str]:
    """Why the installed MLX is not the one ``built`` (``_build_info``) names, or None.

    A version that no distribution records (an MLX on ``PYTHONPATH``, an
    MLX built in place) is not compared: the extension's import decides.
    """
    mlx_version = installed_version("mlx")
    mlx_ok = mlx_version is None or mlx_version == built.mlx_version
    backend_ok = True
    if built.mlx_backend and built.mlx_backend != "mlx":
        backend_ok = installed_version(built.mlx_backend) == built.mlx_backend_version
    if mlx_ok and backend_ok:
        return None
    name, version = libmlx_distribution()
    if not name:
        return no_backend(built, f"no installed distribution ships libmlx ({built.mlx_backend} is not installed)")
    return (
        f"mlx_qsdpa {built.version} was built against {built_against(built)}, but "
        f"{describe(mlx_version, name, version)} is installed. Its compiled extension links "
        "libmlx and loads only with the MLX it was built against.\n" + fix(built)
    )


def load_extension(built):
    """Check the installed MLX against ``built``, then import and return ``mlx_qsdpa._ext``.

    Raises ImportError saying what is installed, what the extension was
    built against and how to fix it; the original error, if any, is chained.
    """
    package = __name__.rpartition(".")[0]
    loaded = sys.modules.get(package + "._ext")
    if loaded is not None:
        return loaded
    problem = mismatch(built)
    if problem:
        raise ImportError(problem)
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        if "libmlx" not in str(e):
            raise
        raise ImportError(no_backend(built, f"`import mlx.core` failed: {e}")) from e
    try:
        return importlib.import_module(package + "._ext")
    except ImportError as e:
        hint = ""
        if "undefined symbol" in str(e) or "Symbol not found" in str(e):
            hint = " An undefined symbol means that the libmlx it found is not the one it was built against."
        raise ImportError(
            f"mlx_qsdpa: its compiled extension failed to load: {e}\n"
            f"It was built against {built_against(built)}; installed: {installed()}.{hint}\n"
            + fix(built)
        ) from e


if __name__ == "__main__":
    # Build time (CMakeLists.txt): the installed MLX as a CMake list,
    # "<mlx version>;<distribution that ships libmlx>;<its version>".
    version = installed_version("mlx")
    if version is None:  # no distribution records it: ask MLX itself
        import mlx.core

        version = mlx.core.__version__
    print(";".join((version, *libmlx_distribution())))
