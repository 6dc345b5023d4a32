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


def test_bf16_update_follows_the_fp32_update():
    """bf16 hidden-layer matmuls: gradients close to the fp32 ones; weights and outputs stay float32."""
    ds, da, cfg = 11, 3, SACConfig(hidden=256)
    grads = {}
    for precision in ("fp32", "bf16"):
        sac = SAC(ds, da, cfg, seed=0, precision=precision)
        total, _ = sac._losses(*batch(ds, da, b=256), *torch.randn((2, 256, da), generator=torch.Generator()
                                                                   .manual_seed(3)))
        total.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in sac.params])
        assert all(p.dtype == torch.float32 for p in sac.params)
        assert sac.critic(torch.randn(4, ds), torch.rand(4, da), dtype=sac.matmul_dtype).dtype == torch.float32
    g32, g16 = grads["fp32"], grads["bf16"]
    cos = float(g32 @ g16 / (g32.norm() * g16.norm()))
    assert 0.995 < cos < 1.0, cos            # close, and really computed differently
    with pytest.raises(ValueError, match="precision must be"):
        SAC(ds, da, cfg, precision="fp8")


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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sac_learns_a_one_step_task(precision):
    """Reward -|a - 0.5 obs|^2 with every step terminal: the deterministic action must approach 0.5 obs."""
    torch.manual_seed(0)
    sac = SAC(3, 3, SACConfig(hidden=64, lr=3e-3), seed=0, precision=precision)
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
          "medium_score": 0.0, "medium_window": 1e9, "medium_tolerance": 1e9, "long_eval_episodes": 1,
          "config": SACConfig(hidden=32, batch_size=64), "buffer_capacity": 5000}
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


TINY = {"eval_every": 300, "eval_episodes": 1, "snapshot_every": 200, "start_steps": 100, "long_eval_episodes": 2,
        "config": SACConfig(hidden=32, batch_size=64), "buffer_capacity": 5000, "keep_buffer": False}


def test_medium_search_keeps_the_candidate_closest_to_the_target(tmp_path):
    # every screen is a candidate (huge window) and none is close enough to end the search (tolerance -1)
    state, pol = tmp_path / "state", tmp_path / "pol"
    target = 1.5
    meta = train_behaviour_policy("hopper", state, pol, total_steps=1200, medium_score=target, medium_window=1e9,
                                  medium_tolerance=-1.0, log=lambda m: None, **TINY)
    progress = [json.loads(line) for line in (state / "progress.jsonl").read_text().splitlines()]
    cands = {r["step"]: r["medium_candidate"] for r in progress}
    assert sorted(cands) == [300, 600, 900, 1200]
    best = min(cands, key=lambda k: abs(cands[k] - target))
    med = torch.load(pol / "medium.pt", weights_only=True)
    assert meta["medium_final"] and meta["medium_step"] == best == med["step"]
    assert med["eval_score"] == pytest.approx(cands[best]) and med["eval_episodes"] == 2
    # snapshots were written during the whole search, then cut at the medium step
    assert sorted(p.name for p in (pol / "replay").iterdir()) == \
        [f"actor_{s:07d}.pt" for s in range(0, 1200, 200) if s < best]
    # the expert is the best candidate by the long evaluation
    experts = {r["step"]: r["expert_candidate"] for r in progress if "expert_candidate" in r}
    assert torch.load(pol / "expert.pt", weights_only=True)["step"] == max(experts, key=experts.get)


