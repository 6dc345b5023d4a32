"""benchmarks/gpu_summary.py reads the logs the GPU suite's scripts print (made here by their own main functions, with
the measurements replaced by fixed numbers) and checks the three targets."""
import types

import pytest
import torch
from conftest import load_script

FAKE_CUDA = types.SimpleNamespace(type="cuda")


@pytest.fixture
def logs(tmp_path, monkeypatch, capsys):
    """A folder as gpu_suite.sh leaves it: device.txt and the logs of bench_train (eager, then compiled) and
    bench_core, printed by their main functions on a pretend H200."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    train = load_script("benchmarks/bench_train.py")
    monkeypatch.setattr(train, "bench_device", lambda name: FAKE_CUDA)
    monkeypatch.setattr(train, "synthetic_trajectories", lambda *a, **k: None)
    rates = {("paper", True, None): 40.0, ("paper", False, None): 300.0, ("paper", False, "reduce-overhead"): 900.0,
             ("paper", False, "cuda-graph"): 800.0,
             ("gpt2", True, None): 10.0, ("gpt2", False, None): 30.0}

    def measure(name, trajs, device, steps, batch_size, K, slow, amp, compile=None):
        sps = rates[(name, slow, compile)]
        return sps, sps * batch_size * 60, 1000.0, sps * 1e13 * (1.65 if name == "gpt2" else 0.01), 0.5

    monkeypatch.setattr(train, "measure", measure)
    train.main(["--configs", "paper", "gpt2"])
    (tmp_path / "bench_train.txt").write_text(capsys.readouterr().out)
    train.main(["--configs", "paper", "--compile", "reduce-overhead"])
    (tmp_path / "bench_train_compile.txt").write_text(capsys.readouterr().out)

    core = load_script("benchmarks/bench_core.py")
    monkeypatch.setattr(core, "bench_device", lambda name: FAKE_CUDA)
    monkeypatch.setattr(core, "tune_allocator", lambda: True)
    monkeypatch.setattr(core, "bench_sampler", lambda device: (1000.0, 50.0))
    monkeypatch.setattr(core, "bench_env_stepping", lambda n, workers, steps: [(0, 12000.0), (8, 60000.0)])
    monkeypatch.setattr(core, "bench_forward", lambda device, sizes: [(1, 2.0, 1.0)])
    eval_rows = [(10, 0, 1, "on", 20.0, 1.0), (50, 0, 1, "on", 30.0, 1.0), (50, 0, 4, "on", 42.0, 1.0),
                 (50, 8, 4, "off", 41.0, 0.8), (100, 0, 4, "on", 50.0, 1.0)]
    monkeypatch.setattr(core, "bench_eval", lambda device, episodes, seq, workers, groups, graphs: eval_rows)
    core.main([])
    (tmp_path / "bench_core.txt").write_text(capsys.readouterr().out)
    (tmp_path / "device.txt").write_text("name, memory.total [MiB], driver_version\nNVIDIA H200, 143771 MiB, 570.1\n")
    (tmp_path / "check_precision_paper.txt").write_text(
        "| variant | loss (max rel.) | weight drift | action (max abs.) | tolerances | result |\n|---|---:|---:|---:|---|---|\n"
        "| bf16 (fused) | 1.00e-03 | 2.00e-02 | 3.00e-03 | 0.05 / 0.2 / 0.05 | ok |\n")
    (tmp_path / "cuda_checks.txt").write_text(cuda_checks_log(monkeypatch, capsys, {}))
    return tmp_path


def cuda_checks_log(monkeypatch, capsys, failing):
    """cuda_checks.py's output with --device cpu: the batch-window check run, the others replaced by fixed results
    (those named in ``failing`` fail); returns the text and checks the exit status."""
    checks = load_script("benchmarks/cuda_checks.py")
    for name in ("check_graph_reseed", "check_resume", "check_torchrun"):
        monkeypatch.setattr(checks, name, lambda *a, _n=name: (_n not in failing, f"{_n} measured"))
    assert checks.main(["--device", "cpu"]) == (1 if failing else 0)
    return capsys.readouterr().out


def test_the_targets_are_checked_from_the_logs(logs):
    summary = load_script("benchmarks/gpu_summary.py")
    text, figures = summary.summarise(logs)
    assert figures["train"] == pytest.approx(300.0 / 40.0)          # eager on-device against the loop of its run
    assert figures["eval"] == pytest.approx(51.25)                  # 41.0 / 0.8: the best 50-episode ratio
    assert figures["overlap"] == "4"                                # the fastest 50-episode batched rate: 42.0
    assert figures["mfu"] == pytest.approx(100 * 30.0 * 1.65e13 / 989e12, abs=0.05)
    assert text.startswith("Device: NVIDIA H200, 143771 MiB, 570.1\n")
    assert "| evaluation, 50 episodes, batched vs one by one | 30x | 51.2x | met |" in text
    assert "| training steps/s at the paper config, on-device vs per-sample loop | 5x | 7.5x | met |" in text
    assert "under `--compile reduce-overhead`: 22.5x the per-sample loop of the same run" in text
    assert f"| MFU at GPT-2 size (768 x 12), bf16 | 35% | {figures['mfu']:.1f}% (batch 64, on-device) | met |" in text
    assert figures["mfu_at"] == "batch 64, on-device" and "MFU at GPT-2 size: " not in text   # one row: no list
    assert "Fastest 50-episode evaluation with overlap groups = 4" in text
    assert "| bf16 (fused) | 1.00e-03 |" in text
    # bench_core's other tables come too: the sampler, env stepping and the evaluation forward
    assert "**Sampler (batch 64, K 20, 1M timesteps)**" in text and "**Env stepping (50 HalfCheetah-v4 envs" in text
    assert "|  | 8 | 60,000 |" in text and "**Evaluation forward (DT 128x3, K 20)**" in text
    assert "**CUDA checks (cuda_checks.py)**" in text and "| windows | pass | same batch digest: True;" in text
    assert "| graph_reseed | pass | check_graph_reseed measured |" in text and "CUDA checks failed" not in text
    assert text.rstrip().endswith("No rows in: bench_train_gpt2.txt, check_precision_gpt2.txt, bench_analysis.txt "
                                  "(missing, or stopped before its first row).")


def test_mfu_is_the_best_gpt2_row_of_either_batch_and_is_named(logs, monkeypatch, capsys):
    """MFU at GPT-2 size: the best on-device row (eager or --cuda_graph) of bench_train.txt (batch 64) and
    bench_train_gpt2.txt (a larger batch, no loop rows), named by batch and path; every such row is listed."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    train = load_script("benchmarks/bench_train.py")
    monkeypatch.setattr(train, "bench_device", lambda name: FAKE_CUDA)
    monkeypatch.setattr(train, "synthetic_trajectories", lambda *a, **k: None)
    flops = {(None, 64): 50e12, ("cuda-graph", 64): 150e12, (None, 512): 200e12, ("cuda-graph", 512): 360e12}

    def measure(name, trajs, device, steps, batch_size, K, slow, amp, compile=None, **kw):
        return 10.0, 1.0, 1000.0, (1e12 if slow else flops[(compile, batch_size)]), 0.5

    monkeypatch.setattr(train, "measure", measure)
    train.main(["--configs", "gpt2", "--cuda_graph"])
    (logs / "bench_train.txt").write_text(capsys.readouterr().out)
    summary = load_script("benchmarks/gpu_summary.py")
    text, figures = summary.summarise(logs)
    assert figures["mfu"] == pytest.approx(15.2) and figures["mfu_at"] == "batch 64, on-device, CUDA graph step"
    assert "| 35% | 15.2% (batch 64, on-device, CUDA graph step) | NOT met |" in text
    assert "MFU at GPT-2 size: batch 64, on-device 5.1%; batch 64, on-device, CUDA graph step 15.2%." in text
    train.main(["--configs", "gpt2", "--batch_size", "512", "--no_loop", "--cuda_graph", "--profile", "2"])
    (logs / "bench_train_gpt2.txt").write_text(capsys.readouterr().out + "profile of 2 steps (sorted by x):\n---\n")
    text, figures = summary.summarise(logs)
    assert figures["mfu"] == pytest.approx(36.4) and figures["mfu_at"] == "batch 512, on-device, CUDA graph step"
    assert "| MFU at GPT-2 size (768 x 12), bf16 | 35% | 36.4% (batch 512, on-device, CUDA graph step) | met |" in text
    assert "batch 512, on-device 20.2%; batch 512, on-device, CUDA graph step 36.4%." in text
    assert "**Training at GPT-2 size, batch 512**" in text and text.count("| gpt2 | on-device |") == 2


