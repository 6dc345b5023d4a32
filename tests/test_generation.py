"""D4RL-style dataset generation (decision_transformer/generation.py, data/generate_datasets.py) end to end on
real MuJoCo with small policy files made here (freshly initialised actors standing in for trained ones): layout,
consistency with the simulator state, determinism, the medium-expert and medium-replay recipes, stats, the
embedded default ``ensure_dataset`` and the refusal of damaged policy files; last, the bundled (trained) policy set:
complete for all 15 datasets and scoring what its files record."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from decision_transformer import generation
from decision_transformer.data import load_trajectories, read_hdf5, safe_pickle_load
from decision_transformer.errors import UserError
from decision_transformer.generation import (
    ensure_dataset,
    generate_dataset,
    generate_flat,
    load_policy,
    random_policy,
)
from decision_transformer.sac import Actor, actor_file_dict

ROOT = Path(__file__).resolve().parents[1]




def save_actor(path, env, seed, step, half=False, shift=0.0, **meta):
    """A freshly initialised actor; ``shift`` moves its mean action (pre-tanh) so that actors are told apart."""
    from decision_transformer.envs import get_env_spec

    spec = get_env_spec(env)
    torch.manual_seed(seed)
    actor = Actor(spec.state_dim, spec.act_dim)
    with torch.no_grad():
        actor.head.bias[: spec.act_dim] += shift
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(actor_file_dict(actor.state_dict(), env, step=step, half=half, **meta), path)
    return path


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """medium (step 3000), expert and replay snapshots at 0/1000/2000 (uniform actions before 500)."""
    d = tmp_path_factory.mktemp("policies")
    for env in ("hopper", "halfcheetah"):
        save_actor(d / env / "medium.pt", env, 1, 3000, kind="medium")
        save_actor(d / env / "expert.pt", env, 2, 9000, kind="expert", final=True)
        for i, step in enumerate((0, 1000, 2000)):
            save_actor(d / env / "replay" / f"actor_{step:07d}.pt", env, 10 + i, step, half=True, covers=1000,
                       uniform_before=500, shift=0.6 * i)
    return d


def test_generated_hdf5_layout_and_simulator_consistency(tmp_path, policies):
    stats = generate_dataset(tmp_path, "halfcheetah", "medium", num_transitions=2500, policy_dir=policies,
                             progress=False, log=lambda m: None)
    d = read_hdf5(tmp_path / "halfcheetah_medium-v2.hdf5")
    n = 2500
    for k, shape in {"observations": (n, 17), "next_observations": (n, 17), "actions": (n, 6), "rewards": (n,),
                     "terminals": (n,), "timeouts": (n,), "infos/qpos": (n, 9), "infos/qvel": (n, 9),
                     "infos/action_log_probs": (n,)}.items():
        assert d[k].shape == shape, k
        assert d[k].dtype == (bool if k in ("terminals", "timeouts") else np.float32), k
    assert d["metadata/algorithm"] == b"SAC" and d["metadata/iteration"] == 3000
    # HalfCheetah never terminates: episodes end by timeout after 1000 steps; the cut tail carries no flag
    assert not d["terminals"].any()
    assert list(np.flatnonzero(d["timeouts"])) == [999, 1999]
    # observation = qpos[1:] ++ qvel of the simulator state before the step
    np.testing.assert_allclose(d["observations"][:, :8], d["infos/qpos"][:, 1:], atol=1e-5)
    np.testing.assert_allclose(d["observations"][:, 8:], d["infos/qvel"], atol=1e-5)
    # within an episode, the next observation is the following row's observation
    same_ep = ~(d["timeouts"] | d["terminals"])[:-1]
    np.testing.assert_array_equal(d["next_observations"][:-1][same_ep], d["observations"][1:][same_ep])
    assert np.abs(d["actions"]).max() <= 1.0 and np.isfinite(d["infos/action_log_probs"]).all()
    # the pkl holds the two complete episodes; stats describe them
    trajs = load_trajectories(tmp_path / "halfcheetah-medium-v2.pkl", "halfcheetah")
    assert [len(t["rewards"]) for t in trajs] == [1000, 1000]
    assert stats["episodes"] == 2 and stats["transitions"] == 2000
    rets = [t["rewards"].sum() for t in trajs]
    assert stats["return_mean"] == pytest.approx(np.mean(rets), rel=1e-5)
    assert stats["score"] == pytest.approx(100 * (np.mean(rets) + 280.178953) / (12135.0 + 280.178953), rel=1e-5)
    assert stats["d4rl_average_score"] == 40.7
    saved = json.loads((tmp_path / "halfcheetah-medium-v2.stats.json").read_text())
    assert saved["episodes"] == 2 and saved["files"]["pkl"].endswith("halfcheetah-medium-v2.pkl")


def test_generation_is_seeded(policies):
    a, _ = generate_flat("hopper", "expert", 1200, seed=3, policy_dir=policies)
    b, _ = generate_flat("hopper", "expert", 1200, seed=3, policy_dir=policies)
    c, _ = generate_flat("hopper", "expert", 1200, seed=4, policy_dir=policies)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["actions"], c["actions"])


def test_medium_expert_is_medium_cut_then_expert(policies):
    med, _ = generate_flat("hopper", "medium", 1500, policy_dir=policies)
    exp, _ = generate_flat("hopper", "expert", 1500, policy_dir=policies)
    me, meta = generate_flat("hopper", "medium-expert", 1500, policy_dir=policies)
    cut = int(np.flatnonzero(med["terminals"] | med["timeouts"])[-1]) + 1
    assert 0 < cut < 1500 and len(me["rewards"]) == cut + 1500
    for k in med:
        np.testing.assert_array_equal(me[k][:cut], med[k][:cut])
        np.testing.assert_array_equal(me[k][cut:], exp[k])
    assert meta["policy"] == "hopper/medium.pt+hopper/expert.pt"


def _log_prob(actor, obs, action):
    mean, log_std = actor.dist_params(obs)
    u = np.arctanh(np.clip(action, -1 + 1e-6, 1 - 1e-6))
    eps = (u - mean) / np.exp(log_std)
    return float((-0.5 * eps ** 2 - log_std - 0.5 * math.log(2 * math.pi) - np.log(1 - np.tanh(u) ** 2)).sum())


def test_medium_replay_follows_the_training_snapshots(tmp_path, policies):
    d, meta = generate_flat("hopper", "medium-replay", policy_dir=policies)
    assert len(d["rewards"]) == 3000 and meta["snapshots"] == 3   # every step up to the medium policy
    lp = d["infos/action_log_probs"]
    assert np.allclose(lp[:500], -3 * np.log(2.0))                 # uniform warm-up
    assert not np.allclose(lp[500:], -3 * np.log(2.0))
    snap0, _ = load_policy(policies / "hopper" / "replay" / "actor_0000000.pt", "hopper")
    snap1, _ = load_policy(policies / "hopper" / "replay" / "actor_0001000.pt", "hopper")
    for row, right, wrong in ((700, snap0, snap1), (1500, snap1, snap0)):
        obs, act = d["observations"][row], d["actions"][row]
        assert _log_prob(right, obs, act) == pytest.approx(float(lp[row]), abs=2e-2)
        assert abs(_log_prob(wrong, obs, act) - float(lp[row])) > 0.1
    # a prefix can be asked for
    short, _ = generate_flat("hopper", "medium-replay", 800, policy_dir=policies)
    np.testing.assert_array_equal(short["actions"], d["actions"][:800])


def test_random_dataset_and_the_script(tmp_path, policies, capsys):
    spec = importlib.util.spec_from_file_location("gen_script", ROOT / "data" / "generate_datasets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--env", "hopper", "--dataset", "random", "--num_transitions", "3000", "--data_path",
                 str(tmp_path), "--no_progress", "--no_hdf5"])
    out = capsys.readouterr().out
    assert "hopper-random:" in out and "D4RL average 1.2" in out
    assert not (tmp_path / "hopper_random-v2.hdf5").exists()
    trajs = safe_pickle_load(tmp_path / "hopper-random-v2.pkl")
    assert len(trajs) > 50 and all(t["terminals"][-1] for t in trajs)   # random hopper falls quickly
    # a damaged policy file stops the script with a one-line error naming it
    bad = tmp_path / "pol" / "hopper" / "medium.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(SystemExit) as e:
        script.main(["--env", "hopper", "--dataset", "medium", "--num_transitions", "100", "--data_path",
                     str(tmp_path), "--policy_dir", str(tmp_path / "pol"), "--no_progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err


def test_no_episode_end_within_the_transitions_is_refused_before_writing(tmp_path, capsys):
    """HalfCheetah never terminates: 50 transitions end no episode. That is one line (how many transitions, a larger
    --num_transitions), and the datasets already there (pkl, hdf5, stats JSON) are left as they were."""
    from conftest import fails

    spec = importlib.util.spec_from_file_location("gen_script", ROOT / "data" / "generate_datasets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = ("halfcheetah-random-v2.pkl", "halfcheetah_random-v2.hdf5", "halfcheetah-random-v2.stats.json")
    for name in names:
        (tmp_path / name).write_bytes(b"an earlier dataset " + name.encode())
    with pytest.raises(UserError) as e:
        generate_dataset(tmp_path, "halfcheetah", "random", num_transitions=50, progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "no episode ended within the 50 generated transitions" in msg and "--num_transitions" in msg
    msg = fails(script.main, ["--env", "halfcheetah", "--dataset", "random", "--num_transitions", "40", "--data_path",
                              tmp_path, "--no_progress"], capsys)
    assert msg == (f"error: {tmp_path / names[0]} and 1 more already exist(s); generating would replace it with "
                   f"generated data: give another --data_path, or pass --force to overwrite")
    msg = fails(script.main, ["--env", "halfcheetah", "--dataset", "random", "--num_transitions", "40", "--data_path",
                              tmp_path, "--no_progress", "--force"], capsys)
    assert "within the 40 generated transitions" in msg
    # --no_hdf5 writes only a pkl, which loaders read before a D4RL hdf5 of the same dataset: refused as well
    (tmp_path / names[0]).unlink()
    msg = fails(script.main, ["--env", "halfcheetah", "--dataset", "random", "--num_transitions", "40", "--data_path",
                              tmp_path, "--no_progress", "--no_hdf5"], capsys)
    assert f"{tmp_path / names[1]} already exist(s)" in msg
    (tmp_path / names[0]).write_bytes(b"an earlier dataset " + names[0].encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == b"an earlier dataset " + name.encode()


def test_damaged_policy_files_are_refused(tmp_path):
    p = tmp_path / "p.pt"
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="p.pt: not a readable policy file"):
        load_policy(p)
    torch.save({"format": "something-else"}, p)
    with pytest.raises(UserError, match="p.pt: not a behaviour-policy file"):
        load_policy(p)
    save_actor(p, "hopper", 0, 10)
    obj = torch.load(p, weights_only=True)
    obj["actor"]["l2.weight"][0, 0] = float("nan")
    torch.save(obj, p)
    with pytest.raises(UserError, match="NaN"):
        load_policy(p)
    save_actor(p, "hopper", 0, 10)
    with pytest.raises(UserError, match="expected walker2d"):
        load_policy(p, "walker2d")
    obj = torch.load(p, weights_only=True)
    del obj["actor"]["head.bias"]
    torch.save(obj, p)
    with pytest.raises(UserError, match="malformed actor weights"):
        load_policy(p)
    with pytest.raises(UserError, match="policy file not found"):
        load_policy(tmp_path / "missing.pt")


def test_ensure_dataset(tmp_path, policies):
    messages = []
    # generate=False: the data module's "not found" error
    with pytest.raises(UserError, match="dataset not found"):
        ensure_dataset(tmp_path, "hopper", "medium", generate=False)
    # no bundled policy for the dataset: one line saying so
    with pytest.raises(UserError, match="cannot be generated: no medium behaviour policy"):
        ensure_dataset(tmp_path, "hopper", "medium", policy_dir=tmp_path / "nothing")
    # an expert policy from unfinished training is not used silently
    unfinished = tmp_path / "unfinished"
    save_actor(unfinished / "hopper" / "expert.pt", "hopper", 2, 500)
    with pytest.raises(UserError, match="unfinished training"):
        ensure_dataset(tmp_path, "hopper", "expert", policy_dir=unfinished)
    path = ensure_dataset(tmp_path, "hopper", "medium", num_transitions=1500, policy_dir=policies,
                          log=messages.append)
    assert path == tmp_path / "hopper-medium-v2.pkl" and path.is_file()
    assert "not found: generating hopper-medium" in messages[0] and "--no_generate" in messages[0]
    assert not (tmp_path / "hopper_medium-v2.hdf5").exists()
    trajs = load_trajectories(path, "hopper")
    assert sum(len(t["rewards"]) for t in trajs) <= 1500
    # an existing file is returned untouched
    mtime = path.stat().st_mtime_ns
    assert ensure_dataset(tmp_path, "hopper", "medium", policy_dir=policies, log=messages.append) == path
    assert path.stat().st_mtime_ns == mtime and len(messages) == 2


def test_random_policy_is_seeded():
    a = random_policy("walker2d", 0).act(np.zeros(17, np.float32))[0]
    b = random_policy("walker2d", 0).act(np.zeros(17, np.float32))[0]
    c = random_policy("walker2d", 1).act(np.zeros(17, np.float32))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bundled_policy_files_load_when_present():
    """Whatever is bundled must load cleanly for its env; the package ships hopper's, halfcheetah's and walker2d's
    medium and expert policies and replay snapshots."""
    bundled = sorted(p.name for p in generation.BUNDLED_POLICY_DIR.glob("*") if p.is_dir())
    assert bundled == ["halfcheetah", "hopper", "walker2d"]
    loaded = []
    for env_dir in sorted(p for p in generation.BUNDLED_POLICY_DIR.glob("*") if p.is_dir()):
        assert {p.name for p in env_dir.glob("*.pt")} == {"expert.pt", "medium.pt"}, env_dir
        assert (env_dir / "replay" / "actor_0000000.pt").is_file(), env_dir
        for f in sorted(env_dir.glob("*.pt")) + sorted(env_dir.glob("replay/*.pt"))[:3]:
            _, meta = load_policy(f, env_dir.name)
            assert meta["env"] == env_dir.name
            loaded.append(f)
    assert len(loaded) == 3 * (2 + 3)


@pytest.mark.parametrize("env", ["hopper", "halfcheetah", "walker2d"])
def test_bundled_policies_cover_every_dataset_and_behave_as_recorded(env):
    """The shipped set is complete (all five datasets generate: medium, a final expert, replay snapshots every 10k
    steps from 0 up to the medium step) and each policy still scores what its file records: the mean of 20 seeded
    episodes of the sampled policy lies within 3 standard errors (+3 points) of the recorded 50-episode score, and
    the recorded scores are within D4RL's +-10-point targets."""
    from decision_transformer.envs import get_env_spec
    from decision_transformer.sac import evaluate_policy

    spec = get_env_spec(env)
    for dataset in generation.DATASETS:
        assert generation.missing_policies(env, dataset) is None, (env, dataset)
    policy_dir = generation.BUNDLED_POLICY_DIR
    _, med_meta = load_policy(policy_dir / env / "medium.pt", env)
    steps = [s for s, _ in generation.replay_snapshots(policy_dir, env, med_meta["step"])]
    assert steps == list(range(0, med_meta["step"], 10_000))
    for kind in ("medium", "expert"):
        actor, meta = load_policy(policy_dir / env / f"{kind}.pt", env)
        assert meta["kind"] == kind and meta["eval_episodes"] == 50
        assert abs(meta["eval_score"] - generation.D4RL_AVERAGE_SCORE[(env, kind)]) <= 10, (kind, meta["eval_score"])
        scores = spec.d4rl_score(evaluate_policy(actor, env, 20, seed=0))
        band = 3 * scores.std() / math.sqrt(len(scores)) + 3
        assert abs(scores.mean() - meta["eval_score"]) <= band, (kind, scores.mean(), meta["eval_score"], band)
    assert meta["final"]


