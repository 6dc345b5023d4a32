"""The grid launcher: expansion, skip/resume detection, a real two-process run, WandB export."""
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from decision_transformer import sweep


def _half_done(folder, iteration: int = 0):
    """A readable training state, as an interrupted run leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"iteration": iteration}, folder / "train_state.pt")


def test_bundled_grids_expand():
    counts = {name: len(sweep.expand(sweep.load_grid(name))) for name in
              ("pretraining_table1", "pretraining_k1", "block_replacement", "grad_clip", "merging_chibit")}
    assert counts == {"pretraining_table1": 18, "pretraining_k1": 12, "block_replacement": 36, "grad_clip": 3,
                      "merging_chibit": 6}
    # the ChibiT grid is the Merging-DT seed's lm_cotraining command
    chibit = sweep.to_argv(sweep.expand(sweep.load_grid("merging_chibit"))[0])
    for flags in (["--pretrained_lm", "checkpoints/ChibiT"], ["--gpt_kmeans", "1000"], ["--gpt_kmeans_const", "0.1"],
                  ["--save_mode", "best"], ["--dropout", "0.1"], ["--init_reg", "0.0001"], ["--extend_positions"]):
        assert " ".join(flags) in " ".join(chibit), flags
    blocks = {r["pretrained_block"] for r in sweep.expand(sweep.load_grid("block_replacement"))}
    assert blocks == set(range(12))


def test_to_argv_switches_and_nulls():
    assert sweep.to_argv({"env": "hopper", "pretrained_lm": None, "share_input_output_proj": True, "frozen": False,
                          "K": 1, "include": ["attn", "mlp"]}) == \
        ["--env", "hopper", "--share_input_output_proj", "--K", "1", "--include", "attn", "mlp"]


def _grid(tmp_path, data):
    spec = {"program": "experiment.py",
            "fixed": {"data_path": str(data), "outdir": str(tmp_path / "ck"), "embed_dim": 16, "n_layer": 1,
                      "K": 5, "batch_size": 4, "max_iters": 1, "num_steps_per_iter": 2, "num_eval_episodes": 1,
                      "device": "cpu"},
            "grid": {"seed": [1, 2], "pretrained_lm": [None]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_skip_finished_and_resume_partial(tmp_path, hopper_data):
    spec = sweep.load_grid(str(_grid(tmp_path, hopper_data)))
    assert [s for s, _ in sweep.plan(spec, [])] == ["new", "new"]
    done = tmp_path / "ck" / "dt_medium_hopper_1_K5"
    done.mkdir(parents=True)
    (done / "model_1.pt").write_bytes(b"x")
    part = tmp_path / "ck" / "dt_medium_hopper_2_K5"
    _half_done(part)
    states = sweep.plan(spec, [])
    assert [s for s, _ in states] == ["done", "partial"]
    assert states[1][1][-1] == "--resume" and "--resume" not in states[0][1]


def test_damaged_training_state_is_not_started(tmp_path, hopper_data, capsys):
    """A training state that cannot be read would fail its run on every call of the launcher: it is listed as
    damaged, named with the reason, not started, and the launcher exits non-zero; the file is left as it is."""
    grid = _grid(tmp_path, hopper_data)
    part = tmp_path / "ck" / "dt_medium_hopper_2_K5"
    part.mkdir(parents=True)
    (part / "train_state.pt").write_bytes(b"x")
    assert [s for s, _ in sweep.plan(sweep.load_grid(str(grid)), [])] == ["new", "damaged"]
    (tmp_path / "ck" / "dt_medium_hopper_1_K5").mkdir()
    (tmp_path / "ck" / "dt_medium_hopper_1_K5" / "model_1.pt").write_bytes(b"x")   # the other run: finished
    capsys.readouterr()
    try:
        sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs")])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("a damaged run must make the launcher exit 2")
    out, err = capsys.readouterr()
    assert err.strip() == "error: 1 runs not started: their training state cannot be read (see above)"
    lines = out.splitlines()
    assert lines[0].startswith("done ") and lines[1].startswith("damaged ") and "--resume" not in lines[1]
    assert "1 finished (skipped), 0 to resume, 0 new, 1 with a damaged training state (not started)" in lines[2]
    assert lines[3].startswith(f"damaged: {part / 'train_state.pt'}: not loadable (UnpicklingError") and \
        lines[3].endswith("move it away to start that run over")
    assert not (tmp_path / "logs").exists() and (part / "train_state.pt").read_bytes() == b"x"
    # a state whose iteration count is damaged would be resumed from it (its run's metrics cut, models overwritten)
    import torch

    for bad in (-1, 1.5):
        torch.save({"iteration": bad}, part / "train_state.pt")
        assert [s for s, _ in sweep.plan(sweep.load_grid(str(grid)), [])] == ["done", "damaged"]
        assert sweep.state_iteration(part / "train_state.pt") == \
            f"not a training state (its iteration {bad!r} is not a non-negative integer)"


def test_merge_runs_found_by_their_merge_flags(tmp_path):
    """Merge runs write to {run}_{exp_id}: the launcher finds a finished or half-done one by the merge flags recorded
    in its config.json, and a folder of another merge of the same models does not count."""
    import json

    from decision_transformer.cli import experiment_parser, merge_signature

    spec = {"program": "experiment.py", "name": "m",
            "fixed": {"outdir": str(tmp_path / "ck"), "K": 5, "max_iters": 2, "pretrained_models": ["a.pt", "b.pt"],
                      "copy_model": True},
            "grid": {"include": [["attn"], ["mlp"]]}}
    assert [s for s, _ in sweep.plan(spec, [])] == ["new", "new"]

    def folder(exp_id, include, files):
        argv = sweep.to_argv({**spec["fixed"], "include": include})
        d = tmp_path / "ck" / f"dt_medium_hopper_666_K5_{exp_id}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(merge_signature(experiment_parser().parse_args(argv))))
        for f in files:
            (d / f).write_bytes(b"x")
        if "train_state.pt" in files:  # at the last checkpoint's iteration, as a run writes them
            _half_done(d, max(int(f[len("model_"):-len(".pt")]) for f in files if f.startswith("model_")))

    folder(111111, ["attn"], ["model_1.pt", "model_2.pt", "train_state.pt"])
    assert [s for s, _ in sweep.plan(spec, [])] == ["done", "new"]
    folder(222222, ["mlp"], ["model_1.pt", "train_state.pt"])
    states = sweep.plan(spec, [])
    assert [s for s, _ in states] == ["done", "partial"] and states[1][1][-1] == "--resume"


def test_merge_runs_of_the_same_merge_flags_and_another_learning_rate_are_two_runs(tmp_path):
    """Two grid points that merge alike but finetune with another -lr write two {run}_{id} folders: each is its own
    run (found, locked and resumed by all its flags, as --resume finds it), not one run 'made with other flags'; a
    half-done one whose config.json was lost is found by the config its training state records."""
    import json

    from decision_transformer.cli import experiment_parser
    from decision_transformer.run import resume_signature

    spec = {"program": "experiment.py", "name": "m",
            "fixed": {"outdir": str(tmp_path / "ck"), "K": 5, "max_iters": 2, "pretrained_models": ["a.pt", "b.pt"],
                      "copy_model": True, "include": ["attn"]},
            "grid": {"learning_rate": [1e-4, 3e-4]}}
    runs = sweep.plan_runs(spec, [])
    assert [r.state for r in runs] == ["new", "new"] and runs[0].found.lock != runs[1].found.lock

    def config(lr):
        return vars(experiment_parser().parse_args(sweep.to_argv({**spec["fixed"], "learning_rate": lr})))

    done = tmp_path / "ck" / "dt_medium_hopper_666_K5_111111"
    done.mkdir(parents=True)
    (done / "config.json").write_text(json.dumps(resume_signature(experiment_parser().parse_args(
        sweep.to_argv({**spec["fixed"], "learning_rate": 1e-4})))))
    for f in ("model_1.pt", "model_2.pt"):
        (done / f).write_bytes(b"x")
    _half_done(done, 2)
    assert [s for s, _ in sweep.plan(spec, [])] == ["done", "new"]
    half = tmp_path / "ck" / "dt_medium_hopper_666_K5_222222"
    half.mkdir()
    (half / "model_1.pt").write_bytes(b"x")
    torch.save({"iteration": 1, "config": config(3e-4)}, half / "train_state.pt")   # no config.json
    states = sweep.plan(spec, [])
    assert [s for s, _ in states] == ["done", "partial"] and states[1][1][-1] == "--resume"


def test_eval_only_multi_runs_are_finished_once_every_iteration_is_logged(tmp_path, monkeypatch):
    """experiment_multi.py --eval_only (the multi-task merge-and-evaluate step) keeps no training state: its run is
    finished when a folder of these flags logs every iteration, and is run again otherwise (it cannot resume)."""
    import json

    from decision_transformer.multi_run import multi_parser, resume_signature as multi_signature

    monkeypatch.chdir(tmp_path)
    spec = {"program": "experiment_multi.py", "name": "merge",
            "fixed": {"outdir": "ck", "max_iters": 2, "num_steps_per_iter": 0, "eval_only": True,
                      "multi_pretrained_models": ["a.pt", "b.pt"]},
            "grid": {"seed": [1, 2]}}
    assert [s for s, _ in sweep.plan(spec, [])] == ["new", "new"]

    def folder(exp_id, seed, iterations):
        d = tmp_path / "ck" / "multi" / f"gym-experiment-multi-medium-{exp_id}"
        d.mkdir(parents=True)
        cfg = multi_signature(multi_parser().parse_args(sweep.to_argv({**spec["fixed"], "seed": seed})))
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in iterations)
                                         + '{"iteration": 9')              # (a last line cut short is skipped)

    folder(111, 1, [1, 2])
    folder(222, 2, [1])                                                     # stopped after iteration 1
    assert [s for s, _ in sweep.plan(spec, [])] == ["done", "new"]


def test_lm_and_multi_runs_found_by_their_flags(tmp_path, monkeypatch):
    """lm_cotraining/experiment.py runs ({outdir}/dt_gym-experiment-{env}-{dataset}-{id}) and experiment_multi.py runs
    ({outdir}/multi/gym-experiment-multi-{dataset}-{id}) are found by the flags in their config.json: finished,
    half-done, or (another run's flags) new."""
    import json

    import torch

    from decision_transformer.cli_lm import lm_cotraining_parser
    from decision_transformer.multi_run import multi_parser, resume_signature as multi_signature
    from decision_transformer.run import resume_signature

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "_lm_problem", lambda name: None)   # the LM's presence is another test's concern
    lm = {"program": "lm_cotraining/experiment.py", "name": "lm",
          "fixed": {"pretrained_lm": "checkpoints/ChibiT", "max_iters": 2, "init_reg": 0.0001},
          "grid": {"env": ["hopper", "walker2d"], "dataset": ["medium"]}}
    multi = {"program": "experiment_multi.py", "name": "multi",
             "fixed": {"outdir": "ck", "max_iters": 2, "dataset": "expert"},
             "grid": {"selected_training": ["hopper", "walker2d"]}}
    assert [s for s, _ in sweep.plan(lm, [])] == ["new", "new"]
    assert [s for s, _ in sweep.plan(multi, [])] == ["new", "new"]

    def folder(d, config, files):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config))
        for f, content in files.items():
            if isinstance(content, dict):
                torch.save(content, d / f)
            else:
                (d / f).write_bytes(content)

    def lm_config(**flags):
        argv = sweep.to_argv({**lm["fixed"], **flags, "dataset": "medium"})
        return resume_signature(lm_cotraining_parser().parse_args(argv))

    models = tmp_path / "models"
    folder(models / "hopper" / "dt_gym-experiment-hopper-medium-111", lm_config(env="hopper"),
           {"model_2.pt": b"x", "train_state.pt": b"x"})
    folder(models / "walker2d" / "dt_gym-experiment-walker2d-medium-222", lm_config(env="walker2d", init_reg=0.1),
           {"model_1.pt": b"x", "train_state.pt": b"x"})                  # other flags: does not count
    assert [s for s, _ in sweep.plan(lm, [])] == ["done", "new"]
    folder(models / "walker2d" / "dt_gym-experiment-walker2d-medium-333", lm_config(env="walker2d"),
           {"model_1.pt": b"x", "train_state.pt": {"iteration": 1}})
    states = sweep.plan(lm, [])
    assert [s for s, _ in states] == ["done", "partial"] and states[1][1][-1] == "--resume"

    def multi_config(env):
        argv = sweep.to_argv({**multi["fixed"], "selected_training": env})
        return multi_signature(multi_parser().parse_args(argv))

    folder(tmp_path / "ck" / "multi" / "gym-experiment-multi-expert-444", {**multi_config("hopper"), "seed": 7},
           {"train_state.pt": {"iteration": 2}})
    folder(tmp_path / "ck" / "multi" / "gym-experiment-multi-expert-555", {**multi_config("walker2d"), "seed": 8},
           {"train_state.pt": {"iteration": 1}})
    states = sweep.plan(multi, [])
    assert [s for s, _ in states] == ["done", "partial"] and states[1][1][-1] == "--resume"

    # a half-done run that a process started by hand is training (it holds its folder's lock) is running, not
    # resumed a second time; a filesystem without flock holds nothing
    half = tmp_path / "ck" / "multi" / "gym-experiment-multi-expert-555"
    taken, fd = sweep._take_lock(sweep.folder_lock_path(half))
    try:
        runs = sweep.plan_runs(multi, [])
        assert [r.state for r in runs] == ["done", "running"] and half.name in runs[1].found.note
    finally:
        os.close(fd)
    assert [s for s, _ in sweep.plan(multi, [])] == ["done", "partial"]
    import errno

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(sweep.fcntl, "flock", no_flock)
    assert sweep._lock_holder(sweep.folder_lock_path(half)) is None
    assert [s for s, _ in sweep.plan(multi, [])] == ["done", "partial"]


