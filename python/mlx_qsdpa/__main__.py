"""Command line of mlx-qsdpa.

    python -m mlx_qsdpa bench [options]   # the benchmark (see bench --help)
    python -m mlx_qsdpa bench --e2e       # mlx-lm decoding with/without the patch
    python -m mlx_qsdpa quality [options] # attention error of each K/V format (see quality --help)
    python -m mlx_qsdpa --cmake-dir        # where find_package(mlx_qsdpa) looks
    python -m mlx_qsdpa --include-dir      # the C++ headers
    python -m mlx_qsdpa info               # versions, backends, and whether they match
"""

from __future__ import annotations

import argparse
import sys


def info() -> int:
    """Print what the package was built against and what is installed.

    Reads the build's record and the installed distributions before it
    loads the extension, so that it reports a mismatch instead of failing
    with it. Returns 0 when the extension loads, 1 otherwise.
    """
    from . import _build_info, _mlx_check

    built = _build_info
    problem = _mlx_check.mismatch(built)
    print(f"mlx-qsdpa {built.version}")
    print(f"built against:  {_mlx_check.built_against(built)}")
    print(f"installed:      {_mlx_check.installed()}")
    print(f"match:          {'yes' if problem is None else 'NO'}")
    print(f"GPU backend compiled in: {built.gpu_backend}")
    try:
        ext = _mlx_check.load_extension(built)
    except ImportError as e:
        print("extension:      cannot be loaded:")
        print("    " + str(e).replace("\n", "\n    "))
        return 1
    import mlx.core as mx

    from ._api import cpu_variant, cpu_variants

    variants = ", ".join(f"{name}{'' if ok else ' (not on this CPU)'}" for name, ok in cpu_variants())
    print(f"extension:      {ext.__file__}")
    print(f"  version {ext.version()}, built against mlx {ext.mlx_build_version()}, GPU backend {ext.gpu_backend()}")
    print(f"  CPU kernel variant: {cpu_variant()}" + (f" (compiled in: {variants})" if variants else ""))
    print(f"mlx {mx.__version__}, default device {mx.default_device()}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import mlx_qsdpa

    if argv and argv[0] in ("--cmake-dir", "--cmake_dir"):
        print(mlx_qsdpa.cmake_dir())
        return 0
    if argv and argv[0] in ("--include-dir", "--include_dir"):
        print(mlx_qsdpa.include_dir())
        return 0
    if argv[:1] == ["info"]:
        return info()
    if mlx_qsdpa._load_error is not None:
        # The package imported without its extension (see __init__.py).
        print(f"{mlx_qsdpa._load_error}\n", file=sys.stderr)
        return 1

    parser = argparse.ArgumentParser(prog="python -m mlx_qsdpa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, quality

    p_bench = sub.add_parser("bench", help="time quant_sdpa against MLX's attention paths")
    bench.add_arguments(p_bench)
    p_quality = sub.add_parser("quality", help="attention error of each K/V format at equal bytes",
                               description=quality.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_arguments(p_quality)
    sub.add_parser("info", help="print versions and backends, built against and installed")
    args = parser.parse_args(argv)
    if args.command == "quality":
        return quality.main(args)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
