"""Tests of return-conditioned evaluation (lockstep vs one-by-one rollouts, seeding, metrics, env errors).

Reference behaviour: /work/shared/reference/evaluation.md. MuJoCo envs (gymnasium v4) run locally; no network.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from decision_transformer import evaluation as ev
from decision_transformer.envs import get_env_spec, make_env
from decision_transformer.errors import UserError
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

MODES = ("normal", "noise", "delayed")
N_EPISODES = 3
SEED = 1


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------------
def make_model(env: str) -> DecisionTransformer:
    """Random-init models. Hopper: small (episodes terminate after ~20 steps, with different lengths).
    HalfCheetah never terminates (1000 steps per episode), so the model is tiny."""
    spec = get_env_spec(env)
    if env == "hopper":
        bb = BackboneConfig(n_embd=16, n_layer=2, n_head=2, vocab_size=1)
        K = 4
    else:
        bb = BackboneConfig(n_embd=8, n_layer=1, n_head=1, vocab_size=1)
        K = 3
    return DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim, max_length=K, backbone=bb), seed=1).eval()


def norm_stats(env: str):
    d = get_env_spec(env).state_dim
    return np.linspace(-0.2, 0.2, d), np.linspace(0.5, 1.5, d)


class RowwiseModel:
    """The same policy, but every row of a batched ``get_action`` is computed with its own batch-1 forward.

    CPU BLAS kernels round a row's result differently depending on how many rows are in the matrix product (1 ulp in
    the first ``nn.Linear``), so batch-1 and batch-M forwards of one history are not bit-identical. With this wrapper
    the lockstep loop performs exactly the forwards the sequential loop performs, so any difference in the returns is
    a bookkeeping error (histories, RTG updates, reset seeds, done masks)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def eval(self):
        self.model.eval()
        return self

    def get_action(self, states, actions, returns_to_go, timesteps):
        return torch.cat([self.model.get_action(states[i:i + 1], actions[i:i + 1], returns_to_go[i:i + 1],
                                                timesteps[i:i + 1]) for i in range(states.shape[0])])




@pytest.fixture(scope="module")
def models():
    return {env: make_model(env) for env in ("hopper", "halfcheetah")}


@pytest.fixture(scope="module")
def pools():
    p = {env: ev.EnvPool(env) for env in ("hopper", "halfcheetah")}
    yield p
    for pool in p.values():
        pool.close()


_CACHE: dict = {}


def run_eval(kind, env, mode, models, pools, num_episodes=N_EPISODES, seed=SEED):
    """Cached evaluations: kind in {'sequential', 'lockstep', 'rowwise'}."""
    key = (kind, env, mode, num_episodes, seed)
    if key not in _CACHE:
        model = models[env]
        target = get_env_spec(env).targets[0]
        mean, std = norm_stats(env)
        kw = dict(seed=seed, mode=mode, pool=pools[env])
        if kind == "sequential":
            res = ev.evaluate_episodes_sequential(model, env, target, num_episodes, mean, std, **kw)
        elif kind == "lockstep":
            res = ev.evaluate_episodes(model, env, target, num_episodes, mean, std, **kw)
        else:
            res = ev.evaluate_episodes(RowwiseModel(model), env, target, num_episodes, mean, std, **kw)
        _CACHE[key] = res
    return _CACHE[key]


def record_actions(kind, env, mode, models, pools, num_episodes=N_EPISODES):
    """Per-episode list of the actions chosen at each step (uncached; used for the divergence diagnosis)."""
    model = models[env]
    calls = []

    class Spy:
        config = model.config

        def eval(self):
            model.eval()
            return self

        def get_action(self, s, a, r, t):
            out = model.get_action(s, a, r, t)
            calls.append(out.clone())
            return out

    target = get_env_spec(env).targets[0]
    mean, std = norm_stats(env)
    if kind == "sequential":
        res = ev.evaluate_episodes_sequential(Spy(), env, target, num_episodes, mean, std, seed=SEED, mode=mode,
                                              pool=pools[env])
        per_ep, i = [], 0
        for n in res.lengths:
            per_ep.append(torch.cat(calls[i:i + n]))
            i += n
    else:
        res = ev.evaluate_episodes(Spy(), env, target, num_episodes, mean, std, seed=SEED, mode=mode, pool=pools[env])
        per_ep = [torch.stack([c[e] for c in calls[:n]]) for e, n in enumerate(res.lengths)]  # all live (no term.)
    return res, per_ep