def test_local_run_two_processes_then_skip(tmp_path, hopper_data, capsys):
    grid = _grid(tmp_path, hopper_data)
    sweep.main(["run", str(grid), "--procs", "2", "--log_dir", str(tmp_path / "logs")])
    for seed in (1, 2):
        assert (tmp_path / "ck" / f"dt_medium_hopper_{seed}_K5" / "model_1.pt").is_file()
    capsys.readouterr()
    sweep.main(["run", str(grid), "--procs", "2", "--log_dir", str(tmp_path / "logs")])
    assert "2 finished (skipped)" in capsys.readouterr().out


def _interrupt_once_started(tmp_path, n: int, times: int):
    """From another thread: once commands 0..n-1 wrote their pid files, raise KeyboardInterrupt in the main thread
    (as Ctrl-C does) ``times`` times, 1 s apart."""
    import _thread
    import threading

    def interrupt():
        for _ in range(300):
            if all((tmp_path / f"pid{i}").is_file() for i in range(n)):
                break
            threading.Event().wait(0.1)
        for k in range(times):
            if k:
                threading.Event().wait(1.0)
            _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()


def test_interrupt_stops_the_running_commands(tmp_path, capsys):
    """Ctrl-C (here: KeyboardInterrupt raised in the launcher's thread) sends SIGINT to the running commands, waits
    for them and exits 130 with one line; the commands see the interrupt as on Ctrl-C in a terminal."""
    import os

    import pytest

    # the pid file is written inside the try: the interrupt, sent once it exists, always meets the handler
    script = ("import os, pathlib, sys, time\n"
              "try:\n    pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\n    time.sleep(60)\n"
              "except KeyboardInterrupt:\n"
              "    pathlib.Path(sys.argv[1] + '.stopped').write_text('SIGINT')\n    raise\n")
    cmds = [[sys.executable, "-c", script, str(tmp_path / f"pid{i}")] for i in range(3)]

    _interrupt_once_started(tmp_path, 2, times=1)
    with pytest.raises(sweep.Interrupted, match="stopped 2 running and 1 waiting runs; the same command resumes"):
        sweep.launch(cmds, [None, None], tmp_path / "logs", ["a", "b", "c"])
    for i in range(2):
        assert (tmp_path / f"pid{i}.stopped").read_text() == "SIGINT"
        pid = int((tmp_path / f"pid{i}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "pid2").exists()                                  # the waiting run never started
    assert "[stopped a]" in capsys.readouterr().out


def test_an_interrupt_while_a_run_is_being_started_counts_it_as_not_started(tmp_path):
    """Ctrl-C / SIGTERM while a run is being started (its state checked again before it starts) leaves it among the
    waiting runs of the summary and the message, not out of both."""
    import pytest

    cmds = [[sys.executable, "-c", "import time; time.sleep(60)"] for _ in range(3)]

    def recheck(i):
        if i == 1:
            raise KeyboardInterrupt
        return "new", cmds[i]

    report = sweep.new_report()
    with pytest.raises(sweep.Interrupted, match="stopped 1 running and 2 waiting runs"):
        sweep.launch(cmds, [None, None], tmp_path / "logs", ["a", "b", "c"], recheck=recheck, report=report)
    assert report["stopped"] == ["a"] and report["not_started"] == ["b", "c"]


def test_a_run_log_that_cannot_be_written_stops_the_launcher_naming_it(tmp_path):
    """A run's log that cannot be opened or written (a full disk; here a folder in its place) ended the launcher with
    an error naming no file, its runs left going and out of the summary. Now the log is named, the runs are stopped
    as on Ctrl-C, and the summary counts them (the same command resumes them)."""
    import pytest

    cmds = [[sys.executable, "-c", "import time; time.sleep(60)"] for _ in range(3)]
    (tmp_path / "logs" / "b.log").mkdir(parents=True)
    report = sweep.new_report()
    with pytest.raises(sweep.UserError) as e:
        sweep.launch(cmds, [None, None], tmp_path / "logs", ["a", "b", "c"], report=report)
    assert str(e.value) == (f"cannot write {tmp_path / 'logs' / 'b.log'}: it is a folder; stopped 1 running and 2 "
                            f"waiting runs; the same command resumes them")
    assert report["stopped"] == ["a"] and report["not_started"] == ["b", "c"]


def test_a_run_that_fails_with_its_logs_disk_full_stops_the_launcher_naming_the_log(tmp_path, monkeypatch, capsys):
    """A run whose log filled the disk stopped (its output could not be written) with its log cut short and no reason
    anywhere: 'FAILED (exit 1, see ...)', and the launcher started the next run into the same full disk. Now the
    launcher stops as on a log it cannot open, naming the log and the full disk."""
    import shutil
    from types import SimpleNamespace

    import pytest

    cmds = [[sys.executable, "-c", "import sys; sys.exit(1)"], [sys.executable, "-c", "import time; time.sleep(60)"]]
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1, used=1, free=0)
                        if str(p).startswith(str(tmp_path)) else real(p))
    report = sweep.new_report()
    with pytest.raises(sweep.UserError) as e:
        sweep.launch(cmds, [None], tmp_path / "logs", ["a", "b"], report=report)
    assert str(e.value) == (f"cannot write {tmp_path / 'logs' / 'a.log'}: no space left on the device (run a stopped "
                            f"with exit 1, its log cut short); stopped 0 running and 1 waiting runs; the same command "
                            f"starts them")
    assert report["failed"] == [("a", 1, str(tmp_path / "logs" / "a.log"))] and report["not_started"] == ["b"]
    assert "[end a] FAILED (exit 1" in capsys.readouterr().out