def test_a_missing_or_cut_short_log_is_said_and_its_target_not_measured(logs, capsys):
    summary = load_script("benchmarks/gpu_summary.py")
    (logs / "bench_train.txt").unlink()
    core = (logs / "bench_core.txt").read_text()
    (logs / "bench_core.txt").write_text(core[:core.index("| | 10 |")])       # stopped before its first eval row
    text, figures = summary.summarise(logs)
    assert figures["eval"] is None and figures["mfu"] is None
    assert figures["train"] is None                                 # the compiled run does not stand in for it
    assert "| evaluation, 50 episodes, batched vs one by one | 30x | not measured | - |" in text
    assert "No rows in: bench_train.txt, bench_train_gpt2.txt, bench_core.txt, check_precision_gpt2.txt" in text
    with pytest.raises(SystemExit) as stop:
        summary.main([str(logs / "nothing")])
    assert stop.value.code == 2
    assert "not a folder of GPU suite logs" in capsys.readouterr().err


def test_a_warning_between_two_rows_does_not_cut_the_table(logs):
    """The suite logs stderr too: a warning line inside a table keeps the rows after it."""
    summary = load_script("benchmarks/gpu_summary.py")
    f = logs / "bench_train_compile.txt"
    lines = f.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if "compile reduce-overhead" in line)
    f.write_text("\n".join(lines[:row] + ["W1201 12:00:00 skipping cudagraphs due to cpu device"] + lines[row:]) + "\n")
    text, figures = summary.summarise(logs)
    assert "under `--compile reduce-overhead`: 22.5x" in text and text.count("compile reduce-overhead |") == 1


