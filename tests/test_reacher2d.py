"""The reacher2d port: the env's rules (reference/evaluation.md section 1 and the module docstring), its table entry
(targets 76/40, RTG scale 10, 100 steps, no D4RL score) and the scripts end to end on user-style data."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from decision_transformer import evaluation as ev
from decision_transformer.envs import ENVS, get_env_spec, make_env
from decision_transformer.errors import UserError
from decision_transformer.reacher2d import reaching_action, scripted_trajectories
from tests.conftest import fails, listed, load_script

SHOULDER_ANGLE = 0.785  # the shoulder body's fixed rotation in the model; the elbow's undoes it


def joint_angles(obs):
    return np.arctan2(obs[:2], obs[2:4])


def fingertip(q):
    """Planar forward kinematics of the model: links of 0.6 and (to the fingertip site) 0.45."""
    a0, a1 = SHOULDER_ANGLE + q[0], q[0] + q[1]
    return np.array([0.6 * np.cos(a0) + 0.45 * np.cos(a1), 0.6 * np.sin(a0) + 0.45 * np.sin(a1)])


@pytest.fixture(scope="module")
def env():
    e = make_env("reacher2d")
    yield e
    e.close()


def test_table_entry():
    spec = ENVS["reacher2d"]
    assert (spec.state_dim, spec.act_dim, spec.max_ep_len, spec.targets, spec.scale) == (12, 2, 100, (76.0, 40.0), 10.0)
    assert not spec.has_d4rl_score and not spec.d4rl
    with pytest.raises(UserError, match="no D4RL reference"):
        spec.d4rl_score(np.array([50.0]))
    with pytest.raises(UserError, match="only as --env_version v4"):
        make_env("reacher2d", "v5")
    assert spec.score_metrics("target_76", [1.0]) == {}
    assert set(ENVS["hopper"].score_metrics("k", [1.0])) == {"k_d4rl_score_mean", "k_d4rl_score_std"}


def test_spaces_and_reset(env):
    assert env.observation_space.shape == (12,) and env.action_space.shape == (2,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    goals = []
    for seed in range(30):
        obs, _ = env.reset(seed=seed)
        q = joint_angles(obs)
        assert np.all(np.abs(q) <= 2.0)                      # angles uniform in [-2, 2]
        np.testing.assert_allclose(obs[:2] ** 2 + obs[2:4] ** 2, 1.0)
        assert np.all(obs[4:6] == 0)                         # at rest
        np.testing.assert_allclose(obs[6:8], fingertip(q), atol=1e-6)
        np.testing.assert_allclose(obs[10:12], obs[6:8] - obs[8:10])
        assert 0.5 <= np.linalg.norm(obs[8:10]) <= 1.0      # target in the annulus
        goals.append(obs[8:10])
    assert len({tuple(np.round(g, 6)) for g in goals}) == 30
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    np.testing.assert_array_equal(a, b)


def test_step_rules(env):
    """Reward 1 exactly when the L1 fingertip-target distance is below 0.1; 100 steps, never a termination;
    velocities enter the observation times dt = 0.15; actions are clipped to [-1, 1]."""
    returns = []
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        total, n, done = 0.0, 0, False
        while not done:
            obs, r, term, trunc, info = env.step(reaching_action(obs))
            n += 1
            assert not term
            assert r == float(np.abs(obs[10:12]).sum() < 0.1) == float(info["distance"] < 0.1)
            # positions are read after mj_step, as the originals did: from the start of the last 0.01 s substep
            np.testing.assert_allclose(obs[6:8], fingertip(joint_angles(obs)), atol=0.05)
            total += r
            done = trunc
        assert n == 100
        returns.append(total)
    assert max(returns) > 40 and min(returns) < 100, returns   # both reward values occur
    u = env.unwrapped
    import mujoco

    mujoco.mj_forward(u.model, u.data)
    np.testing.assert_allclose(u.data.site_xpos[u._tip][:2], fingertip(u.data.qpos), atol=1e-6)
    assert u.dt == pytest.approx(0.15)
    env.reset(seed=0)
    obs, *_ = env.step(np.array([1.0, -1.0]))
    np.testing.assert_allclose(obs[4:6], 0.15 * u.data.qvel)
    big = []
    for a in ([1.0, -1.0], [7.0, -3.0]):
        env.reset(seed=5)
        big.append(env.step(np.array(a))[0])
    np.testing.assert_array_equal(big[0], big[1])


def _tiny_model():
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    spec = get_env_spec("reacher2d")
    bb = BackboneConfig(n_embd=16, n_layer=1, n_head=2, vocab_size=1)
    return DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim, max_length=5, max_ep_len=spec.max_ep_len,
                                        backbone=bb), seed=0).eval()


@pytest.mark.parametrize("mode", ["normal", "delayed"])
def test_batched_evaluation_equals_one_by_one(mode):
    model = _tiny_model()
    mean, std = np.zeros(12), np.ones(12)
    with torch.no_grad():
        seq = ev.evaluate_episodes_sequential(model, "reacher2d", 76.0, 3, mean, std, seed=2, mode=mode)
        lock = ev.evaluate_episodes(model, "reacher2d", 76.0, 3, mean, std, seed=2, mode=mode)
    assert (seq.lengths == 100).all()
    np.testing.assert_array_equal(lock.lengths, seq.lengths)
    np.testing.assert_allclose(lock.returns, seq.returns)
    m = lock.metrics("reacher2d")
    assert set(m) == {f"target_76_{k}_{s}" for k in ("return", "length") for s in ("mean", "std")}


def _user_dataset(folder, n_episodes=6):
    """Trajectories in the DT pickle layout, as a user would supply them: scripted reaching episodes."""
    trajs = scripted_trajectories(n_episodes, noise=(0.0,), seed=1)
    with open(folder / "reacher2d-medium-v2.pkl", "wb") as f:
        pickle.dump(trajs, f)
    return trajs


def test_experiment_on_user_data(tmp_path, monkeypatch, capsys):
    """experiment.py trains and evaluates on reacher2d: targets 76 and 40, RTG scale 10, 100-step episodes, no
    D4RL keys; an unavailable dataset and --env_version v5 are one line, before any run folder exists."""
    import experiment

    data = tmp_path / "data"
    data.mkdir()
    trajs = _user_dataset(data)
    assert np.mean([t["rewards"].sum() for t in trajs]) > 20
    monkeypatch.chdir(tmp_path)
    base = ["--env", "reacher2d", "--data_path", data, "--K", "5", "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "1", "--batch_size", "4", "--num_steps_per_iter", "3", "--max_iters", "1",
            "--num_eval_episodes", "2", "--no_generate", "--device", "cpu", "--outdir", "runs"]
    assert "only as --env_version v4" in fails(experiment.main, base + ["--env_version", "v5"], capsys)
    assert "reacher2d-expert-v2.pkl" in fails(experiment.main, base + ["--dataset", "expert"], capsys)
    assert not (tmp_path / "runs").exists()
    experiment.main([str(a) for a in base + ["--dataset", "medium"]])
    out = capsys.readouterr()
    assert "target_76 return" in out.out + out.err and "d4rl" not in out.out
    (run,) = listed(tmp_path / "runs")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for t in (76, 40):
        assert last[f"evaluation/target_{t}_length_mean"] == 100.0
        assert 0.0 <= last[f"evaluation/target_{t}_return_mean"] <= 100.0
    assert not [k for k in last if "d4rl" in k]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["env"] == "reacher2d"


def test_data_scripts(tmp_path, capsys):
    gen = load_script("data/generate_datasets.py")
    gen.main(["--env", "reacher2d", "--dataset", "random", "--num_transitions", "500", "--data_path", str(tmp_path),
              "--no_hdf5", "--no_progress"])
    assert "no D4RL reference" in capsys.readouterr().out
    with open(tmp_path / "reacher2d-random-v2.pkl", "rb") as f:
        trajs = pickle.load(f)
    assert trajs[0]["observations"].shape == (100, 12) and trajs[0]["actions"].shape == (100, 2)
    assert "no bundled behaviour policies" in fails(
        gen.main, ["--env", "reacher2d", "--dataset", "medium", "--data_path", tmp_path], capsys)
    dl = load_script("data/download_d4rl_datasets.py")
    assert "no D4RL files to download" in fails(dl.main, ["--envs", "reacher2d", "--hdf5_dir", tmp_path / "h",
                                                          "--data_path", tmp_path], capsys)
    dl.main(["--envs", "reacher2d", "--datasets", "expert", "--synthetic", "2", "--hdf5_dir", str(tmp_path / "h"),
             "--data_path", str(tmp_path)])
    assert (tmp_path / "h" / "reacher2d_expert-v2.hdf5").is_file()
    assert (tmp_path / "reacher2d-expert-v2.pkl").is_file()


def test_minari_round_trip(tmp_path, monkeypatch):
    """The export records the registered Reacher2d-v4 spec, which Minari can rebuild the env from."""
    minari = pytest.importorskip("minari")
    from decision_transformer.data import split_episodes
    from decision_transformer.minari_io import export_minari, load_minari_trajectories
    from decision_transformer.synthetic import rollout_flat

    trajs = split_episodes(rollout_flat("reacher2d", None, seed=0, num_episodes=2))
    export_minari(trajs, "dt/reacher2d/test-v0", "reacher2d", root=tmp_path)
    back = load_minari_trajectories("dt/reacher2d/test-v0", root=tmp_path)
    np.testing.assert_array_equal(back[1]["observations"], trajs[1]["observations"])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    ds = minari.load_dataset("dt/reacher2d/test-v0")
    assert ds.spec.env_spec.id == "Reacher2d-v4" and ds.spec.env_spec.max_episode_steps == 100
    e = ds.recover_environment()
    assert e.reset(seed=0)[0].shape == (12,)


def test_results_table_refuses_the_env(tmp_path, capsys, monkeypatch):
    """A table of D4RL scores: a reacher2d run folder, checkpoint or --envs entry is one line, before evaluating."""
    from decision_transformer import results_table as rt

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"env": "reacher2d"}))
    (run / "metrics.jsonl").write_text(json.dumps({"evaluation/target_76_return_mean": 50.0}) + "\n")
    for argv in (["--row", f"a={run}"], ["--row", f"a={run}", "--envs", "hopper", "reacher2d"]):
        assert "reacher2d has no D4RL reference returns" in fails(rt.main, argv, capsys)
    # a hopper checkpoint row before a reacher2d one: refused before the hopper model is evaluated
    from tests.conftest import write_source_models

    _, data, paths = write_source_models(tmp_path, ("hopper", "reacher2d"), n=120, max_ep_len=50, id_base=10)
    evaluated = []
    monkeypatch.setattr(rt, "evaluate_checkpoint", lambda path, **kw: evaluated.append(path) or {"hopper": 1.0})
    msg = fails(rt.main, ["--row", f"h={paths['hopper']}", "--row", f"r={paths['reacher2d']}", "--data_path", data],
                capsys)
    assert f"{paths['reacher2d']}: reacher2d has no D4RL reference returns" in msg and not evaluated


def test_long_episodes_and_files_without_timeouts(tmp_path, capsys):
    """A D4RL-layout file without timeouts is cut into 100-step episodes (not D4RL's 1000/999); trajectories longer
    than 100 steps are accepted with a warning (the sampler clips their timesteps, as the originals did)."""
    from decision_transformer.data import load_trajectories, split_episodes
    from decision_transformer.synthetic import rollout_flat, write_hdf5

    flat = rollout_flat("reacher2d", None, seed=0, num_episodes=3)
    del flat["timeouts"]
    write_hdf5(tmp_path / "reacher2d_medium-v2.hdf5", flat)
    trajs = load_trajectories(tmp_path / "reacher2d_medium-v2.hdf5", "reacher2d")
    assert [len(t["rewards"]) for t in trajs] == [100, 100, 100]
    assert [len(t["rewards"]) for t in split_episodes(flat)] == []   # D4RL's rule: no episode closes in 300 rows
    dl = load_script("data/download_d4rl_datasets.py")
    dl.convert(str(tmp_path / "reacher2d_medium-v2.hdf5"), str(tmp_path / "out"))
    with open(tmp_path / "out" / "reacher2d-medium-v2.pkl", "rb") as f:
        assert [len(t["rewards"]) for t in pickle.load(f)] == [100, 100, 100]
    assert "warning" not in capsys.readouterr().err
    joined = {k: np.concatenate([t[k] for t in trajs[:2]]) for k in ("observations", "actions", "rewards")}
    with open(tmp_path / "reacher2d-expert-v2.pkl", "wb") as f:
        pickle.dump([joined, trajs[2]], f)
    assert len(load_trajectories(tmp_path / "reacher2d-expert-v2.pkl", "reacher2d")) == 2
    assert ("1 trajectory is longer than reacher2d's 100-step episodes (longest 200)"
            in capsys.readouterr().err)


def test_missing_data_messages(tmp_path, capsys):
    """No advice to generate or download what cannot be: the user's own data, or random-policy data."""
    from decision_transformer.data import find_dataset_file

    with pytest.raises(UserError, match="reacher2d has no public or bundled data: put your own trajectories") as e:
        find_dataset_file(tmp_path, "reacher2d", "expert")
    assert "download_d4rl" not in str(e.value) and "only random-policy data can be generated" in str(e.value)
    gen = load_script("data/generate_datasets.py")
    assert "only --dataset random can be generated" in fails(
        gen.main, ["--env", "reacher2d", "--dataset", "all", "--data_path", tmp_path], capsys)
    assert not list(tmp_path.iterdir())   # refused before the random dataset was written


def test_learning_curves_default_to_the_first_target():
    from decision_transformer.analysis.curves import return_key

    assert return_key("reacher2d") == "evaluation/target_76_return_mean"
    assert return_key("hopper") == "evaluation/target_3600_return_mean"
    assert return_key("halfcheetah") == "evaluation/target_6000_return_mean"


def test_scripted_data_script(tmp_path, capsys):
    """data/reacher2d_scripted_data.py: whole episodes of the reaching controller, noisier ones returning less."""
    script = load_script("data/reacher2d_scripted_data.py")
    script.main(["--episodes", "12", "--noise", "0", "1.5", "--seed", "3", "--data_path", str(tmp_path)])
    out = capsys.readouterr().out
    assert "reacher2d-medium-v2.pkl: 12 episodes, 1200 steps" in out
    with open(tmp_path / "reacher2d-medium-v2.pkl", "rb") as f:
        trajs = pickle.load(f)
    from decision_transformer.data import validate_trajectories

    validate_trajectories(trajs, get_env_spec("reacher2d"), "scripted")
    returns = np.array([t["rewards"].sum() for t in trajs])
    assert returns[0::2].mean() > returns[1::2].mean() + 10, returns
    np.testing.assert_array_equal(trajs[2]["observations"][1:], trajs[2]["next_observations"][:-1])
    again = scripted_trajectories(12, noise=(0.0, 1.5), seed=3)
    assert all(np.array_equal(a["actions"], b["actions"]) for a, b in zip(trajs, again))   # seeded
    assert "--noise values must be finite" in fails(script.main, ["--noise", "-1", "--data_path", tmp_path], capsys)
    assert "unknown dataset" in fails(script.main, ["--dataset", "mine", "--data_path", tmp_path], capsys)
    # an existing dataset is not replaced without --force
    before = (tmp_path / "reacher2d-medium-v2.pkl").read_bytes()
    assert fails(script.main, ["--episodes", "2", "--seed", "4", "--data_path", tmp_path], capsys) == \
        (f"error: {tmp_path / 'reacher2d-medium-v2.pkl'} already exists; give another --data_path or --dataset, or "
         f"pass --force to overwrite it")
    assert (tmp_path / "reacher2d-medium-v2.pkl").read_bytes() == before
    script.main(["--episodes", "2", "--seed", "4", "--data_path", str(tmp_path), "--force"])
    assert (tmp_path / "reacher2d-medium-v2.pkl").read_bytes() != before


def test_force_refuses_a_folder_at_the_dataset_path_before_generating(tmp_path, capsys, monkeypatch):
    """--force cannot replace a folder where the dataset file belongs: one line before any rollout or policy is run
    (the scripted script and generate_datasets.py both), the folder untouched."""
    from decision_transformer import generation, reacher2d

    def no_work(*a, **k):
        raise AssertionError("data generated before the folder was refused")

    monkeypatch.setattr(reacher2d, "scripted_trajectories", no_work)
    monkeypatch.setattr(generation, "generate_dataset", no_work)
    (tmp_path / "reacher2d-medium-v2.pkl").mkdir()
    (tmp_path / "hopper-medium-v2.pkl").mkdir()
    script = load_script("data/reacher2d_scripted_data.py")
    msg = fails(script.main, ["--data_path", str(tmp_path), "--force"], capsys)
    assert msg == f"error: cannot write {tmp_path / 'reacher2d-medium-v2.pkl'}: it is a folder"
    gen = load_script("data/generate_datasets.py")
    monkeypatch.setattr(gen, "generate_dataset", no_work, raising=False)
    msg = fails(gen.main, ["--env", "hopper", "--dataset", "medium", "--data_path", str(tmp_path), "--force",
                           "--num_transitions", "2000"], capsys)
    assert msg == f"error: cannot write {tmp_path / 'hopper-medium-v2.pkl'}: it is a folder"
    assert (tmp_path / "reacher2d-medium-v2.pkl").is_dir() and (tmp_path / "hopper-medium-v2.pkl").is_dir()
