"""Environment variables the toolkit hands to other libraries: a bad value is one line, found before files are written
where the toolkit reads it first."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from decision_transformer.errors import UserError
from decision_transformer.runlog import RunLogger


def test_a_bad_wandb_mode_is_refused_before_the_run_folder_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "junkmode")
    with pytest.raises(UserError, match="WANDB_MODE='junkmode' is not a WandB mode; use one of online, offline"):
        RunLogger(tmp_path / "run", {"a": 1}, use_wandb=True)
    assert not (tmp_path / "run").exists()
    RunLogger(tmp_path / "run", {"a": 1}, use_wandb=False).finish()   # without -w the variable is not read
    assert (tmp_path / "run" / "config.json").is_file()


def test_a_bad_mujoco_gl_is_one_line():
    """MuJoCo raises when it is imported with an unknown MUJOCO_GL (a fresh process: here it is imported already)."""
    code = ("from decision_transformer.envs import make_env\n"
            "from decision_transformer.errors import UserError\n"
            "try:\n    make_env('hopper')\nexcept UserError as e:\n    print('UserError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MUJOCO_GL": "junk"})
    assert proc.stdout.strip() == ("UserError: invalid value for environment variable MUJOCO_GL: junk; unset it or use "
                                   "egl, osmesa or glfw (evaluation does not render)"), proc.stderr[-2000:]


def test_training_scripts_check_wandb_mode_and_the_models_folder_first(tmp_path, monkeypatch, capsys, hopper_data):
    """With -w a bad WANDB_MODE, and with --save_model a file where models/{env}/ goes, stop before the data is read
    or the run folder is written (instead of after the first iteration)."""
    from conftest import fails

    import experiment

    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", hopper_data, "--max_iters", "1", "--num_steps_per_iter", "1", "--outdir", "out"]
    monkeypatch.setenv("WANDB_MODE", "junkmode")
    assert "WANDB_MODE='junkmode'" in fails(experiment.main, argv + ["-w"], capsys)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "models").write_text("x")
    assert fails(experiment.main, argv + ["--save_model"], capsys) == \
        "error: --save_model writes to models/hopper/, but models is a file"
    assert not (tmp_path / "out").exists()
    import experiment_multi

    assert fails(experiment_multi.main, ["--data_path", hopper_data, "--max_iters", "1", "--outdir", "out",
                                         "--save_model"], capsys) == \
        "error: --save_model writes to models/multi/, but models is a file"
    assert not (tmp_path / "out").exists()
