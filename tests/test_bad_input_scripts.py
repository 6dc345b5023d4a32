"""Bad flags of the data scripts and the benchmarks: one line ``error: ...``, exit 2, no traceback, and nothing that
was already saved is touched. Everything here fails before any real work starts. At the end, the benchmarks' own
bookkeeping (FLOP counts, GPU peaks, the variants checked, the order rows are measured and printed in) and the GPU
suite's steps, run with stand-ins for python, timeout and nvidia-smi."""
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script

from decision_transformer.synthetic import make_dataset


def expect_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("seed", ["-1", str(2 ** 70)])
def test_generate_datasets_seed(tmp_path, capsys, seed):
    main = load_script("data/generate_datasets.py").main
    msg = expect_error(capsys, main, ["--env", "hopper", "--dataset", "random", "--num_transitions", "50",
                                      "--data_path", tmp_path / "d", "--no_progress", "--seed", seed])
    assert f"--seed must be an integer from 0 to 2**32 - 1, got {seed}" in msg
    assert not (tmp_path / "d").exists()


def test_create_state_stats_bad_input(tmp_path, capsys):
    make_dataset(tmp_path, "hopper", "medium", 200, seed=0, max_ep_len=30)
    made = sorted(p.name for p in tmp_path.iterdir())       # (the pkl and its stand-in mark)
    main = load_script("data/create_state_stats.py").main
    out = tmp_path / "state_stats.pkl"
    out.write_bytes(pickle.dumps({"kept": 1}))
    before = out.read_bytes()
    assert "unknown env 'ant'" in expect_error(capsys, main, ["--data_path", tmp_path, "--envs", "ant"])
    assert "unknown dataset 'foo'" in expect_error(capsys, main, ["--data_path", tmp_path, "--datasets", "foo"])
    assert "is a folder" in expect_error(capsys, main, ["--data_path", tmp_path, "--out", tmp_path])
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert expect_error(capsys, main, ["--data_path", tmp_path, "--out", blocker / "x.pkl"]) == \
        f"error: --out writes to {blocker}/, but {blocker} is a file"   # (before any dataset is loaded)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", *made, "state_stats.pkl"]
    # {"kept": 1} is not a stats table: a plain run (which updates the table) refuses it, --replace writes anew
    assert "state_stats.pkl" in expect_error(capsys, main, ["--data_path", tmp_path])
    assert out.read_bytes() == before
    main(["--data_path", str(tmp_path), "--replace"])   # replaces it whole, and leaves no temporary file
    assert set(pickle.loads(out.read_bytes())) == {"hopper-medium-v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", *made, "state_stats.pkl"]


BENCH_BAD = [
    ("bench_sac.py", ["--env", "ant"], "unknown env 'ant'"),
    ("bench_sac.py", ["--threads", "0"], "--threads: must be at least 1"),
    ("bench_sac.py", ["--rounds", "0"], "--rounds: must be at least 1"),
    ("bench_sac.py", ["--rounds", "-1"], "--rounds: must be at least 1"),
    ("bench_sac.py", ["--seconds", "-1"], "--seconds: must be a positive number"),
    ("bench_sac.py", ["--seconds", "nan"], "--seconds: must be a positive number"),
    ("bench_train.py", ["--steps", "0"], "--steps: must be at least 1"),
    ("bench_train.py", ["--batch_size", "0"], "--batch_size: must be at least 1"),
    ("bench_train.py", ["--K", "5000"], "invalid --K 5000"),
    ("bench_train.py", ["--device", "foo"], "unknown --device 'foo'"),
    ("bench_analysis.py", ["--windows", "0"], "--windows: must be at least 1"),
    ("bench_analysis.py", ["--windows", "-1"], "--windows: must be at least 1"),
    ("bench_analysis.py", ["--cka_examples", "0"], "--cka_examples: must be at least 1"),
    ("bench_analysis.py", ["--cka_examples", "3"], "at least 4 examples"),
    ("bench_analysis.py", ["--device", "mps"], "unsupported --device 'mps'"),
    ("bench_core.py", ["--episodes", "0"], "--episodes: must be at least 1"),
    ("bench_core.py", ["--episodes", "10", "-1"], "--episodes: must be at least 1"),
    ("bench_core.py", ["--threads", "0"], "--threads: must be at least 1"),
    ("bench_core.py", ["--device", "foo"], "unknown --device 'foo'"),
    ("check_precision.py", ["--steps", "0"], "--steps: must be at least 1"),
    ("check_precision.py", ["--batch_size", "-1"], "--batch_size: must be at least 1"),
    ("check_precision.py", ["--device", "foo"], "unknown --device 'foo'"),
    ("cuda_checks.py", ["--device", "tpu"], "unknown --device 'tpu'"),
    ("cuda_checks.py", ["--device", "meta"], "unsupported --device 'meta'"),
]