def test_hdf5_and_stats_writes_are_atomic_and_name_the_file(tmp_path, monkeypatch):
    """A failed write of a generated hdf5 is one line naming the file, keeps the old file and leaves no temporary
    file; the same helper writes the stats JSON."""
    import errno

    import h5py

    from decision_transformer import synthetic
    from decision_transformer.errors import UserError
    from decision_transformer.generation import write_d4rl_hdf5

    path = tmp_path / "hopper_medium-v2.hdf5"
    path.write_bytes(b"old")

    class FullDisk:
        """A file whose writes stop part-way with ENOSPC."""

        def __init__(self, name, mode):
            self.f = open(name, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "open", FullDisk, raising=False)
    with pytest.raises(UserError, match=rf"^cannot write {path}: no space left on the device$"):
        write_d4rl_hdf5(path, {"rewards": np.zeros(3, np.float32)})
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.delattr(synthetic, "open")
    write_d4rl_hdf5(path, {"rewards": np.zeros(3, np.float32)}, {"policy": "x"})
    with h5py.File(path) as f:
        assert f["rewards"].shape == (3,) and f["metadata/policy"][()] == b"x"


def test_the_rollout_progress_bar_ends_at_the_request(monkeypatch):
    """Envs finishing 1000-step episodes together pass the request (3 x 1000 for 2500): the bar stops at it."""
    from decision_transformer import generation

    class Bar:
        def __init__(self, total, desc):
            self.total, self.n, self.seen = total, 0, []

        def update(self, k):
            self.n += k
            self.seen.append(self.n)

        def close(self):
            bars.append(self)

    bars = []
    monkeypatch.setattr(generation, "_progress", Bar)
    data = generation.rollout_policy("halfcheetah", generation.random_policy("halfcheetah", 0), 2500, seed=0,
                                     progress=True)
    assert len(data["rewards"]) == 2500
    (bar,) = bars
    assert bar.n == 2500 and max(bar.seen) == 2500