# ---------------------------------------------------------------------------------------------------------------------
# 1. lockstep == one-by-one
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("env", ["hopper", "halfcheetah"])
def test_lockstep_bookkeeping_equals_sequential(env, mode, models, pools):
    """Exact equality, with per-row forwards in the lockstep loop (see RowwiseModel)."""
    seq = run_eval("sequential", env, mode, models, pools)
    lock = run_eval("rowwise", env, mode, models, pools)
    assert seq.returns.shape == lock.returns.shape == (N_EPISODES,)
    np.testing.assert_array_equal(lock.lengths, seq.lengths)
    np.testing.assert_array_equal(lock.returns, seq.returns)
    assert lock.lengths.dtype == np.int64 and seq.lengths.dtype == np.int64
    if env == "halfcheetah":
        assert (seq.lengths == 1000).all()   # never terminates: TimeLimit
    else:
        assert (seq.lengths < 1000).all()    # the random hopper falls


def test_hopper_episode_lengths_differ(models, pools):
    """The hopper check exercises the done mask: episodes end at different steps."""
    seq = run_eval("sequential", "hopper", "normal", models, pools)
    assert len(set(seq.lengths.tolist())) > 1, seq.lengths


@pytest.mark.parametrize("mode", MODES)
def test_lockstep_batched_model_equals_sequential_hopper(mode, models, pools):
    """The real batched forward (one forward for all live episodes): exact equality on hopper."""
    seq = run_eval("sequential", "hopper", mode, models, pools)
    lock = run_eval("lockstep", "hopper", mode, models, pools)
    np.testing.assert_array_equal(lock.lengths, seq.lengths)
    np.testing.assert_array_equal(lock.returns, seq.returns)


def test_lockstep_equals_sequential_default_size_halfcheetah():
    """With the default model size (128 hidden, 3 layers, K=20) the batched forward rounds every row exactly as a
    batch-1 forward on CPU, so even HalfCheetah's 1000 chaotic steps give identical returns. (The tiny models above
    hit BLAS kernels that round a row differently depending on the number of rows: see the next test.)"""
    spec = get_env_spec("halfcheetah")
    model = DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim), seed=0).eval()
    mean, std = norm_stats("halfcheetah")
    pool = ev.EnvPool("halfcheetah")
    try:
        seq = ev.evaluate_episodes_sequential(model, "halfcheetah", 6000, 3, mean, std, seed=SEED, pool=pool)
        lock = ev.evaluate_episodes(model, "halfcheetah", 6000, 3, mean, std, seed=SEED, pool=pool)
    finally:
        pool.close()
    np.testing.assert_array_equal(lock.lengths, np.full(3, 1000))
    np.testing.assert_array_equal(lock.returns, seq.returns)


def test_a_short_context_gives_an_episode_the_same_return_alone_or_with_others(K=1):
    """K=1 (the no-context recipe): one live episode alone would be a one-row matrix product, which BLAS rounds
    otherwise than a row of several; short contexts are padded to enough rows, so an episode's return does not depend
    on how many run beside it, and lockstep equals one by one."""
    spec = get_env_spec("halfcheetah")
    model = DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim, max_length=K,
                                         backbone=BackboneConfig(n_embd=16, n_layer=1)), seed=666).eval()
    mean, std = norm_stats("halfcheetah")
    pool = ev.EnvPool("halfcheetah")
    try:
        alone = ev.evaluate_episodes(model, "halfcheetah", 6000, 1, mean, std, seed=SEED, pool=pool)
        three = ev.evaluate_episodes(model, "halfcheetah", 6000, 3, mean, std, seed=SEED, pool=pool)
        seq = ev.evaluate_episodes_sequential(model, "halfcheetah", 6000, 3, mean, std, seed=SEED, pool=pool)
    finally:
        pool.close()
    assert alone.returns[0] == three.returns[0]
    np.testing.assert_array_equal(three.returns, seq.returns)


def test_halfcheetah_divergence_starts_at_rounding_level(models, pools):
    """Where the batched and sequential halfcheetah rollouts part, the first differing action differs by rounding
    only (identical inputs up to that step): the divergence is float batching, not a logic error."""
    _, seq = record_actions("sequential", "halfcheetah", "normal", models, pools)
    _, lock = record_actions("lockstep", "halfcheetah", "normal", models, pools)
    for e in range(N_EPISODES):
        assert seq[e].shape == lock[e].shape == (1000, 6)
        diff = (seq[e] - lock[e]).abs().amax(dim=1)
        nz = torch.nonzero(diff).flatten()
        if len(nz):
            assert diff[nz[0]] < 1e-6, (e, int(nz[0]), float(diff[nz[0]]))