def test_failed_runs_exit_nonzero(tmp_path, capsys):
    spec = {"program": "experiment.py",
            "fixed": {"data_path": str(tmp_path / "none"), "outdir": "", "no_generate": True},
            "grid": {"seed": [1]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        sweep.main(["run", str(path), "--log_dir", str(tmp_path / "logs")])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("a failing run must make the launcher exit non-zero")
    assert "1 of 1 runs failed" in capsys.readouterr().err


def test_unknown_grid(capsys):
    import pytest

    for name in ("no_such_grid", "no_such_grid.yaml"):
        with pytest.raises(SystemExit) as e:
            sweep.main(["run", name])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"unknown grid '{name}': no file {name} or " in err
        assert f"{sweep.GRID_DIR / 'no_such_grid.yaml'}; known grids: " in err and ".yaml.yaml" not in err


def test_export_splits_null(tmp_path):
    paths = sweep.export_wandb(sweep.load_grid("pretraining_table1"), tmp_path)
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in paths}
    no_lm = docs["pretraining_table1-no-pretrained_lm"]
    with_lm = docs["pretraining_table1-pretrained_lm"]
    assert "pretrained_lm" not in no_lm["parameters"]
    assert with_lm["parameters"]["pretrained_lm"]["values"] == ["gpt2", "openai/imagegpt-small"]
    assert with_lm["method"] == "grid" and "${args_no_boolean_flags}" in with_lm["command"]
    assert with_lm["parameters"]["share_input_output_proj"] == {"value": True}


def _expect_error(capsys, argv) -> str:
    try:
        sweep.main(argv)
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError(f"{argv} must exit 2")
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_grid_files_and_flags(tmp_path, capsys):
    out = tmp_path / "sweeps"
    cases = {"scalar": ("program: experiment.py\nfixed: {env: hopper}\ngrid: {seed: 5}\n", "must be a list of values"),
             "empty": ("program: experiment.py\ngrid: {seed: []}\n", "empty list"),
             "noprog": ("program: nonexist.py\ngrid: {seed: [1]}\n", "program 'nonexist.py' not found"),
             "fixedlist": ("program: experiment.py\nfixed: [1]\ngrid: {seed: [1]}\n",
                           "'fixed' and 'grid', where given, are mappings")}
    for name, (text, msg) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        for argv in (["run", str(tmp_path / f"{name}.yaml"), "--dry_run"],
                     ["export", str(tmp_path / f"{name}.yaml"), "--out", str(out)]):
            assert msg in _expect_error(capsys, argv)
    (tmp_path / "binary.yaml").write_bytes(b"program: experiment.py\ngrid: {seed: [1, \xff]}\n")
    assert "not a text (UTF-8) file" in _expect_error(capsys, ["run", str(tmp_path / "binary.yaml"), "--dry_run"])
    assert not out.exists()
    assert "No closing quotation" in _expect_error(
        capsys, ["run", "generated_medium", "--extra", "--foo 'bar", "--dry_run"])
    assert "experiment.py: unrecognized arguments: --foo bar" in _expect_error(
        capsys, ["run", "generated_medium", "--extra", "--foo bar", "--dry_run"])
    for gpus in ("abc", "", "0,,1"):
        assert "--gpus" in _expect_error(capsys, ["run", "generated_medium", "--gpus", gpus, "--dry_run"])
    assert "must be at least 1" in _expect_error(capsys, ["run", "generated_medium", "--procs", "0", "--dry_run"])
    sweep.main(["run", "generated_medium", "--gpus", "0,1", "--dry_run"])   # valid ids pass
    out = capsys.readouterr().out
    assert "3 runs" in out
    assert out.splitlines()[0].split()[:2] == ["new", sys.executable]      # a command that can be pasted as it is


def test_runs_whose_lm_is_missing_are_blocked(tmp_path, capsys):
    """A grid run whose --pretrained_lm cannot be found here is listed as blocked and not started (one line saying
    why, exit 2), instead of failing in its log; a run whose LM folder exists is planned as usual."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=1, n_positions=16, vocab_size=10, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "tiny_lm")
    spec = {"program": "experiment.py",
            "fixed": {"outdir": str(tmp_path / "ck"), "max_iters": 1, "seed": 1},
            "grid": {"pretrained_lm": [None, str(tmp_path / "tiny_lm"), "no_such_lm"]}}
    done = tmp_path / "ck" / "dt_medium_hopper_1"
    done.mkdir(parents=True)
    (done / "model_1.pt").write_bytes(b"x")
    assert [s for s, _ in sweep.plan(spec, [])] == ["done", "new", "blocked"]
    path = tmp_path / "g.yaml"
    spec["grid"]["pretrained_lm"] = [None, "no_such_lm"]
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    err = _expect_error(capsys, ["run", str(path), "--log_dir", str(tmp_path / "logs")])
    assert "1 runs not started: their language model is not available here" in err
    assert not (tmp_path / "logs").exists()


def test_extra_takes_a_lone_flag(tmp_path, capsys):
    """--extra "--max_iters=3" (one flag, no space) or --extra --save_model is a value for the runs, not an option
    of the launcher; with "=" forms the half-done runs are still found and resumed."""
    grid = _grid(tmp_path, tmp_path / "data")
    _half_done(tmp_path / "ck" / "dt_medium_hopper_2_K5")
    for extra in (["--extra", "--max_iters=3"], ["--ext", "--max_iters=3"], ["--extra=--max_iters=3"]):
        sweep.main(["run", str(grid), *extra, "--dry_run"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("new ") and lines[0].endswith("--seed 1 --max_iters=3")
        assert lines[1].startswith("partial ") and lines[1].endswith("--seed 2 --max_iters=3 --resume")
    sweep.main(["run", str(grid), "--extra", "--save_model", "--dry_run"])
    assert capsys.readouterr().out.splitlines()[0].endswith("--seed 1 --save_model")


def test_second_interrupt_kills_the_running_commands(tmp_path, capsys):
    """A second Ctrl-C (or SIGTERM) while the launcher waits for its commands to stop kills them at once: the
    launcher never exits leaving a run behind that still trains and writes."""
    import os
    import time

    import pytest

    script = ("import os, pathlib, signal, sys, time\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"                 # a run slow to stop
              "pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\n"
              "time.sleep(60)\n")
    cmds = [[sys.executable, "-c", script, str(tmp_path / f"pid{i}")] for i in range(2)]

    _interrupt_once_started(tmp_path, 2, times=2)
    t0 = time.time()
    try:
        with pytest.raises(sweep.Interrupted, match="stopped 2 running"):
            sweep.launch(cmds, [None, None], tmp_path / "logs", ["a", "b"])
    except KeyboardInterrupt:
        for i in range(2):
            os.kill(int((tmp_path / f"pid{i}").read_text()), 9)
        pytest.fail("the second interrupt escaped the launcher, leaving its commands running")
    assert time.time() - t0 < 25
    for i in range(2):
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / f"pid{i}").read_text()), 0)
    out = capsys.readouterr().out
    assert "[stopped a]" in out and "[stopped b]" in out


def test_lm_runs_the_newest_decides(tmp_path, monkeypatch, capsys):
    """lm_cotraining/experiment.py: the launcher looks at the run that --resume continues, the newest of the same
    flags (an older finished one does not hide it), also when that run's config.json is missing (its flags are then
    read from its train_state.pt, as --resume does); --dry_run prints its command ending with --resume."""
    import json
    import os
    import time

    import torch

    from decision_transformer.cli_lm import lm_cotraining_parser
    from decision_transformer.run import resume_signature

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "_lm_problem", lambda name: None)
    spec = {"program": "lm_cotraining/experiment.py", "name": "lm",
            "fixed": {"pretrained_lm": "checkpoints/ChibiT", "max_iters": 2, "outdir": "rel"},
            "grid": {"seed": [1]}}
    cfg = resume_signature(lm_cotraining_parser().parse_args(sweep.to_argv({**spec["fixed"], "seed": 1})))

    def folder(exp_id, iteration, age, config=True):
        d = tmp_path / "rel" / f"dt_gym-experiment-hopper-medium-{exp_id}"
        d.mkdir(parents=True)
        if config:
            (d / "config.json").write_text(json.dumps(cfg))
        torch.save({"iteration": iteration, "config": cfg}, d / "train_state.pt")
        for i in range(iteration + 1):
            (d / f"model_{i}.pt").write_bytes(b"x")
        for f in d.iterdir():
            os.utime(f, (time.time() - age, time.time() - age))
        return d

    folder(111111, 2, 100)
    assert [s for s, _ in sweep.plan(spec, [])] == ["done"]
    folder(222222, 1, 10)                                   # started again later, stopped half-way
    assert [s for s, _ in sweep.plan(spec, [])] == ["partial"]
    folder(333333, 1, 1, config=False)
    sweep.main(["run", str(_write(tmp_path, spec)), "--extra", "--max_iters=2", "--dry_run"])
    out = capsys.readouterr()
    assert out.out.startswith("partial ") and out.out.splitlines()[0].endswith("--max_iters=2 --resume")
    assert "dt_gym-experiment-hopper-medium-333333/config.json is missing or not JSON" in out.err


def _write(tmp_path, spec):
    import yaml

    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if k != "name"}))
    return path


def test_two_grids_of_one_name_keep_their_logs_apart(tmp_path):
    """Two grid files of the same name sharing a --log_dir: the second one's logs get the grid file's hash, so
    neither appends to the other's; each grid keeps appending to its own logs."""
    specs = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        path = tmp_path / d / "g.yaml"
        path.write_text("program: experiment.py\ngrid: {seed: [1]}\n")
        specs.append(sweep.load_grid(str(path)))
    logs = tmp_path / "logs"
    cmd = [[sys.executable, "-c", "print('hi')"]]
    first = sweep._log_prefix(specs[0], logs)
    assert first == "g"
    assert sweep.launch(cmd, [None], logs, [f"{first}_000"], grid=specs[0]["path"]) == 0
    assert sweep._log_prefix(specs[0], logs) == "g"
    second = sweep._log_prefix(specs[1], logs)
    assert second.startswith("g-") and second == sweep._log_prefix(specs[1], logs)
    assert sweep.launch(cmd, [None], logs, [f"{second}_000"], grid=specs[1]["path"]) == 0
    assert sweep._log_prefix(specs[0], logs) == "g" and sweep._log_prefix(specs[1], logs) == second
    header = (logs / "g_000.log").read_text().splitlines()[0]
    assert header.startswith("=== ") and f"[grid {specs[0]['path']}]" in header
    assert (logs / f"{second}_000.log").read_text().count("=== ") == 1


