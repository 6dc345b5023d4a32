"""Minari as a data source and export target (decision_transformer/minari_io.py). Uses the real ``minari`` package
(skipped where it is not installed) with a temporary local root; nothing is downloaded."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from decision_transformer.data import split_episodes, validate_trajectories
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.minari_io import (
    env_from_dataset_id,
    export_minari,
    load_minari_trajectories,
)
from decision_transformer.synthetic import rollout_flat


def test_missing_minari_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)   # makes `import minari` raise ImportError
    with pytest.raises(UserError, match=r"pip install minari"):
        load_minari_trajectories("mujoco/hopper/medium-v0")


def test_env_from_dataset_id():
    assert env_from_dataset_id("mujoco/hopper/medium-v0") == "hopper"
    assert env_from_dataset_id("mujoco/walker2d/expert-v0") == "walker2d"
    assert env_from_dataset_id("D4RL/halfcheetah-medium-v2") == "halfcheetah"
    with pytest.raises(UserError):
        env_from_dataset_id("mujoco/ant/medium-v0")


def test_export_then_read_back(tmp_path):
    minari = pytest.importorskip("minari")
    flat = rollout_flat("hopper", 600, seed=0, max_ep_len=100)
    trajs = split_episodes(flat)
    folder = export_minari(trajs, "dt/hopper/test-v0", "hopper", root=tmp_path)
    # Minari's on-disk layout
    assert (folder / "data" / "main_data.hdf5").is_file()
    meta = json.loads((folder / "data" / "metadata.json").read_text())
    assert meta["dataset_id"] == "dt/hopper/test-v0" and meta["total_episodes"] == len(trajs)
    # Minari itself reads it
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    ds = minari.load_dataset("dt/hopper/test-v0")
    assert ds.total_episodes == len(trajs) and ds.total_steps == sum(len(t["rewards"]) for t in trajs)
    ep = next(iter(ds.iterate_episodes([0])))
    np.testing.assert_array_equal(ep.observations[:-1], trajs[0]["observations"])
    np.testing.assert_array_equal(ep.observations[-1], trajs[0]["next_observations"][-1])
    monkeypatch.undo()
    # and so do we, back to the DT layout
    back = load_minari_trajectories("dt/hopper/test-v0", root=tmp_path)
    assert len(back) == len(trajs)
    for a, b in zip(trajs, back):
        for k in ("observations", "next_observations", "actions", "rewards", "terminals"):
            np.testing.assert_array_equal(a[k], b[k])
    validate_trajectories(back, get_env_spec("hopper"), "minari")
    # exporting to an existing id is refused
    with pytest.raises(UserError, match="cannot create Minari dataset"):
        export_minari(trajs, "dt/hopper/test-v0", "hopper", root=tmp_path)


def test_read_a_dataset_made_with_minaris_api(tmp_path, monkeypatch):
    """Episodes recorded here (gymnasium steps, Minari's T+1 observations) and stored by Minari's own
    ``create_dataset_from_buffers``; Minari's DataCollector would need jax (minari[create])."""
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    from decision_transformer.envs import make_env

    env = make_env("hopper")
    rng = np.random.default_rng(0)
    buffers, lengths = [], []
    for i in range(3):
        obs = [env.reset(seed=i)[0]]
        acts, rews, terms, truncs = [], [], [], []
        done = False
        while not done:
            a = rng.uniform(-1, 1, 3).astype(np.float32)
            o, r, term, trunc, _ = env.step(a)
            obs.append(o), acts.append(a), rews.append(r), terms.append(term), truncs.append(trunc)
            done = term or trunc
        lengths.append(len(rews))
        buffers.append(EpisodeBuffer(id=i, observations=np.array(obs), actions=np.array(acts), rewards=rews,
                                     terminations=terms, truncations=truncs, infos={}))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    minari.create_dataset_from_buffers("mujoco/hopper/collected-v0", buffers, env="Hopper-v4",
                                       algorithm_name="random", ref_min_score=0.0, ref_max_score=1.0,
                                       data_format="hdf5")
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    trajs = load_minari_trajectories("mujoco/hopper/collected-v0", root=tmp_path)
    assert [len(t["rewards"]) for t in trajs] == lengths
    assert all(t["terminals"][-1] for t in trajs)          # random hopper falls: terminated episodes
    np.testing.assert_allclose(trajs[1]["rewards"], np.array(buffers[1].rewards, dtype=np.float32))
    np.testing.assert_allclose(trajs[2]["next_observations"][-1], buffers[2].observations[-1], rtol=1e-6)
    assert trajs[0]["observations"].shape == (lengths[0], 11) and trajs[0]["observations"].dtype == np.float32
    with pytest.raises(UserError, match="not found"):
        load_minari_trajectories("mujoco/hopper/nothing-v0", root=tmp_path)


def _minari_script():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("minari_script", ROOT / "data" / "minari_datasets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_with_a_relative_root(tmp_path, monkeypatch, capsys):
    pytest.importorskip("minari")
    from decision_transformer.synthetic import make_dataset

    make_dataset(tmp_path / "data", "hopper", "medium", 200, seed=0, max_ep_len=30)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINARI_DATASETS_PATH", raising=False)
    script = _minari_script()
    script.main(["export", "data/hopper-medium-v2.pkl", "dt/hopper/medium-v0", "--minari_root", "mroot"])
    assert (tmp_path / "mroot" / "dt" / "hopper" / "medium-v0" / "data" / "main_data.hdf5").is_file()
    assert str(tmp_path / "mroot" / "dt" / "hopper" / "medium-v0") in capsys.readouterr().out
    assert len(load_minari_trajectories("dt/hopper/medium-v0", root="mroot")) > 1
    # a missing pkl says so, before anything else
    with pytest.raises(SystemExit) as e:
        script.main(["export", "nonexist.pkl", "dt/hopper/x-v0", "--minari_root", "mroot"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: nonexist.pkl: file not found"
    # exporting to the existing id is refused and the dataset stays
    before = (tmp_path / "mroot" / "dt" / "hopper" / "medium-v0" / "data" / "main_data.hdf5").read_bytes()
    with pytest.raises(SystemExit) as e:
        script.main(["export", "data/hopper-medium-v2.pkl", "dt/hopper/medium-v0", "--minari_root", "mroot"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot create Minari dataset") and "\n" not in err
    assert (tmp_path / "mroot" / "dt" / "hopper" / "medium-v0" / "data" / "main_data.hdf5").read_bytes() == before


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    """Minari failing part-way through its writing (in the child process that writes; forked here, so that it sees
    the patched writer) is one line, and no partial dataset, namespace folder or temporary root is left."""
    import multiprocessing

    from decision_transformer import minari_io

    minari = pytest.importorskip("minari")
    trajs = split_episodes(rollout_flat("hopper", 200, seed=0, max_ep_len=30))
    export_minari(trajs, "dt/hopper/keep-v0", "hopper", root=tmp_path)   # a dataset of the same namespace stays
    real = minari.create_dataset_from_buffers

    def failing(dataset_id, *a, **k):
        real(dataset_id, *a, **k)   # writes the dataset, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", failing)
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(minari_io.multiprocessing, "get_context", lambda _: fork)
    for dataset_id in ("dt/hopper/new-v0", "other/hopper/new-v0"):
        with pytest.raises(UserError) as ei:
            export_minari(trajs, dataset_id, "hopper", root=tmp_path)
        assert str(ei.value) == (f"cannot create Minari dataset {dataset_id!r} in {tmp_path}: "
                                 f"OSError: [Errno 28] No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dt"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "dt", "dt/hopper", "dt/hopper/keep-v0", "dt/hopper/keep-v0/data", "dt/hopper/keep-v0/data/main_data.hdf5",
        "dt/hopper/keep-v0/data/metadata.json", "dt/hopper/namespace_metadata.json", "dt/namespace_metadata.json"]


@pytest.mark.parametrize("body", ["[]", "null", "3"])
def test_a_metadata_file_that_is_json_but_no_object_is_one_line(tmp_path, body):
    """Minari calls .keys() on data/metadata.json: a list or null there was an AttributeError traceback."""
    pytest.importorskip("minari")
    trajs = split_episodes(rollout_flat("hopper", 300, seed=0, max_ep_len=100))
    folder = export_minari(trajs, "dt/hopper/meta-v0", "hopper", root=tmp_path)
    (folder / "data" / "metadata.json").write_text(body)
    with pytest.raises(UserError, match="Minari dataset 'dt/hopper/meta-v0' not found or unreadable under"):
        load_minari_trajectories("dt/hopper/meta-v0", root=tmp_path)


def test_a_stand_in_keeps_its_mark_through_minari(tmp_path, capsys):
    """A pkl converted from a smoke-test stand-in, exported to Minari and imported back, came back unmarked: read as
    if it were D4RL's data. The mark now travels in the Minari description."""
    pytest.importorskip("minari")
    from decision_transformer.data import stand_in_mark_path, synthetic_stand_in
    from decision_transformer.minari_io import minari_stand_in
    from conftest import load_script

    from decision_transformer.synthetic import make_dataset

    load_script("data/download_d4rl_datasets.py").main(
        ["--synthetic", "20", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "h5"),
         "--data_path", str(tmp_path / "syn")])
    mark = synthetic_stand_in(tmp_path / "syn" / "hopper-medium-v2.pkl")
    assert mark
    script = _minari_script()
    root = str(tmp_path / "mroot")
    script.main(["export", str(tmp_path / "syn" / "hopper-medium-v2.pkl"), "dt/hopper/syn-v0", "--minari_root", root])
    assert "smoke-test stand-in" in capsys.readouterr().out
    assert minari_stand_in("dt/hopper/syn-v0", root=root) == mark
    back = tmp_path / "back"
    script.main(["import", "dt/hopper/syn-v0", "--dataset", "medium", "--data_path", str(back), "--minari_root", root])
    assert synthetic_stand_in(back / "hopper-medium-v2.pkl") == mark
    assert "marked as one" in capsys.readouterr().out
    # real data exported and imported over it: no mark on either side, and the old mark goes
    make_dataset(tmp_path / "real", "hopper", "random", 200, seed=0, max_ep_len=30)   # (unmarked under this name)
    script.main(["export", str(tmp_path / "real" / "hopper-random-v2.pkl"), "dt/hopper/real-v0", "--minari_root", root])
    assert minari_stand_in("dt/hopper/real-v0", root=root) is None
    script.main(["import", "dt/hopper/real-v0", "--dataset", "medium", "--data_path", str(back), "--minari_root", root,
                 "--force"])
    assert synthetic_stand_in(back / "hopper-medium-v2.pkl") is None
    assert not stand_in_mark_path(back / "hopper-medium-v2.pkl").exists()
    assert "stand-in" not in capsys.readouterr().out
