"""Files that several runs make and share (datasets, Fisher files, k-means centres, the state-stats table): one
process makes each, the others wait and find it made; a resumed run notices a replaced k-means cache."""
import contextlib
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

import precompute_fisher
from conftest import load_script, write_source_models
from decision_transformer import fisher, files, generation
from decision_transformer.training import kmeans


def held_by_a_thread(target):
    """(order, thread): a thread that holds ``target``'s lock for 0.3 s, then appends "first done" to ``order``;
    returns once it holds the lock."""
    order, inside = [], threading.Event()

    def first():
        with files.exclusive(target, "centres"):
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    return order, t


def test_exclusive_makes_a_second_holder_wait_and_leaves_no_lock_file(tmp_path, capsys):
    target = tmp_path / "shared" / "c.pt"
    order, t = held_by_a_thread(target)
    with files.exclusive(target, "centres"):       # (flock: another open file description, as another process)
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    assert f"waiting for another process making {target} (centres)" in capsys.readouterr().err
    assert os.listdir(target.parent) == []          # the hidden lock file goes with its holder


def test_exclusive_waits_on_another_users_lock_file_and_warns_where_it_cannot_lock(tmp_path, monkeypatch, capsys):
    """A lock file left by another user (one this user may not write) is opened read-only and still makes us wait;
    where it cannot be opened at all the block runs unlocked, with a warning saying so."""
    target = tmp_path / "c.pt"
    lock = tmp_path / ".c.pt.lock"
    order, t = held_by_a_thread(target)
    real_open, modes = os.open, []

    def others_file(path, flags, *a):
        if str(path) == str(lock):
            modes.append(flags & os.O_ACCMODE)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", others_file)
    with files.exclusive(target, "centres"):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"] and os.O_RDONLY in modes
    assert "waiting for another process" in capsys.readouterr().err

    def no_open(path, flags, *a):
        if str(path) == str(lock):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_open)
    with files.exclusive(target, "centres"):
        order.append("unlocked")
    assert order[-1] == "unlocked"
    assert f"warning: cannot lock {lock} (Permission denied); nothing stops a second process" in capsys.readouterr().err


def made_while_waiting(module, make):
    """Replace ``module.exclusive`` by a lock during whose wait "another process" makes the file (``make(path)``)."""
    @contextlib.contextmanager
    def lock(path, what="it"):
        make(path)
        yield

    return lock


def test_kmeans_centres_made_by_another_run_meanwhile_are_read_not_recomputed(tmp_path, monkeypatch, capsys):
    theirs = torch.randn(8, 4)
    monkeypatch.setattr(kmeans, "exclusive", made_while_waiting(kmeans, lambda p: torch.save(theirs, p)))
    monkeypatch.setattr(kmeans, "cosine_kmeans", lambda *a, **k: pytest.fail("clustered again"))
    got = kmeans.load_or_compute_centres(torch.randn(50, 4), 8, str(tmp_path / "c.pt"), seed=1)
    assert torch.equal(got, theirs)
    assert "8 centres read from" in capsys.readouterr().err


def test_a_resume_with_a_replaced_kmeans_cache_is_refused():
    """Another run (another seed) replaced a shared --kmeans_cache: the resumed run would have gone on with centres it
    never trained with, without a word."""
    from decision_transformer.model_factory import AuxLosses
    from decision_transformer.training.trainer import Trainer

    def trainer(centres):
        t = Trainer.__new__(Trainer)           # only the auxiliary losses matter here
        t.extra_loss = AuxLosses(kmeans=kmeans.KMeansAlignment(centres, const=0.1))
        return t

    c = torch.randn(8, 4)
    saved = trainer(c).extra_state()
    assert saved == {"kmeans_centres": kmeans.centres_fingerprint(c)}
    trainer(c.clone()).load_extra_state(saved)            # the same centres: fine
    with pytest.raises(ValueError, match="not those the run started with"):
        trainer(c + 1e-3).load_extra_state(saved)


def test_a_dataset_generated_by_another_run_meanwhile_is_used(tmp_path, monkeypatch):
    """Runs started together on a fresh machine each generated the missing dataset (minutes each); the later ones now
    wait and read it. generate_datasets.py, which never replaces a dataset, refuses one written meanwhile."""
    def make(path):
        with open(path, "wb") as f:
            pickle.dump([], f)

    monkeypatch.setattr(generation, "exclusive", made_while_waiting(generation, make))
    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: pytest.fail("generated again"))
    assert generation.ensure_dataset(tmp_path, "hopper", "random") == tmp_path / "hopper-random-v2.pkl"

    script = load_script("data/generate_datasets.py")
    monkeypatch.setattr(script, "exclusive", made_while_waiting(script, make))
    with pytest.raises(SystemExit) as e:
        script.main(["--env", "hopper", "--dataset", "random", "--data_path", str(tmp_path / "other")])
    assert e.value.code == 2


def test_a_fisher_file_made_by_another_process_meanwhile_is_checked_and_kept(tmp_path, monkeypatch, capsys):
    """Two precompute_fisher.py of one model with different K at once: the later one replaced the file the first had
    just reported writing. It now waits, then checks the file as one found on disk (and refuses this K)."""
    root, data, paths = write_source_models(tmp_path, ("hopper",), n=250, max_ep_len=50, id_base=100000)
    argv = ["--model", str(paths["hopper"]), "--data_path", str(data), "--f_batch_size", "4", "--f_num_batches", "2",
            "--device", "cpu"]
    precompute_fisher.main(argv + ["--K", "5"])
    out = fisher.fisher_info_path(paths["hopper"], 4, 2)
    theirs = out.read_bytes()
    out.unlink()
    monkeypatch.setattr(fisher, "exclusive", made_while_waiting(fisher, lambda p: p.write_bytes(theirs)))
    monkeypatch.setattr(fisher, "compute_fisher", lambda *a, **k: pytest.fail("computed again"))
    with pytest.raises(SystemExit) as e:
        precompute_fisher.main(argv + ["--K", "4"])
    assert e.value.code == 2 and "with K=5, not on hopper-medium with K=4" in capsys.readouterr().err
    assert out.read_bytes() == theirs


def test_state_stats_updates_at_once_keep_each_others_entries(tmp_path, monkeypatch, hopper_data):
    """Two create_state_stats.py runs into one table (hopper, walker2d): the later write dropped the other's env. The
    table is read again under the lock, so an entry added meanwhile is kept."""
    script = load_script("data/create_state_stats.py")
    out = tmp_path / "state_stats.pkl"
    theirs = {"walker2d-medium-v2": {"state_mean": np.zeros(17, np.float32), "state_std": np.ones(17, np.float32)}}

    def make(path):
        with open(path, "wb") as f:
            pickle.dump(theirs, f)

    monkeypatch.setattr(files, "exclusive", made_while_waiting(files, make))   # (the script imports it when run)
    script.main(["--envs", "hopper", "--datasets", "medium", "--data_path", str(hopper_data), "--out", str(out)])
    with open(out, "rb") as f:
        table = pickle.load(f)
    assert sorted(table) == ["hopper-medium-v2", "walker2d-medium-v2"]