def test_gpus_are_checked_against_the_machine(tmp_path, hopper_data, capsys, monkeypatch):
    """--gpus on a machine without them (or an id beyond its count) stops before any run starts; a dry run plans."""
    grid = str(_grid(tmp_path, hopper_data))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    err = _expect_error(capsys, ["run", grid, "--gpus", "0,1", "--log_dir", str(tmp_path / "logs")])
    assert "torch sees no CUDA device on this machine; use --procs N" in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = _expect_error(capsys, ["run", grid, "--gpus", "1,2,3,3", "--log_dir", str(tmp_path / "logs")])
    assert err == "error: --gpus 1,2,3,3: no GPU 2, 3 here; this machine has 2 (ids 0-1)"
    assert not (tmp_path / "logs").exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit):
        sweep.main(["run", grid, "--gpus", "0", "--log_dir", str(tmp_path / "logs")])
    assert capsys.readouterr().out == ""              # refused before the grid is planned and listed
    assert sweep.main(["run", grid, "--gpus", "0", "--dry_run"]) == 0


# ---- locks, run identity, invalid points, WandB resume, export, the final summary ----------------------------------

def _fails_with(capsys, argv) -> tuple[str, list[str]]:
    """Run the launcher where it must exit 2 with one error line; returns that line and the lines it printed."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err.strip(), out.splitlines()


def _run_folder_lock(tmp_path, seed: int):
    return tmp_path / "ck" / f".dt_medium_hopper_{seed}_K5.lock"


def test_a_run_locked_by_another_launcher_is_left_to_it(tmp_path, hopper_data, capsys):
    """A run whose lock another launcher holds (the same grid started twice, or a relaunch while an earlier
    launcher's run still trains) is listed as running elsewhere and not started: its folder is left alone; the other
    runs go on, the launcher exits 0 and its summary counts it."""
    grid = _grid(tmp_path, hopper_data)
    taken, fd = sweep._take_lock(_run_folder_lock(tmp_path, 1))   # "another launcher": an open file description
    assert taken and fd is not None
    try:
        capsys.readouterr()
        sweep.main(["run", str(grid), "--dry_run"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("running ") and out[1].startswith("new ")
        assert "1 running elsewhere (another process holds their lock)" in out[2]
        assert out[3].startswith(f"running: {tmp_path / 'ck' / 'dt_medium_hopper_1_K5'}: another process (pid "
                                 f"{os.getpid()}, since ")
        assert sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs")]) == 0
        out = capsys.readouterr().out
        assert not (tmp_path / "ck" / "dt_medium_hopper_1_K5").exists()
        assert (tmp_path / "ck" / "dt_medium_hopper_2_K5" / "model_1.pt").is_file()
        assert out.splitlines()[-1] == ("summary of 2 runs: 1 done, 0 failed, 0 skipped (finished before), "
                                        "1 running elsewhere")
    finally:
        os.close(fd)
    assert sweep._lock_holder(_run_folder_lock(tmp_path, 2)) is None    # released when its run ended


def test_launch_takes_each_runs_lock_and_checks_it_again(tmp_path, capsys):
    """launch: a command whose lock is held elsewhere is skipped; the lock of a started command is held while it runs
    (another process cannot take it) and passed on to the command (a run whose launcher is killed keeps it until it
    ends); a run found finished once its lock is taken (by another launcher, since the plan)
    is not started; the report names what happened."""
    probe = ("import fcntl, os, sys\n"                                  # exit 8: the lock is not passed on to it
             "own = not os.path.isdir('/proc/self/fd') or any(os.path.realpath('/proc/self/fd/' + f) == "
             "os.path.realpath(sys.argv[1]) for f in os.listdir('/proc/self/fd'))\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError:\n    sys.exit(0 if own else 8)\n"
             "sys.exit(7)\n")                                            # exit 7: the lock was free
    locks = [tmp_path / "l" / f".{i}.lock" for i in range(3)]
    cmds = [[sys.executable, "-c", probe, str(lock)] for lock in locks]
    taken, fd = sweep._take_lock(locks[0])
    report = sweep.new_report()
    rechecked = []

    def recheck(i):
        rechecked.append(i)
        return ("done" if i == 2 else "new"), cmds[i]

    try:
        assert sweep.launch(cmds, [None], tmp_path / "logs", ["a", "b", "c"], locks=locks, recheck=recheck,
                            report=report) == 0
    finally:
        os.close(fd)
    assert report["elsewhere"] == ["a"] and report["done"] == ["b"] and report["skipped"] == [("c", "done")]
    assert rechecked == [1, 2] and not report["failed"]
    assert not (tmp_path / "logs" / "a.log").exists() and not (tmp_path / "logs" / "c.log").exists()
    out = capsys.readouterr().out
    assert "[skip a] running elsewhere: another process (pid" in out and "[skip c] now done" in out
    assert not any(sweep._lock_holder(lock) for lock in locks)         # all three free again


def test_runs_stop_when_their_launcher_is_killed(tmp_path):
    """A launcher killed with SIGKILL cannot stop its runs itself: they get SIGINT from the system (Linux) and stop
    as on Ctrl-C, instead of training on beside a relaunch; the run held its lock until then."""
    import signal
    import subprocess
    import threading

    import pytest

    from conftest import ROOT

    if not sys.platform.startswith("linux"):
        pytest.skip("the death signal is Linux's")
    pid_file, lock = tmp_path / "pid", tmp_path / ".run.lock"
    # the pid file is written inside the try: the interrupt, sent once it exists, always meets the handler
    script = ("import os, pathlib, sys, time\n"
              "try:\n    pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\n    time.sleep(60)\n"
              "except KeyboardInterrupt:\n"
              "    pathlib.Path(sys.argv[1] + '.stopped').write_text('SIGINT')\n    raise\n")
    launcher = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pathlib import Path\n"
                f"from decision_transformer import sweep\n"
                f"sweep.launch([[sys.executable, '-c', {script!r}, {str(pid_file)!r}]], [None], "
                f"Path({str(tmp_path / 'logs')!r}), ['a'], locks=[Path({str(lock)!r})])\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    child = None
    try:
        for _ in range(300):
            if pid_file.is_file() and pid_file.read_text():
                break
            threading.Event().wait(0.1)
        child = int(pid_file.read_text())
        assert sweep._lock_holder(lock) is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(100):
            if (tmp_path / "pid.stopped").is_file() and sweep._lock_holder(lock) is None:
                break
            threading.Event().wait(0.1)
        assert (tmp_path / "pid.stopped").read_text() == "SIGINT"
        assert sweep._lock_holder(lock) is None
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and not (tmp_path / "pid.stopped").is_file():
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_no_two_shipped_grids_share_a_run_folder(tmp_path, monkeypatch):
    """Each run of the bundled grids has a run folder (lock) of its own: a grid never takes another grid's run for
    its own, finished or half-done (the random-init seed-666 medium runs of merging_single_task and
    pretraining_table1 were one folder)."""
    monkeypatch.chdir(tmp_path)
    owner = {}
    for path in sorted(sweep.GRID_DIR.glob("*.yaml")):
        spec = sweep.load_grid(str(path))
        for params in sweep.expand(spec):
            found = sweep.inspect_run(str(sweep.ROOT / spec["program"]), sweep.to_argv(params))
            assert found.lock is not None, (path.stem, params)
            key = found.lock.resolve()
            assert key not in owner, f"{path.stem} {params} and {owner.get(key)} share {found.target}"
            owner[key] = (path.stem, params)
    assert len(owner) == sum(len(sweep.expand(sweep.load_grid(str(p)))) for p in sweep.GRID_DIR.glob("*.yaml"))


def _config_of(argv: list[str], **extra) -> dict:
    """The config.json an experiment.py run of ``argv`` writes (its flags, and what the run adds)."""
    import json

    from decision_transformer.cli import experiment_parser

    return {**json.loads(json.dumps(vars(experiment_parser().parse_args(argv)), default=str)), **extra}


def test_a_folder_of_a_run_with_other_flags_is_not_this_run(tmp_path, hopper_data, capsys):
    """A plain experiment.py run folder made with other flags (outside those a resumed run may change) is neither
    skipped as finished nor resumed: it is listed as mismatch with the differing flags, not started, left as it is,
    and the launcher exits 2; a grid two of whose points are one run folder is refused before anything starts."""
    import json

    grid = _grid(tmp_path, hopper_data)
    spec = sweep.load_grid(str(grid))
    d1, d2 = tmp_path / "ck" / "dt_medium_hopper_1_K5", tmp_path / "ck" / "dt_medium_hopper_2_K5"
    argv1 = sweep.to_argv({**spec["fixed"], "seed": 1})
    d1.mkdir(parents=True)
    (d1 / "model_1.pt").write_bytes(b"x")
    (d1 / "config.json").write_text(json.dumps(_config_of(argv1 + ["--learning_rate", "0.5"], exp_id=1)))
    _half_done(d2)
    (d2 / "config.json").write_text(json.dumps(_config_of(sweep.to_argv({**spec["fixed"], "seed": 2, "dropout": 0.3}))))
    assert [s for s, _ in sweep.plan(spec, [])] == ["mismatch", "mismatch"]
    (d1 / "config.json").write_text(json.dumps(_config_of(argv1 + ["--num_eval_episodes", "3"], exp_id=1)))
    assert [s for s, _ in sweep.plan(spec, [])] == ["done", "mismatch"]        # a flag a resumed run may change
    # a dry run exits as the run would
    assert _expect_error(capsys, ["run", str(grid), "--dry_run"]) == \
        "error: 1 runs not started: their run folder holds a run made with other flags (see above)"
    err, out = _fails_with(capsys, ["run", str(grid), "--log_dir", str(tmp_path / "logs")])
    assert err == "error: 1 runs not started: their run folder holds a run made with other flags (see above)"
    assert any(line.startswith(f"mismatch: {d2} holds a run made with other flags: --dropout 0.1 (the run: 0.3); "
                               f"move it away") for line in out)
    assert out[-1] == "summary of 2 runs: 0 done, 0 failed, 1 skipped (finished before), 1 made with other flags"
    assert not (tmp_path / "logs").exists() and sorted(p.name for p in d2.iterdir()) == ["config.json",
                                                                                        "train_state.pt"]
    raw = yaml.safe_load(grid.read_text())
    raw["grid"] = {"seed": [1], "learning_rate": [0.0001, 0.001]}
    grid.write_text(yaml.safe_dump(raw))
    err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
    assert ("runs 1 and 2 (--learning_rate 0.0001 / 0.001) are one and the same run, " f"{d1}: each would" in err)


def test_an_invalid_grid_point_does_not_stop_the_others(tmp_path, hopper_data, capsys):
    """A point whose flags its program rejects (K: [5, abc]) is listed as invalid with the program's message; the
    other points run; the launcher exits 2 at the end and its summary counts both. Logs are named by the run's
    folder, so that a point added to the grid does not move another run's log."""
    import re

    grid = _grid(tmp_path, hopper_data)
    spec = yaml.safe_load(grid.read_text())
    spec["grid"] = {"seed": [1], "K": [5, "abc"]}
    grid.write_text(yaml.safe_dump(spec))
    err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
    assert err == "error: 1 runs not started: their flags are invalid (see above)"
    err, out = _fails_with(capsys, ["run", str(grid), "--log_dir", str(tmp_path / "logs")])
    assert err == "error: 1 runs not started: their flags are invalid (see above)"
    assert out[0].startswith("new ") and out[1].startswith("invalid ")
    assert "1 new, 1 with invalid flags (not started)" in out[2]
    assert out[3] == "invalid: --K abc --seed 1: experiment.py: argument --K: invalid int value: 'abc' (see " \
                     "experiment.py --help)"
    assert out[-1] == "summary of 2 runs: 1 done, 0 failed, 0 skipped (finished before), 1 invalid"
    assert (tmp_path / "ck" / "dt_medium_hopper_1_K5" / "model_1.pt").is_file()
    logs = [p.name for p in (tmp_path / "logs").iterdir()]
    assert len(logs) == 1 and re.fullmatch(r"tiny_[0-9a-f]{8}\.log", logs[0])
    spec["grid"] = {"seed": [0, 1], "K": [5]}
    grid.write_text(yaml.safe_dump(spec))
    runs = sweep.plan_runs(sweep.load_grid(str(grid)), [])
    assert f"tiny_{sweep._run_key(runs[1])}.log" == logs[0]             # seed 1's log, also as the second point


def _saved_model_run(tmp_path, name: str, state_iteration: int, **fixed) -> tuple[dict, Path]:
    """A 2-iteration --save_model hopper grid of one point, whose run folder holds model_2.pt, its config and a
    training state at ``state_iteration``; returns (spec, run folder)."""
    import json

    spec = {"program": "experiment.py", "name": name,
            "fixed": {"outdir": "ck", "K": 5, "max_iters": 2, "save_model": True, **fixed, "seed": 1},
            "grid": {"env": ["hopper"]}}
    d = tmp_path / "ck" / "dt_medium_hopper_1_K5"
    _half_done(d, state_iteration)
    (d / "model_2.pt").write_bytes(b"x")
    (d / "config.json").write_text(json.dumps(_config_of(sweep.to_argv({**spec["fixed"], "env": "hopper"}),
                                                         exp_prefix="gym-experiment-hopper-medium-123")))
    return spec, d


def test_a_run_killed_after_its_last_checkpoint_is_resumed(tmp_path, monkeypatch):
    """A run stopped after model_{max_iters}.pt but before its training state (which follows the iteration's best
    model) or before its last model (--save_model, --save_mode last) is resumed, not skipped as finished."""
    monkeypatch.chdir(tmp_path)
    spec, d = _saved_model_run(tmp_path, "l2", 1)
    states = sweep.plan(spec, [])
    assert [s for s, _ in states] == ["partial"] and states[0][1][-1] == "--resume"
    _half_done(d, 2)                                                          # the last model is still missing
    assert [s for s, _ in sweep.plan(spec, [])] == ["partial"]
    (tmp_path / "models" / "hopper").mkdir(parents=True)
    (tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-123.pt").write_bytes(b"x")
    assert [s for s, _ in sweep.plan(spec, [])] == ["done"]
    spec["fixed"]["save_mode"] = "best"                                       # written before the training state
    (tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-123.pt").unlink()
    assert [s for s, _ in sweep.plan(spec, [])] == ["done"]


class _FakeWandb:
    """A stand-in for the wandb module: records init's arguments and the logged rows."""

    def __init__(self):
        self.inits, self.rows = [], []

    def init(self, **kwargs):
        import types

        self.inits.append(kwargs)
        rows = self.rows

        def log(row, step=None):
            rows.append((dict(row), step))
        return types.SimpleNamespace(id=kwargs.get("id"), log=log, finish=lambda: None)


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch, hopper_data):
    """-w: the run's WandB id is recorded (config.json, training state); --resume continues that WandB run
    (resume="allow") instead of starting one whose steps restart at 0, and every row carries its iteration, logged
    as the WandB step."""
    import json

    from decision_transformer.cli import experiment_parser
    from decision_transformer.run import run_experiment

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    base = ["--data_path", str(hopper_data), "--outdir", "ck", "--embed_dim", "16", "--n_layer", "1", "--K", "5",
            "--batch_size", "4", "--num_steps_per_iter", "2", "--num_eval_episodes", "1", "--device", "cpu", "-w"]
    run_experiment(experiment_parser().parse_args(base + ["--max_iters", "1"]))
    run_experiment(experiment_parser().parse_args(base + ["--max_iters", "2", "--resume"]))
    first, second = fake.inits
    assert isinstance(first["id"], str) and first["id"] and "resume" not in first
    assert second["id"] == first["id"] and second["resume"] == "allow"
    assert [(row["iteration"], step) for row, step in fake.rows] == [(1, 1), (2, 2)]
    d = tmp_path / "ck" / "dt_medium_hopper_666_K5"
    assert json.loads((d / "config.json").read_text())["wandb_run_id"] == first["id"]
    assert torch.load(d / "train_state.pt", weights_only=True)["config"]["wandb_run_id"] == first["id"]


def test_wandb_rows_logged_before_a_resume_are_not_sent_again(tmp_path, monkeypatch):
    """A resumed WandB run is at the step after its last row: a row of an iteration redone after the resume (logged
    before the run stopped, but not saved in its training state) is not sent again (WandB would refuse it); the id
    is kept through a resumed part run without -w."""
    import types

    from decision_transformer.runlog import RunLogger

    fake = _FakeWandb()
    init = fake.init
    fake.init = lambda **kw: types.SimpleNamespace(**{**vars(init(**kw)), "step": 3})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    RunLogger(tmp_path, {"a": 1}, use_wandb=True).finish()
    wid = fake.inits[0]["id"]
    RunLogger(tmp_path, {"a": 1}, resume=True, resume_after=1).finish()      # without -w: the id stays recorded
    logger = RunLogger(tmp_path, {"a": 1}, use_wandb=True, resume=True, resume_after=1)
    assert fake.inits[1]["id"] == wid and fake.inits[1]["resume"] == "allow"
    for it in (2, 3, 4):
        logger.log({"x": it}, it)
    assert fake.rows == [({"x": 3, "iteration": 3}, 3), ({"x": 4, "iteration": 4}, 4)]


def test_export_lists_and_null_only_values(tmp_path, capsys):
    """A WandB agent passes a value as one --flag=value argument: a one-element list is exported as its element, a
    list of several values is refused naming the flag (nothing written); a grid parameter whose only value is null
    is left out (no sweep with an empty list of values)."""
    spec = {"program": "experiment.py", "fixed": {"include": ["attn"], "outdir": "ck"},
            "grid": {"seed": [1, 2], "pretrained_lm": [None], "exclude": [["mlp"], ["ln"]]}}
    path = tmp_path / "ex.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweeps"
    paths = sweep.export_wandb(sweep.load_grid(str(path)), out)
    assert [p.name for p in paths] == ["ex.yaml"]
    params = yaml.safe_load(paths[0].read_text())["parameters"]
    assert params == {"include": {"value": "attn"}, "outdir": {"value": "ck"}, "seed": {"values": [1, 2]},
                      "exclude": {"values": ["mlp", "ln"]}}
    spec["fixed"]["include"] = ["attn", "mlp"]
    path.write_text(yaml.safe_dump(spec))
    err = _expect_error(capsys, ["export", str(path), "--out", str(tmp_path / "other")])
    assert err.startswith("error: grid ex: include = ['attn', 'mlp'] cannot be exported: a WandB agent passes a list "
                          "as one argument")
    assert not (tmp_path / "other").exists()


def test_shipped_grids_name_the_projects_folders_from_a_sub_folder(monkeypatch):
    """Started inside a project sub-folder, a shipped grid's relative outdir is the project's folder, as the training
    scripts' defaults are (so the analyses find its runs); from the root it stays as written."""
    root = Path(sweep.ROOT)
    monkeypatch.chdir(root)
    assert sweep.load_grid("merging_single_task")["fixed"]["outdir"] == "checkpoints/merging"
    monkeypatch.chdir(root / "lm_cotraining")
    assert sweep.load_grid("merging_single_task")["fixed"]["outdir"] == "../checkpoints/merging"
    assert sweep.load_grid("pretraining_table1")["fixed"]["outdir"] == "../checkpoints"


def test_shipped_grids_name_the_projects_models_from_a_sub_folder(monkeypatch):
    """From a project sub-folder a shipped grid's local LM folder and k-means cache are the project's too; Hub names
    (gpt2, openai/imagegpt-small) and null stay as written, in the fixed flags and in the grid's lists."""
    root = Path(sweep.ROOT)
    monkeypatch.chdir(root / "analysis")
    fixed = sweep.load_grid("merging_chibit")["fixed"]
    assert fixed["pretrained_lm"] == "../checkpoints/ChibiT"
    assert fixed["kmeans_cache"] == "../kmeans_cache/chibi_1000.pt"
    assert sweep.load_grid("pretraining_table1")["grid"]["pretrained_lm"] == [None, "gpt2", "openai/imagegpt-small"]
    monkeypatch.chdir(root)
    assert sweep.load_grid("merging_chibit")["fixed"]["pretrained_lm"] == "checkpoints/ChibiT"


def test_export_writes_the_grids_paths_as_written_from_any_folder(tmp_path, monkeypatch):
    """A WandB agent runs the exported program from the project's root: the export's paths are the grid's own,
    wherever `export` itself was run."""
    monkeypatch.chdir(Path(sweep.ROOT) / "analysis")
    sweep.main(["export", "merging_chibit", "--out", str(tmp_path)])
    params = yaml.safe_load((tmp_path / "merging_chibit.yaml").read_text())["parameters"]
    assert params["pretrained_lm"] == {"value": "checkpoints/ChibiT"}
    assert params["kmeans_cache"] == {"value": "kmeans_cache/chibi_1000.pt"}
    sweep.main(["export", "pretraining_k1", "--out", str(tmp_path)])
    for path in tmp_path.glob("pretraining_k1*.yaml"):
        assert yaml.safe_load(path.read_text())["parameters"]["outdir"] == {"value": "checkpoints"}
    assert len(list(tmp_path.glob("pretraining_k1*.yaml"))) == 2


def test_other_programs_flags_are_checked_by_their_parser(tmp_path, capsys):
    """A grid of a script other than the training ones (data, Fisher, analysis) has its flags checked by the script's
    own parser: a rejected value is an invalid point and the dry run exits 2, as the run would; a program that is
    not one of the project's Python scripts is refused."""
    grid = tmp_path / "gen.yaml"
    grid.write_text(yaml.safe_dump({"program": "data/generate_datasets.py", "fixed": {"dataset": "medium"},
                                    "grid": {"env": ["hopper", "nope"]}}))
    runs = sweep.plan_runs(sweep.load_grid(str(grid)), [])
    assert [r.state for r in runs] == ["new", "invalid"]
    assert "argument --env: invalid choice: 'nope'" in runs[1].found.note
    assert runs[1].found.note.startswith("generate_datasets.py: ")
    err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
    assert err == "error: 1 runs not started: their flags are invalid (see above)"
    grid.write_text(yaml.safe_dump({"program": "precompute_fisher.py", "fixed": {"bogus": 1}}))
    err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
    assert "precompute_fisher.py" in err and ("--model" in err or "--bogus" in err)
    # a script of the user's own make is not run while the grid is planned: listed new, its flags unchecked
    mine = Path(sweep.ROOT) / f"tmp_sweep_user_script_{os.getpid()}.py"
    marker = tmp_path / "ran"
    mine.write_text(f"import sys\nopen({str(marker)!r}, 'w').write('top level')\n"
                    "def main():\n    pass\nif __name__ == '__main__':\n    main()\n")
    try:
        grid.write_text(yaml.safe_dump({"program": mine.name, "grid": {"lr": [0.1, 0.01]}}))
        assert [r.state for r in sweep.plan_runs(sweep.load_grid(str(grid)), [])] == ["new", "new"]
        assert not marker.exists()
    finally:
        mine.unlink()
    for program in ("/etc/passwd", "README.md"):
        grid.write_text(yaml.safe_dump({"program": program, "fixed": {}}))
        err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
        assert err.endswith("is not one of the project's Python scripts (a .py file below "
                            f"{sweep.ROOT}, such as experiment.py)")


def test_a_run_trained_by_another_process_is_refused_by_a_hand_started_one(tmp_path, hopper_data, capsys):
    """experiment.py takes the same lock as the launcher: a second start of a run that another process (a launcher,
    or the same command in another shell) is training stops with one line before it writes anything, and the lock is
    free again once a run ends."""
    from conftest import fails, load_script

    argv = ["--data_path", str(hopper_data), "--outdir", str(tmp_path / "ck"), "--embed_dim", "16", "--n_layer", "1",
            "--K", "5", "--batch_size", "4", "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes",
            "1", "--device", "cpu", "--seed", "3"]
    lock = sweep.inspect_run(str(sweep.ROOT / "experiment.py"), argv).lock
    run_dir = tmp_path / "ck" / "dt_medium_hopper_3_K5"
    assert lock == tmp_path / "ck" / f".{run_dir.name}.lock"
    experiment = load_script("experiment.py")
    taken, fd = sweep._take_lock(lock)                       # "another process": another open file description
    assert taken and fd is not None
    try:
        msg = fails(experiment.main, argv, capsys)
        assert msg.startswith("error: experiment.py: this run is being trained by another process: another process "
                              f"(pid {os.getpid()}, since ") and f"holds {lock}" in msg, msg
        assert not run_dir.exists()                            # nothing written, nothing set aside
        # --resume while that process is still in its first iteration: not "nothing to resume"
        msg = fails(experiment.main, [*argv, "--resume"], capsys)
        assert msg.startswith("error: nothing to resume yet: this run is being trained by another process: another "
                              f"process (pid {os.getpid()}, since ") and "has not finished its first iteration" in msg
    finally:
        os.close(fd)
    experiment.main(argv)
    assert (run_dir / "model_1.pt").is_file() and sweep._lock_holder(lock) is None
    taken, fd = sweep._take_lock(lock)
    try:                                                       # --resume of the finished run: refused the same way
        assert "being trained by another process" in fails(experiment.main, [*argv, "--resume"], capsys)
    finally:
        os.close(fd)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["config.json", "metrics.jsonl", "model_0.pt",
                                                                "model_1.pt", "train_state.pt"])


def test_the_launcher_passes_its_lock_to_the_run(tmp_path, monkeypatch):
    """A run the launcher starts finds its lock held through the launcher's descriptor (``DT_RUN_LOCK_FD``) and
    trains; a descriptor of another file, or none, is not mistaken for it."""
    from decision_transformer.cli import experiment_parser

    a = sweep._parse(experiment_parser(), "experiment.py", ["--outdir", str(tmp_path / "ck"), "--seed", "4"])
    lock = sweep.run_lock_path("experiment.py", a)
    taken, fd = sweep._take_lock(lock)
    other = tmp_path / "other.lock"
    other.write_text("")
    try:
        monkeypatch.setenv(sweep.LOCK_FD_ENV, str(fd))
        assert sweep._inherited_lock(lock) and not sweep._inherited_lock(other)
        with sweep.run_lock(lock, "experiment.py"):           # held through fd: no second lock is taken
            pass
        monkeypatch.setenv(sweep.LOCK_FD_ENV, "not a number")
        with pytest.raises(sweep.UserError, match="being trained by another process"):
            with sweep.run_lock(lock, "experiment.py"):
                pass
    finally:
        os.close(fd)


def test_a_bc_run_and_the_dt_run_of_the_same_flags_are_two_runs(tmp_path):
    """--model_type bc trains in bc_{dataset}_{env}_{seed}...: its lock and the launcher's view of it are its own,
    not the DT run's."""
    dt = ["--outdir", str(tmp_path / "ck"), "--seed", "4", "--K", "5"]
    prog = str(sweep.ROOT / "experiment.py")
    assert sweep.inspect_run(prog, dt).lock == tmp_path / "ck" / ".dt_medium_hopper_4_K5.lock"
    assert sweep.inspect_run(prog, [*dt, "--model_type", "bc"]).lock == tmp_path / "ck" / ".bc_medium_hopper_4_K5.lock"
    (tmp_path / "ck" / "dt_medium_hopper_4_K5").mkdir(parents=True)
    (tmp_path / "ck" / "dt_medium_hopper_4_K5" / "model_40.pt").write_bytes(b"")
    assert sweep.inspect_run(prog, [*dt, "--model_type", "bc"]).state == "new"


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(sweep.fcntl, "flock", no_flock)
    lock = tmp_path / ".run.lock"
    with sweep.run_lock(lock, "experiment.py"):
        pass
    assert capsys.readouterr().err == (f"warning: cannot lock {lock} (Function not implemented); nothing stops a "
                                       f"second process from training this run at the same time\n")


def test_resuming_drops_unreadable_metric_rows_and_says_so_unless_the_last_was_cut(tmp_path, capsys):
    """A last row cut short by a kill is dropped without a word; an unreadable row elsewhere is dropped with a
    warning naming its line, so that a resume never removes results silently."""
    from decision_transformer.runlog import RunLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2, "x": 0.')
    RunLogger(tmp_path, {}, resume=True, resume_after=2).finish()
    assert path.read_text() == '{"iteration": 1}\n' and "warning" not in capsys.readouterr().err
    path.write_text('{"iteration": 1}\nGARBAGE\n{"iteration": 2}\n{"iteration": 3}\n')
    RunLogger(tmp_path, {}, resume=True, resume_after=2).finish()
    assert path.read_text() == '{"iteration": 1}\n{"iteration": 2}\n'
    assert f"warning: {path}: dropped 1 unreadable line(s) on resuming (line 2)" in capsys.readouterr().err


def test_a_lock_file_that_cannot_be_opened_for_writing_still_locks(tmp_path, monkeypatch, capsys):
    """Another user's lock file (created 0644) in a shared folder cannot be opened read-write: the run trained
    unlocked, without a word. flock works on a read-only descriptor, so the lock is taken (and still refused to a
    second holder); a lock that cannot be opened at all is a warning."""
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text("")
    real_open = os.open

    def no_write(path, flags, *a):
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(sweep.os, "open", no_write)
    taken, fd = sweep._take_lock(lock)
    assert taken and fd is not None
    try:
        assert sweep._take_lock(lock) == (False, None)                       # a second process: refused
    finally:
        os.close(fd)
    monkeypatch.setattr(sweep.os, "open", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert sweep._take_lock(lock) == (True, None)
    assert "warning: cannot open the lock" in capsys.readouterr().err


def test_the_launcher_starts_from_inside_the_package_folder():
    """``python -m`` puts the working folder first on the import path: started from inside decision_transformer/, a
    module of the package named like one of Python's own (it was logging.py) would shadow it and the start crashed."""
    import os
    import subprocess

    root = Path(sweep.__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "decision_transformer.sweep", "run", "generated_medium", "--dry_run"],
                          cwd=root / "decision_transformer", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 runs:" in proc.stdout
    import sysconfig

    stdlib = {p.stem for p in Path(sysconfig.get_paths()["stdlib"]).iterdir()}
    assert not [p.name for p in (root / "decision_transformer").glob("*.py") if p.stem in stdlib - {"__init__"}]


def test_every_script_of_the_project_has_its_flags_checked():
    """Each of the project's scripts with a ``main`` (top level, data, analysis, MINE, benchmarks, checkpoints) is
    built as the launcher expects of its own scripts, so a grid of any of them has its flags checked by its parser."""
    root = Path(sweep.ROOT)
    scripts = [p for folder in ("", "data", "analysis", "mine", "benchmarks", "checkpoints", "lm_cotraining")
               for p in sorted((root / folder).glob("*.py")) if "def main(" in p.read_text()]
    assert len(scripts) > 10
    assert [p.relative_to(root).as_posix() for p in scripts if not sweep._own_script(p)] == []


def test_the_export_hint_quotes_a_path_with_spaces(tmp_path, capsys):
    """The printed `wandb sweep FILE` was not quoted: a grid under a folder with a space gave a command that fails."""
    import shlex

    spec = {"program": "experiment.py", "fixed": {"outdir": "ck"}, "grid": {"seed": [1, 2]}}
    path = tmp_path / "my grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sw eeps"
    sweep.main(["export", str(path), "--out", str(out)])
    said = capsys.readouterr().out
    assert f"`wandb sweep {shlex.quote(str(out / 'my grid.yaml'))}`" in said, said


def test_a_point_without_a_run_folder_is_locked_by_its_log(tmp_path, capsys):
    """A run of a script that writes no run folder (here a script of the user's own) is locked by its log's name and
    its flags in --log_dir: while another launcher holds it, a launch skips it as running elsewhere and does not start
    it; the same point with other --extra flags is another run and starts."""
    mine = Path(sweep.ROOT) / f"tmp_sweep_lock_script_{os.getpid()}.py"
    marker = tmp_path / "ran"
    mine.write_text(f"import sys\nopen({str(marker)!r}, 'a').write(' '.join(sys.argv[1:]) + ';')\n")
    grid = tmp_path / "mine.yaml"
    try:
        grid.write_text(yaml.safe_dump({"program": mine.name, "grid": {"lr": [0.1]}}))
        runs = sweep.plan_runs(sweep.load_grid(str(grid)), [])
        assert runs[0].found.lock is None
        lock = tmp_path / "logs" / f".mine_{sweep._run_key(runs[0])}-{sweep._argv_key(runs[0].argv)}.lock"
        taken, fd = sweep._take_lock(lock)
        assert taken and fd is not None
        try:
            sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs"), "--no_pin"])
            assert "running elsewhere" in capsys.readouterr().out and not marker.exists()
            assert sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs"), "--no_pin", "--extra",
                               "--seed 2"]) == 0
            assert marker.read_text() == "--lr 0.1 --seed 2;"
        finally:
            os.close(fd)
        assert sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs"), "--no_pin"]) == 0
        assert marker.read_text() == "--lr 0.1 --seed 2;--lr 0.1;"
    finally:
        mine.unlink()


