"""``--threads``: the thread choice, the busy-core measurement, the flag on the scripts and the launcher's split."""
import os
import subprocess
import sys
import time

import pytest
import torch

from decision_transformer import sweep
from decision_transformer.errors import UserError
from decision_transformer.cpu import available_cpus, busy_cores, choose_threads, configure_threads


def test_choose_threads_leaves_out_busy_cores():
    assert choose_threads("auto", available=2, busy=1.0, current=2) == 1
    assert choose_threads("auto", available=2, busy=0.1, current=2) == 2
    assert choose_threads(None, available=8, busy=2.8, current=8) == 5
    assert choose_threads("auto", available=2, busy=2.0, current=2) == 1  # never below one
    assert choose_threads("auto", available=16, busy=0.0, current=4) == 4  # never above torch's setting
    assert choose_threads("3", available=2, busy=2.0, current=1) == 3  # a number is used as given
    for bad in ("0", "-2", "many"):
        with pytest.raises(UserError, match="--threads"):
            choose_threads(bad, available=2, busy=0.0, current=2)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    cpus = available_cpus()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(cpus, sample_s=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.7 <= busy <= len(cpus) + 0.01


def test_configure_threads_sets_and_restores():
    before = torch.get_num_threads()
    try:
        assert configure_threads("2", torch.device("cpu")) == 2 and torch.get_num_threads() == 2
        assert configure_threads("auto", torch.device("cpu")) in (1, 2)
        torch.set_num_threads(1)
        assert configure_threads("auto", torch.device("cpu")) == 1  # auto never raises the count
    finally:
        torch.set_num_threads(before)


def test_experiment_rejects_a_bad_thread_count(hopper_data):
    out = subprocess.run([sys.executable, "experiment.py", "--env", "hopper", "--dataset", "medium", "--data_path",
                          str(hopper_data), "--threads", "0", "--max_iters", "1", "--num_steps_per_iter", "1",
                          "--num_eval_episodes", "1", "--outdir", ""],
                         capture_output=True, text=True, cwd=sweep.ROOT, timeout=120,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode != 0
    assert "--threads '0': use auto or a positive number of threads" in out.stderr
    assert "Traceback" not in out.stderr


def test_launcher_splits_cores_between_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = "import os; print('threads', os.environ['OMP_NUM_THREADS'])"
    cmds = [[sys.executable, "-c", script] for _ in range(2)]
    assert sweep.launch(cmds, [None, None], tmp_path) == 0
    expected = str(max(1, len(available_cpus()) // 2))
    for i in range(2):
        header, out = (tmp_path / f"run_{i:03d}.log").read_text().strip().splitlines()
        assert header.startswith("=== ") and out == f"threads {expected}"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's setting wins
    assert sweep.launch(cmds[:1], [None, None], tmp_path) == 0
    lines = (tmp_path / "run_000.log").read_text().strip().splitlines()   # appended to the first run's log
    assert len(lines) == 4 and lines[1] == f"threads {expected}" and lines[3] == "threads 7"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_tuning_applies_once_and_defers_to_the_environment():
    code = "from decision_transformer.cpu import tune_allocator as t; print(t(), t())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=sweep.ROOT, env=env)
    assert out.stdout.split() == ["True", "True"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=sweep.ROOT,
                         env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_analysis_tools_take_threads():
    """The analyses that run models have --threads (default auto); a count is applied, a bad value is one error."""
    from decision_transformer.analysis import attention, cka, common, grads, mi

    for build in (attention.build_parser, cka.build_parser, grads.build_confusion_parser, grads.build_norm_parser,
                  mi.build_save_parser, mi.build_mi_parser):
        assert build().parse_args([]).threads == "auto", build
    args = cka.build_parser().parse_args(["--threads", "1"])
    before = torch.get_num_threads()
    try:
        common.resolve_device(args.device, args.threads)
        assert torch.get_num_threads() == 1
        with pytest.raises(UserError, match="--threads"):
            common.resolve_device("cpu", "0")
    finally:
        torch.set_num_threads(before)


def test_launcher_pins_each_slot_to_its_own_cores(tmp_path, monkeypatch):
    """Concurrent runs get disjoint sets of this process's cores (so --threads auto and --eval_workers auto in each
    see only their share); with more slots than cores, or --no_pin, nothing is pinned."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = available_cpus()
    script = "import os; print('cores', sorted(os.sched_getaffinity(0)))"
    cmds = [[sys.executable, "-c", script] for _ in range(2)]
    assert sweep.launch(cmds, [None, None], tmp_path, ["a", "b"]) == 0
    seen = [eval((tmp_path / f"{n}.log").read_text().strip().splitlines()[-1][len("cores "):]) for n in "ab"]
    if len(cores) >= 2:
        assert sorted(seen[0] + seen[1]) == cores and not set(seen[0]) & set(seen[1])
        assert abs(len(seen[0]) - len(seen[1])) <= 1
    assert sweep.launch(cmds[:1], [None, None], tmp_path, ["c"], pin=False) == 0
    assert eval((tmp_path / "c.log").read_text().strip().splitlines()[-1][len("cores "):]) == cores
    assert sweep.core_sets(len(cores) + 1) is None and sweep.core_sets(1) is None


def test_launcher_runs_take_sigint_even_when_the_launcher_ignores_it(tmp_path):
    """A launcher started in the background by a non-interactive shell ignores SIGINT; its runs must not inherit that,
    or they would never stop when the launcher passes on Ctrl-C or SIGTERM."""
    import signal

    script = "import signal; print('sigint', signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert sweep.launch([[sys.executable, "-c", script]], [None], tmp_path, ["a"]) == 0
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "a.log").read_text().strip().splitlines()[-1] == "sigint True"


def test_every_script_with_device_takes_threads(capsys):
    """Setting the device also chooses the CPU threads, and a busy machine gets the line `threads: n (...; pass
    --threads N to choose)`: pretrain_chibit.py, run_all.py and results_table printed it but refused the flag.
    Every script whose --help lists --device now takes --threads; run_all.py passes it on to each analysis."""
    import glob

    from conftest import ROOT
    from test_analysis_support import load_script

    scripts = sorted({*glob.glob("*.py", root_dir=ROOT), *glob.glob("*/*.py", root_dir=ROOT),
                      *glob.glob("analysis/*/*.py", root_dir=ROOT)} - {"setup.py"})
    scripts = [s for s in scripts if not s.startswith(("tests/", "decision_transformer/", "docs/"))
               and "__main__" in (ROOT / s).read_text()]
    # (these benchmarks keep torch's own thread count: they choose none, so they never print the line)
    own_threads = {"benchmarks/bench_analysis.py", "benchmarks/check_precision.py", "benchmarks/cuda_checks.py"}
    for s in own_threads:
        assert "resolve_device" not in (ROOT / s).read_text() and "configure_threads" not in (ROOT / s).read_text()
    mains = {s: (lambda s=s: load_script(s).main) for s in scripts}
    from decision_transformer import merge_cli, results_table

    mains.update({"results_table": lambda: results_table.main, "merge_cli": lambda: merge_cli.main})
    with_device, missing = [], []
    for name, main in mains.items():
        try:
            with pytest.raises(SystemExit):
                main()(["--help"])
        except Exception as e:   # (a script without argparse, or one that runs without --help)
            raise AssertionError(f"{name}: --help did not exit ({e!r})") from None
        text = capsys.readouterr().out
        if "--device" in text:
            with_device.append(name)
            if "--threads" not in text and name not in own_threads:
                missing.append(name)
    assert len(with_device) > 15 and {"results_table", "lm_cotraining/pretrain_chibit.py",
                                       "analysis/run_all.py"} <= set(with_device), with_device
    assert missing == []
    from decision_transformer.analysis import report

    args = report.build_parser().parse_args(["--threads", "1"])
    assert report._data_flags(args)[:4] == ["--device", "cpu", "--threads", "1"]