def test_modes_change_the_rollout(models, pools):
    res = {m: run_eval("rowwise", "hopper", m, models, pools) for m in MODES}
    assert not np.array_equal(res["normal"].returns, res["noise"].returns)
    assert not np.array_equal(res["normal"].returns, res["delayed"].returns)


# ---------------------------------------------------------------------------------------------------------------------
# what get_action receives: seeds, normalisation, RTG, timesteps
# ---------------------------------------------------------------------------------------------------------------------
class CallRecorder:
    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def eval(self):
        self.model.eval()
        return self

    def get_action(self, s, a, r, t):
        self.calls.append((s.clone(), a.clone(), r.clone(), t.clone()))
        return self.model.get_action(s, a, r, t)


@pytest.mark.parametrize("mode", ["normal", "noise"])
def test_initial_observation_seed_and_normalisation(mode, models, pools):
    env, seed, n = "hopper", 3, 2
    spec = get_env_spec(env)
    mean, std = norm_stats(env)
    rec = CallRecorder(models[env])
    ev.evaluate_episodes(rec, env, 3600.0, n, mean, std, seed=seed, mode=mode, pool=pools[env])
    s0, a0, r0, t0 = rec.calls[0]
    assert s0.shape == (n, 1, spec.state_dim)
    e = make_env(env)
    for i in range(n):
        assert ev.episode_seed(seed, i) == 10000 * seed + i
        obs, _ = e.reset(seed=10000 * seed + i)
        if mode == "noise":
            obs = obs + np.random.default_rng(10000 * seed + i).normal(0, 0.1, size=obs.shape)
        expected = (torch.as_tensor(obs).float() - torch.as_tensor(mean).float()) / torch.as_tensor(std).float()
        torch.testing.assert_close(s0[i, 0], expected, atol=1e-6, rtol=0)
    e.close()
    assert torch.equal(a0, torch.zeros(n, 1, spec.act_dim))           # the current action slot is a zero placeholder
    torch.testing.assert_close(r0, torch.full((n, 1, 1), 3600.0 / 1000.0))
    assert torch.equal(t0, torch.zeros(n, 1, dtype=torch.long))


@pytest.mark.parametrize("mode", ["normal", "delayed"])
def test_rtg_and_timestep_histories(mode, models, pools):
    env = "hopper"
    mean, std = norm_stats(env)
    rec = CallRecorder(models[env])
    res = ev.evaluate_episodes_sequential(rec, env, 3600.0, 1, mean, std, seed=SEED, mode=mode, pool=pools[env])
    n = int(res.lengths[0])
    assert len(rec.calls) == n
    s, a, r, t = rec.calls[-1]                 # full history at the last decision (sequential path)
    assert torch.equal(t[0], torch.arange(n))
    assert torch.count_nonzero(a[0, -1]) == 0  # placeholder
    if mode == "delayed":
        assert torch.all(r == 3.6)
    else:
        # R̂ decreases by r/1000 each step: after n-1 steps it has dropped by (return - last reward)/1000
        dropped = float(r[0, 0, 0] - r[0, -1, 0]) * 1000.0
        assert 0 < dropped < res.returns[0]
        assert res.returns[0] - dropped < 5.0
    # lockstep sees the same last-K window
    rec2 = CallRecorder(models[env])
    ev.evaluate_episodes(rec2, env, 3600.0, 1, mean, std, seed=SEED, mode=mode, pool=pools[env])
    K = models[env].config.max_length
    s2, a2, r2, t2 = rec2.calls[n - 1]
    assert torch.equal(s2, s[:, -K:]) and torch.equal(a2, a[:, -K:])
    assert torch.equal(r2, r[:, -K:]) and torch.equal(t2, t[:, -K:])


def test_progress_counts_finished_episodes(models, pools):
    class Counter:
        n = 0

        def update(self, k):
            self.n += k

    c = Counter()
    mean, std = norm_stats("hopper")
    ev.evaluate_episodes(models["hopper"], "hopper", 3600.0, 4, mean, std, seed=SEED, pool=pools["hopper"], progress=c)
    assert c.n == 4


# ---------------------------------------------------------------------------------------------------------------------
# 2. seeding
# ---------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_returns_different_seed_different(models, pools):
    env = "hopper"
    mean, std = norm_stats(env)
    m = models[env]
    a = ev.evaluate_episodes(m, env, 3600.0, 3, mean, std, seed=5, pool=pools[env])
    b = ev.evaluate_episodes(m, env, 3600.0, 3, mean, std, seed=5)            # fresh pool
    c = ev.evaluate_episodes(m, env, 3600.0, 3, mean, std, seed=6, pool=pools[env])
    np.testing.assert_array_equal(a.returns, b.returns)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert not np.array_equal(a.returns, c.returns)
    # the episodes within one evaluation differ from each other (distinct reset seeds)
    assert len(set(a.returns.tolist())) == 3