def _compile_log(tmp_path, monkeypatch, capsys, rates, modes):
    """bench_train_compile.txt as train.main prints it with ``--compile *modes``, at the fixed ``rates``."""
    train = load_script("benchmarks/bench_train.py")
    monkeypatch.setattr(train, "bench_device", lambda name: FAKE_CUDA)
    monkeypatch.setattr(train, "synthetic_trajectories", lambda *a, **k: None)
    monkeypatch.setattr(train, "measure", lambda name, trajs, device, steps, batch_size, K, slow, amp, compile=None:
                        (rates[(name, slow, compile)], 1.0, 1000.0, 1e11, 0.5))
    train.main(["--configs", "paper", "--compile", *modes])
    (tmp_path / "bench_train_compile.txt").write_text(capsys.readouterr().out)


def test_the_training_target_and_the_compiled_ratio_each_use_their_own_runs_loop(logs, monkeypatch, capsys):
    """The target divides by the per-sample loop of bench_train.txt, never the compiled run's; the compiled ratio
    shown is the best compile mode's, over the compiled run's own loop."""
    summary = load_script("benchmarks/gpu_summary.py")
    _compile_log(logs, monkeypatch, capsys, {("paper", True, None): 60.0, ("paper", False, None): 300.0,
                                             ("paper", False, "default"): 1200.0,
                                             ("paper", False, "reduce-overhead"): 900.0},
                 ["default", "reduce-overhead"])
    text, figures = summary.summarise(logs)
    assert figures["train"] == pytest.approx(300.0 / 40.0)          # not 300 / 60
    assert "| training steps/s at the paper config, on-device vs per-sample loop | 5x | 7.5x | met |" in text
    assert "under `--compile reduce-overhead`: 20.0x the per-sample loop of the same run" in text   # 1200 / 60


def _set_rows(folder, train_rates):
    """Rewrite bench_train.txt's steps/s of the paper rows named in ``train_rates`` ({batches: cell}) in place."""
    summary = load_script("benchmarks/gpu_summary.py")
    f = folder / "bench_train.txt"
    text = f.read_text()
    for row in summary.table(text, "config"):
        if row["config"] == "paper" and row["batches"] in train_rates:
            old = next(x for x in text.splitlines() if x.startswith("|") and row["batches"] in x and "paper" in x)
            text = text.replace(old, old.replace(f" {row['steps/s']} ", f" {train_rates[row['batches']]} ", 1))
    f.write_text(text)


def test_the_fastest_overlap_is_the_fastest_batched_rate_and_exactly_the_target_is_met(logs):
    summary = load_script("benchmarks/gpu_summary.py")
    core = logs / "bench_core.txt"
    text = core.read_text()
    # the (50, 8, 4, 41.0, 0.8) row with 2 groups: the best ratio (51.25) but not the fastest rate (42.0 at 4 groups)
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if "| 41.00 |" in line or "| 41.0 |" in line)
    c = summary._cells(lines[i])
    c[c.index("4")] = "2"
    lines[i] = "| " + " | ".join(c) + " |"
    core.write_text("\n".join(lines) + "\n")
    out, figures = summary.summarise(logs)
    assert figures["eval"] == pytest.approx(51.25)
    assert figures["overlap"] == "4"
    _set_rows(logs, {"per-sample loop": "60.0", "on-device": "300.0"})
    out, figures = summary.summarise(logs)
    assert figures["train"] == 5.0
    assert "| training steps/s at the paper config, on-device vs per-sample loop | 5x | 5.0x | met |" in out