def test_a_medium_only_run_stops_when_final_and_leaves_the_rest(tmp_path):
    state, pol = tmp_path / "state", tmp_path / "pol"
    # an earlier run's files: its medium policy and snapshots are moved away, its expert is left alone
    (pol / "replay").mkdir(parents=True)
    (pol / "replay" / "actor_0000000.pt").write_bytes(b"old snapshot")
    (pol / "medium.pt").write_bytes(b"old medium")
    (pol / "expert.pt").write_bytes(b"old expert")
    logs = []
    meta = train_behaviour_policy("hopper", state, pol, total_steps=3000, medium_score=0.0, medium_window=1e9,
                                  medium_tolerance=1e9, roles=("medium",), log=logs.append, **TINY)
    assert meta["env_steps"] == 300 and meta["medium_final"] and meta["medium_step"] == 300
    assert (pol / "expert.pt").read_bytes() == b"old expert"
    assert torch.load(pol / "medium.pt", weights_only=True)["step"] == 300
    assert sorted(p.name for p in (pol / "replay").iterdir()) == ["actor_0000000.pt", "actor_0000200.pt"]
    moved = list((state / "previous").iterdir())
    assert len(moved) == 1 and (moved[0] / "medium.pt").read_bytes() == b"old medium"
    assert (moved[0] / "replay" / "actor_0000000.pt").read_bytes() == b"old snapshot"
    assert any("moved the previous run's medium.pt, replay" in m for m in logs)
    # run again with nothing left to train: the committed state is left byte for byte (no buffer refill advancing
    # its RNG, no wall time added)
    before = (state / "state.pt").read_bytes()
    logs.clear()
    again = train_behaviour_policy("hopper", state, pol, total_steps=3000, medium_score=0.0, medium_window=1e9,
                                   medium_tolerance=1e9, roles=("medium",), log=logs.append, **TINY)
    assert again["env_steps"] == 300 and (state / "state.pt").read_bytes() == before
    assert any("nothing left to train for medium" in m for m in logs)
    # no candidate in the window: no medium policy, the search goes on (snapshots kept)
    state2, pol2 = tmp_path / "state2", tmp_path / "pol2"
    meta = train_behaviour_policy("hopper", state2, pol2, total_steps=600, max_seconds=None, medium_score=1e6,
                                  medium_window=10.0, roles=("medium", "expert"), log=lambda m: None,
                                  **{**TINY, "eval_every": 1000})
    assert meta["medium_step"] is None and not (pol2 / "medium.pt").exists()
    with pytest.raises(UserError, match="roles must be"):
        train_behaviour_policy("hopper", state2, pol2, roles=("best",), medium_score=1.0, **TINY)


