"""Runs a Python script or module with the CUDA kernels' test overrides set
(mlx_qsdpa._ext._set_cuda_test_overrides): the generic kernel forced, a fixed
key split count, or the pool workspace. For tuning runs of run_gpu.sh
(bench, profile.py, overhead.py under ncu or not):

    python benchmarks/cuda/with_overrides.py [--kernel simt] [--splits N] [--workspace pool] \\
        (-m MODULE | SCRIPT) [ARGS...]
"""

import argparse
import runpy
import sys

from mlx_qsdpa import _ext

ap = argparse.ArgumentParser(usage=__doc__)
ap.add_argument("--kernel", choices=["simt"])
ap.add_argument("--splits", type=int, default=0, help="0: the plan's")
ap.add_argument("--workspace", choices=["pool"])
ap.add_argument("-m", dest="module")
ap.add_argument("target", nargs=argparse.REMAINDER)
args = ap.parse_args()
if not hasattr(_ext, "_set_cuda_test_overrides"):
    sys.exit(f"with_overrides: needs the CUDA build; this one's GPU backend is {_ext.gpu_backend()!r}")
_ext._set_cuda_test_overrides(kernel=args.kernel, splits=args.splits, workspace=args.workspace)
if args.module:
    sys.argv = [args.module, *args.target]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)
elif args.target:
    sys.argv = args.target
    runpy.run_path(args.target[0], run_name="__main__")
else:
    ap.error("a script or -m MODULE to run")
