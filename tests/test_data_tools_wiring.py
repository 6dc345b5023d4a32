"""Wiring of the data tools not pinned elsewhere: the downloader's URL choice and 416 handling, fetch_d4rl's
--verify switch, Minari export/import details, run-folder parsing and ordering, and shared analysis helpers."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_download import DIGEST, PAYLOAD, Server

from decision_transformer import download
from decision_transformer.download import download_file
from decision_transformer.errors import UserError


# ---- download.py ------------------------------------------------------------------------------------------------

def test_base_url_prefers_the_flag_and_drops_trailing_slashes(monkeypatch):
    monkeypatch.setenv("D4RL_BASE_URL", "http://mirror.example/d4rl/")
    assert download.base_url("http://flag.example/x//") == "http://flag.example/x"
    assert download.base_url() == "http://mirror.example/d4rl"
    monkeypatch.delenv("D4RL_BASE_URL")
    assert download.base_url() == download.DEFAULT_BASE_URL


def test_a_complete_part_of_unknown_size_is_finished_by_the_servers_416(tmp_path):
    dest = tmp_path / "f.hdf5"
    (tmp_path / "f.hdf5.part").write_bytes(PAYLOAD)
    with Server({"f.hdf5": PAYLOAD}) as s:
        download_file(f"{s.url}/f.hdf5", dest, sha256=DIGEST, progress=False)
    assert s.requests == [("f.hdf5", f"bytes={len(PAYLOAD)}-")]
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.hdf5.part").exists()


def test_fetch_d4rl_checks_the_sha256_only_with_verify(tmp_path, monkeypatch):
    name = "hopper_medium-v2.hdf5"
    monkeypatch.setitem(download.D4RL_FILES, name, (len(PAYLOAD), "2" * 64))
    with Server({name: PAYLOAD}) as s:
        with pytest.raises(UserError, match="sha256 mismatch"):
            download.fetch_d4rl(name, tmp_path / "a", url=f"{s.url}/{name}", progress=False)
        assert not (tmp_path / "a" / name).exists()
        out = download.fetch_d4rl(name, tmp_path / "b", url=f"{s.url}/{name}", verify=False, progress=False)
    assert out == tmp_path / "b" / name and hashlib.sha256(out.read_bytes()).hexdigest() == DIGEST


def test_a_complete_part_of_known_size_is_not_downloaded_again(tmp_path):
    dest = tmp_path / "f.hdf5"
    (tmp_path / "f.hdf5.part").write_bytes(PAYLOAD)
    with Server({"f.hdf5": PAYLOAD}) as s:
        download_file(f"{s.url}/f.hdf5", dest, size=len(PAYLOAD), sha256=DIGEST, progress=False)
    assert s.requests == []
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.hdf5.part").exists()


# ---- minari_io.py -----------------------------------------------------------------------------------------------

def _traj(n, seed, *, terminal=False, timeout=False):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, 11)).astype(np.float32)
    t = {"observations": obs[:-1], "next_observations": obs[1:],
         "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32), "rewards": np.arange(n, dtype=np.float32),
         "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    t["terminals"][-1], t["timeouts"][-1] = terminal, timeout
    return t


def test_export_marks_an_unfinished_last_episode_truncated_and_records_d4rl_scores(tmp_path):
    import json

    pytest.importorskip("minari")
    from decision_transformer.envs import get_env_spec
    from decision_transformer.minari_io import export_minari, load_minari_trajectories

    trajs = [_traj(4, 0, terminal=True), _traj(3, 1)]          # the last one neither terminated nor timed out
    folder = export_minari(trajs, "dt/hopper/cut-v0", "hopper", root=tmp_path)
    back = load_minari_trajectories("dt/hopper/cut-v0", root=tmp_path)
    assert [t["terminals"].tolist() for t in back] == [[False, False, False, True], [False, False, False]]
    assert [t["timeouts"].tolist() for t in back] == [[False] * 4, [False, False, True]]
    np.testing.assert_array_equal(back[1]["next_observations"], trajs[1]["next_observations"])
    meta = json.loads((folder / "data" / "metadata.json").read_text())
    spec = get_env_spec("hopper")
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (spec.ref_min_score, spec.ref_max_score)
    assert spec.ref_min_score != spec.ref_max_score


def test_dataset_ids_need_a_version():
    from decision_transformer.minari_io import check_dataset_id

    assert check_dataset_id("dt/hopper/medium-v0") == "dt/hopper/medium-v0"
    assert check_dataset_id("medium-v12") == "medium-v12"
    for bad in ("dt/hopper/medium", "dt/hopper/medium-v", "/medium-v0"):
        with pytest.raises(UserError, match="not a Minari dataset id of the form namespace/name-vN"):
            check_dataset_id(bad)


def test_env_from_dataset_id_splits_at_underscores():
    from decision_transformer.minari_io import env_from_dataset_id

    assert env_from_dataset_id("dt/walker2d_medium-v0") == "walker2d"
    assert env_from_dataset_id("mine/halfcheetah_expert_run-v3") == "halfcheetah"


# ---- analysis/runs.py -------------------------------------------------------------------------------------------

def test_parse_run_dir_defaults_and_variants():
    from decision_transformer.analysis.runs import RunKey, parse_run_dir

    assert parse_run_dir("dt_medium_hopper_666") == RunKey("dt", "medium", "hopper", 666, 20, False, None)
    assert parse_run_dir("gpt2_medium_hopper_7_K5_no_grad_clip_block1") == \
        RunKey("gpt2", "medium", "hopper", 7, 5, True, 1)
    assert parse_run_dir("igpt_expert_halfcheetah_3_no_grad_clip") == \
        RunKey("igpt", "expert", "halfcheetah", 3, 20, True, None)


def test_checkpoint_epochs_and_other_k_runs_are_in_numeric_order(tmp_path):
    from decision_transformer.analysis.runs import RunKey, checkpoint_epochs, runs_with_other_k

    key = RunKey("dt", "medium", "hopper", 666)
    d = key.path(tmp_path)
    d.mkdir()
    for name in ("model_10.pt", "model_2.pt", "model_0.pt", "model_best.pt"):
        (d / name).write_bytes(b"")
    assert checkpoint_epochs(tmp_path, key) == [0, 2, 10]
    for k in (30, 1, 5):
        (tmp_path / f"dt_medium_hopper_666_K{k}").mkdir()
    (tmp_path / "dt_medium_hopper_666_K7_no_grad_clip").mkdir()    # another variant: not listed
    assert [k.K for k in runs_with_other_k(tmp_path, key)] == [1, 5, 30]


def test_a_checkpoint_recorded_for_another_env_is_refused(tmp_path):
    from decision_transformer.analysis.runs import check_checkpoint_env

    check_checkpoint_env({"config": {"env": "hopper"}}, tmp_path / "model_1.pt", "hopper")
    with pytest.raises(UserError, match="trained on walker2d, but its run folder is for hopper"):
        check_checkpoint_env({"config": {"env": "walker2d"}}, tmp_path / "model_1.pt", "hopper")


def test_epoch_0_of_an_lm_run_is_not_rebuilt_from_another_epoch(tmp_path):
    from test_analysis_support import write_run

    from decision_transformer.analysis.runs import RunKey, load_run_checkpoint

    write_run(tmp_path, "gpt2", epochs=(1,))
    with pytest.raises(UserError, match=r"checkpoint not found: .*model_0\.pt; the folder has model_1\.pt"):
        load_run_checkpoint(tmp_path, RunKey("gpt2", "medium", "hopper", 666), 0)


def test_model_inputs_take_the_rtg_of_the_current_steps():
    import torch

    from decision_transformer.analysis.runs import model_inputs
    from decision_transformer.data import Batch

    rtg = torch.arange(4.0).reshape(1, 4, 1)   # K = 3: rtg has K + 1 entries
    b = Batch(states="s", actions="a", rewards="r", dones="d", rtg=rtg, timesteps="t", mask="m")
    s, a, r, t, m = model_inputs(b)
    assert (s, a, t, m) == ("s", "a", "t", "m")
    assert r.reshape(-1).tolist() == [0.0, 1.0, 2.0]


def test_analysis_batch_accepts_a_context_as_long_as_an_episode():
    from types import SimpleNamespace

    from decision_transformer.analysis.runs import analysis_batch

    calls = []
    ds = SimpleNamespace(max_ep_len=5, env="hopper", device="cpu",
                         sample_batch=lambda b, k, g: calls.append((b, k)) or "batch")
    assert analysis_batch(ds, 2, 5, seed=0) == "batch" and calls == [(2, 5)]
    with pytest.raises(UserError, match="invalid context K 6"):
        analysis_batch(ds, 2, 6, seed=0)


def test_discover_runs_finds_metrics_only_and_checkpoint_folders(tmp_path):
    from decision_transformer.analysis.runs import RunKey, discover_runs

    for name in ("dt_medium_hopper_1", "gpt2_medium_hopper_2_K5", "igpt_medium_hopper_3", "not_a_run"):
        (tmp_path / name).mkdir()
    (tmp_path / "dt_medium_hopper_1" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "gpt2_medium_hopper_2_K5" / "model_1.pt").write_bytes(b"")
    (tmp_path / "not_a_run" / "metrics.jsonl").write_text("{}\n")
    assert discover_runs(tmp_path) == [RunKey("dt", "medium", "hopper", 1), RunKey("gpt2", "medium", "hopper", 2, 5)]


def test_run_depth_is_the_configs_block_count(tmp_path):
    from test_analysis_support import write_run

    from decision_transformer.analysis.runs import RunKey, run_depth

    write_run(tmp_path, "dt", epochs=(1,), n_layer=3)
    assert run_depth(tmp_path, RunKey("dt", "medium", "hopper", 666)) == 3


# ---- analysis/common.py -----------------------------------------------------------------------------------------

def test_run_k_and_its_file_tag():
    from argparse import Namespace

    from decision_transformer.analysis import common

    assert common.run_k(Namespace(run_K=None, no_context=True)) == 1
    assert common.run_k(Namespace(run_K=None)) == 20
    assert common.run_k(Namespace(run_K=5, no_context=True)) == 5
    assert [common.run_k_tag(k) for k in (20, 1, 5)] == ["", "_K1", "_K5"]


def test_pair_average_leaves_a_non_multiple_and_names_wider_groups():
    from decision_transformer.analysis import common

    np.testing.assert_array_equal(common.pair_average(np.arange(5.0), 2), np.arange(5.0))
    np.testing.assert_allclose(common.pair_average(np.arange(6.0).reshape(1, 6), 2, axis=1), [[1.0, 4.0]])
    assert common.pairing_text("igpt", 24, 12) == "iGPT: blocks 2b and 2b+1 averaged"
    assert common.pairing_text("igpt", 36, 12) == "iGPT: blocks 3b to 3b+2 averaged"


def test_seed_and_array_checks_refuse_out_of_range_and_nan():
    from argparse import Namespace

    from decision_transformer.analysis import common

    common.check_seeds(Namespace(s=[0, 2 ** 32 - 1]), "s")
    with pytest.raises(UserError, match=r"invalid --s 4294967296"):
        common.check_seeds(Namespace(s=[1, 2 ** 32]), "s")
    common.check_arrays("f.npz", {"a": np.array([np.nan])}, ["a"], finite=False)
    with pytest.raises(UserError, match=r"f\.npz: array 'a' has NaN or infinite values"):
        common.check_arrays("f.npz", {"a": np.array([1.0, np.inf])}, ["a"])


def test_analysis_dataset_ignores_a_recorded_file_of_another_dataset(tmp_path, monkeypatch):
    from decision_transformer.analysis import runs
    from decision_transformer.synthetic import make_dataset

    from decision_transformer.data import safe_pickle_load

    other = make_dataset(tmp_path / "old", "hopper", "expert", 120, seed=1, max_ep_len=20)
    mine = make_dataset(tmp_path / "data", "hopper", "medium", 60, seed=2, max_ep_len=20)
    n_other, n_mine = (sum(len(t["rewards"]) for t in safe_pickle_load(p)) for p in (other, mine))
    assert n_other != n_mine
    monkeypatch.setattr(runs, "project_path", lambda p: str(tmp_path / p))
    ckpt = {"config": {"env": "hopper", "dataset": "expert", "data_file": str(other)}}
    medium = runs.analysis_dataset("hopper", "medium", None, ckpt)
    assert medium.num_timesteps == n_mine
    assert runs.analysis_dataset("hopper", "expert", None, ckpt).num_timesteps == n_other


def test_section_folders_keep_the_originals_names():
    from decision_transformer.analysis import common

    assert common.SECTIONS == {
        "scores": "section-4-sanity-check", "cka": "section-51-activation-similarity",
        "mi": "section-52-mutual-information", "params": "section-53-parameter-similarity",
        "grads": "section-54-gradient-analysis", "no_context": "section-55-fine-tuning-no-context",
        "attention": "section-56-dependence-on-context"}


def test_an_analysis_batch_is_drawn_by_a_cpu_generator_whatever_the_datasets_device():
    """A GPU's generator gives another stream than the CPU's: --device cuda analyses saw another batch than --device
    cpu ones for the same --batch_seed (under the same file tags). The windows are now drawn on the CPU."""
    from types import SimpleNamespace

    from decision_transformer.analysis.runs import analysis_batch

    gens = []
    ds = SimpleNamespace(max_ep_len=5, env="hopper", device="cuda",
                         sample_batch=lambda b, k, g: gens.append(g) or "batch")
    assert analysis_batch(ds, 2, 5, seed=42) == "batch"
    (g,), = [gens]
    assert g.device.type == "cpu" and g.initial_seed() == 42


def test_merge_windows_are_drawn_by_a_cpu_generator_whatever_the_datasets_device():
    """RegMean's Gram windows and greedy soup's scoring windows, as the analyses' batches and the Fisher's."""
    from types import SimpleNamespace

    from decision_transformer.merge_setup import windows

    gens = []
    ds = SimpleNamespace(device="cuda", sample_batch=lambda b, k, g: gens.append((b, g)) or "batch")
    assert windows(ds, 5, 2, 4, seed=9) == ["batch"] * 3
    assert [b for b, _ in gens] == [2, 2, 1]
    assert all(g.device.type == "cpu" and g.initial_seed() == 9 for _, g in gens)
