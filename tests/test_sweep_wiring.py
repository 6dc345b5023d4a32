"""The grid launcher's wiring: half-done runs started again with --resume, a GPU slot's CUDA_VISIBLE_DEVICES, the
last model of a --save_mode both run, merge runs of 0 iterations, runs skipped at their recheck, WandB export of
null values, the last of repeated flags, CPU threads and cores per slot."""
import json
import re
import sys

import pytest
import yaml

from decision_transformer import sweep
from decision_transformer.errors import UserError
from test_sweep import _fails_with, _grid, _half_done, _saved_model_run


def _one_seed_grid(tmp_path, data, **fixed):
    """test_sweep's tiny grid with one run (seed 1), no evaluation episodes."""
    path = _grid(tmp_path, data)
    spec = yaml.safe_load(path.read_text())
    spec["fixed"].update({"num_eval_episodes": 0, **fixed})
    spec["grid"] = {"seed": [1]}
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- item 1: half-done runs are started, with --resume ---------------------------------------------------------

def test_a_half_done_run_is_resumed_end_to_end(tmp_path, hopper_data, capsys):
    """A grid run to 1 iteration, then again with --max_iters=2: the launcher resumes it (one metrics row per
    iteration, nothing set aside in previous/) and counts it as done."""
    grid = _one_seed_grid(tmp_path, hopper_data)
    logs = str(tmp_path / "logs")
    assert sweep.main(["run", str(grid), "--log_dir", logs]) == 0
    capsys.readouterr()
    assert sweep.main(["run", str(grid), "--extra", "--max_iters=2", "--log_dir", logs]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("partial ") and out[0].endswith("--seed 1 --max_iters=2 --resume")
    assert out[-1] == "summary of 1 runs: 1 done, 0 failed, 0 skipped (finished before)"
    d = tmp_path / "ck" / "dt_medium_hopper_1_K5"
    rows = [json.loads(line)["iteration"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]
    assert (d / "model_2.pt").is_file() and not (d / "previous").exists()


def test_main_starts_a_partial_run_and_rechecks_it_with_resume(tmp_path, monkeypatch, capsys):
    """main hands a half-done run to launch, and its recheck (once the lock is taken) gives the command with
    --resume appended."""
    grid = _grid(tmp_path, tmp_path / "data")
    _half_done(tmp_path / "ck" / "dt_medium_hopper_2_K5")
    seen = {}

    def fake_launch(commands, slots, log_dir, names, recheck=None, report=None, **kw):
        seen["commands"] = commands
        seen["rechecked"] = [recheck(k) for k in range(len(commands))]
        return 0

    monkeypatch.setattr(sweep, "launch", fake_launch)
    assert sweep.main(["run", str(grid), "--log_dir", str(tmp_path / "logs")]) == 0
    prog = str(sweep.ROOT / "experiment.py")
    base = [sys.executable, prog, *sweep.to_argv(yaml.safe_load(grid.read_text())["fixed"])]
    new, partial = [*base, "--seed", "1"], [*base, "--seed", "2", "--resume"]
    assert seen["commands"] == [new, partial]
    assert seen["rechecked"] == [("new", new), ("partial", partial)]


def test_launch_starts_a_run_rechecked_as_partial(tmp_path, capsys):
    """launch starts a command whose recheck says partial (as it does a new one), and skips a finished one."""
    cmds = [[sys.executable, "-c", f"print({i})"] for i in range(3)]
    report = sweep.new_report()
    states = ["partial", "new", "done"]
    assert sweep.launch(cmds, [None], tmp_path / "logs", ["a", "b", "c"],
                        recheck=lambda i: (states[i], cmds[i]), report=report) == 0
    assert report["done"] == ["a", "b"] and report["skipped"] == [("c", "done")]
    assert (tmp_path / "logs" / "a.log").read_text().splitlines()[1:] == ["0"]


# ---- item 2: a GPU slot's device ---------------------------------------------------------------------------------

def test_each_gpu_slot_sees_its_own_device(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    cmd = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    assert sweep.launch([cmd, cmd], ["0", "1"], tmp_path / "logs", ["a", "b"]) == 0
    for name, gpu in (("a", "0"), ("b", "1")):
        lines = (tmp_path / "logs" / f"{name}.log").read_text().splitlines()
        assert lines[0].startswith("=== ") and lines[1:] == [gpu]


# ---- item 3: --save_mode both writes a last model too --------------------------------------------------------------

def test_a_save_mode_both_run_without_its_last_model_is_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, _ = _saved_model_run(tmp_path, "both", 2, save_mode="both")
    states = sweep.plan(spec, [])
    assert [s for s, _ in states] == ["partial"] and states[0][1][-1] == "--resume"
    (tmp_path / "models" / "hopper").mkdir(parents=True)
    (tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-123.pt").write_bytes(b"x")
    assert [s for s, _ in sweep.plan(spec, [])] == ["done"]


# ---- item 4: a merge run of 0 iterations writes no training state ---------------------------------------------------

def test_a_finished_merge_run_without_training_state_is_done(tmp_path):
    from decision_transformer.cli import experiment_parser, merge_signature

    spec = {"program": "experiment.py", "name": "m0",
            "fixed": {"outdir": str(tmp_path / "ck"), "K": 5, "max_iters": 0, "pretrained_models": ["a.pt", "b.pt"]},
            "grid": {"include": [["attn"]]}}
    assert sweep.plan(spec, [])[0][0] == "new"
    d = tmp_path / "ck" / "dt_medium_hopper_666_K5_111111"
    d.mkdir(parents=True)
    argv = sweep.to_argv({**spec["fixed"], "include": ["attn"]})
    (d / "config.json").write_text(json.dumps(merge_signature(experiment_parser().parse_args(argv))))
    (d / "model_0.pt").write_bytes(b"x")
    found = sweep.inspect_run(str(sweep.ROOT / "experiment.py"), argv)
    assert (found.state, found.folder) == ("done", d)
    states = sweep.plan(spec, [])
    assert [s for s, _ in states] == ["done"] and "--resume" not in states[0][1]


# ---- item 5: a run found damaged at its recheck counts in the exit code ----------------------------------------------

def test_a_run_found_damaged_at_its_recheck_makes_the_launcher_exit_2(tmp_path, monkeypatch, capsys):
    grid = _grid(tmp_path, tmp_path / "data")
    spec = yaml.safe_load(grid.read_text())
    spec["grid"] = {"seed": [1]}
    grid.write_text(yaml.safe_dump(spec))
    real_launch = sweep.launch

    def launch_after_damage(*args, **kw):   # between the plan and the start, another process damages the run
        monkeypatch.setattr(sweep, "inspect_run", lambda program, argv: sweep.Found("damaged"))
        return real_launch(*args, **kw)

    monkeypatch.setattr(sweep, "launch", launch_after_damage)
    err, out = _fails_with(capsys, ["run", str(grid), "--log_dir", str(tmp_path / "logs")])
    assert err == "error: 1 runs not started: their training state cannot be read (see above)"
    assert out[0].startswith("new ") and out[2].startswith("disk: about ") and out[3].startswith("disk: ")  # the plan
    assert "now damaged (another launcher or process got to it first)" in out[4]
    assert out[-1] == "summary of 1 runs: 0 done, 0 failed, 0 skipped (finished before), 1 damaged"
    assert not (tmp_path / "ck" / "dt_medium_hopper_1_K5").exists() and list((tmp_path / "logs").iterdir()) == []


# ---- item 6: WandB export of two null-containing parameters -----------------------------------------------------------

def test_export_refuses_two_parameters_with_null(tmp_path, capsys):
    spec = {"program": "experiment.py", "fixed": {"outdir": "ck"},
            "grid": {"seed": [1, 2], "pretrained_lm": [None, "gpt2"], "pretrained_block": [None, 3]}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(sweep.UserError) as e:
        sweep.export_wandb(sweep.load_grid(str(path)), tmp_path / "sweeps")
    assert str(e.value) == "grid two: only one parameter may contain null, found pretrained_block, pretrained_lm"
    assert not (tmp_path / "sweeps").exists()


# ---- item 7: the last value of a repeated flag -------------------------------------------------------------------

def test_the_last_pretrained_lm_flag_decides_whether_a_run_is_blocked(tmp_path, monkeypatch):
    names = ("--pretrained_lm", "-plm")
    assert sweep._flag_value(["--pretrained_lm", "a", "-plm", "b"], names) == "b"
    assert sweep._flag_value(["--pretrained_lm=a", "--pretrained_lm", "b", "--pretrained_lm=c"], names) == "c"
    asked = []

    def lm_problem(name):
        asked.append(name)
        return None if name == "here_lm" else "not found"

    monkeypatch.setattr(sweep, "_lm_problem", lm_problem)
    spec = {"program": "experiment.py", "fixed": {"outdir": str(tmp_path / "ck"), "max_iters": 1, "seed": 1},
            "grid": {"pretrained_lm": ["no_such_lm"]}}
    assert [s for s, _ in sweep.plan(spec, ["--pretrained_lm", "here_lm"])] == ["new"]
    assert asked == ["here_lm"]
    assert [r.found.note for r in sweep.plan_runs(spec, [])] == ["no_such_lm: not found"]


# ---- item 8: CPU threads and cores per slot --------------------------------------------------------------------

def test_cpu_slots_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "available_cpus", lambda: [0, 1, 2, 3, 4])
    assert sweep.core_sets(2) == [[0, 1, 2], [3, 4]]
    assert sweep.core_sets(3) == [[0, 1], [2, 3], [4]]
    monkeypatch.setattr(sweep, "available_cpus", lambda: list(range(6)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cmd = [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"]
    assert sweep.launch([cmd, cmd], [None, None], tmp_path / "logs", ["a", "b"], pin=False) == 0
    for name in ("a", "b"):
        assert (tmp_path / "logs" / f"{name}.log").read_text().splitlines()[1:] == ["3"]


# ---- points that the programs' own flag checks refuse are invalid, not launched --------------------------------------

@pytest.mark.parametrize("program, fixed, grid, needle", [
    ("experiment.py", {"K": 5}, {"env_targets": ["3600", "3600.5"]}, "--env_targets: 3600.5 is not a whole number"),
    ("experiment.py", {"K": 5}, {"weight_decay": [1e-4, 1e5]}, "lr * wd must be below 1"),
    ("experiment.py", {"K": 5}, {"device": ["cpu", "cpux"]}, "unknown --device 'cpux'"),
    ("experiment_multi.py", {"K": 5}, {"threads": ["1", "0"]}, "--threads '0': use auto or a positive number"),
    ("lm_cotraining/experiment.py", {"K": 5, "pretrained_lm": "gpt2"}, {"gpt_kmeans": [None, 1000]},
     "--gpt_kmeans needs --gpt_kmeans_const"),
    ("experiment_multi.py", {"K": 5, "save_model": True, "num_eval_episodes": 0}, {"save_mode": ["last", "best"]},
     "--num_eval_episodes 0 evaluates nothing"),
    ("lm_cotraining/experiment.py", {"K": 5}, {"pretrained_lm": ["gpt2", None]}, "needs --pretrained_lm"),
])
def test_points_the_programs_checks_refuse_are_invalid(tmp_path, monkeypatch, program, fixed, grid, needle):
    """The planner runs each program's own flag checks (not only its parser): a point they refuse is listed as
    invalid with the program's message, before anything is launched, and the other point is planned."""
    monkeypatch.chdir(tmp_path)
    spec = {"program": program, "name": "checks", "fixed": {"outdir": "ck", **fixed}, "grid": grid}
    runs = sweep.plan_runs(spec, [])
    assert [r.state for r in runs][1] == "invalid" and runs[0].state != "invalid", [r.found.note for r in runs]
    assert runs[1].found.note.startswith(f"{program}: ") and needle in runs[1].found.note
    spec["grid"] = {k: v[1:] for k, v in grid.items()}                     # only the refused point: the grid's error
    with pytest.raises(UserError, match=re.escape(needle)):
        sweep.plan_runs(spec, [])


def test_planning_runs_the_checks_without_their_warnings(tmp_path, monkeypatch, capsys):
    """The checks' warnings belong to the run that starts: planning a grid prints none of them per point."""
    monkeypatch.chdir(tmp_path)
    spec = {"program": "experiment.py", "name": "quiet", "fixed": {"outdir": "ck", "K": 5, "save_model": True,
                                                                    "num_eval_episodes": 0, "save_mode": "both"},
            "grid": {"seed": [1, 2]}}
    capsys.readouterr()
    assert [r.state for r in sweep.plan_runs(spec, [])] == ["new", "new"]
    assert "--save_mode both" not in capsys.readouterr().err


def test_merge_runs_lock_by_the_files_not_their_spelling(tmp_path, monkeypatch):
    """--resume matches --pretrained_models as files; the launcher's lock of a merge run does too, so a grid point and
    a hand-started resume that spell the paths differently take one lock (and two such grid points are one run)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    for name in ("a.pt", "b.pt"):
        (tmp_path / "m" / name).write_bytes(b"x")
    sig = {"pretrained_models": ["m/a.pt", "m/b.pt"], "include": ["attn"]}
    same = {"pretrained_models": ["./m/a.pt", str(tmp_path / "m" / "b.pt")], "include": ["attn"]}
    other = {"pretrained_models": ["m/b.pt", "m/a.pt"], "include": ["attn"]}
    lock = sweep._signature_lock(tmp_path, "run_", sig)
    assert sweep._signature_lock(tmp_path, "run_", same) == lock != sweep._signature_lock(tmp_path, "run_", other)


def test_a_training_state_that_is_not_a_dict_is_damaged(tmp_path):
    import torch

    torch.save(torch.zeros(3), tmp_path / "train_state.pt")
    assert sweep.state_iteration(tmp_path / "train_state.pt") == "not a training state (no iteration number)"
    (tmp_path / "train_state.pt").write_bytes(b"garbage")
    problem = sweep.state_iteration(tmp_path / "train_state.pt")
    assert problem.startswith("not loadable (UnpicklingError: ") and "weights_only" not in problem \
        and "\x1b" not in problem


def test_a_training_state_without_an_iteration_is_damaged(tmp_path):
    import torch

    torch.save({"step": 1}, tmp_path / "train_state.pt")
    assert sweep.state_iteration(tmp_path / "train_state.pt") == "not a training state (no iteration number)"


def test_find_run_matches_path_flags_as_files(tmp_path, monkeypatch):
    """A run recorded with --pretrained_models m/a.pt is the one asked for with ./m/a.pt."""
    from decision_transformer.checkpoint import find_run

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run_1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"pretrained_models": ["m/a.pt"]}))
    (run / "train_state.pt").write_bytes(b"")
    assert find_run(tmp_path, "run_", {"pretrained_models": ["./m/a.pt"]}, require="train_state.pt") == run
    assert find_run(tmp_path, "run_", {"pretrained_models": ["m/b.pt"]}, require="train_state.pt") is None


def test_a_symlink_to_a_model_names_the_same_model(tmp_path, monkeypatch):
    from decision_transformer.checkpoint import same_flag_value

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"x")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    assert same_flag_value("load_checkpoint", "b.pt", "a.pt")
    assert same_flag_value("pretrained_models", ["b.pt"], [str(tmp_path / "a.pt")])

def test_flags_that_name_files_compare_as_files(tmp_path, monkeypatch):
    from decision_transformer.checkpoint import PATH_FLAGS, same_flag_value

    monkeypatch.chdir(tmp_path)
    assert {"pretrained_models", "load_checkpoint", "nlp_dataset_name", "tokenizer_name"} <= PATH_FLAGS
    assert same_flag_value("nlp_dataset_name", "./corpus.txt", str(tmp_path / "corpus.txt"))
    assert same_flag_value("pretrained_models", ["a.pt", "./b.pt"], ["./a.pt", "b.pt"])
    assert not same_flag_value("pretrained_models", ["a.pt", "b.pt"], ["b.pt", "a.pt"])
    assert not same_flag_value("dataset", "./medium", "medium")          # not a path flag: compared as given


def test_merge_runs_of_the_same_substrings_in_another_order_share_a_lock(tmp_path):
    """--include / --exclude are sets of substrings: a merge run spelt with them in another order is the same run to
    --resume, so the launcher's lock (a hash of its flags) is the same too."""
    from decision_transformer.cli import experiment_parser

    parse = lambda *inc: experiment_parser().parse_args(  # noqa: E731
        ["--outdir", str(tmp_path), "--pretrained_models", "a.pt", "b.pt", "--include", *inc])
    assert sweep.run_lock_path("experiment.py", parse("attn", "mlp")) == \
        sweep.run_lock_path("experiment.py", parse("mlp", "attn"))
    assert sweep.run_lock_path("experiment.py", parse("attn", "mlp")) != \
        sweep.run_lock_path("experiment.py", parse("attn"))