def test_a_launcher_that_ignores_sigint_still_stops_on_it(tmp_path):
    """Started in the background by a script, the launcher inherits an ignored SIGINT; a SIGINT still stops it as
    Ctrl-C does: its running command stops, the waiting one is never started."""
    import signal
    import subprocess
    import threading

    from conftest import ROOT

    pid_file = tmp_path / "pid"
    script = ("import os, pathlib, sys, time\n"
              "try:\n    pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\n    time.sleep(60)\n"
              "except KeyboardInterrupt:\n"
              "    pathlib.Path(sys.argv[1] + '.stopped').write_text('SIGINT')\n    raise\n")
    cmds = [[sys.executable, "-c", script, str(pid_file)], [sys.executable, "-c", script, str(tmp_path / "second")]]
    launcher = (f"import signal, sys\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nsys.path.insert(0, {str(ROOT)!r})\n"
                f"from pathlib import Path\nfrom decision_transformer import sweep\n"
                f"try:\n    sweep.launch({cmds!r}, [None], Path({str(tmp_path / 'logs')!r}), ['a', 'b'])\n"
                f"except sweep.Interrupted:\n    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        for _ in range(300):
            if pid_file.is_file() and pid_file.read_text():
                break
            threading.Event().wait(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert (tmp_path / "pid.stopped").read_text() == "SIGINT" and not (tmp_path / "second").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_grid_of_the_wrong_shape_is_one_line_and_one_without_grid_is_one_run(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    for bad in ([1, 2], {"fixed": {"seed": 1}}, {"program": "experiment.py", "grid": [1]}):
        grid.write_text(yaml.safe_dump(bad))
        err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
        assert err == (f"error: {grid}: a grid needs a 'program' (a script's path); 'fixed' and 'grid', where given, "
                       f"are mappings of flags to values (a grid without 'grid' is one run of its fixed flags)")
    grid.write_text(yaml.safe_dump({"program": "experiment.py", "fixed": {"seed": 3, "outdir": str(tmp_path / "ck")}}))
    (run,) = sweep.plan_runs(sweep.load_grid(str(grid)), [])
    assert run.argv == ["--outdir", str(tmp_path / "ck"), "--seed", "3"] and run.state == "new"


def test_export_checks_each_points_flags_with_the_programs_parser(tmp_path, capsys):
    """A WandB agent would start every point of an exported sweep with its flags: a flag the program rejects is a
    one-line error naming the point, and no sweep file is written."""
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"program": "experiment.py", "fixed": {"K": 5},
                                    "grid": {"seed": [1], "bogus": [2]}}))
    err = _expect_error(capsys, ["export", str(grid), "--out", str(tmp_path / "out")])
    assert err == ("error: grid g: point 1 (--K 5 --bogus 2 --seed 1): experiment.py: unrecognized arguments: "
                   "--bogus 2 (see experiment.py --help)")
    assert not (tmp_path / "out").exists()
    grid.write_text(yaml.safe_dump({"program": "experiment.py", "fixed": {"K": 5}, "grid": {"seed": [1, 2]}}))
    assert sweep.main(["export", str(grid), "--out", str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["g.yaml"]


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_no_cut_yaml(tmp_path, monkeypatch):
    """``export`` wrote each YAML in place: a full disk left an empty or cut-short sweep config (which ``wandb sweep``
    then reads) and an error naming no file. Now each is written whole or not at all, and the error names it."""
    import errno
    from pathlib import Path

    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(sweep.UserError) as e:
        sweep.export_wandb(sweep.load_grid("pretraining_table1"), tmp_path)
    assert str(e.value).startswith("cannot write ") and str(e.value).endswith(".yaml: no space left on the device")
    assert str(tmp_path) in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_grid_mistakes_that_lost_or_doubled_runs_are_one_line(tmp_path, capsys, monkeypatch):
    """A key given twice in a grid file (YAML keeps the last: `seed: [1, 2]` ... `seed: [3]` planned one run, exit 0);
    an export of two points that are one run (a WandB sweep trained it twice, one over the other); `--extra --resume`
    (every new run failed, its error blaming the launcher's own lock)."""
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "g.yaml"
    grid.write_text("program: experiment.py\nfixed:\n  env: hopper\ngrid:\n  seed: [1, 2]\n  K: [5]\n  seed: [3]\n")
    err = _expect_error(capsys, ["run", str(grid), "--dry_run"])
    assert err == f"error: {grid}: 'seed' is given twice (lines 5 and 7): YAML would keep the last and drop the " \
                  f"first's values"
    grid.write_text("program: experiment.py\ngrid:\n  seed: [1]\ngrid:\n  K: [5]\n")
    assert "'grid' is given twice (lines 2 and 4)" in _expect_error(capsys, ["export", str(grid)])
    grid.write_text(yaml.safe_dump({"program": "experiment.py", "fixed": {"env": "hopper"}, "grid": {"seed": [1, 1]}}))
    err = _expect_error(capsys, ["export", str(grid), "--out", str(tmp_path / "out")])
    assert err.startswith("error: grid g: runs 1 and 2 (the same flags) are one and the same run, ") and \
        err.endswith("make them differ in a flag that names the run folder, or give them different --outdir values")
    assert not (tmp_path / "out").exists()
    grid.write_text(yaml.safe_dump({"program": "experiment.py", "fixed": {"env": "hopper"}, "grid": {"seed": [1, 2]}}))
    for extra in ("--resume", "--max_iters 1 --resume", "--resu"):
        err = _expect_error(capsys, ["run", str(grid), "--extra", extra])
        assert err.startswith(f"error: --extra {extra!r}: leave {extra.split()[-1]} out: the launcher resumes each "
                              f"run that stopped part way by itself"), err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "sweep_logs").exists()


def test_a_launcher_that_ignores_sigint_stops_on_it_while_planning(tmp_path, monkeypatch, capsys):
    """Started in the background (SIGINT ignored), the launcher took SIGINT only once it launched runs: one sent
    while it planned (seconds for a large grid) was lost, and it went on to run the whole grid."""
    import signal

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"program": "experiment.py", "fixed": {"env": "hopper",
                                                                          "outdir": str(tmp_path / "ck")},
                                    "grid": {"seed": [1, 2]}}))

    def planning(*a, **k):
        signal.raise_signal(signal.SIGINT)   # (arrives while the grid is planned)
        pytest.fail("the launcher planned on after a SIGINT")

    monkeypatch.setattr(sweep, "plan_runs", planning)
    monkeypatch.setattr(sweep, "launch", lambda *a, **k: pytest.fail("the launcher started runs"))
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as e:
            sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs")])
        assert e.value.code == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN   # as it was, once the launcher is done
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: interrupted")