@pytest.mark.parametrize("script, argv, msg", BENCH_BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BENCH_BAD])
def test_benchmark_flags(capsys, script, argv, msg):
    assert msg in expect_error(capsys, load_script(f"benchmarks/{script}").main, argv)


def test_bench_core_refuses_cuda_graphs_on_the_cpu_before_measuring(capsys):
    """--cuda_graphs on without a GPU: refused before the sampler and env-stepping tables (minutes) are measured."""
    with pytest.raises(SystemExit) as e:
        load_script("benchmarks/bench_core.py").main(["--device", "cpu", "--cuda_graphs", "on"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.strip() == ("error: --cuda_graphs on needs a CUDA device (the CPU "
                                                               "has no graphs)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_precision_needs_a_gpu_for_cuda(capsys):
    msg = expect_error(capsys, load_script("benchmarks/check_precision.py").main, ["--device", "cuda", "--steps", "1"])
    assert "CUDA is not available" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_suite_stops_without_a_gpu(tmp_path):
    """The GPU suite would otherwise run its GPT-2-size benchmarks on the CPU for hours: one line, exit 2, no logs."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: torch sees no CUDA device here")
    assert not (tmp_path / "out").exists()


# ---- the benchmarks' bookkeeping (no timing) ------------------------------------------------------------------------

def test_bench_train_peaks_by_gpu_name():
    """MFU is taken against the dense bf16 peak of the card itself: the PCIe and NVL H100s run below the SXM ones."""
    peak = load_script("benchmarks/bench_train.py").peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == peak("NVIDIA GH200 480GB") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H100 NVL") == peak("NVIDIA H200 NVL") == 835.0
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312.0
    assert peak("NVIDIA GeForce RTX 4090") is None and peak("NVIDIA H20") is None


def test_bench_train_counts_matmul_flops_only():
    """6 FLOPs per matmul parameter per token: the blocks' linear layers over 3K tokens, the three embeddings and
    heads over K tokens each; the timestep lookup and the layer norms count nothing."""
    from decision_transformer.models import DecisionTransformer, DTConfig

    bench = load_script("benchmarks/bench_train.py")
    model = DecisionTransformer(DTConfig(11, 3), seed=0)           # the paper's 128 x 3 x 1
    H, B, K, L = 128, 64, 20, 3
    block = (H * 3 * H + 3 * H) + (H * H + H) + (H * 4 * H + 4 * H) + (4 * H * H + H)
    io = (1 * H + H) + (11 * H + H) + (3 * H + H) + (H * 11 + 11) + (H * 3 + 3) + (H * 1 + 1)
    attention = 12 * L * B * (3 * K) ** 2 * H
    assert bench.flops_per_step(model, B, K) == 6 * B * (3 * K * L * block + K * io) + attention


def test_bench_train_rows_report_their_last_loss():
    """Each row carries its last step's loss, so that a compiled path that trains wrongly shows."""
    import math

    bench = load_script("benchmarks/bench_train.py")
    trajs = load_script("benchmarks/bench_core.py").synthetic_trajectories("hopper", 3000)
    sps, tps, mem, flops, loss = bench.measure("paper", trajs, torch.device("cpu"), 1, 4, 5, False, None)
    assert sps > 0 and math.isfinite(loss) and 0 < loss < 10


def test_check_precision_checks_cuda_graphs_on_cuda():
    """On CUDA the compiled variants are torch's default mode and reduce-overhead (CUDA graphs), with the same
    tolerances; on the CPU only the default mode; ``--no_compile`` leaves both out."""
    check = load_script("benchmarks/check_precision.py")
    cuda = check.variants(torch.device("cuda"), no_compile=False)
    assert cuda["compile"]["compile"] is True and cuda["compile reduce-overhead"]["compile"] == "reduce-overhead"
    assert check.TOLERANCES["compile reduce-overhead"] == check.TOLERANCES["compile"]
    assert "compile reduce-overhead" not in check.variants(torch.device("cpu"), no_compile=False)
    assert not any(k.startswith("compile") for k in check.variants(torch.device("cuda"), no_compile=True))


def test_bench_core_rows_come_as_measured(monkeypatch):
    """The evaluation rows come one by one as they are measured, every setting of the first ``--episodes`` size
    first (a suite step stopped at its time budget keeps them), after a one-by-one baseline timed after a warm-up."""
    bench = load_script("benchmarks/bench_core.py")
    log = []
    monkeypatch.setattr(bench, "warm_up", lambda model, device: log.append("warm-up"))
    monkeypatch.setattr(bench, "evaluate_episodes_sequential", lambda *a, **k: log.append("one-by-one"))
    monkeypatch.setattr(bench, "evaluate_episodes", lambda model, env, target, n, *a, **k: log.append(n))
    rows = bench.bench_eval(torch.device("cpu"), [3, 2], 1, workers_list=[0, 0], groups_list=[1, 2])
    first = next(rows)
    assert log == ["warm-up", "one-by-one", 3] and first[:3] == (3, 0, 1)
    assert [r[0] for r in rows] == [3, 3, 3, 2, 2, 2, 2]


def _suite_stand_ins(tmp_path, fail_step=None):
    """A bin folder with stand-ins: python (logs each call's MUJOCO_GL and arguments, says CUDA is there, exits 124
    for the step whose script is ``fail_step``), timeout (logs the budget, runs the command) and nvidia-smi."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"""#!/usr/bin/env bash
echo "MUJOCO_GL=${{MUJOCO_GL:-}} $*" >> {tmp_path / 'python.log'}
case "$*" in *"{fail_step or 'no step fails'}"*) echo "a row"; exit 124;; esac
""")
    (bin_dir / "timeout").write_text(f"""#!/usr/bin/env bash
while [[ $1 == -* ]]; do [[ $1 == -k || $1 == -s ]] && shift; shift; done
echo "$1" >> {tmp_path / 'budgets.log'}
shift
exec "$@"
""")
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'name, memory.total'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": str(bin_dir / "python"), "OUT": str(tmp_path / "out")}


def test_gpu_suite_steps_and_budgets(tmp_path):
    """Every step of the GPU suite runs under ``timeout``, within 565 s in all (a device command may run 600 s),
    the target figures first, with MUJOCO_GL=disable (no libEGL needed; evaluation never renders), each step's
    output kept in its own log; a step stopped at its budget is noted, fails the suite, and the next steps still run."""
    import subprocess

    env = _suite_stand_ins(tmp_path, fail_step="bench_core.py")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    calls = (tmp_path / "python.log").read_text().splitlines()[1:]        # the first call asks for CUDA
    summary = calls.pop()                                                 # last, the summary, printed (no budget)
    assert summary.endswith(f"benchmarks/gpu_summary.py {tmp_path / 'out'}")
    budgets = [int(b) for b in (tmp_path / "budgets.log").read_text().split()]
    assert len(budgets) == len(calls) == 8 and sum(budgets) <= 565
    assert all(c.startswith("MUJOCO_GL=disable benchmarks/") for c in calls)
    scripts = [c.split()[1] for c in calls]
    assert scripts[:3] == ["benchmarks/bench_train.py", "benchmarks/bench_train.py", "benchmarks/bench_core.py"]
    assert scripts[-1] == "benchmarks/cuda_checks.py"
    assert "--compile" not in calls[0] and "--configs paper gpt2" in calls[0]
    assert "--configs gpt2 --batch_size 512" in calls[1]      # GPT-2 size at a batch that fills the GPU (MFU)
    assert "--no_loop" in calls[1] and "--cuda_graph" in calls[1] and "--profile" in calls[1]
    assert "--episodes 50 " in calls[2] and calls[2].endswith("--stepping_workers 0 8")
    assert [c for c in calls if "--config gpt2" in c][0].endswith("--no_compile")
    logs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert logs == ["bench_analysis.txt", "bench_core.txt", "bench_train.txt", "bench_train_compile.txt",
                    "bench_train_gpt2.txt", "check_precision_gpt2.txt", "check_precision_paper.txt", "cuda_checks.txt",
                    "device.txt"]
    kept = (tmp_path / "out" / "bench_core.txt").read_text().splitlines()
    assert kept[0] == "a row" and kept[1].startswith("== bench_core: stopped after its") and len(kept) == 2
    # a MUJOCO_GL of the caller's is kept
    (tmp_path / "python.log").unlink()
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                   env={**env, "MUJOCO_GL": "egl"}, timeout=60)
    assert all(c.startswith("MUJOCO_GL=egl ") for c in (tmp_path / "python.log").read_text().splitlines())


def test_gpu_suite_runs_the_steps_named_only(tmp_path):
    """``gpu_suite.sh STEP ...`` runs those steps in the suite's order, then the summary; an unknown name is an
    error before anything runs."""
    import subprocess

    env = _suite_stand_ins(tmp_path)
    suite = str(ROOT / "benchmarks" / "gpu_suite.sh")
    proc = subprocess.run(["bash", suite, "cuda_checks", "bench_train_gpt2"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "python.log").read_text().splitlines()[1:]
    assert [c.split()[1] for c in calls] == ["benchmarks/bench_train.py", "benchmarks/cuda_checks.py",
                                             "benchmarks/gpu_summary.py"]
    assert "--batch_size 512" in calls[0] and (tmp_path / "budgets.log").read_text().split() == ["40", "125"]
    (tmp_path / "python.log").unlink()
    proc = subprocess.run(["bash", suite, "bench_train", "no_such_step"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2 and not (tmp_path / "python.log").exists()
    assert proc.stderr.startswith("error: unknown step 'no_such_step'; the steps: bench_train bench_train_gpt2 ")
    # every step the suite runs can be named
    names = re.findall(r"^run (\w+) \d+ ", Path(suite).read_text(), re.M)
    listed = re.search(r"^steps=\(([^)]*)\)", Path(suite).read_text(), re.M).group(1).split()
    assert names == listed and len(names) == 8


@pytest.mark.parametrize("argv, sizes", [(["--quick"], [10]), (["--quick", "--episodes", "2"], [2]), ([], [10, 50, 100]),
                                         (["--episodes", "3", "5"], [3, 5])])
def test_bench_core_episodes_given_are_measured_also_with_quick(monkeypatch, capsys, argv, sizes):
    bench = load_script("benchmarks/bench_core.py")
    asked = []
    monkeypatch.setattr(bench, "bench_sampler", lambda device: (1000.0, 50.0))
    monkeypatch.setattr(bench, "bench_env_stepping", lambda n, workers, steps: [(0, 1.0)])
    monkeypatch.setattr(bench, "bench_forward", lambda device, sizes: [])
    monkeypatch.setattr(bench, "bench_eval", lambda device, episodes, *a: asked.append(episodes) or [])
    bench.main(["--device", "cpu", *argv])
    assert asked == [sizes]
