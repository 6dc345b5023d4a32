"""Places on the file system that were found wrong only after the work: a folder that cannot be written (a read-only
mount), a dangling link where the dataset belongs, a file name near the 255-character limit, a run folder reached
through a link, a table's --out that names a folder."""
import os
from pathlib import Path

import pytest
import torch
from conftest import fails

from decision_transformer import generation, results_table
from decision_transformer.errors import UserError
from decision_transformer.files import atomic_write, exclusive, refuse_files_above


def unwritable(monkeypatch, folder: Path):
    """``folder`` reads as one that cannot be written (tests may run as root, whom permission bits do not stop)."""
    real = os.access

    def access(path, mode, *a, **k):
        if Path(path).absolute() == folder.absolute() and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


def test_a_folder_that_cannot_be_written_is_said_before_the_work(tmp_path, monkeypatch, capsys, hopper_data):
    ro = tmp_path / "ro"
    ro.mkdir()
    unwritable(monkeypatch, ro)
    with pytest.raises(UserError, match=f"^--save_model writes to {ro}/models/hopper/, but {ro} cannot be written "
                                        r"\(permission denied\)"):
        refuse_files_above(ro / "models" / "hopper", "--save_model")
    refuse_files_above(ro / "models", "reading", writable=False)   # (only read: fine)
    # a missing dataset is not generated for minutes only to find its folder read-only
    called = []
    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: called.append(1))
    with pytest.raises(UserError, match=f"^generating the missing dataset writes to {ro}/, but {ro} cannot"):
        generation.ensure_dataset(ro, "hopper", "random")
    assert not called
    # experiment.py --save_model, run from a read-only folder: refused before training
    monkeypatch.chdir(ro)
    import experiment

    msg = fails(experiment.main, ["--data_path", hopper_data, "--embed_dim", "16", "--n_layer", "1", "--K", "5",
                                  "--max_iters", "1", "--num_steps_per_iter", "1", "--num_eval_episodes", "0",
                                  "--save_model", "--outdir", tmp_path / "ck"], capsys)
    assert msg.startswith("error: --save_model writes to models/hopper/, but ") and "cannot be written" in msg
    assert not (tmp_path / "ck").exists()


def test_a_dangling_link_where_the_dataset_belongs_is_one_line_before_generating(tmp_path, monkeypatch):
    """The link read as no dataset, one was generated (minutes), and then the link took the write for another
    process's file."""
    (tmp_path / "hopper-random-v2.pkl").symlink_to(tmp_path / "gone.pkl")
    called = []
    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: called.append(1))
    with pytest.raises(UserError, match=r"hopper-random-v2\.pkl is a link to .*gone\.pkl, which does not exist; "
                                        "remove the link"):
        generation.ensure_dataset(tmp_path, "hopper", "random")
    assert not called
    # a file written only where none is: a dangling link in its place is named as one, not as another process's file
    (tmp_path / "out.bin").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="a link to .*nowhere, which does not exist, is in its place"):
        atomic_write(tmp_path / "out.bin", lambda t: Path(t).write_bytes(b"x"), replace=False)
    assert (tmp_path / "out.bin").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["hopper-random-v2.pkl", "out.bin"]


def test_a_name_near_the_length_limit_can_be_written_and_locked(tmp_path):
    """The temporary file added .{pid}.{hex}.tmp to the whole name: a legal 240-character name could not be
    written."""
    from decision_transformer.checkpoint import atomic_save

    name = "r" * 240
    atomic_write(tmp_path / f"{name}.md", lambda t: Path(t).write_text("table"))
    atomic_save({"x": torch.ones(1)}, tmp_path / f"{name}.pt")
    with exclusive(tmp_path / f"{name}.csv"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.md", f"{name}.pt"]


def test_a_run_folder_reached_through_a_link_shares_its_lock(tmp_path):
    """The lock stood beside the folder as written: one process training it as outdir/run and another through a
    link to it both ran, mixing their metrics."""
    from decision_transformer.sweep import folder_lock_path

    real = tmp_path / "shm" / "dt_medium_hopper_666_K5"
    real.mkdir(parents=True)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "dt_medium_hopper_666_K5").symlink_to(real)
    assert folder_lock_path(tmp_path / "o" / "dt_medium_hopper_666_K5") == folder_lock_path(real) == \
        tmp_path / "shm" / ".dt_medium_hopper_666_K5.lock"


def test_a_table_out_that_names_a_folder_is_refused(tmp_path, capsys):
    """--out results/ wrote results.csv and results.md beside the folder."""
    msg = fails(results_table.main, ["--row", f"a={tmp_path / 'nothing.pt'}", "--envs", "hopper",
                                     "--out", f"{tmp_path / 'results'}/"], capsys)
    assert msg == (f"error: --out {tmp_path / 'results'}/: give a file name without extension (writes OUT.csv and "
                   f"OUT.md), not a folder (e.g. {tmp_path / 'results' / 'table'})")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_tilde_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """--flag=~/x: the shell leaves that ~ alone (it expands ~ only at the start of a word), and the scripts made a
    folder named ~ in the working directory; they now read it as --flag ~/x."""
    import sys

    from decision_transformer.errors import expand_home

    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["--a=~/x", "--b", "~/y", "-c=~/z", "--d=x~", "--e=~", "p=~/x", "--f=~/g=~/h"]
    assert expand_home(argv) == [f"--a={tmp_path}/x", "--b", "~/y", f"-c={tmp_path}/z", "--d=x~", f"--e={tmp_path}",
                                 "p=~/x", f"--f={tmp_path}/g=~/h"]
    # a command line no shell read (a sweep grid's values, its --extra): whole words too
    assert expand_home(argv, words=True)[2] == f"{tmp_path}/y"
    monkeypatch.setattr(sys, "argv", ["results_table.py", "--row", f"a={tmp_path / 'nothing.pt'}", "--envs", "hopper",
                                      "--out=~/results/"])
    with pytest.raises(SystemExit):
        results_table.main()
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'results'}/: give a file name")


def test_a_sweep_reads_a_tilde_where_its_runs_do(tmp_path, monkeypatch):
    """A grid value or an --extra flag with ~: the launcher looked for (and locked) a folder named ~ in the working
    directory while the run it started wrote to the home folder, so a finished run was trained again."""
    from decision_transformer import sweep

    monkeypatch.setenv("HOME", str(tmp_path))
    spec = {"program": "experiment.py", "name": "t", "fixed": {"outdir": "~/ck", "K": 5, "max_iters": 1},
            "grid": {"seed": [1]}}
    for extra in ([], ["--data_path=~/data"], ["--data_path", "~/data"]):
        (r,) = sweep.plan_runs(spec, extra)
        assert r.found.target == str(tmp_path / "ck" / "dt_medium_hopper_1_K5")
        assert "~/ck" not in r.cmd and str(tmp_path / "ck") in r.cmd
        assert not any("~" in a for a in r.cmd)
