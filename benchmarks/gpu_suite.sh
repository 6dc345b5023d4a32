#!/usr/bin/env bash
# Every GPU figure of the speed work in one command (one device lease): training throughput and MFU at the paper config
# and at GPT-2 size (eager and --cuda_graph at batch 64, then GPT-2 size at batch 512 with a profile of its steps, then
# the paper config under --compile reduce-overhead), sampler and evaluation (50/10/100 episodes, with and without env
# worker processes and CUDA graphs) against the slow paths, the fast path's numerics against fp32, and last the
# CUDA-only paths' correctness checks (cuda_checks.py). Output: device.txt and one log per step under
# ${OUT:-benchmarks/results}/; last, the summary of benchmarks/gpu_summary.py (the targets checked, the README table)
# is printed.
#
#   bash benchmarks/gpu_suite.sh                          # every step, on a CUDA machine with torch,
#                                                         # gymnasium[mujoco] and this package
#   bash benchmarks/gpu_suite.sh bench_train_gpt2 cuda_checks     # these steps only (names: the list below)
#
# Each step is stopped after its time budget (seconds, below; 565 in all, to end within a 600 s device command, with
# 2 s more per step for one that ignores SIGTERM); its log keeps the rows measured until then, since every benchmark
# prints a row as soon as it is measured, and ends with a line saying it was cut (gpu_summary.py names such logs). The target
# figures come first: training at the paper config against the per-sample loop and at GPT-2 size (MFU), then
# evaluation at 50 episodes against one by one. Steps named on the command line run alone, in the suite's order; the
# summary then reads every log in $OUT, those of earlier runs included.
#
# On a machine without MuJoCo, install it from wheels first: benchmarks/gpu_wheels.sh downloads them (where PyPI is
# reachable) and shows the install line. PYTHON picks the interpreter (default python3). MUJOCO_GL defaults to
# disable: evaluation never renders, and a machine without libEGL then still imports MuJoCo.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
py=${PYTHON:-python3}
steps=(bench_train bench_train_gpt2 bench_core bench_train_compile check_precision_paper check_precision_gpt2
       bench_analysis cuda_checks)
selected="$*"
for name in "$@"; do
  if [[ " ${steps[*]} " != *" $name "* ]]; then
    echo "error: unknown step '$name'; the steps: ${steps[*]}" >&2
    exit 2
  fi
done
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: torch sees no CUDA device here; the GPU suite measures GPUs only" \
       "(the CPU figures: README, Benchmarks)" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-disable}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
status=0
run() {  # run NAME SECONDS COMMAND...: output to the terminal and $out/NAME.txt, the command stopped after SECONDS
  local name=$1 secs=$2
  shift 2
  if [ -n "$selected" ] && [[ " $selected " != *" $name "* ]]; then return; fi   # not among the steps named
  echo "== $name (at most ${secs} s): $*"
  timeout -k 2 "$secs" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "== $name: stopped after its ${secs} s budget; the rows above were measured" | tee -a "$out/$name.txt"
  fi
  [ "$rc" = 0 ] || status=1
}
run bench_train 70 "$py" benchmarks/bench_train.py --device cuda --configs paper gpt2 --steps 100 --cuda_graph
run bench_train_gpt2 40 "$py" benchmarks/bench_train.py --device cuda --configs gpt2 --batch_size 512 --steps 30 \
    --no_loop --cuda_graph --profile 3
run bench_core 95 "$py" benchmarks/bench_core.py --device cuda --episodes 50 10 100 --stepping_workers 0 8
run bench_train_compile 70 "$py" benchmarks/bench_train.py --device cuda --configs paper --steps 100 \
    --compile reduce-overhead
run check_precision_paper 95 "$py" benchmarks/check_precision.py --device cuda --config paper --steps 100
run check_precision_gpt2 45 "$py" benchmarks/check_precision.py --device cuda --config gpt2 --steps 50 --no_compile
run bench_analysis 25 "$py" benchmarks/bench_analysis.py --device cuda --mine_estimates 118 --mine_iters 3
run cuda_checks 125 "$py" benchmarks/cuda_checks.py
echo "== summary (printed only: \$OUT keeps device.txt and the step logs; rerun it on the logs anywhere)"
"$py" benchmarks/gpu_summary.py "$out"
exit $status