def test_a_state_from_before_the_medium_search_keeps_its_medium_policy(tmp_path):
    state, pol = tmp_path / "state", tmp_path / "pol"
    kw = {**TINY, "keep_buffer": True, "medium_score": 0.0, "medium_window": 1e9, "medium_tolerance": -1.0}
    train_behaviour_policy("hopper", state, pol, total_steps=300, log=lambda m: None, **kw)
    saved = torch.load(state / "state.pt", weights_only=True)
    meta = json.loads(saved["meta"])
    assert meta["medium_step"] == 300 and meta["medium_final"]   # total_steps reached: the search ended
    del meta["medium_final"]                      # what the earlier format wrote
    saved["meta"] = json.dumps(meta)
    torch.save(saved, state / "state.pt")
    medium = (pol / "medium.pt").read_bytes()
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, log=lambda m: None, **kw)
    assert meta["medium_final"] and meta["medium_step"] == 300 and (pol / "medium.pt").read_bytes() == medium
    last = json.loads((state / "progress.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 600 and "medium_candidate" not in last     # no search after the resume


def test_medium_search_ends_after_patience_evaluations_without_a_closer_candidate(tmp_path):
    state, pol = tmp_path / "state", tmp_path / "pol"
    target, patience = 3.0, 2
    logs = []
    meta = train_behaviour_policy("hopper", state, pol, total_steps=3000, medium_score=target, medium_window=1e9,
                                  medium_tolerance=-1.0, medium_patience=patience, roles=("medium",),
                                  log=logs.append, **TINY)
    cands = [(r["step"], r["medium_candidate"]) for r in
             (json.loads(line) for line in (state / "progress.jsonl").read_text().splitlines())]
    # replay the rule on the recorded candidates: the closest so far, ended after `patience` that were not closer
    best, stale, end = None, 0, None
    for step, c in cands:
        if best is None or abs(c - target) < abs(best[1] - target):
            best, stale = (step, c), 0
        else:
            stale += 1
        if stale >= patience:
            end = step
            break
    assert end is not None and meta["env_steps"] == end == cands[-1][0]
    assert meta["medium_final"] and meta["medium_step"] == best[0]
    assert f"medium policy of step {best[0]} final ({patience} evaluations without a closer one)" in logs[-1]
    assert max(int(p.stem.split("_")[1]) for p in (pol / "replay").iterdir()) < best[0]


def test_a_resume_with_a_wider_tolerance_finalises_the_medium_policy(tmp_path):
    state, pol = tmp_path / "state", tmp_path / "pol"
    kw = {**TINY, "keep_buffer": True, "medium_window": 1e9, "roles": ("medium",)}
    train_behaviour_policy("hopper", state, pol, total_steps=300, medium_score=1e3, medium_tolerance=-1.0,
                           log=lambda m: None, **{**kw, "eval_every": 200, "snapshot_every": 100})
    # as if it had been stopped before the end: the search still open, snapshots past the candidate on disk
    saved = torch.load(state / "state.pt", weights_only=True)
    m = json.loads(saved["meta"])
    assert m["medium_step"] == 200 and m["medium_final"]
    m["medium_final"] = False
    saved["meta"] = json.dumps(m)
    torch.save(saved, state / "state.pt")
    for step in (200, 300):
        torch.save(torch.load(pol / "replay" / "actor_0000100.pt", weights_only=True),
                   pol / "replay" / f"actor_{step:07d}.pt")
    logs = []
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, medium_score=1e3, medium_tolerance=1e4,
                                  log=logs.append, **{**kw, "eval_every": 200})
    assert meta["medium_final"] and meta["medium_step"] == 200 and meta["env_steps"] == 300
    assert any("the medium policy of step 200" in m and "is final" in m for m in logs)
    assert sorted(p.name for p in (pol / "replay").iterdir()) == ["actor_0000000.pt", "actor_0000100.pt"]


def test_the_expert_is_final_once_it_reaches_the_target(tmp_path):
    state, pol = tmp_path / "state", tmp_path / "pol"
    kw = {**TINY, "keep_buffer": True, "roles": ("expert",)}
    # an unreachable target: training runs to total_steps, then the best candidate is final
    logs = []
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, expert_score=1e6, log=logs.append, **kw)
    assert meta["env_steps"] == 600 and not meta["expert_final"]     # more steps may still improve it
    best = torch.load(pol / "expert.pt", weights_only=True)
    assert best["final"] and best["trained_steps"] == 600 and best["step"] == meta["best_step"]
    assert any("final (training reached 600 steps)" in m for m in logs)

    # a target within reach of the first candidate: final at the first evaluation, the run stops there
    state2, pol2 = tmp_path / "state2", tmp_path / "pol2"
    meta = train_behaviour_policy("hopper", state2, pol2, total_steps=3000, expert_score=-1e6, log=lambda m: None,
                                  **kw)
    assert meta["env_steps"] == 300 and meta["expert_final"] and meta["best_step"] == 300
    assert torch.load(pol2 / "expert.pt", weights_only=True)["trained_steps"] == 300

    # a resume applies the target to the candidate in hand: a run started without one is finalised at once
    state3, pol3 = tmp_path / "state3", tmp_path / "pol3"
    meta = train_behaviour_policy("hopper", state3, pol3, total_steps=300, log=lambda m: None,
                                  **{**kw, "roles": ("medium", "expert"), "medium_score": 1e6})
    assert meta["best_eval"] is not None
    saved = torch.load(state3 / "state.pt", weights_only=True)
    m = json.loads(saved["meta"])
    m["expert_final"] = False
    del m["expert_final"]                         # a state written before the expert target existed
    saved["meta"] = json.dumps(m)
    torch.save(saved, state3 / "state.pt")
    e = torch.load(pol3 / "expert.pt", weights_only=True)
    del e["final"]
    torch.save(e, pol3 / "expert.pt")
    logs = []
    meta = train_behaviour_policy("hopper", state3, pol3, total_steps=3000, roles=("expert",),
                                  expert_score=meta["best_eval"] + 4.0, expert_tolerance=5.0, log=logs.append,
                                  **{k: v for k, v in kw.items() if k != "roles"})
    assert meta["env_steps"] == 300 and meta["expert_final"]          # nothing trained after the resume
    assert torch.load(pol3 / "expert.pt", weights_only=True)["final"] is True
    assert any("within 5" in m for m in logs)