@pytest.mark.parametrize("mode", ["normal", "noise"])
def test_episode_return_independent_of_num_episodes(mode, models, pools):
    env = "hopper"
    mean, std = norm_stats(env)
    m = models[env]
    two = ev.evaluate_episodes(m, env, 3600.0, 2, mean, std, seed=SEED, mode=mode, pool=pools[env])
    four = ev.evaluate_episodes(m, env, 3600.0, 4, mean, std, seed=SEED, mode=mode, pool=pools[env])
    np.testing.assert_array_equal(four.returns[:2], two.returns)
    np.testing.assert_array_equal(four.lengths[:2], two.lengths)
    # ... also for the sequential path
    seq = ev.evaluate_episodes_sequential(m, env, 3600.0, 4, mean, std, seed=SEED, mode=mode, pool=pools[env])
    np.testing.assert_array_equal(seq.returns[:2], two.returns)


# ---------------------------------------------------------------------------------------------------------------------
# 3. metrics
# ---------------------------------------------------------------------------------------------------------------------
def test_metrics_keys_and_values():
    returns = np.array([100.0, 250.0, 400.0, -10.0])
    lengths = np.array([10, 25, 40, 3], dtype=np.int64)
    res = ev.EvalResult(3600.0, returns, lengths)
    m = res.metrics("hopper")
    p = "target_3600"
    assert set(m) == {f"{p}_return_mean", f"{p}_return_std", f"{p}_length_mean", f"{p}_length_std",
                      f"{p}_d4rl_score_mean", f"{p}_d4rl_score_std"}
    assert all(type(v) is float for v in m.values())
    rmin, rmax = -20.272305, 3234.3
    scores = [100.0 * (r - rmin) / (rmax - rmin) for r in returns]

    def pstd(xs):
        mu = sum(xs) / len(xs)
        return (sum((x - mu) ** 2 for x in xs) / len(xs)) ** 0.5      # population std (ddof 0)

    assert m[f"{p}_return_mean"] == pytest.approx(185.0)
    assert m[f"{p}_return_std"] == pytest.approx(pstd(returns.tolist()))
    assert m[f"{p}_return_std"] != pytest.approx(float(np.std(returns, ddof=1)))
    assert m[f"{p}_length_mean"] == pytest.approx(19.5)
    assert m[f"{p}_length_std"] == pytest.approx(pstd(lengths.tolist()))
    assert m[f"{p}_d4rl_score_mean"] == pytest.approx(sum(scores) / 4)
    assert m[f"{p}_d4rl_score_std"] == pytest.approx(pstd(scores))
    # a known point: the expert return scores 100, the random one 0
    one = ev.EvalResult(1800.0, np.array([3234.3, -20.272305]), np.array([1000, 5])).metrics("hopper", prefix="ev/")
    assert set(one) == {f"ev/target_1800_{s}" for s in ("return_mean", "return_std", "length_mean", "length_std",
                                                         "d4rl_score_mean", "d4rl_score_std")}
    assert one["ev/target_1800_d4rl_score_mean"] == pytest.approx(50.0)
    assert one["ev/target_1800_d4rl_score_std"] == pytest.approx(50.0)


def test_metrics_other_env_constants():
    r = ev.EvalResult(12000.0, np.array([12135.0]), np.array([1000])).metrics("halfcheetah")
    assert r["target_12000_d4rl_score_mean"] == pytest.approx(100.0)
    assert r["target_12000_return_std"] == 0.0
    r = ev.EvalResult(5000.0, np.array([1.629008]), np.array([1000])).metrics("walker2d")
    assert r["target_5000_d4rl_score_mean"] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# 4. errors
# ---------------------------------------------------------------------------------------------------------------------
def test_unknown_env_is_user_error(models):
    unknown = "unknown env 'ant'; choose one of hopper, halfcheetah, walker2d"
    with pytest.raises(UserError, match=unknown):
        get_env_spec("ant")
    with pytest.raises(UserError, match=unknown):
        make_env("ant")
    with pytest.raises(UserError, match=unknown):
        ev.evaluate_episodes(models["hopper"], "ant", 3600.0, 1, np.zeros(11), np.ones(11))
    with pytest.raises(UserError, match=unknown):
        ev.evaluate_episodes_sequential(models["hopper"], "ant", 3600.0, 1, np.zeros(11), np.ones(11))
    with pytest.raises(UserError, match=unknown):
        ev.EvalResult(3600.0, np.zeros(2), np.zeros(2)).metrics("ant")