def test_a_file_given_for_the_folder_is_refused(logs, capsys):
    summary = load_script("benchmarks/gpu_summary.py")
    with pytest.raises(SystemExit) as stop:
        summary.main([str(logs / "device.txt")])
    assert stop.value.code == 2
    assert "device.txt: not a folder of GPU suite logs" in capsys.readouterr().err
    # a folder without any of the suite's logs (a wrong one) gave a table of "not measured" rows and exit 0
    (logs / "other").mkdir()
    (logs / "other" / "m.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        summary.main([str(logs / "other")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {logs / 'other'}: none of gpu_suite.sh's logs ("), err


def test_a_failed_cuda_check_whose_output_holds_a_bar_is_named(logs, monkeypatch, capsys):
    """A check's text with ``|`` in it (the tail of a run's summary line ``iter 1/1 | loss ...``) split its row into
    more cells than the header: the row, the failure with it, vanished from the summary."""
    summary = load_script("benchmarks/gpu_summary.py")
    checks = load_script("benchmarks/cuda_checks.py")
    for name in ("check_graph_reseed", "check_resume"):
        monkeypatch.setattr(checks, name, lambda *a: (True, "measured"))
    monkeypatch.setattr(checks, "check_torchrun", lambda *a: (False, "exit 1: iter 1/1 | loss 0.5 | error: boom"))
    assert checks.main(["--device", "cpu"]) == 1
    (logs / "cuda_checks.txt").write_text(capsys.readouterr().out)
    text, _ = summary.summarise(logs)
    assert "\nCUDA checks failed: torchrun_nccl.\n" in text
    assert "exit 1: iter 1/1 \\| loss 0.5 \\| error: boom" in text   # (still a markdown cell: the bars escaped)


def test_a_failed_cuda_check_is_named(logs, monkeypatch, capsys):
    summary = load_script("benchmarks/gpu_summary.py")
    (logs / "cuda_checks.txt").write_text(cuda_checks_log(monkeypatch, capsys, {"check_resume"}))
    text, _ = summary.summarise(logs)
    assert "| resume_cpu_to_cuda | FAIL | check_resume measured |" in text
    assert "\nCUDA checks failed: resume_cpu_to_cuda.\n" in text
    (logs / "cuda_checks.txt").unlink()
    missing = "No rows in: bench_train_gpt2.txt, check_precision_gpt2.txt, bench_analysis.txt, cuda_checks.txt"
    assert missing in summary.summarise(logs)[0]


def test_the_training_target_takes_the_cuda_graph_row_where_it_is_faster(logs, monkeypatch, capsys):
    """bench_train.py --cuda_graph adds a row; the target is the faster of eager and --cuda_graph, both shown."""
    summary = load_script("benchmarks/gpu_summary.py")
    train = load_script("benchmarks/bench_train.py")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(train, "bench_device", lambda name: FAKE_CUDA)
    monkeypatch.setattr(train, "synthetic_trajectories", lambda *a, **k: None)
    monkeypatch.setattr(train, "measure", lambda name, trajs, device, steps, batch_size, K, slow, amp, compile=None:
                        ({(True, None): 40.0, (False, None): 300.0, (False, "cuda-graph"): 800.0}[(slow, compile)],
                         1.0, 1000.0, 1e11, 0.5))
    train.main(["--configs", "paper", "--cuda_graph"])
    (logs / "bench_train.txt").write_text(capsys.readouterr().out)
    text, figures = summary.summarise(logs)
    assert figures["train"] == pytest.approx(20.0) and figures["train_path"] == "--cuda_graph"
    assert "| paper | on-device, CUDA graph step | 30 | 800.00 |" in text
    assert "eager on-device 7.5x, with `--cuda_graph` 20.0x (the target row: the faster)" in text
    assert "| training steps/s at the paper config, on-device vs per-sample loop | 5x | 20.0x | met |" in text


