#!/usr/bin/env bash
# Stage mlx-lm (and its dependencies, as py3.12 wheels) for the GPU machine,
# which has no network, next to ../shared/tools/gpu-stage.sh's MLX staging.
#
#   bash tools/gpu_stage_mlx_lm.sh        # here: fills the ignored folder .gpu-c (~45 MB)
#   on the machine, after gpu-stage.sh's two commands, carrying .gpu-c:
#     bash .gpu-c/stage.sh && source /tmp/gpu/env.sh && bash benchmarks/cuda/run_gpu.sh e2e
#
# The wheels are installed into /tmp/gpu/site (already on env.sh's
# PYTHONPATH) without their dependency resolution: numpy comes from the
# machine's python, MLX from gpu-stage.sh.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qxF "/.gpu-c/" .git/info/exclude 2>/dev/null || echo "/.gpu-c/" >> .git/info/exclude
rm -rf .gpu-c && mkdir -p .gpu-c
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu-c "mlx-lm>=0.32,<0.33" 2>&1 | grep -v '^WARNING' || true
rm -f .gpu-c/numpy-*.whl
cat > .gpu-c/stage.sh <<'C'
set -e
[[ -d /tmp/gpu/site ]] || { echo "gpu-stage mlx-lm: run gpu-stage.sh's two commands first" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu/site .gpu-c/*.whl
echo "gpu-stage mlx-lm: $(ls .gpu-c/mlx_lm-*.whl | xargs -n1 basename) staged"
C
du -sh .gpu-c
