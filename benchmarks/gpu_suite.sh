#!/usr/bin/env bash
# Every GPU figure of the speed work in one command (one device lease): sampler and evaluation (10/50/100 episodes)
# against the slow paths (with and without env worker processes and overlapped forwards), training throughput and
# MFU at the paper config and at GPT-2 size, and the fast path's numerics against fp32. Output: one log per benchmark
# under ${OUT:-benchmarks/results}/.
#
#   bash benchmarks/gpu_suite.sh            # on a CUDA machine with torch, gymnasium[mujoco] and this package
#
# On a machine without MuJoCo, install it from wheels first: benchmarks/gpu_wheels.sh downloads them (where PyPI is
# reachable) and shows the install line. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
py=${PYTHON:-python3}
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: torch sees no CUDA device here; the GPU suite measures GPUs only (the CPU figures: README, Benchmarks)" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
status=0
run() {
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt" || status=1
}
# the target figures first: a lease that runs out still returns them
run bench_train "$py" benchmarks/bench_train.py --device cuda --configs paper gpt2 --steps 100 --compile reduce-overhead
run bench_core "$py" benchmarks/bench_core.py --device cuda --episodes 10 50 100 --stepping_workers 0 2 4 8
run check_precision_paper "$py" benchmarks/check_precision.py --device cuda --config paper --steps 200
run check_precision_gpt2 "$py" benchmarks/check_precision.py --device cuda --config gpt2 --steps 50
run bench_analysis "$py" benchmarks/bench_analysis.py --device cuda
exit $status