def test_the_step_profiles_of_the_large_batch_log_are_shown(logs):
    """bench_train_gpt2.txt's --profile tables (printed just before their rows) come in the summary: the column header
    and the top operators, under the row they profiled; a failed profile is its one line."""
    import torch

    bench = load_script("benchmarks/bench_train.py")
    trajs = bench.synthetic_trajectories("hopper", 3000)
    trainer = types.SimpleNamespace(train_step=lambda: torch.randn(64, 64) @ torch.randn(64, 64))
    table = bench.profile_table(trainer, 2, torch.device("cpu"))
    assert trajs and "aten::mm" in table
    head = ("torch 2.13; batch 512, K 20; timed steps: gpt2 30\n\n| config | batches | timed steps | steps/s |\n"
            "|---|---|---:|---:|\n")
    (logs / "bench_train_gpt2.txt").write_text(head + table + "\n| gpt2 | on-device | 30 | 5.00 |\n"
                                               "profile of 3 steps failed: RuntimeError: CUPTI\n"
                                               "| gpt2 | on-device, CUDA graph step | 30 | 9.00 |\n")
    text, _ = load_script("benchmarks/gpu_summary.py").summarise(logs)
    shown = text[text.index("**Profile (gpt2, on-device, batch 512)**"):]
    block = shown.split("```\n")[1].split("\n```")[0].splitlines()
    assert block[0] == "profile of 2 steps (sorted by self_cpu_time_total):" and "Name" in block[1]
    assert any("aten::mm" in line for line in block[2:]) and not any(line.startswith("---") for line in block)
    assert "**Profile (gpt2, on-device, CUDA graph step, batch 512)**\n\n```\nprofile of 3 steps failed: " \
           "RuntimeError: CUPTI\n```" in text


def test_logs_cut_short_by_their_budget_are_named_with_the_checks_never_run(logs):
    """gpu_suite.sh ends a step stopped by its time budget with a line saying so: the summary names each such log,
    and the CUDA checks the cut log never reached; a check skipped (here, on the CPU) is shown as such, not failed."""
    summary = load_script("benchmarks/gpu_summary.py")
    full = (logs / "cuda_checks.txt").read_text()
    assert "| cuda_graph_dropout | skip | skipped: --cuda_graph needs CUDA |" in full
    text, _ = summary.summarise(logs)
    assert "CUDA checks failed" not in text and "CUDA checks not run" not in text and "Cut short" not in text
    head = full[:full.index("| windows |")]
    (logs / "cuda_checks.txt").write_text(head + "== cuda_checks: stopped after its 125 s budget; the rows above "
                                          "were measured\n")
    core = (logs / "bench_core.txt").read_text()
    (logs / "bench_core.txt").write_text(core + "== bench_core: stopped after its 95 s budget; the rows above were "
                                         "measured\n")
    text, _ = summary.summarise(logs)
    assert "\nCUDA checks not run: windows, graph_reseed, eval_graphs, resume_cpu_to_cuda, torchrun_nccl.\n" in text
    assert ("\nCut short by their time budgets: bench_core.txt (95 s), cuda_checks.txt (125 s); the rows after those "
            "shown were not measured.\n") in text


def test_cuda_checks_run_the_never_passed_paths_first_and_only_those_named(monkeypatch, capsys):
    checks = load_script("benchmarks/cuda_checks.py")
    for name in ("check_graph_reseed", "check_resume", "check_torchrun"):
        monkeypatch.setattr(checks, name, lambda *a, _n=name: (True, f"{_n} measured"))
    assert checks.main(["--device", "cpu"]) == 0
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert rows[:3] == ["cuda_graph_dropout", "multi_cuda_graph", "cuda_graph_run"] and len(rows) == 8
    assert checks.main(["--device", "cpu", "--only", "windows", "torchrun_nccl"]) == 0
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert rows == ["windows", "torchrun_nccl"]


def test_the_compiled_training_rows_are_a_table_of_their_own(logs, monkeypatch, capsys):
    """The eager and the ``--compile`` training logs' rows were shown in one table, alike and unlabelled."""
    summary = load_script("benchmarks/gpu_summary.py")
    (logs / "bench_train_compile.txt").write_text((logs / "bench_train.txt").read_text())
    text, _ = summary.summarise(logs)
    eager = text.split("**Training (bench_train.txt, eager)**")[1].split("**")[0]
    compiled = text.split("**Training under --compile (bench_train_compile.txt)**")[1].split("**")[0]
    rows = [line for line in eager.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 1 and [line for line in compiled.splitlines() if line.startswith("| ") and "---" not in line] \
        == rows