def test_a_small_request_is_rolled_out_in_one_env():
    """Episodes still running when the request is filled are left out, and those are the long ones: 16 lockstep envs
    on a 20k request gave a hopper-medium 5 points below its policy. A request of fewer than 20 episodes' worth of
    steps per env now steps fewer envs, down to one (as D4RL's rollouts); 1M-transition datasets still use 16."""
    actor = generation.random_policy("hopper", 0)
    small = generation.rollout_policy("hopper", actor, 3000, seed=1)
    one = generation.rollout_policy("hopper", actor, 3000, seed=1, num_envs=1)
    assert all(np.array_equal(small[k], one[k]) for k in one)

    class Seen(Exception):
        pass

    class Counting:
        """An actor that notes how many envs its first call steps, then stops the rollout."""
        def act(self, obs, rng):
            raise Seen(len(obs))

    for n, envs in ((19_999, 1), (40_000, 2), (319_999, 15), (1_000_000, 16)):
        with pytest.raises(Seen) as e:
            generation.rollout_policy("hopper", Counting(), n)
        assert e.value.args == (envs,), n


def test_a_failed_pkl_write_takes_the_new_hdf5_with_it(tmp_path, monkeypatch):
    """The pkl failing after the hdf5 was written where none was (a full disk between the two) left that hdf5 alone,
    and the next try was refused as replacing an existing dataset: it is removed with the failure, which says so."""
    from decision_transformer import synthetic
    from decision_transformer.synthetic import rollout_flat

    monkeypatch.setattr(generation, "generate_flat",
                        lambda env, ds, n, seed, policy_dir, progress: (rollout_flat(env, 300, seed=0, max_ep_len=50),
                                                                        {"policy": "x"}))

    def full_disk(path, *a, **k):
        raise UserError(f"cannot write {path}: no space left on the device")

    monkeypatch.setattr(synthetic, "write_pkl", full_disk)
    with pytest.raises(UserError) as e:
        generation.generate_dataset(tmp_path, "hopper", "random", replace=False, progress=False, log=lambda *a: None)
    hdf5 = tmp_path / "hopper_random-v2.hdf5"
    assert str(e.value) == (f"cannot write {tmp_path / 'hopper-random-v2.pkl'}: no space left on the device; the hdf5 "
                            f"generated with this one, {hdf5}, is removed with it")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(generation, "generate_flat",
                        lambda env, ds, n, seed, policy_dir, progress: (rollout_flat(env, 300, seed=0, max_ep_len=50),
                                                                        {"policy": "x"}))
    generation.generate_dataset(tmp_path, "hopper", "random", replace=False, progress=False, log=lambda *a: None)
    assert hdf5.is_file() and (tmp_path / "hopper-random-v2.pkl").is_file()