def test_unsupported_env_version_is_user_error(models):
    unsupported = "unsupported --env_version 'v3'; choose one of v4, v5"
    with pytest.raises(UserError, match=unsupported):
        make_env("hopper", "v3")
    with pytest.raises(UserError, match=unsupported):
        ev.EnvPool("hopper", "v3").get(1)
    with pytest.raises(UserError, match=unsupported):
        ev.evaluate_episodes(models["hopper"], "hopper", 3600.0, 1, np.zeros(11), np.ones(11), env_version="v3")
    with pytest.raises(UserError, match=unsupported):
        ev.evaluate_episodes_sequential(models["hopper"], "hopper", 3600.0, 1, np.zeros(11), np.ones(11),
                                        env_version="v3")
    # the supported versions build
    for v in ("v4", "v5"):
        e = make_env("hopper", v)
        assert e.spec.id == f"Hopper-{v}"
        e.close()


@pytest.mark.parametrize("env", ["hopper", "halfcheetah"])
def test_overlapped_groups_equal_sequential(env, models, pools):
    """Episodes split into groups whose forwards are launched before the envs step (the GPU overlap path) give the
    same returns as one-by-one rollouts: the grouping changes scheduling only."""
    target = get_env_spec(env).targets[0]
    mean, std = norm_stats(env)
    kw = dict(seed=SEED, pool=pools[env])
    seq = ev.evaluate_episodes_sequential(models[env], env, target, 5, mean, std, **kw)
    grouped = ev.evaluate_episodes(RowwiseModel(models[env]), env, target, 5, mean, std, overlap_groups=3, **kw)
    np.testing.assert_array_equal(grouped.lengths, seq.lengths)
    np.testing.assert_array_equal(grouped.returns, seq.returns)


class _LoggedEnv:
    """A stand-in env that logs its steps in ``log``: observations from the step count, reward 1, over at step 2."""

    def __init__(self, i: int, log: list, obs_dim: int = 11):
        self.i, self.log, self.obs_dim, self.t = i, log, obs_dim, 0

    def reset(self, seed=None):
        self.t = 0
        return np.full(self.obs_dim, 0.01 * self.i), {}

    def step(self, action):
        self.t += 1
        self.log.append(("step", self.i))
        return np.full(self.obs_dim, 0.01 * self.i + 0.1 * self.t), 1.0 + float(action[0]), self.t >= 2, False, {}

    def close(self):
        pass


def test_local_envs_step_at_step_async():
    """In-process envs step when their actions are sent, not when their results are asked for; the results come
    back in the order of the sends, and a reset drops results never waited for."""
    log = []
    envs = ev.LocalEnvs([_LoggedEnv(i, log) for i in range(3)])
    envs.reset(3, seed=0, mode="normal")
    envs.step_async(np.array([0, 2]), np.zeros((2, 3)))
    assert log == [("step", 0), ("step", 2)]
    envs.step_async(np.array([1]), np.ones((1, 3)))
    assert log == [("step", 0), ("step", 2), ("step", 1)]
    obs, rewards, done = envs.step_wait()
    np.testing.assert_array_equal(rewards, [1.0, 1.0])
    np.testing.assert_allclose(obs[:, 0], [0.1, 0.12])
    obs, rewards, done = envs.step_wait()
    np.testing.assert_array_equal(rewards, [2.0])
    envs.step_async(np.array([0]), np.zeros((1, 3)))
    envs.reset(3, seed=0, mode="normal")
    with pytest.raises(IndexError):
        envs.step_wait()


def test_overlapped_groups_step_in_process_envs_before_later_groups_are_awaited(models, monkeypatch):
    """With in-process envs (no worker processes) each group's envs step right after its own actions have arrived on
    the host, before the arrival of the later groups' actions is waited for: on a GPU the CPU then steps a group
    while the later groups' forwards run. The arrival is logged by a stand-in for the CUDA event; the returns equal
    those of one group."""
    import itertools

    env, model = "hopper", models["hopper"]
    log = []

    class LoggedEvent:
        def __init__(self, k):
            self.k = k

        def synchronize(self):
            log.append(("actions on host", self.k))

    class LoggedModel(RowwiseModel):
        def get_action(self, states, actions, returns_to_go, timesteps):
            log.append(("forward", states.shape[0]))
            return super().get_action(states, actions, returns_to_go, timesteps)

    def run(groups):
        log.clear()
        count = itertools.count()
        monkeypatch.setattr(ev, "_host_copy_event", lambda cuda: LoggedEvent(next(count)))
        pool = ev.EnvPool(env)
        pool.envs = [_LoggedEnv(i, log) for i in range(5)]
        mean, std = norm_stats(env)
        try:
            res = ev.evaluate_episodes(LoggedModel(model), env, 3600.0, 5, mean, std, seed=SEED, pool=pool,
                                       overlap_groups=groups)
        finally:
            pool.close()
        return res, list(log)

    grouped, order = run(3)
    # groups [0, 1], [2, 3], [4]: every forward is launched first, then each group steps once its actions are there
    expected = []
    for t in range(2):
        expected += [("forward", 2), ("forward", 2), ("forward", 1),
                     ("actions on host", 3 * t), ("step", 0), ("step", 1),
                     ("actions on host", 3 * t + 1), ("step", 2), ("step", 3),
                     ("actions on host", 3 * t + 2), ("step", 4)]
    assert order == expected
    single, _ = run(1)
    assert grouped.lengths.tolist() == single.lengths.tolist() == [2] * 5
    np.testing.assert_array_equal(grouped.returns, single.returns)


