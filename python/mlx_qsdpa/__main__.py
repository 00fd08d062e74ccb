"""Command line of mlx-qsdpa.

    python -m mlx_qsdpa bench [options]   # the benchmark (see bench --help)
    python -m mlx_qsdpa bench --e2e       # mlx-lm decoding with/without the patch
    python -m mlx_qsdpa --cmake-dir        # where find_package(mlx_qsdpa) looks
    python -m mlx_qsdpa --include-dir      # the C++ headers
    python -m mlx_qsdpa info               # versions and backends
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import mlx_qsdpa

    if argv and argv[0] in ("--cmake-dir", "--cmake_dir"):
        print(mlx_qsdpa.cmake_dir())
        return 0
    if argv and argv[0] in ("--include-dir", "--include_dir"):
        print(mlx_qsdpa.include_dir())
        return 0

    parser = argparse.ArgumentParser(prog="python -m mlx_qsdpa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench

    p_bench = sub.add_parser("bench", help="time quant_sdpa against MLX's attention paths")
    bench.add_arguments(p_bench)
    sub.add_parser("info", help="print versions and the compiled backends")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    import mlx.core as mx

    print(f"mlx_qsdpa {mlx_qsdpa.__version__} (built against mlx {mlx_qsdpa.mlx_build_version()})")
    print(f"mlx {mx.__version__}, default device {mx.default_device()}")
    print(f"GPU backend compiled in: {mlx_qsdpa.gpu_backend()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
