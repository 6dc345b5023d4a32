"""Wiring of D4RL-style generation (decision_transformer/generation.py, sac.py, synthetic.py) that the end-to-end
tests leave open: which env seed each dataset rolls out from, the replay schedule's boundaries (uniform warm-up,
snapshot switch), the medium-replay length cap, the unfinished-expert warning, the snapshot checks, the stats
numbers, and the replay buffer / evaluation / random-rollout details."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from decision_transformer import generation
from decision_transformer.envs import make_env
from decision_transformer.errors import UserError
from decision_transformer.generation import generate_flat, load_policy
from test_generation import _log_prob, policies, save_actor  # noqa: F401  (policies: the module fixture)


def _reset_obs(env, seed):
    e = make_env(env)
    try:
        return np.asarray(e.reset(seed=seed)[0], dtype=np.float32)
    finally:
        e.close()


# ----------------------------------------------------------------------------------------------------------------
# generation.py
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replay(policies):  # noqa: F811
    """medium-replay asked for more steps (3100) than the medium policy's step (3000)."""
    return generate_flat("hopper", "medium-replay", 3100, seed=0, policy_dir=policies)


def test_medium_replay_is_capped_at_the_medium_step_and_seeded_apart(replay):
    d, meta = replay
    assert len(d["rewards"]) == 3000 and meta["iteration"] == 3000
    # the replay stream resets its single env with seed (seed + 2) * 1_000_003
    np.testing.assert_array_equal(d["observations"][0], _reset_obs("hopper", 2 * 1_000_003))


def test_medium_replay_switches_at_the_exact_boundaries(replay, policies):  # noqa: F811
    d, _ = replay
    lp = d["infos/action_log_probs"]
    uniform = np.float32(-3 * np.log(2.0))
    # steps 0..499 are the uniform warm-up, step 500 is the first sampled from the snapshot
    assert lp[499] == uniform and lp[500] != uniform
    snap0, _ = load_policy(policies / "hopper" / "replay" / "actor_0000000.pt", "hopper")
    snap1, _ = load_policy(policies / "hopper" / "replay" / "actor_0001000.pt", "hopper")
    for row, right, wrong in ((999, snap0, snap1), (1000, snap1, snap0)):
        obs, act = d["observations"][row], d["actions"][row]
        assert _log_prob(right, obs, act) == pytest.approx(float(lp[row]), abs=2e-2), row
        assert abs(_log_prob(wrong, obs, act) - float(lp[row])) > 0.1, row


def test_medium_and_expert_roll_out_from_different_env_seeds(policies):  # noqa: F811
    med, _ = generate_flat("hopper", "medium", 200, seed=0, policy_dir=policies)
    exp, _ = generate_flat("hopper", "expert", 200, seed=0, policy_dir=policies)
    np.testing.assert_array_equal(med["observations"][0], _reset_obs("hopper", 0))
    np.testing.assert_array_equal(exp["observations"][0], _reset_obs("hopper", 1_000_003))
    me, meta = generate_flat("hopper", "medium-expert", 200, seed=0, policy_dir=policies)
    cut = len(me["rewards"]) - 200
    assert cut > 0
    np.testing.assert_array_equal(me["observations"][cut], _reset_obs("hopper", 1_000_003))
    assert meta["iteration"] == 9000 and meta["policy"] == "hopper/medium.pt+hopper/expert.pt"