@pytest.mark.parametrize("mode", MODES)
def test_env_worker_processes_equal_in_process_stepping(mode, models):
    """Envs stepped in worker processes (round robin over 2 workers, 1 to 3 overlapped groups) give exactly the
    returns and lengths of stepping them in this process; the pool's workers are reused and stopped on close."""
    env = "hopper"
    target = get_env_spec(env).targets[0]
    mean, std = norm_stats(env)
    local = ev.EnvPool(env)
    remote = ev.EnvPool(env, workers=2)
    try:
        ref = ev.evaluate_episodes(models[env], env, target, 7, mean, std, seed=SEED, mode=mode, pool=local)
        assert len(set(ref.lengths)) > 1                         # episodes end at different steps
        for groups in (1, 3):
            out = ev.evaluate_episodes(models[env], env, target, 7, mean, std, seed=SEED, mode=mode, pool=remote,
                                       overlap_groups=groups)
            np.testing.assert_array_equal(out.lengths, ref.lengths)
            np.testing.assert_array_equal(out.returns, ref.returns)
        procs = list(remote._remote.procs)
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
    finally:
        local.close()
        remote.close()
    for p in procs:
        p.join(timeout=5)
        assert not p.is_alive()


def test_env_worker_failure_is_reported():
    """A worker that fails (here: an action of the wrong size) raises in the main process with the worker's error."""
    from decision_transformer.env_workers import EnvWorkers

    w = EnvWorkers("hopper", workers=1)
    try:
        assert w.reset(2, seed=0, mode="normal").shape == (2, 11)
        w.step_async(np.arange(2), np.zeros((2, 5)))
        with pytest.raises(RuntimeError, match="evaluation env worker 0: .*"):
            w.step_wait()
    finally:
        w.close()


def test_env_workers_default():
    assert ev.default_env_workers("cpu", 50) == 0
    assert ev.default_env_workers("cuda", 4) == 0
    from decision_transformer.cpu import available_cpus

    assert ev.default_env_workers("cuda", 50) == max(0, min(8, len(available_cpus()) - 1))


# ---------------------------------------------------------------------------------------------------------------------
# 5. env worker processes: reuse, failures, interrupts, signals, main scripts
# ---------------------------------------------------------------------------------------------------------------------
def _hopper_eval(models, pool, n=6, seed=SEED, mode="normal", **kw):
    mean, std = norm_stats("hopper")
    return ev.evaluate_episodes(kw.pop("model", models["hopper"]), "hopper", 3600.0, n, mean, std, seed=seed,
                                mode=mode, pool=pool, **kw)


def _assert_same(a, b):
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.returns, b.returns)


def test_env_worker_pool_reused_across_episode_counts_seeds_and_modes(models, pools, monkeypatch):
    """One pool serves evaluations of 2, 7, 3 and 9 episodes with other seeds and modes, one whose episodes all stop
    after one step (envs left mid-episode), and equals stepping in this process each time. It starts more workers
    when an evaluation needs more than run (up to ``workers``), and keeps them for smaller ones."""
    remote = ev.EnvPool("hopper", workers=4)
    try:
        _assert_same(_hopper_eval(models, remote, 2), _hopper_eval(models, pools["hopper"], 2))
        first = list(remote._remote.procs)
        assert len(first) == 2
        for n, seed, mode in [(7, 3, "noise"), (3, 4, "delayed"), (9, 5, "normal")]:
            _assert_same(_hopper_eval(models, remote, n, seed, mode),
                         _hopper_eval(models, pools["hopper"], n, seed, mode))
            assert remote._remote.workers == 4
        assert not any(p.is_alive() for p in first)           # the 2 first workers were replaced by 4
        spec = get_env_spec("hopper")
        one_step = type(spec)(**{**spec.__dict__, "max_ep_len": 1})
        with monkeypatch.context() as m:
            m.setattr(ev, "get_env_spec", lambda name: one_step)
            short = _hopper_eval(models, remote, 5, seed=7)
        assert list(short.lengths) == [1] * 5
        _assert_same(_hopper_eval(models, remote, 5, seed=7), _hopper_eval(models, pools["hopper"], 5, seed=7))
    finally:
        remote.close()


