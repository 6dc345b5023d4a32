"""SAC (decision_transformer/sac.py): the fast update against the textbook one, the critic ensemble against
separate MLPs, the NumPy actor against the torch actor, learning on a tiny problem, and the resumable
behaviour-policy training loop on real Hopper-v4 with a tiny budget."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from decision_transformer.errors import UserError
from decision_transformer.sac import (
    SAC,
    Actor,
    NumpyActor,
    ReferenceSAC,
    SACConfig,
    train_behaviour_policy,
)




def batch(ds, da, b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, ds, generator=g), torch.rand(b, da, generator=g) * 2 - 1, torch.randn(b, generator=g),
            torch.randn(b, ds, generator=g), (torch.rand(b, generator=g) < 0.2).float())


def test_fast_update_equals_the_textbook_update():
    ds, da, cfg = 5, 2, SACConfig(hidden=32)
    fast = SAC(ds, da, cfg, seed=1)
    ref = ReferenceSAC(ds, da, cfg, seed=2)
    ref.load_from(fast)
    for step in range(3):
        b = batch(ds, da, seed=step)
        fast.generator.manual_seed(100 + step)
        noise = torch.randn((2, 64, da), generator=torch.Generator().manual_seed(100 + step))
        fast.update(*b)
        ref.update(*b, noise[0], noise[1])
    torch.testing.assert_close(fast.actor.state_dict(), ref.actor.state_dict(), rtol=1e-4, atol=1e-5)
    for e in range(2):
        for i, layer in enumerate(ref.qs[e].layers):
            torch.testing.assert_close(fast.critic.weights[i][e].T, layer.weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast.critic_target.biases[i][e, 0], ref.q_targets[e].layers[i].bias,
                                       rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.log_alpha.detach(), ref.log_alpha.detach())
    # and the update did move the networks
    assert not torch.allclose(fast.actor.l1.weight, SAC(ds, da, cfg, seed=1).actor.l1.weight)


def test_critic_ensemble_equals_separate_mlps():
    sac = SAC(4, 2, SACConfig(hidden=16), seed=0)
    ref = ReferenceSAC(4, 2, SACConfig(hidden=16))
    ref.load_from(sac)
    obs, act = torch.randn(10, 4), torch.rand(10, 2)
    torch.testing.assert_close(sac.critic(obs, act), ref.q_all(ref.qs, obs, act))
    assert sac.critic(obs, act).shape == (2, 10)


def test_numpy_actor_matches_the_torch_actor():
    torch.manual_seed(0)
    actor = Actor(11, 3, 32)
    np_actor = NumpyActor.from_module(actor)
    obs = np.random.default_rng(0).normal(size=(7, 11)).astype(np.float32)
    a_np, logp_np = np_actor.act(obs, np.random.default_rng(5))
    eps = torch.from_numpy(np.random.default_rng(5).standard_normal((7, 3)).astype(np.float32))
    sac = SAC(11, 3, SACConfig(hidden=32))
    sac.actor.load_state_dict(actor.state_dict())
    with torch.no_grad():
        a_t, logp_t = sac._sample_with_noise(torch.from_numpy(obs), eps)
    np.testing.assert_allclose(a_np, a_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logp_np, logp_t.numpy(), rtol=1e-4, atol=1e-4)
    # the log-density is that of the squashed Gaussian: check one entry against the explicit formula
    mean, log_std = (t.detach().numpy() for t in actor.dist_params(torch.from_numpy(obs)))
    u = mean[0] + np.exp(log_std[0]) * eps[0].numpy()
    explicit = sum(-0.5 * e * e - ls - 0.5 * math.log(2 * math.pi) - math.log(1 - math.tanh(x) ** 2)
                   for e, ls, x in zip(eps[0].numpy(), log_std[0], u))
    assert abs(explicit - logp_np[0]) < 1e-3
    # live view: an optimiser step on the torch actor is seen by the NumPy actor without copying
    with torch.no_grad():
        actor.l1.bias.add_(1.0)
    assert np.allclose(np_actor.b1, actor.l1.bias.detach().numpy())


def test_sac_learns_a_one_step_task():
    """Reward -|a - 0.5 obs|^2 with every step terminal: the deterministic action must approach 0.5 obs."""
    torch.manual_seed(0)
    sac = SAC(3, 3, SACConfig(hidden=64, lr=3e-3), seed=0)
    g = torch.Generator().manual_seed(1)

    def error():
        obs = torch.rand(512, 3, generator=g) * 2 - 1
        with torch.no_grad():
            mean, _ = sac.actor.dist_params(obs)
        return (torch.tanh(mean) - 0.5 * obs).abs().mean().item()

    before = error()
    for _ in range(1500):
        obs = torch.rand(128, 3, generator=g) * 2 - 1
        act = torch.rand(128, 3, generator=g) * 2 - 1
        rew = -((act - 0.5 * obs) ** 2).sum(-1)
        sac.update(obs, act, rew, obs, torch.ones(128))
    after = error()
    assert before > 0.2 and after < 0.06, (before, after)


def test_behaviour_training_is_resumable(tmp_path):
    kw = {"total_steps": 600, "eval_every": 300, "eval_episodes": 1, "snapshot_every": 200, "start_steps": 100,
              "medium_score": -1e9, "config": SACConfig(hidden=32, batch_size=64), "buffer_capacity": 5000}
    logs = []
    state, pol = tmp_path / "state", tmp_path / "pol"
    meta = train_behaviour_policy("hopper", state, pol, log=logs.append, **kw)
    assert meta["env_steps"] == 600 and meta["medium_step"] == 300
    snaps = sorted(p.name for p in (pol / "replay").iterdir())
    assert snaps == ["actor_0000000.pt", "actor_0000200.pt"]           # none after the medium policy
    assert {p.name for p in pol.iterdir()} == {"replay", "medium.pt", "expert.pt"}
    progress = [json.loads(line) for line in (state / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in progress] == [300, 600]
    saved = torch.load(state / "state.pt", weights_only=True)
    assert saved["agent"]["num_updates"] > 0
    assert torch.load(pol / "expert.pt", weights_only=True)["final"] is True   # total_steps reached
    med = torch.load(pol / "medium.pt", weights_only=True)
    assert med["step"] == 300 and med["env"] == "hopper"
    snap = torch.load(pol / "replay" / "actor_0000200.pt", weights_only=True)
    assert snap["actor"]["l1.weight"].dtype == torch.float16 and snap["uniform_before"] == 100

    # continue with its buffer
    meta = train_behaviour_policy("hopper", state, pol, log=logs.append, **{**kw, "total_steps": 900})
    assert meta["env_steps"] == 900
    assert any("resuming at 600 env steps (with its replay buffer)" in m for m in logs)
    resumed = torch.load(state / "state.pt", weights_only=True)
    assert resumed["agent"]["num_updates"] == saved["agent"]["num_updates"] + 300
    assert len((state / "progress.jsonl").read_text().splitlines()) == 3

    # continue on a "fresh machine": the git-ignored buffer is gone, it is refilled first
    (state / "replay_buffer.npz").unlink()
    n_logs = len(logs)
    meta = train_behaviour_policy("hopper", state, pol, log=logs.append, **{**kw, "total_steps": 1000})
    assert meta["env_steps"] == 1000
    assert "resuming at 900 env steps (without its replay buffer)" in logs[n_logs]

    # a damaged state is a one-line error naming the file
    (state / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="state.pt: cannot resume"):
        train_behaviour_policy("hopper", state, pol, log=logs.append, **kw)