def test_behaviour_training_is_seeded(tmp_path):
    """Same seed, same actor (bit for bit); another seed, another actor."""
    kw = {**TINY, "total_steps": 400, "eval_every": 200, "medium_score": 0.0}
    actors = []
    for i, seed in enumerate((3, 3, 4)):
        train_behaviour_policy("hopper", tmp_path / f"s{i}", tmp_path / f"p{i}", seed=seed, log=lambda m: None, **kw)
        actors.append(torch.load(tmp_path / f"p{i}" / "expert.pt", weights_only=True)["actor"])
    assert all(torch.equal(actors[0][k], actors[1][k]) for k in actors[0])
    assert not all(torch.equal(actors[0][k], actors[2][k]) for k in actors[0])


def test_the_expert_screen_keeps_a_best_score_of_zero():
    """A best screening score of exactly 0.0 is a score, not "none yet": a later, lower score inside the window is
    evaluated but does not lower the bar (it used to replace it, so the threshold could only sink)."""
    from decision_transformer.sac import expert_screen

    assert expert_screen(None, -5.0, 10.0) == -5.0                    # the first screen
    assert expert_screen(0.0, -5.0, 10.0) == 0.0                      # within the window: evaluated, bar kept
    assert expert_screen(0.0, -15.0, 10.0) is None                    # below the window: not evaluated
    assert expert_screen(0.0, 3.0, 10.0) == 3.0                       # a better one raises the bar


def test_a_role_this_run_does_not_train_and_a_search_without_a_candidate_go_on_later(tmp_path):
    """A medium-only run used to store the expert as final (and an expert-only run the medium), and a medium search
    that ended at --total_steps without a candidate was stored as final: a later call could never train them."""
    state, pol = tmp_path / "state", tmp_path / "pol"
    kw = dict(medium_window=10.0, log=lambda m: None, **{**TINY, "eval_every": 300})
    meta = train_behaviour_policy("hopper", state, pol, total_steps=300, medium_score=1e6, roles=("medium",), **kw)
    assert meta["env_steps"] == 300 and meta["medium_step"] is None and not meta["medium_final"]
    saved = json.loads(torch.load(state / "state.pt", weights_only=True)["meta"])
    assert saved["expert_final"] is False and saved["medium_final"] is False
    # the same search with more steps goes on, and the expert is trained where a run asks for it
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, medium_score=1e6, roles=("medium", "expert"),
                                  **kw)
    assert meta["env_steps"] == 600 and (pol / "expert.pt").exists() and meta["best_step"] == 600
    # an expert-only run leaves the medium search open
    meta = train_behaviour_policy("hopper", state, pol, total_steps=900, medium_score=1e6, roles=("expert",), **kw)
    assert meta["env_steps"] == 900
    assert json.loads(torch.load(state / "state.pt", weights_only=True)["meta"])["medium_final"] is False