class _KillWorker:
    """The hopper policy, killing (SIGKILL) env worker 1 of ``pool`` before the 5th forward."""

    def __init__(self, model, pool):
        self.model, self.config, self.pool, self.calls = model, model.config, pool, 0

    def eval(self):
        return self

    def get_action(self, *args):
        self.calls += 1
        if self.calls == 5:
            import signal

            p = self.pool._remote.procs[1]
            os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=5)
        return self.model.get_action(*args)


class _InterruptAt:
    """A progress bar whose ``n``-th update raises KeyboardInterrupt (Ctrl-C in the middle of a step's groups)."""

    def __init__(self, n):
        self.calls, self.n = 0, n

    def update(self, k):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


class _InterruptingConn:
    """A worker's pipe whose next ``recv`` raises KeyboardInterrupt (Ctrl-C while waiting for the worker's reply)."""

    def __init__(self, conn):
        self.conn, self.armed = conn, True

    def recv(self):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return self.conn.recv()

    def __getattr__(self, name):
        return getattr(self.conn, name)


@pytest.mark.parametrize("failure", ["killed", "killed_between_evaluations", "interrupted_between_replies",
                                     "interrupted_in_recv", "bad_action"])
def test_env_worker_pool_recovers_after_a_failed_evaluation(failure, models, pools):
    """A worker killed mid-evaluation raises a RuntimeError naming it; one killed between evaluations (by the OOM
    killer, say) is replaced at the next one; Ctrl-C between the replies of one env step
    (the other groups' replies left in the pipes) or while waiting for a reply propagates; a worker error raises.
    The pool's next evaluations equal stepping in this process: it waits for the replies left, or starts new workers
    where a round was cut short or a worker is gone; ``close`` (twice) leaves no process."""
    ref = _hopper_eval(models, pools["hopper"])
    remote = ev.EnvPool("hopper", workers=2)
    try:
        _assert_same(_hopper_eval(models, remote), ref)
        old = list(remote._remote.procs)
        if failure == "killed":
            with pytest.raises(RuntimeError, match=r"evaluation env worker 1 exited \(exit code -9\); it was killed "
                                                   r"\(out of memory\?\)") as e:
                _hopper_eval(models, remote, model=_KillWorker(models["hopper"], remote))
            assert isinstance(e.value, UserError) and "continues with --resume" in str(e.value)   # one line
        elif failure == "killed_between_evaluations":
            import signal

            os.kill(old[1].pid, signal.SIGKILL)
            old[1].join(timeout=5)
        elif failure == "interrupted_between_replies":
            with pytest.raises(KeyboardInterrupt):
                _hopper_eval(models, remote, overlap_groups=3, progress=_InterruptAt(4))
            assert len(remote._remote._pending) == 2              # the 2nd and 3rd groups of the step
        elif failure == "interrupted_in_recv":
            remote._remote.conns[1] = _InterruptingConn(remote._remote.conns[1])
            with pytest.raises(KeyboardInterrupt):
                _hopper_eval(models, remote)
        else:
            s = remote.stepper(6)
            s.reset(6, 0, "normal")
            s.step_async(np.arange(6), np.zeros((6, 5)))
            with pytest.raises(RuntimeError, match="evaluation env worker .: ValueError"):
                s.step_wait()
        restart = failure != "interrupted_between_replies"
        assert remote._remote.usable is not restart
        _assert_same(_hopper_eval(models, remote), ref)
        _assert_same(_hopper_eval(models, remote, 4, seed=2), _hopper_eval(models, pools["hopper"], 4, seed=2))
        assert remote._remote.usable
        new = list(remote._remote.procs)
        assert (new == old) is not restart
        if restart:
            assert not any(p.is_alive() for p in old)
    finally:
        remote.close()
        remote.close()
    assert all(p.exitcode is not None for p in old + new)        # all ended and waited for


