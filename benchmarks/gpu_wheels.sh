#!/usr/bin/env bash
# Wheels of what the GPU machine lacks for gpu_suite.sh (MuJoCo and gymnasium; it has torch, transformers, numpy),
# for its Python 3.12 on x86-64, into .whl/ (ignored by git). Run once here, where PyPI is reachable:
#
#   bash benchmarks/gpu_wheels.sh
#
# then on the GPU machine, with .whl carried along:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# keep .whl/ out of git: the exclude file of this checkout (in a linked worktree that of its main repository)
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         any; do plat+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
    "gymnasium==${GYMNASIUM_VERSION:-1.4.0}" farama-notifications==0.0.6 \
    "mujoco==${MUJOCO_VERSION:-4.0.0}" "mujoco-core==${MUJOCO_VERSION:-4.0.0}" "mujoco-studio==${MUJOCO_VERSION:-4.0.0}" \
    websockets glfw pyopengl

du -sh .whl
echo "on the GPU machine (carry .whl): python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir" \
     "--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_suite.sh"