def test_snapshots_are_the_medium_roles_and_a_finished_rerun_keeps_the_state(tmp_path):
    """Replay snapshots are written by runs of the medium role only: an expert-only run of another state sharing the
    policy folder used to overwrite them. One continuing a state whose medium search is open takes none, says so,
    and the gap is refused when medium-replay is made (it used to be rolled with an older snapshot's policy). A rerun
    of a run that reached --total_steps (its expert not at the target) used to refill the buffer and rewrite the
    state. A state folder named like the policy-role lock (the README's --run_name hopper-medium, both folders in one
    place) used to lock itself out."""
    from decision_transformer.generation import replay_snapshots

    root = tmp_path / "policies"            # --state_dir and --policy_dir one folder, as the lock names could collide
    state, pol = root / "hopper-medium", root / "hopper"
    logs = []
    kw = dict(medium_window=10.0, log=logs.append, **{**TINY, "eval_every": 300})
    train_behaviour_policy("hopper", state, pol, total_steps=300, medium_score=1e6, roles=("medium",), **kw)
    snaps = {p.name: p.read_bytes() for p in (pol / "replay").iterdir()}
    assert sorted(snaps) == ["actor_0000000.pt", "actor_0000200.pt"]
    train_behaviour_policy("hopper", root / "other", pol, total_steps=600, roles=("expert",), **kw)   # another state
    assert {p.name: p.read_bytes() for p in (pol / "replay").iterdir()} == snaps
    logs.clear()
    train_behaviour_policy("hopper", state, pol, total_steps=900, roles=("expert",), **kw)          # this state
    assert any("this state's medium search is open, but a run without the medium role takes no replay" in m
               for m in logs)
    assert {p.name: p.read_bytes() for p in (pol / "replay").iterdir()} == snaps
    meta = train_behaviour_policy("hopper", state, pol, total_steps=1500, medium_score=0.0, roles=("medium",),
                                  **{**kw, "medium_window": 1e9})
    assert meta["medium_final"] and meta["medium_step"] == 1200
    with pytest.raises(UserError, match="gap between steps 200 and 1000 \\(they are 200 steps apart\\)"):
        replay_snapshots(root, "hopper", 1200)
    # both roles to their last step, then the same call again: nothing to train, the state byte for byte
    state2, pol2 = tmp_path / "state2", tmp_path / "pol2"
    meta = train_behaviour_policy("hopper", state2, pol2, total_steps=300, medium_score=0.0, roles=("medium", "expert"),
                                  **{**kw, "medium_window": 1e9})
    assert meta["medium_final"] and not meta["expert_final"] and (pol2 / "expert.pt").exists()
    before = (state2 / "state.pt").read_bytes()
    logs.clear()
    train_behaviour_policy("hopper", state2, pol2, total_steps=300, medium_score=0.0, roles=("medium", "expert"),
                           **{**kw, "medium_window": 1e9})
    assert (state2 / "state.pt").read_bytes() == before
    assert logs[1:] == [f"hopper: nothing left to train for medium and expert up to 300 env steps (more --total_steps "
                        f"trains on) (state: {state2 / 'state.pt'})"]


def test_a_role_stored_final_without_a_policy_by_earlier_versions_is_open_again(tmp_path):
    """Earlier versions stored a role a run did not train as final (``expert_final`` with no expert, ``medium_final``
    with no medium step): such a role could never be trained. It is read as open."""
    state, pol = tmp_path / "state", tmp_path / "pol"
    kw = dict(log=lambda m: None, **{**TINY, "eval_every": 300})
    train_behaviour_policy("hopper", state, pol, total_steps=300, medium_score=1e6, medium_window=10.0,
                           roles=("medium",), **kw)
    saved = torch.load(state / "state.pt", weights_only=True)
    m = json.loads(saved["meta"])
    assert m["best_step"] is None and m["medium_step"] is None
    saved["meta"] = json.dumps({**m, "expert_final": True, "medium_final": True})   # as an earlier version stored it
    torch.save(saved, state / "state.pt")
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, roles=("expert",), **kw)
    assert meta["env_steps"] == 600 and (pol / "expert.pt").exists()
    assert json.loads(torch.load(state / "state.pt", weights_only=True)["meta"])["medium_final"] is False


def test_a_progress_log_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """The evaluation row appended to ``progress.jsonl`` (a full disk; here a folder in its place) ended in a bare
    IsADirectoryError / OSError naming no file; now a one-line ``UserError`` names the log."""
    import pytest

    from decision_transformer.errors import UserError

    kw = {"total_steps": 300, "eval_every": 200, "eval_episodes": 1, "snapshot_every": 200, "start_steps": 100,
          "medium_score": 0.0, "medium_window": 1e9, "medium_tolerance": 1e9, "long_eval_episodes": 1,
          "config": SACConfig(hidden=32, batch_size=64), "buffer_capacity": 5000}
    state, pol = tmp_path / "state", tmp_path / "pol"
    (state / "progress.jsonl").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        train_behaviour_policy("hopper", state, pol, log=lambda *_: None, **kw)
    assert str(e.value) == f"cannot write {state / 'progress.jsonl'}: it is a folder"
