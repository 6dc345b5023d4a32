"""Bad flags of the data scripts and the benchmarks: one line ``error: ...``, exit 2, no traceback, and nothing that
was already saved is touched. Everything here fails before any real work starts."""
import pickle

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
        f"error: cannot write {blocker / 'x.pkl'}: {blocker} is a file, not a folder"
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "hopper-medium-v2.pkl", "state_stats.pkl"]
    # {"kept": 1} is not a stats table: a plain run (which updates the table) refuses it, --replace writes anew
    assert "state_stats.pkl" in expect_error(capsys, main, ["--data_path", tmp_path])
    assert out.read_bytes() == before
    main(["--data_path", str(tmp_path), "--replace"])   # replaces it whole, and leaves no temporary file
    assert set(pickle.loads(out.read_bytes())) == {"hopper-medium-v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "hopper-medium-v2.pkl", "state_stats.pkl"]


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
]


@pytest.mark.parametrize("script, argv, msg", BENCH_BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BENCH_BAD])
def test_benchmark_flags(capsys, script, argv, msg):
    assert msg in expect_error(capsys, load_script(f"benchmarks/{script}").main, argv)


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
