"""The benchmarks run where pytest is not installed (a GPU machine with the package's runtime dependencies only): each
script's ``--help`` works with pytest made unimportable, and none of them loads a module from tests/. bench_train's
CPU rows each run in a fresh process whose peak memory is their own; its table says how many steps each row timed."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

BENCHMARKS = ("bench_core.py", "bench_train.py", "bench_analysis.py", "bench_sac.py", "check_precision.py",
              "gpu_summary.py")

# Runs a script as __main__ with pytest unimportable; exit 3 if a module under tests/ was loaded (even with --help).
WITHOUT_PYTEST = """
import os, runpy, sys
sys.modules["pytest"] = None
tests = os.path.join(sys.argv[1], "tests") + os.sep
script = sys.argv[2]
sys.argv = sys.argv[2:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
loaded = [m for m, mod in list(sys.modules.items()) if (getattr(mod, "__file__", None) or "").startswith(tests)]
if loaded:
    print("modules loaded from tests/:", loaded, file=sys.stderr)
    sys.exit(3)
sys.exit(code)
"""


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_help_without_pytest(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PYTEST, str(ROOT), str(ROOT / "benchmarks" / script),
                           "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]


def test_no_script_outside_tests_imports_from_tests():
    """benchmarks/, analysis/, data/, the top-level scripts and the package never put tests/ on sys.path nor import
    a test module (a test module may import pytest, which only the test extra installs)."""
    bad = []
    for top in ("benchmarks", "analysis", "data", "decision_transformer", "mine", "lm_cotraining", "."):
        folder = ROOT / top
        files = folder.glob("*.py") if top == "." else folder.rglob("*.py")
        for f in files:
            text = f.read_text(errors="replace")
            for needle in ('"tests"', "'tests'", "from test_", "import test_", "from conftest", "import conftest",
                           "import pytest"):
                if needle in text:
                    bad.append(f"{f.relative_to(ROOT)}: {needle}")
    assert not bad, bad


def _cpu_main(monkeypatch):
    """bench_train's main on the CPU with ``measure`` recorded instead of run: (printed text, the measure calls)."""
    train = load_script("benchmarks/bench_train.py")
    calls = []

    def measure(name, trajs, device, steps, batch_size, K, slow, amp, compile=None):
        calls.append((name, steps, slow))
        return 10.0, 10.0 * batch_size * 60, 321.0, 1e9, 0.5

    monkeypatch.setattr(train, "synthetic_trajectories", lambda *a, **k: None)
    monkeypatch.setattr(train, "measure", measure)
    monkeypatch.setattr(train, "bench_device", lambda name: torch.device("cpu"))
    return train, calls


def test_bench_train_prints_the_steps_each_row_timed_and_what_its_memory_is(monkeypatch, capsys):
    train, calls = _cpu_main(monkeypatch)
    train.main(["--configs", "paper", "gpt2", "--steps", "50"])
    out = capsys.readouterr().out
    assert calls == [("paper", 50, True), ("paper", 50, False), ("gpt2", 5, True), ("gpt2", 5, False)]
    assert "timed steps: paper 50, gpt2 5 (gpt2 on the CPU: max(3, --steps // 10))" in out
    assert "| config | batches | timed steps | steps/s |" in out and "peak RSS of the row's own process (MiB)" in out
    assert "| paper | per-sample loop | 50 | 10.00 |" in out and "| gpt2 | on-device | 5 | 10.00 |" in out
    summary = load_script("benchmarks/gpu_summary.py")
    rows = summary.table(out, "config")
    assert [r["timed steps"] for r in rows] == ["50", "50", "5", "5"]
    train.main(["--configs", "gpt2", "--steps", "20"])          # at least 3
    out = capsys.readouterr().out
    assert "timed steps: gpt2 3 (gpt2 on the CPU" in out and "| gpt2 | per-sample loop | 3 |" in out


def test_bench_train_header_without_a_reduced_count(monkeypatch, capsys):
    train, _ = _cpu_main(monkeypatch)
    train.main(["--configs", "paper", "--steps", "7"])
    out = capsys.readouterr().out
    assert "timed steps: paper 7\n" in out and "max(3" not in out


def test_a_cpu_row_runs_in_its_own_process_and_reports_its_own_peak(monkeypatch):
    """The row's peak memory does not include this process's: here 1.5 GiB more is resident than a tiny training
    row needs (ru_maxrss, in this process or, after fork + exec, in a child, would count it)."""
    train = load_script("benchmarks/bench_train.py")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    trajs = train.synthetic_trajectories("hopper", 3000)
    block = np.ones(1536 * 2**20 // 8)
    try:
        here = train.peak_rss_mib()
        sps, tps, mem, flops, loss = train.measure("paper", trajs, torch.device("cpu"), 2, 4, 5, True, None)
    finally:
        del block
    assert here > 1536
    assert 50 < mem < 1200, mem
    assert sps > 0 and tps == pytest.approx(sps * 4 * 3 * 5) and np.isfinite(loss)


def test_a_failed_row_process_is_one_error_line(capfd):
    train = load_script("benchmarks/bench_train.py")
    with pytest.raises(SystemExit) as e:
        train.measure("paper", None, torch.device("cpu"), 1, 2, 5, True, None)   # no trajectories: the child fails
    assert str(e.value).startswith("error: the process measuring paper (per-sample loop) exited with 1")
    assert "Traceback" in capfd.readouterr().err


def test_a_cuda_row_is_measured_in_this_process(monkeypatch):
    train = load_script("benchmarks/bench_train.py")
    called = []
    monkeypatch.setattr(train, "measure_here", lambda *a: called.append(a) or (1.0, 1.0, 1.0, 1.0, 0.0))
    monkeypatch.setattr(train, "measure_in_child", lambda *a: pytest.fail("a CUDA row went to a child process"))
    assert train.measure("paper", None, types.SimpleNamespace(type="cuda"), 3, 2, 5, False, None) == (1.0,) * 4 + (0.0,)
    assert called and called[0][3] == 3


def test_bench_train_no_loop_leaves_out_the_loop_rows_and_profile_reaches_each_row(monkeypatch, capsys):
    bench = load_script("benchmarks/bench_train.py")
    seen = []
    monkeypatch.setattr(bench, "synthetic_trajectories", lambda *a, **k: None)
    monkeypatch.setattr(bench, "measure", lambda name, trajs, device, steps, bs, K, slow, amp, mode, **kw:
                        seen.append((slow, mode, kw)) or ({None: 2.0, "default": 3.0}[mode], 1.0, 1.0, 0.0, 0.5))
    bench.main(["--configs", "paper", "--steps", "1", "--device", "cpu", "--no_loop", "--compile", "--profile", "4",
                "--batch_size", "512"])
    assert seen == [(False, None, {"profile": 4}), (False, "default", {"profile": 4})]
    out = capsys.readouterr().out
    assert "per-sample loop" not in out and "batch 512, K 20" in out
    assert "| paper | on-device | 1 | 2.00 |" in out and "| 1.00x |" in out and "| 1.50x |" in out


def test_bench_train_profile_prints_the_operators_that_took_the_most_time(capsys):
    """One CPU row measured with ``profile``: the profiler's table, with the matmuls in it, comes on stderr."""
    bench = load_script("benchmarks/bench_train.py")
    trajs = bench.synthetic_trajectories("hopper", 3000)
    sps, *_ = bench.measure_here("paper", trajs, torch.device("cpu"), 1, 4, 5, False, None, None, 2)
    err = capsys.readouterr().err
    assert sps > 0 and err.startswith("profile of 2 steps (sorted by self_cpu_time_total):")
    assert "aten::addmm" in err and "Self CPU time total" in err


def test_a_failed_profile_is_one_line_and_the_row_is_still_measured(monkeypatch, capsys):
    bench = load_script("benchmarks/bench_train.py")

    def broken(*a):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore detail")

    monkeypatch.setattr(bench, "profile_table", broken)
    trajs = bench.synthetic_trajectories("hopper", 3000)
    sps, *_ = bench.measure_here("paper", trajs, torch.device("cpu"), 1, 4, 5, False, None, None, 2)
    assert sps > 0
    assert capsys.readouterr().err == "profile of 2 steps failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED\n"


def test_bench_train_compile_alone_times_the_default_mode(monkeypatch, capsys):
    """``--compile`` without a mode is the scripts' ``--compile``: torch's default mode gets its row (it added none)."""
    bench = load_script("benchmarks/bench_train.py")
    seen = []
    monkeypatch.setattr(bench, "synthetic_trajectories", lambda *a, **k: None)
    monkeypatch.setattr(bench, "measure", lambda name, trajs, device, steps, bs, K, slow, amp, mode:
                        seen.append(mode) or (1.0, 1.0, 1.0, 0.0, 0.5))
    bench.main(["--configs", "paper", "--steps", "1", "--device", "cpu", "--compile"])
    assert seen == [None, None, "default"]
    seen.clear()
    bench.main(["--configs", "paper", "--steps", "1", "--device", "cpu"])
    assert seen == [None, None]


def test_bench_train_threads_reach_every_row(monkeypatch, capsys):
    """--threads sets this process's torch threads (the header says so) and each CPU row's child process's, which gets
    the count with its row."""
    import io
    import pickle
    import sys

    bench = load_script("benchmarks/bench_train.py")
    before = torch.get_num_threads()
    jobs = []
    monkeypatch.setattr(bench, "synthetic_trajectories", lambda *a, **k: None)

    class Proc:   # the child, not started: the job it would read is kept
        returncode = 0

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def communicate(self, payload):
            jobs.append(pickle.loads(payload)[0])
            return (bench._RESULT + "[1.0, 1.0, 1.0, 0.0, 0.5]\n").encode(), None

    monkeypatch.setattr(bench.subprocess, "Popen", Proc)
    try:
        bench.main(["--configs", "paper", "--steps", "1", "--device", "cpu", "--threads", "1"])
        assert "cores, 1 torch threads)" in capsys.readouterr().out
        assert [j["threads"] for j in jobs] == [1, 1]
        seen = []
        monkeypatch.setattr(bench, "measure_here", lambda *a: seen.append(torch.get_num_threads()) or (1, 1, 1, 0, 0))
        torch.set_num_threads(2)
        job = dict(jobs[0], threads=1)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pickle.dumps((job, None)))))
        bench.child_main()
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