def test_env_workers_reset_waits_for_rounds_left_pending():
    """A step sent and never waited for (Ctrl-C between ``step_async`` and ``step_wait``): the next reset drops its
    results instead of taking them for observations."""
    from decision_transformer.env_workers import EnvWorkers

    envs = [make_env("hopper") for _ in range(3)]
    w = EnvWorkers("hopper", workers=2)
    try:
        w.reset(3, seed=0, mode="normal")
        w.step_async(np.arange(3), np.zeros((3, 3), dtype=np.float32))
        obs = w.reset(3, seed=1, mode="normal")
        np.testing.assert_array_equal(obs, np.stack([ev.initial_obs(e, 1, i, "normal") for i, e in enumerate(envs)]))
        assert w.usable
    finally:
        w.close()
        for e in envs:
            e.close()


def test_env_worker_user_error_stays_a_user_error():
    """An error the user can fix (here an env version) is a UserError with workers too, as in this process."""
    pool = ev.EnvPool("hopper", "v3", workers=2)
    try:
        with pytest.raises(UserError, match="unsupported --env_version 'v3'"):
            pool.stepper(2).reset(2, 0, "normal")
    finally:
        pool.close()


_SIGINT_SCRIPT = """
import os, signal, time
import numpy as np
from multiprocessing import resource_tracker
from decision_transformer.env_workers import EnvWorkers

if __name__ == "__main__":
    assert resource_tracker._resource_tracker._fd is None       # a fresh process: the first workers it starts
    w = EnvWorkers("hopper", workers=2)
    for p in w.procs:                                           # at once: the workers are still starting up
        os.kill(p.pid, signal.SIGINT)
    first = w.reset(2, seed=0, mode="normal")
    for p in w.procs:
        os.kill(p.pid, signal.SIGINT)
    time.sleep(0.3)
    assert all(p.is_alive() for p in w.procs)
    assert np.array_equal(w.reset(2, seed=0, mode="normal"), first)
    w.close()
    print("ok")
"""


def _run_python(tmp_path, script: str, *, stdin: bool = False):
    """Run ``script`` in a fresh interpreter (from a file, or read from stdin) with this checkout importable."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if stdin:
        return subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def test_env_workers_ignore_sigint(tmp_path):
    """Ctrl-C is the main process's: SIGINT reaching the workers, while they start or later, stops none of them
    (also for the first workers of a process, whose start also starts multiprocessing's resource tracker)."""
    out = _run_python(tmp_path, _SIGINT_SCRIPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]
    assert "KeyboardInterrupt" not in out.stderr


_SCRIPT_WITHOUT_MAIN_GUARD = """
import numpy as np
from decision_transformer.env_workers import EnvWorkers, initial_obs, step_envs
from decision_transformer.envs import make_env
print("top level", flush=True)
w = EnvWorkers("hopper", workers=2)
obs = w.reset(3, 0, "normal")
a = np.full((3, 3), 0.5, dtype=np.float32)
w.step_async(np.arange(3), a)
o, r, d = w.step_wait()
w.close()
envs = [make_env("hopper") for _ in range(3)]
assert np.array_equal(obs, np.stack([initial_obs(e, 0, i, "normal") for i, e in enumerate(envs)]))
lo, lr, ld = step_envs(envs, a)
assert np.array_equal(o, lo) and np.array_equal(r, lr) and np.array_equal(d, ld)
print("same", flush=True)
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_env_workers_from_a_script_without_main_guard(how, tmp_path):
    """The workers do not re-run the main script (spawn would, by default): a script without an
    ``if __name__ == "__main__"`` guard, or one read from stdin, starts them and gets the in-process results."""
    out = _run_python(tmp_path, _SCRIPT_WITHOUT_MAIN_GUARD, stdin=how == "stdin")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["top", "level", "same"]


def test_env_worker_that_stops_answering_fails_the_round():
    """A worker that no longer answers (stopped here with SIGSTOP) fails the round after the reply timeout with an
    error naming it, instead of hanging the evaluation; closing the pool still ends it."""
    import signal

    from decision_transformer.env_workers import EnvWorkers

    w = EnvWorkers("hopper", workers=2)
    try:
        w.reset(4, seed=0, mode="normal")
        w.reply_timeout_s = 1.0
        os.kill(w.procs[1].pid, signal.SIGSTOP)
        w.step_async(np.arange(4), np.zeros((4, 3)))
        with pytest.raises(RuntimeError, match="worker 1 did not answer within 1 s"):
            w.step_wait()
    finally:
        procs = list(w.procs)
        w.close()
    for p in procs:
        assert not p.is_alive()


def test_zero_episodes_is_a_clear_error(models):
    with pytest.raises(ValueError, match="num_episodes must be >= 1, got 0"):
        ev.evaluate_episodes(models["hopper"], "hopper", 3600, 0, *norm_stats("hopper"))