def test_only_an_unfinished_expert_policy_warns(tmp_path, policies):  # noqa: F811
    save_actor(tmp_path / "hopper" / "expert.pt", "hopper", 2, 500, kind="expert", eval_score=70.0)
    with pytest.warns(RuntimeWarning, match=r"expert policy from unfinished training \(step 500, eval score 70.0\)"):
        generate_flat("hopper", "expert", 30, policy_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate_flat("hopper", "expert", 30, policy_dir=policies)
    assert not [w for w in caught if "unfinished training" in str(w.message)]


def test_missing_training_snapshots_are_named(tmp_path, policies):  # noqa: F811
    save_actor(tmp_path / "hopper" / "medium.pt", "hopper", 1, 3000, kind="medium")
    assert generation.missing_policies("hopper", "medium", tmp_path) is None
    assert generation.missing_policies("hopper", "medium-replay", tmp_path) == \
        f"no training snapshots in {tmp_path / 'hopper' / 'replay'}"
    assert generation.missing_policies("hopper", "medium-replay", policies) is None


def test_replay_snapshots_stop_before_the_medium_step_and_must_start_at_zero(tmp_path):
    folder = tmp_path / "hopper" / "replay"
    folder.mkdir(parents=True)
    for step in (0, 1000, 2000, 3000, 4000):
        (folder / f"actor_{step:07d}.pt").write_bytes(b"")
    (folder / "actor_x.pt").write_bytes(b"")
    assert generation.replay_snapshots(tmp_path, "hopper", 3000) == [
        (0, folder / "actor_0000000.pt"), (1000, folder / "actor_0001000.pt"), (2000, folder / "actor_0002000.pt")]
    assert generation.replay_snapshots(tmp_path, "hopper", 2500)[-1][0] == 2000   # (the medium step between two)
    # a missing snapshot would stretch its neighbour's policy over its steps (a run that took none): refused
    with pytest.raises(UserError, match="gap between steps 4000 and 6000 \\(they are 1000 steps apart\\)"):
        generation.replay_snapshots(tmp_path, "hopper", 6000)      # (after the last one, before the medium step)
    (folder / "actor_0001000.pt").unlink()
    with pytest.raises(UserError, match="gap between steps 0 and 2000"):
        generation.replay_snapshots(tmp_path, "hopper", 5000)
    (folder / "actor_0001000.pt").write_bytes(b"")
    # a single snapshot before the medium step: its recorded interval tells the gap
    single = tmp_path / "walker2d" / "replay"
    single.mkdir(parents=True)
    torch.save({"step": 0, "covers": 1000}, single / "actor_0000000.pt")
    assert len(generation.replay_snapshots(tmp_path, "walker2d", 1000)) == 1
    with pytest.raises(UserError, match="gap between steps 0 and 1500 \\(they are 1000 steps apart\\)"):
        generation.replay_snapshots(tmp_path, "walker2d", 1500)
    (folder / "actor_0000000.pt").unlink()
    with pytest.raises(UserError, match="no training snapshots from step 0"):
        generation.replay_snapshots(tmp_path, "hopper", 3000)


def test_dataset_stats_numbers_and_line():
    trajs = [{"rewards": np.array([1.0, 0.0], np.float32)}, {"rewards": np.array([4.0], np.float32)}]
    s = generation.dataset_stats("hopper", "medium", trajs)
    score = 100 * (2.5 + 20.272305) / (3234.3 + 20.272305)
    assert s["episodes"] == 2 and s["transitions"] == 3
    assert s["return_mean"] == 2.5 and s["return_std"] == 1.5     # population std of returns 1 and 4
    assert s["score"] == pytest.approx(score, rel=1e-9) and s["d4rl_average_score"] == 44.3
    assert generation.format_stats(s) == (f"hopper-medium: 3 transitions, 2 episodes, return 2.5 +- 1.5, "
                                          f"normalised score {score:.1f} (D4RL average 44.3)")


# ----------------------------------------------------------------------------------------------------------------
# sac.py
# ----------------------------------------------------------------------------------------------------------------

def test_replay_buffer_reload_keeps_the_ring_position(tmp_path):
    import torch

    from decision_transformer.sac import ReplayBuffer

    def row(v):
        return np.full(2, v, np.float32), np.full(1, v, np.float32), v, np.full(2, v, np.float32), 0.0

    buf = ReplayBuffer(2, 1, capacity=3)
    for v in range(5):        # wraps: slots hold 3, 4, 2; the next write goes to slot 2
        buf.add(*row(float(v)))
    buf.save(tmp_path / "buf.npz")
    other = ReplayBuffer(2, 1, capacity=3)
    other.load(tmp_path / "buf.npz")
    other.add(*row(5.0))
    assert other.size == 3
    torch.testing.assert_close(other.rew, torch.tensor([3.0, 4.0, 5.0]))


def test_evaluation_episodes_start_from_successive_seeds(monkeypatch):
    """Each of the ``episodes`` resets uses seed + i (stand-in env: the return is the reset seed)."""
    from decision_transformer import envs, sac

    class Env:
        def reset(self, seed=None):
            self.seed = seed
            return np.zeros(11, np.float32), {}

        def step(self, a):
            return np.zeros(11, np.float32), float(self.seed), False, True, {}

        def close(self):
            pass

    monkeypatch.setattr(envs, "make_env", lambda *a, **k: Env())
    actor = generation.random_policy("hopper", 0)
    np.testing.assert_array_equal(sac.evaluate_policy(actor, "hopper", 3, seed=7), [7.0, 8.0, 9.0])


def test_random_policy_leaves_torchs_global_stream_alone():
    """The random actor is built from its own seed without reseeding torch's global generator."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generation.random_policy("hopper", 0)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_that_generates_its_dataset_trains_as_one_that_finds_it(tmp_path, monkeypatch):
    """A single-task run's data step comes after its model is built: a missing ``random`` dataset generated there
    reseeded torch's global generator (the random actor's seed), so the run trained with other dropout masks than
    the same run finding the file (model_1.pt differed)."""
    import experiment

    monkeypatch.setattr(generation, "DEFAULT_NUM_TRANSITIONS", 3000)
    monkeypatch.chdir(tmp_path)
    flags = ["--env", "hopper", "--dataset", "random", "--data_path", "data", "--seed", "1", "--embed_dim", "16",
             "--n_layer", "1", "--n_head", "1", "--K", "5", "--batch_size", "4", "--max_iters", "1",
             "--num_steps_per_iter", "3", "--num_eval_episodes", "0"]
    for out in ("generated", "found"):
        experiment.main([*flags, "--outdir", out])
    a, b = (torch.load(next(tmp_path.glob(f"{out}/*/model_1.pt")), weights_only=False)["state_dict"]
            for out in ("generated", "found"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# synthetic.py
# ----------------------------------------------------------------------------------------------------------------

def test_random_rollout_actions_and_episode_seeds():
    from decision_transformer.synthetic import rollout_flat

    d = rollout_flat("halfcheetah", 60, seed=3, max_ep_len=20)   # never terminates: episodes end by the cap
    assert not d["terminals"].any() and list(np.flatnonzero(d["timeouts"])) == [19, 39, 59]
    # uniform in [-1, 1]: the same draws as the generator's, in order
    expected = np.random.default_rng(3).uniform(-1, 1, (60, 6)).astype(np.float32)
    np.testing.assert_array_equal(d["actions"], expected)
    # episode k (k >= 1) starts from reset(seed + k)
    for k in (1, 2):
        np.testing.assert_array_equal(d["observations"][20 * k], _reset_obs("halfcheetah", 3 + k))
