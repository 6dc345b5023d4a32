"""A file that a tool writes only where none is (no --force) and that another process writes while the tool works: the
tool checked only at its start and then replaced the other's file. Each test writes the other process's file from
inside the tool's work (a patched step), then checks that it is kept, the tool says so in one line, and nothing is
left behind. Also: a report read while a run trains names it as being trained, not as stopped."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import fails, load_script, write_source_models

from decision_transformer import generation, merge_cli
from decision_transformer.errors import UserError
from decision_transformer.files import WrittenMeanwhile, atomic_write

OTHER = b"the other process's file"


def other_writes(path: Path, fn):
    """``fn`` that first writes ``OTHER`` to ``path`` (the other process, finishing while this one works)."""
    def wrapped(*a, **k):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(OTHER)
        return fn(*a, **k)
    return wrapped


def only(folder: Path, *names) -> bool:
    """``folder`` holds the files ``names`` and nothing else (no temporary file left)."""
    return sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("links", [True, False], ids=["hard_links", "no_hard_links"])
def test_a_file_written_only_where_none_is(tmp_path, monkeypatch, links):
    if not links:   # a file system without hard links: checked just before the rename
        def no_link(*a):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    p = tmp_path / "f.bin"
    assert atomic_write(p, lambda tmp: Path(tmp).write_bytes(b"new"), replace=False) == p and p.read_bytes() == b"new"
    with pytest.raises(WrittenMeanwhile, match=f"{p} was written by another process meanwhile; it is kept"):
        atomic_write(p, lambda tmp: Path(tmp).write_bytes(b"newer"), replace=False)
    assert p.read_bytes() == b"new" and only(tmp_path, "f.bin")
    atomic_write(p, lambda tmp: Path(tmp).write_bytes(b"newer"))   # replace=True, as before
    assert p.read_bytes() == b"newer" and only(tmp_path, "f.bin")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_source_models(tmp_path_factory.mktemp("meanwhile"), ("hopper",), n=200, max_ep_len=40,
                               id_base=300000)


def test_merge_cli_keeps_an_out_written_during_the_merge(tiny, tmp_path, capsys, monkeypatch):
    _, _, paths = tiny
    out = tmp_path / "m.pt"
    from decision_transformer import merge_setup

    monkeypatch.setattr(merge_setup, "check_merged_state", other_writes(out, merge_setup.check_merged_state))
    argv = ["--models", paths["hopper"], paths["hopper"], "--out", out]
    assert "m.pt was written by another process meanwhile; it is kept" in fails(merge_cli.main, argv, capsys)
    assert out.read_bytes() == OTHER and only(tmp_path, "m.pt")
    merge_cli.main([str(a) for a in [*argv, "--force"]])   # --force replaces it, as before
    assert isinstance(torch.load(out, weights_only=False)["state_dict"], dict)


def test_a_conversion_keeps_a_pkl_written_while_it_converts(tmp_path, capsys, monkeypatch):
    from decision_transformer import data
    from decision_transformer.synthetic import rollout_flat, write_hdf5

    h5 = write_hdf5(tmp_path / "h5" / "hopper_medium-v2.hdf5", rollout_flat("hopper", 300, seed=1, max_ep_len=100))
    target = tmp_path / "d" / "hopper-medium-v2.pkl"
    monkeypatch.setattr(data, "validate_trajectories", other_writes(target, data.validate_trajectories))
    script = load_script("data/download_d4rl_datasets.py")
    assert "hopper-medium-v2.pkl was written by another process meanwhile" in fails(
        script.main, ["--hdf5", h5, "--data_path", tmp_path / "d"], capsys)
    assert target.read_bytes() == OTHER and only(tmp_path / "d", "hopper-medium-v2.pkl")


def test_generate_datasets_keeps_a_pkl_written_while_it_generates(tmp_path, capsys, monkeypatch):
    target = tmp_path / "d" / "hopper-random-v2.pkl"
    monkeypatch.setattr(generation, "generate_flat", other_writes(target, generation.generate_flat))
    script = load_script("data/generate_datasets.py")
    argv = ["--env", "hopper", "--dataset", "random", "--num_transitions", "1100", "--data_path", tmp_path / "d",
            "--no_hdf5", "--no_progress"]
    assert "hopper-random-v2.pkl was written by another process meanwhile" in fails(script.main, argv, capsys)
    assert target.read_bytes() == OTHER and only(tmp_path / "d", "hopper-random-v2.pkl")


def test_generate_datasets_removes_its_hdf5_when_the_pkl_beside_it_was_written_meanwhile(tmp_path, capsys,
                                                                                         monkeypatch):
    """The pair: the hdf5 was written, the pkl refused; the hdf5 (this run's data) stayed beside the other's pkl."""
    target = tmp_path / "d" / "hopper-random-v2.pkl"
    monkeypatch.setattr(generation, "generate_flat", other_writes(target, generation.generate_flat))
    script = load_script("data/generate_datasets.py")
    argv = ["--env", "hopper", "--dataset", "random", "--num_transitions", "1100", "--data_path", tmp_path / "d",
            "--no_progress"]
    msg = fails(script.main, argv, capsys)
    assert "hopper-random-v2.pkl was written by another process meanwhile" in msg
    assert msg.endswith(f"the hdf5 generated with this one, {tmp_path / 'd' / 'hopper_random-v2.hdf5'}, is removed "
                        f"with it")
    assert target.read_bytes() == OTHER and only(tmp_path / "d", "hopper-random-v2.pkl")


def test_a_training_run_uses_a_dataset_written_while_it_generated_its_own(tmp_path, monkeypatch):
    target = tmp_path / "hopper-random-v2.pkl"
    said = []
    monkeypatch.setattr(generation, "generate_flat", other_writes(target, generation.generate_flat))
    assert generation.ensure_dataset(tmp_path, "hopper", "random", num_transitions=1100, log=said.append) == target
    assert target.read_bytes() == OTHER and only(tmp_path, "hopper-random-v2.pkl")
    assert said[-1] == f"{target} was written by another process while this one was generated: using that file"


def test_reacher2d_and_make_dataset_keep_a_pkl_written_meanwhile(tmp_path, capsys, monkeypatch):
    from decision_transformer import reacher2d, synthetic

    target = tmp_path / "r" / "reacher2d-medium-v2.pkl"
    monkeypatch.setattr(reacher2d, "scripted_trajectories", other_writes(target, reacher2d.scripted_trajectories))
    script = load_script("data/reacher2d_scripted_data.py")
    assert "reacher2d-medium-v2.pkl was written by another process meanwhile" in fails(
        script.main, ["--data_path", tmp_path / "r", "--episodes", "4", "--dataset", "medium"], capsys)
    assert target.read_bytes() == OTHER and only(tmp_path / "r", "reacher2d-medium-v2.pkl")

    target = tmp_path / "s" / "hopper-medium-v2.pkl"
    monkeypatch.setattr(synthetic, "rollout_flat", other_writes(target, synthetic.rollout_flat))
    with pytest.raises(UserError, match="make_dataset keeps it"):
        synthetic.make_dataset(tmp_path / "s", "hopper", "medium", 300, max_ep_len=50)
    assert target.read_bytes() == OTHER and only(tmp_path / "s", "hopper-medium-v2.pkl")
    synthetic.make_dataset(tmp_path / "s", "hopper", "medium", 300, max_ep_len=50, overwrite=True)
    with open(target, "rb") as f:
        assert isinstance(pickle.load(f), list)


def test_pretrain_chibit_keeps_a_model_saved_there_meanwhile(tmp_path, capsys, monkeypatch):
    from test_tools_pretrain import TINY, corpus

    from decision_transformer.training import lm_pretrain
    from lm_cotraining import pretrain_chibit

    text, out = corpus(tmp_path / "c.txt"), tmp_path / "m"
    monkeypatch.setattr(lm_pretrain, "next_token_loss", other_writes(out / "config.json", lm_pretrain.next_token_loss))
    msg = fails(pretrain_chibit.main, ["--text", text, "--out", out, *TINY], capsys)
    aside = tmp_path / f"m.new-{os.getpid()}"
    assert msg == (f"error: {out} was written by another process meanwhile; it is kept, and this model is saved to "
                   f"{aside} instead (--overwrite replaces it)")
    assert (out / "config.json").read_bytes() == OTHER and only(out, "config.json")
    from transformers import GPT2LMHeadModel

    assert GPT2LMHeadModel.from_pretrained(str(aside)).config.n_embd == 16
    assert only(tmp_path, "c.txt", "m", aside.name)


def test_a_report_names_a_run_that_is_still_being_trained(tmp_path):
    from decision_transformer.results_table import stopped_early
    from decision_transformer.sweep import _take_lock, _unlock, folder_lock_path

    run = tmp_path / "dt_medium_hopper_1"
    run.mkdir()
    assert stopped_early({"max_iters": 40}, 4, run) == "stopped at iteration 4 of 40"
    taken, fd = _take_lock(folder_lock_path(run))
    assert taken and fd is not None   # (held by this process; its look at the lock opens the file again)
    try:
        said = stopped_early({"max_iters": 40}, 4, run)
    finally:
        _unlock(fd)
    assert said.startswith(f"still being trained, at iteration 4 of 40 (another process (pid {os.getpid()}"), said
    assert stopped_early({"max_iters": 40}, 40, run) is None
    assert stopped_early({"max_iters": 40}, 4, run) == "stopped at iteration 4 of 40"


def test_an_interrupt_right_after_the_temporary_file_is_made_leaves_none(tmp_path, monkeypatch):
    """The temporary file was created, then recorded as the write's own: an interrupt between the two left an empty
    .tmp file beside the target (seen beside a dataset's .stats.json)."""
    import signal

    real_open = os.open

    def open_then_interrupted(path, *a, **k):
        fd = real_open(path, *a, **k)
        if str(path).endswith(".tmp"):
            signal.raise_signal(signal.SIGINT)   # (Ctrl-C just after the file exists)
        return fd

    monkeypatch.setattr(os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.stats.json", lambda tmp: Path(tmp).write_text("{}"))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