def test_a_null_grid_value_and_an_unmakeable_log_folder_are_named_as_such(tmp_path, capsys):
    """`grid: {seed: }` suggested `[None]`, which YAML reads as the string 'None'; a --log_dir that could not be made
    was the system's bare reason after the path, naming neither the flag nor what was being done."""
    grid = tmp_path / "g.yaml"
    grid.write_text("program: experiment.py\ngrid: {seed: }\n")
    assert _expect_error(capsys, ["run", str(grid), "--dry_run"]) == (
        f"error: {grid}: grid value of 'seed' must be a list of values, got null (write [null] for one value, or move "
        f"it to 'fixed')")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(sweep.UserError) as e:
        sweep.launch([[sys.executable, "-c", "pass"]], [None], tmp_path / "afile" / "logs", ["a"])
    assert str(e.value) == (f"cannot make the runs' log folder {tmp_path / 'afile' / 'logs'} (--log_dir): "
                            f"{tmp_path / 'afile'} is a file, not a folder")


def test_a_finished_run_started_elsewhere_outside_the_project_is_done_from_here(tmp_path, monkeypatch):
    """Outside the project a --save_model run writes models/ below the folder it was started in: re-planned from
    another folder, the launcher looked for the last model below its own and took the finished run for half done
    (its resume then wrote a second copy of the model)."""
    import json

    spec, d = _saved_model_run(tmp_path, "l3", 2, outdir=str(tmp_path / "ck"))
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "working_dir": str(tmp_path / "a")}))
    saved = tmp_path / "a" / "models" / "hopper" / "dt_gym-experiment-hopper-medium-123.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"x")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert [s for s, _ in sweep.plan(spec, [])] == ["done"]
    saved.unlink()                                                    # not there either: the run still writes it
    assert [s for s, _ in sweep.plan(spec, [])] == ["partial"]
