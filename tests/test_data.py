"""Tests of decision_transformer.data: the batch sampler against a per-sample transcription of the originals'
``get_batch``, sampling frequencies, pct_traj, delayed mode, state statistics, episode splitting, file lookup and
the refusal of unsafe or malformed input (reference: shared/reference/training.md sections 1-4).

Everything is offline, seeded and deterministic; only the last test steps real MuJoCo (a few thousand steps).
"""
from __future__ import annotations

import collections
import math
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from decision_transformer import synthetic
from decision_transformer.data import (
    Batch,
    discount_cumsum,
    TrajectoryDataset,
    load_dataset,
    load_trajectories,
    select_top_trajectories,
    split_episodes,
)
from decision_transformer.errors import UserError
from decision_transformer.slow_paths import reference_get_batch  # the originals' per-sample loop

STATE_DIM, ACT_DIM = 11, 3          # hopper
MAX_EP_LEN, SCALE = 1000, 1000.0    # hopper
FIELDS = ("states", "actions", "rewards", "dones", "rtg", "timesteps", "mask")

# Per-dimension scale and offset of the synthetic observations: wide ranges so that normalisation really rounds.
_OBS_SCALE = np.geomspace(0.01, 50.0, STATE_DIM)
_OBS_SHIFT = np.linspace(-3.0, 7.0, STATE_DIM)
CONST_DIM, CONST_VALUE = 3, 0.5     # one constant observation dimension: its std is exactly the +1e-6


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def make_trajs(lengths, seed=0, first_rewards=None):
    """Validated-format trajectories (float32 arrays, bool terminals) of the given lengths.

    With ``first_rewards`` every reward is 0 except rewards[0] = first_rewards[i], so returns are exact."""
    rng = np.random.default_rng(seed)
    trajs = []
    for i, n in enumerate(lengths):
        obs = (rng.normal(size=(n, STATE_DIM)) * _OBS_SCALE + _OBS_SHIFT).astype(np.float32)
        obs[:, CONST_DIM] = CONST_VALUE
        act = rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32)
        if first_rewards is None:
            rew = rng.uniform(-1.0, 4.0, size=n).astype(np.float32)
        else:
            rew = np.zeros(n, dtype=np.float32)
            rew[0] = first_rewards[i]
        term = rng.random(n) < 0.3
        trajs.append({"observations": obs, "actions": act, "rewards": rew, "terminals": term})
    return trajs


def original_state_stats(trajectories):
    states = np.concatenate([path["observations"] for path in trajectories], axis=0)
    return np.mean(states, axis=0), np.std(states, axis=0) + 1e-6


def assert_field_equal(name, got, expected):
    assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype}, expected {expected.dtype}"
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.equal(got, expected):
        bad = (got != expected).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{name}: {len(bad)} of {got.numel()} entries differ; first at {first}: "
                             f"got {got[first].item()!r}, expected {expected[first].item()!r}")


def assert_batch_matches_reference(batch: Batch, ref, pairs, *, exact_states: bool):
    """Every field bit-exact; states bit-exact on padding and, unless exact_states, within 1 ulp on real steps."""
    for f in FIELDS:
        if f != "states":
            assert_field_equal(f, getattr(batch, f), ref[f])
    got, exp = batch.states, ref["states"]
    assert got.dtype == exp.dtype == torch.float32 and got.shape == exp.shape
    if exact_states:
        assert_field_equal("states", got, exp)
    else:
        pad = ref["mask"] == 0
        assert_field_equal("states[padding]", got[pad], exp[pad])
        np.testing.assert_array_max_ulp(got[~pad].numpy(), exp[~pad].numpy(), maxulp=1)


def window_pairs(lengths, K, seed=0):
    """(trajectory, start) pairs: every start of the short trajectories; for long ones the edges (0, 1, around
    len-K, len-1) and the region around the max_ep_len clipping, plus random starts."""
    rng = np.random.default_rng(seed + K)
    pairs = []
    for i, n in enumerate(lengths):
        if n <= 60:
            starts = range(n)
        else:
            cand = {0, 1, 2, n - K - 1, n - K, n - K + 1, n - 2, n - 1,
                    MAX_EP_LEN - K - 1, MAX_EP_LEN - K, MAX_EP_LEN - 2, MAX_EP_LEN - 1, MAX_EP_LEN, MAX_EP_LEN + 1}
            cand |= set(rng.integers(0, n, size=25).tolist())
            starts = sorted(c for c in cand if 0 <= c < n)
        pairs += [(i, s) for s in starts]
    return pairs


def windows(ds, pairs, K):
    traj = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    start = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return ds.get_windows(traj, start, K)


def user_error_message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "\r" not in msg, f"UserError message is not one line: {msg!r}"
    return msg


@pytest.fixture(autouse=True)
def _no_d4rl_cache(monkeypatch, tmp_path_factory):
    """Never look at the user's real ~/.d4rl cache."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path_factory.mktemp("empty_d4rl_cache")))


# ----------------------------------------------------------------------------------------------------------------
# 1. get_windows against the reference sampler
# ----------------------------------------------------------------------------------------------------------------

WINDOW_LENGTHS = (1, 2, 4, 19, 20, 21, 57, 1234)


@pytest.fixture(scope="module")
def window_data():
    trajs = make_trajs(WINDOW_LENGTHS, seed=1)
    return trajs, TrajectoryDataset(trajs, "hopper")


@pytest.mark.parametrize("K", [1, 5, 20])
def test_windows_match_reference_sampler(window_data, K):
    trajs, ds = window_data
    pairs = window_pairs(WINDOW_LENGTHS, K)
    assert (0, 0) in pairs and (7, 1233) in pairs and (7, MAX_EP_LEN - 2) in pairs
    mean, std = original_state_stats(trajs)
    ref = reference_get_batch(trajs, pairs, K, mean, std)
    batch = windows(ds, pairs, K)
    assert_batch_matches_reference(batch, ref, pairs, exact_states=False)
    # the cases the brief asks for are really exercised
    assert (ref["mask"] == 0).any() or K == 1
    assert (ref["timesteps"] == MAX_EP_LEN - 1).sum() > 1


@pytest.mark.parametrize("K", [1, 5, 20])
def test_window_states_bit_exact_with_original_normalisation(window_data, K):
    """The originals normalise the float64 left-padded state array ((zeros float64 ++ s) - mean) / std and only then
    cast to float32; every normalised state must be bit-identical to that."""
    trajs, ds = window_data
    pairs = window_pairs(WINDOW_LENGTHS, K)
    mean, std = original_state_stats(trajs)
    ref = reference_get_batch(trajs, pairs, K, mean, std)
    assert_field_equal("states", windows(ds, pairs, K).states, ref["states"])


def test_window_hand_computed_values():
    """One window checked against literal values (independent of the reference transcription)."""
    trajs = make_trajs([3, 2], seed=2)
    trajs[0]["rewards"] = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    trajs[0]["terminals"] = np.array([False, True, False])
    ds = TrajectoryDataset(trajs, "hopper")
    b = ds.get_windows(torch.tensor([0]), torch.tensor([1]), 5)
    assert b.rewards[0, :, 0].tolist() == [0, 0, 0, 2, 4]
    assert torch.equal(b.rtg[0, :, 0], torch.tensor([0, 0, 0, 6, 4, 0], dtype=torch.float32) / 1000.0)
    assert b.dones[0].tolist() == [2, 2, 2, 1, 0]
    assert b.timesteps[0].tolist() == [0, 0, 0, 1, 2]
    assert b.mask[0].tolist() == [0, 0, 0, 1, 1]
    assert (b.actions[0, :3] == -10).all()
    assert torch.equal(b.actions[0, 3:], torch.from_numpy(trajs[0]["actions"][1:3]))
    mean, std = original_state_stats(trajs)
    pad = torch.from_numpy(((0.0 - mean.astype(np.float64)) / std).astype(np.float32))
    assert torch.equal(b.states[0, 0], pad) and torch.equal(b.states[0, 2], pad)
    assert b.states[0, 0, CONST_DIM].item() == pytest.approx(-CONST_VALUE / 1e-6, rel=1e-5)
    torch.testing.assert_close(b.states[0, 3:], torch.from_numpy((trajs[0]["observations"][1:3] - mean) / std))
    # window from the start of a long-enough trajectory: no padding at all
    b = ds.get_windows(torch.tensor([0]), torch.tensor([0]), 3)
    assert b.mask[0].tolist() == [1, 1, 1] and b.timesteps[0].tolist() == [0, 1, 2]
    assert torch.equal(b.rtg[0, :, 0], torch.tensor([7, 6, 4, 0], dtype=torch.float32) / 1000.0)


def test_timesteps_clipped_for_long_trajectory(window_data):
    trajs, ds = window_data
    long_i = WINDOW_LENGTHS.index(1234)
    b = ds.get_windows(torch.tensor([long_i, long_i]), torch.tensor([990, 1200]), 20)
    assert b.timesteps[0].tolist() == list(range(990, 1000)) + [999] * 10
    assert b.timesteps[1].tolist() == [999] * 20          # 34 steps left: no padding, all clipped
    assert b.mask.tolist() == [[1.0] * 20] * 2
    b = ds.get_windows(torch.tensor([long_i]), torch.tensor([1226]), 20)   # 8 real steps at the episode end
    assert b.timesteps[0].tolist() == [0] * 12 + [999] * 8


def test_batch_shapes_and_dtypes(window_data):
    _, ds = window_data
    b = ds.sample_batch(7, 20, torch.Generator().manual_seed(0))
    assert b.states.shape == (7, 20, STATE_DIM) and b.states.dtype == torch.float32
    assert b.actions.shape == (7, 20, ACT_DIM) and b.actions.dtype == torch.float32
    assert b.rewards.shape == (7, 20, 1) and b.rewards.dtype == torch.float32
    assert b.dones.shape == (7, 20) and b.dones.dtype == torch.int64
    assert b.rtg.shape == (7, 21, 1) and b.rtg.dtype == torch.float32
    assert b.timesteps.shape == (7, 20) and b.timesteps.dtype == torch.int64
    assert b.mask.shape == (7, 20) and b.mask.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# 2. Sampling law and pct_traj
# ----------------------------------------------------------------------------------------------------------------

FREQ_LENGTHS = (5, 20, 75, 100, 300)


def _binomial_check(counts, n, probs, sigmas=5.0):
    for i, (c, p) in enumerate(zip(counts, probs)):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(c - n * p) <= sigmas * sd, f"index {i}: {c} draws, expected {n * p:.0f} +- {sigmas}*{sd:.1f}"


def test_sample_indices_law():
    ds = TrajectoryDataset(make_trajs(FREQ_LENGTHS, seed=3), "hopper")
    n = 200_000
    traj, start = ds.sample_indices(n, torch.Generator().manual_seed(123))
    assert traj.dtype == torch.int64 and start.dtype == torch.int64 and traj.shape == start.shape == (n,)
    traj, start = traj.numpy(), start.numpy()
    lengths = np.array(FREQ_LENGTHS)
    # trajectory ~ len / sum(len), with replacement (5-sigma binomial bound per trajectory)
    counts = np.bincount(traj, minlength=len(lengths))
    _binomial_check(counts, n, lengths / lengths.sum())
    for i, L in enumerate(lengths):
        s = start[traj == i]
        assert s.min() == 0 and s.max() == L - 1, f"trajectory {i}: starts span [{s.min()}, {s.max()}], not [0, {L - 1}]"
    # start uniform within one trajectory: chi-square over the 300 starts of the longest one (df = 299). Bound:
    # df + 5 * sqrt(2 df) = 421 (the 5-sigma normal approximation; the exact chi2(299) tail there is ~1e-5).
    s = start[traj == 4]
    obs = np.bincount(s, minlength=300)
    exp = len(s) / 300
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < 299 + 5 * math.sqrt(2 * 299), chi2
    # and on the shortest one (5 starts) per-bin binomial bounds
    s = start[traj == 0]
    _binomial_check(np.bincount(s, minlength=5), len(s), [0.2] * 5)


def test_sample_batch_is_get_windows_of_sample_indices():
    ds = TrajectoryDataset(make_trajs(FREQ_LENGTHS, seed=3), "hopper")
    traj, start = ds.sample_indices(64, torch.Generator().manual_seed(5))
    b1 = ds.get_windows(traj, start, 10)
    b2 = ds.sample_batch(64, 10, torch.Generator().manual_seed(5))
    for f in FIELDS:
        assert torch.equal(getattr(b1, f), getattr(b2, f)), f


# returns (via rewards[0]) and lengths of a small hand-made case for pct_traj; sum of lengths = 100
PCT_RETURNS = (10.0, 40.0, 30.0, 20.0, 5.0)
PCT_LENGTHS = (10, 20, 30, 35, 5)
# Ascending by return: 4 (5), 0 (10), 3 (20), 2 (30), 1 (40). Best first: 1 (len 20), 2 (30), 3 (35), 0 (10), 4 (5).
PCT_EXPECTED = [
    (1.0, {0, 1, 2, 3, 4}),   # budget 100: all (the strict '<' of R/T/L would drop trajectory 4)
    (0.95, {0, 1, 2, 3}),     # budget 95: 20+30+35+10 = 95 <= 95 ('<' would stop at {1, 2, 3})
    (0.5, {1, 2}),            # budget 50: 20+30 = 50 <= 50; + 35 > 50
    (0.6, {1, 2}),            # budget 60: + 35 = 85 > 60 -> stop, even though trajectory 0 (len 10) would still fit
    (0.3, {1}),               # budget 30: 20, + 30 = 50 > 30
    (0.001, {1}),             # budget max(0, 1) = 1: the best trajectory is always kept
]


@pytest.mark.parametrize("pct, expected", PCT_EXPECTED)
def test_pct_traj_selection(pct, expected):
    kept = select_top_trajectories(np.array(PCT_RETURNS), np.array(PCT_LENGTHS), pct)
    assert set(kept.tolist()) == expected
    ds = TrajectoryDataset(make_trajs(PCT_LENGTHS, seed=4, first_rewards=PCT_RETURNS), "hopper", pct_traj=pct)
    assert set(ds.kept.tolist()) == expected


def test_pct_traj_restricts_sampling():
    ds = TrajectoryDataset(make_trajs(PCT_LENGTHS, seed=4, first_rewards=PCT_RETURNS), "hopper", pct_traj=0.5)
    n = 50_000
    traj, start = ds.sample_indices(n, torch.Generator().manual_seed(7))
    traj, start = traj.numpy(), start.numpy()
    assert set(np.unique(traj).tolist()) == {1, 2}
    counts = np.bincount(traj, minlength=5)
    _binomial_check(counts[[1, 2]], n, [20 / 50, 30 / 50])
    assert start[traj == 1].max() == 19 and start[traj == 2].max() == 29 and start.min() == 0
    # the batch windows come from the kept trajectories only: check via the unique rewards[0] of each trajectory
    b = ds.sample_batch(512, 40, torch.Generator().manual_seed(8))
    assert set(b.rewards[b.rewards != 0].tolist()) == {40.0, 30.0}   # only rewards[0] of each trajectory are non-zero


@pytest.mark.parametrize("pct", [0.0, -0.5, 1.5])
def test_pct_traj_out_of_range(pct):
    with pytest.raises(UserError, match=re.escape(f"--pct_traj must be in (0, 1], got {pct}")):
        TrajectoryDataset(make_trajs(PCT_LENGTHS, seed=4), "hopper", pct_traj=pct)


# ----------------------------------------------------------------------------------------------------------------
# 3. Seeding
# ----------------------------------------------------------------------------------------------------------------

def test_same_seed_same_batch_different_seed_different_batch():
    ds = TrajectoryDataset(make_trajs(FREQ_LENGTHS, seed=3), "hopper")
    a = ds.sample_batch(32, 20, torch.Generator().manual_seed(42))
    b = ds.sample_batch(32, 20, torch.Generator().manual_seed(42))
    c = ds.sample_batch(32, 20, torch.Generator().manual_seed(43))
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.states, c.states)
    assert not torch.equal(a.timesteps, c.timesteps)


# ----------------------------------------------------------------------------------------------------------------
# 4. Delayed mode
# ----------------------------------------------------------------------------------------------------------------

def test_delayed_mode():
    lengths = (3, 10, 25, 1)
    trajs = make_trajs(lengths, seed=5)
    originals = [{k: v.copy() for k, v in t.items()} for t in trajs]
    ds = TrajectoryDataset(trajs, "hopper", mode="delayed")
    # the caller's trajectories are left alone
    for t, o in zip(trajs, originals):
        for k in o:
            assert np.array_equal(t[k], o[k])
    # reference: the originals' in-place transformation, then the reference sampler
    delayed = [{k: v.copy() for k, v in t.items()} for t in trajs]
    for path in delayed:
        path["rewards"][-1] = path["rewards"].sum()
        path["rewards"][:-1] = 0.
    K = 12
    pairs = window_pairs(lengths, K)
    mean, std = original_state_stats(trajs)
    ref = reference_get_batch(delayed, pairs, K, mean, std)
    batch = windows(ds, pairs, K)
    assert_batch_matches_reference(batch, ref, pairs, exact_states=False)
    # and explicitly: one reward at the last step, rtg = the whole return on every real step, 0 after the end
    b = ds.get_windows(torch.tensor([2]), torch.tensor([20]), K)
    S = np.float32(trajs[2]["rewards"].sum())
    assert b.rewards[0, :, 0].tolist() == [0.0] * (K - 1) + [S]
    assert torch.equal(b.rtg[0, :, 0], torch.tensor([0.0] * 7 + [S / np.float32(1000)] * 5 + [0.0]))
    # returns (for pct_traj) are unchanged by the move
    np.testing.assert_allclose(ds.traj_returns_all, [t["rewards"].sum() for t in trajs], rtol=1e-6)


def test_unknown_mode():
    with pytest.raises(UserError, match="unknown --mode 'delay'; choose normal, delayed or noise"):
        TrajectoryDataset(make_trajs([5], seed=0), "hopper", mode="delay")


# ----------------------------------------------------------------------------------------------------------------
# 5. State statistics
# ----------------------------------------------------------------------------------------------------------------

def test_state_stats_over_all_observations_before_pct_filtering():
    trajs = make_trajs(PCT_LENGTHS, seed=6, first_rewards=PCT_RETURNS)
    # make the trajectories that pct_traj drops clearly different, so kept-only stats would differ
    for i in (0, 3, 4):
        trajs[i]["observations"][:, 0] += 100.0
    all_obs = np.concatenate([t["observations"] for t in trajs])
    exp_mean = np.mean(all_obs, axis=0)
    exp_std = np.std(all_obs, axis=0) + 1e-6
    assert exp_mean.dtype == exp_std.dtype == np.float32
    for pct in (1.0, 0.5):
        ds = TrajectoryDataset(trajs, "hopper", pct_traj=pct)
        assert ds.state_mean.dtype == np.float32 and ds.state_std.dtype == np.float32
        assert np.array_equal(ds.state_mean, exp_mean)
        assert np.array_equal(ds.state_std, exp_std)
    kept_obs = np.concatenate([trajs[i]["observations"] for i in (1, 2)])
    assert not np.allclose(np.mean(kept_obs, axis=0), exp_mean)
    # independent float64 check of the values, and the +1e-6 on the constant dimension
    np.testing.assert_allclose(ds.state_mean, all_obs.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.state_std, all_obs.astype(np.float64).std(0) + 1e-6, rtol=1e-5, atol=1e-7)
    assert ds.state_mean[CONST_DIM] == np.float32(CONST_VALUE)
    assert ds.state_std[CONST_DIM] == np.float32(1e-6)


def test_given_state_stats_are_used():
    trajs = make_trajs([30, 40], seed=7)
    mean = np.arange(STATE_DIM, dtype=np.float32)
    std = np.full(STATE_DIM, 2.0, dtype=np.float32)
    ds = TrajectoryDataset(trajs, "hopper", state_mean=mean, state_std=std)
    b = ds.get_windows(torch.tensor([0, 1]), torch.tensor([25, 0]), 10)
    assert torch.equal(b.states[0, 0], torch.from_numpy(-mean / std))               # padding
    assert torch.equal(b.states[1], torch.from_numpy((trajs[1]["observations"][:10] - mean) / std))


# ----------------------------------------------------------------------------------------------------------------
# 6. split_episodes and the hdf5 round trip
# ----------------------------------------------------------------------------------------------------------------

def original_split(dataset):
    """The originals' conversion loop (download_d4rl_datasets.py), verbatim apart from the keys present."""
    N = dataset["rewards"].shape[0]
    data_ = collections.defaultdict(list)
    use_timeouts = "timeouts" in dataset
    episode_step = 0
    paths = []
    for i in range(N):
        done_bool = bool(dataset["terminals"][i])
        if use_timeouts:
            final_timestep = dataset["timeouts"][i]
        else:
            final_timestep = (episode_step == 1000 - 1)
        for k in ["observations", "next_observations", "actions", "rewards", "terminals"]:
            data_[k].append(dataset[k][i])
        if done_bool or final_timestep:
            episode_step = 0
            episode_data = {}
            for k in data_:
                episode_data[k] = np.array(data_[k])
            paths.append(episode_data)
            data_ = collections.defaultdict(list)
        episode_step += 1
    return paths


def make_flat(n, seed=0, dtype=np.float32, terminal_rows=(), timeout_rows=None):
    rng = np.random.default_rng(seed)
    d = {
        "observations": rng.normal(size=(n, STATE_DIM)).astype(dtype),
        "next_observations": rng.normal(size=(n, STATE_DIM)).astype(dtype),
        "actions": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(dtype),
        "rewards": rng.normal(size=n).astype(dtype),
        "terminals": np.zeros(n, dtype=bool),
    }
    d["terminals"][list(terminal_rows)] = True
    if timeout_rows is not None:
        d["timeouts"] = np.zeros(n, dtype=bool)
        d["timeouts"][list(timeout_rows)] = True
    return d


def assert_trajs_equal(got, expected):
    assert [len(t["rewards"]) for t in got] == [len(t["rewards"]) for t in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        for k in e:
            want = e[k].astype(bool) if k == "terminals" else e[k].astype(np.float32)
            assert g[k].dtype == want.dtype, (k, g[k].dtype)
            assert np.array_equal(g[k], want), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_episodes_with_timeouts(dtype):
    d = make_flat(20, seed=1, dtype=dtype, terminal_rows=(4, 15), timeout_rows=(9,))
    trajs = split_episodes(d)
    assert [len(t["rewards"]) for t in trajs] == [5, 5, 6]          # rows 16..19 (unfinished) dropped
    for t, (a, b) in zip(trajs, [(0, 5), (5, 10), (10, 16)]):
        for k in ("observations", "next_observations", "actions", "rewards"):
            assert t[k].dtype == np.float32
            assert np.array_equal(t[k], d[k][a:b].astype(np.float32))
        assert t["terminals"].dtype == bool and np.array_equal(t["terminals"], d["terminals"][a:b])
        assert "timeouts" not in t
    assert_trajs_equal(trajs, original_split(d))


def test_split_episodes_without_timeouts_counter_rule():
    """v0 files: an episode closes when the counter equals 999; the counter restarts at 1 after a close (the
    originals' off-by-one), so the first episode has 1000 steps and later ones 999."""
    trajs = split_episodes(make_flat(3500, seed=2))
    assert [len(t["rewards"]) for t in trajs] == [1000, 999, 999]    # rows 2998..3499 dropped


def test_split_episodes_without_timeouts_after_terminal():
    # a terminal at row 49 closes a 50-step episode; the next episodes are capped at 999 steps
    trajs = split_episodes(make_flat(2600, seed=3, terminal_rows=(49,)))
    assert [len(t["rewards"]) for t in trajs] == [50, 999, 999]


@pytest.mark.parametrize("timeouts", [False, True])
def test_split_episodes_matches_original_conversion(timeouts):
    # terminals placed so that, without timeouts, counter closes follow both a terminal and a counter close
    n = 4200
    terminal_rows = (300, 1998, 1999, 2500)
    timeout_rows = (999, 1500, 3200, 4000) if timeouts else None
    d = make_flat(n, seed=4, dtype=np.float64, terminal_rows=terminal_rows, timeout_rows=timeout_rows)
    expected = original_split(d)
    if timeouts:
        assert [len(t["rewards"]) for t in expected] == [301, 699, 501, 498, 1, 501, 700, 800]
    else:
        assert [len(t["rewards"]) for t in expected] == [301, 999, 699, 1, 501, 999]
    assert_trajs_equal(split_episodes(d), expected)


def test_split_episodes_bad_input():
    d = make_flat(10, terminal_rows=(9,))
    del d["terminals"]
    with pytest.raises(UserError, match="terminals"):
        split_episodes(d, source="x.hdf5")
    d = make_flat(10, terminal_rows=(9,))
    d["actions"] = d["actions"][:9]
    with pytest.raises(UserError, match="actions"):
        split_episodes(d, source="x.hdf5")


def test_hdf5_round_trip(tmp_path):
    d = make_flat(40, seed=5, terminal_rows=(7, 30), timeout_rows=(19,))
    d["infos/qpos"] = np.zeros((40, 6), dtype=np.float32)
    d["metadata/algorithm"] = np.bytes_(b"SAC")
    path = synthetic.write_hdf5(tmp_path / "hopper_medium-v2.hdf5", d)
    found, trajs = load_dataset(tmp_path, "hopper", "medium")
    assert found == path
    assert [len(t["rewards"]) for t in trajs] == [8, 12, 11]
    for t, (a, b) in zip(trajs, [(0, 8), (8, 20), (20, 31)]):
        assert np.array_equal(t["observations"], d["observations"][a:b])
        assert np.array_equal(t["actions"], d["actions"][a:b])
        assert np.array_equal(t["rewards"], d["rewards"][a:b])
        assert np.array_equal(t["terminals"], d["terminals"][a:b])
    # the pkl is preferred when both exist
    pkl_trajs = [{k: v for k, v in t.items()} for t in make_trajs([6, 9], seed=6)]
    synthetic.write_pkl(tmp_path / "hopper-medium-v2.pkl", pkl_trajs)
    found, trajs = load_dataset(tmp_path, "hopper", "medium")
    assert found == tmp_path / "hopper-medium-v2.pkl"
    assert [len(t["rewards"]) for t in trajs] == [6, 9]
    assert np.array_equal(trajs[1]["observations"], pkl_trajs[1]["observations"])


def test_hdf5_medium_replay_float64_and_d4rl_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    d = make_flat(30, seed=6, dtype=np.float64, terminal_rows=(9,), timeout_rows=(24,))
    synthetic.write_hdf5(cache / "hopper_medium_replay-v2.hdf5", d)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    found, trajs = load_dataset(tmp_path / "data", "hopper", "medium-replay")
    assert found == cache / "hopper_medium_replay-v2.hdf5"
    assert [len(t["rewards"]) for t in trajs] == [10, 15]
    assert all(t[k].dtype == np.float32 for t in trajs for k in ("observations", "actions", "rewards"))
    assert np.array_equal(trajs[1]["observations"], d["observations"][10:25].astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# 7. Safety and bad input
# ----------------------------------------------------------------------------------------------------------------

def _pkl_path(tmp_path):
    return tmp_path / "hopper-medium-v2.pkl"


def _write_bytes(tmp_path, data: bytes):
    p = _pkl_path(tmp_path)
    p.write_bytes(data)
    return p


def _good_trajs():
    rng = np.random.default_rng(0)
    out = []
    for n in (4, 7):
        out.append({
            "observations": rng.normal(size=(n, STATE_DIM)).astype(np.float32),
            "next_observations": rng.normal(size=(n, STATE_DIM)),                # float64
            "actions": rng.uniform(-1, 1, size=(n, ACT_DIM)),                    # float64
            "rewards": rng.normal(size=n).astype(np.float32),
            "terminals": np.array([False] * (n - 1) + [True]),
        })
    return out


@pytest.mark.parametrize("protocol", [None, 3, 4, 5])
def test_plain_pickle_loads(tmp_path, protocol):
    trajs = _good_trajs()
    with open(_pkl_path(tmp_path), "wb") as f:
        if protocol is None:
            pickle.dump(trajs, f)
        else:
            pickle.dump(trajs, f, protocol=protocol)
    found, loaded = load_dataset(tmp_path, "hopper", "medium")
    assert found == _pkl_path(tmp_path) and len(loaded) == 2
    for t, o in zip(loaded, trajs):
        assert t["observations"].dtype == t["actions"].dtype == t["rewards"].dtype == np.float32
        assert t["terminals"].dtype == bool
        assert np.array_equal(t["observations"], o["observations"])
        assert np.array_equal(t["actions"], o["actions"].astype(np.float32))
        assert np.array_equal(t["terminals"], o["terminals"])


def test_missing_dataset(tmp_path):
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert str(_pkl_path(tmp_path)) in msg and "not found" in msg and "download_d4rl_datasets" in msg


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "exec", "nested"])
def test_malicious_pickle_is_refused(tmp_path, kind):
    sentinel = tmp_path / "PWNED"
    control = tmp_path / "CONTROL"

    def make(target):
        if kind == "os.system":
            return _Payload(os.system, f"touch '{target}'")
        return _Payload(exec, f"open({str(target)!r}, 'w').write('x')")

    # the payload is live: plain pickle would run it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pickle.loads(pickle.dumps(make(control)))
    assert control.exists()
    obj = make(sentinel)
    if kind == "nested":  # hidden inside an otherwise valid trajectory list
        trajs = _good_trajs()
        trajs[1]["terminals"] = obj
        obj = trajs
    p = _write_bytes(tmp_path, pickle.dumps(obj))
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    assert not sentinel.exists()
    msg = user_error_message(ei)
    assert str(p) in msg and ("forbidden" in msg or "refused" in msg)


def _truncated():
    b = pickle.dumps(_good_trajs(), protocol=4)
    return b[: len(b) // 2]


CORRUPT_BYTES = {
    "garbage": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
    "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
    "empty_file": b"",
    "truncated": _truncated(),
    "newline_load_key": b"\n\n<html>not found</html>",
    "huge_frame": b"\x80\x04\x95" + b"\xff" * 8,
    "huge_binbytes8": b"\x80\x04\x8e" + b"\xff" * 8,
    "persistent_id": b"P0\n.",
}


@pytest.mark.parametrize("name", list(CORRUPT_BYTES))
def test_corrupt_pickle(tmp_path, name):
    p = _write_bytes(tmp_path, CORRUPT_BYTES[name])
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert str(p) in msg


def _load_outcome(p) -> list[tuple[str, str]]:
    """Load a (possibly corrupt) dataset file: [] when it loads or is refused with a one-line UserError naming it,
    else [(what went wrong, message)]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_trajectories(p, "hopper")
    except UserError as e:
        if "\n" in str(e) or str(p) not in str(e):
            return [("UserError message", str(e)[:120])]
    except Exception as e:  # noqa: BLE001
        return [(type(e).__name__, str(e)[:120])]
    return []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numpy noise from broken buffers
def test_fuzzed_pickles_load_or_raise_user_error(tmp_path):
    """Every truncation and 400 seeded single-byte corruptions of a valid pickle (protocols 3-5): the loader either
    returns validated trajectories or raises a one-line UserError naming the file, never anything else."""
    rng = np.random.default_rng(0)
    p = _pkl_path(tmp_path)
    failures = []
    for protocol in (3, 4, 5):
        b = pickle.dumps(_good_trajs(), protocol=protocol)
        cases = [b[:i] for i in range(0, len(b), 7)]
        for _ in range(400):
            bb = bytearray(b)
            bb[rng.integers(len(bb))] = rng.integers(256)
            cases.append(bytes(bb))
        for data in cases:
            p.write_bytes(data)
            failures += [(protocol, *bad) for bad in _load_outcome(p)]
    assert not failures, f"{len(failures)} bad outcomes, e.g. {sorted(set(failures))[:6]}"


def _bad_trajs(kind):
    t = _good_trajs()
    if kind == "dict":
        return {"trajectories": t}
    if kind == "empty":
        return []
    if kind == "no_actions":
        del t[1]["actions"]
    elif kind == "obs_dim":
        t[0]["observations"] = t[0]["observations"][:, :7]
    elif kind == "lengths":
        t[1]["actions"] = t[1]["actions"][:-1]
    elif kind == "nan":
        t[1]["rewards"][2] = np.nan
    elif kind == "nan_terminal":
        t[1]["terminals"] = np.zeros(len(t[1]["rewards"]))
        t[1]["terminals"][3] = np.nan
    elif kind == "string_terminals":
        t[0]["terminals"] = np.array(["no"] * len(t[0]["rewards"]))
    elif kind == "not_dict":
        t[0] = [1, 2, 3]
    elif kind == "list_not_array":
        t[0]["rewards"] = t[0]["rewards"].tolist()
    elif kind == "timedelta_rewards":       # numpy counts timedelta64 as an integer type
        t[0]["rewards"] = np.zeros(len(t[0]["rewards"]), dtype="timedelta64[s]")
    return t


BAD_CONTENT = {            # kind -> words the message must contain
    "dict": ["list", "dict"],
    "empty": ["empty"],
    "no_actions": ["trajectory 1", "actions"],
    "obs_dim": ["trajectory 0", "observations", "11"],
    "lengths": ["trajectory 1", "length"],
    "nan": ["trajectory 1", "rewards", "NaN"],
    "nan_terminal": ["trajectory 1", "'terminals'", "NaN"],  # NaN would read as True: an episode end
    "string_terminals": ["trajectory 0", "'terminals'", "dtype"],
    "not_dict": ["trajectory 0", "dict"],
    "list_not_array": ["trajectory 0", "rewards", "numpy"],
    "timedelta_rewards": ["trajectory 0", "'rewards' has dtype timedelta64[s]"],
}


@pytest.mark.parametrize("kind", list(BAD_CONTENT))
def test_bad_trajectory_content(tmp_path, kind):
    p = _write_bytes(tmp_path, pickle.dumps(_bad_trajs(kind)))
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert str(p) in msg
    for word in BAD_CONTENT[kind]:
        assert word in msg, (word, msg)


def test_corrupt_hdf5(tmp_path):
    p = tmp_path / "hopper_medium-v2.hdf5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert str(p) in msg and "hdf5" in msg


def test_hdf5_wrong_dim(tmp_path):
    d = make_flat(10, terminal_rows=(9,))
    d["observations"] = np.zeros((10, 17), dtype=np.float32)  # a walker2d file under hopper's name
    p = synthetic.write_hdf5(tmp_path / "hopper_medium-v2.hdf5", d)
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert str(p) in msg and "observations" in msg and "11" in msg


def test_unknown_env_and_dataset(tmp_path):
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hoppr", "medium")
    msg = user_error_message(ei)
    assert "hoppr" in msg and "hopper" in msg
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "meduim")
    msg = user_error_message(ei)
    assert "meduim" in msg and "medium-replay" in msg
    with pytest.raises(UserError):
        TrajectoryDataset(make_trajs([5]), "hoppr")


# ----------------------------------------------------------------------------------------------------------------
# 8. Real MuJoCo data
# ----------------------------------------------------------------------------------------------------------------

def test_synthetic_dataset_too_short_for_one_episode_is_an_error(tmp_path):
    """Too few steps for any episode to end: one line, and no file of zero trajectories is written."""
    with pytest.raises(UserError) as ei:
        synthetic.make_dataset(tmp_path, "hopper", "medium", 3, seed=0, max_ep_len=100)
    assert "3 random-policy steps of hopper" in user_error_message(ei) and "no episode ends" in str(ei.value)
    assert not list(tmp_path.iterdir())


def test_synthetic_mujoco_dataset(tmp_path):
    path = synthetic.make_dataset(tmp_path, "hopper", "medium", 2000, seed=0, max_ep_len=100)
    assert path == tmp_path / "hopper-medium-v2.pkl"
    found, trajs = load_dataset(tmp_path, "hopper", "medium")
    assert found == path
    lengths = [len(t["rewards"]) for t in trajs]
    assert len(trajs) > 1 and max(lengths) <= 100 and sum(lengths) <= 2000
    ds = TrajectoryDataset(trajs, "hopper")
    B, K = 16, 20
    b = ds.sample_batch(B, K, torch.Generator().manual_seed(0))
    assert b.states.shape == (B, K, STATE_DIM) and b.states.dtype == torch.float32
    assert b.actions.shape == (B, K, ACT_DIM) and b.actions.dtype == torch.float32
    assert b.rewards.shape == (B, K, 1) and b.rewards.dtype == torch.float32
    assert b.dones.shape == (B, K) and b.dones.dtype == torch.int64
    assert b.rtg.shape == (B, K + 1, 1) and b.rtg.dtype == torch.float32
    assert b.timesteps.shape == (B, K) and b.timesteps.dtype == torch.int64
    assert b.mask.shape == (B, K) and b.mask.dtype == torch.float32
    assert set(b.mask.unique().tolist()) <= {0.0, 1.0}
    assert (b.timesteps < 100).all()
    real = b.mask.bool()
    assert (b.actions[real].abs() <= 1).all() and (b.actions[~real] == -10).all()
    # and the sampled windows agree with the reference sampler on real MuJoCo data
    traj, start = ds.sample_indices(200, torch.Generator().manual_seed(1))
    pairs = list(zip(traj.tolist(), start.tolist()))
    mean, std = original_state_stats(trajs)
    ref = reference_get_batch(trajs, pairs, K, mean, std)
    assert_batch_matches_reference(ds.get_windows(traj, start, K), ref, pairs, exact_states=False)


def test_observations_too_large_to_normalise():
    """Finite but huge observations would give an infinite std (and NaN states after normalising): one line."""
    from decision_transformer.data import state_stats

    rng = np.random.default_rng(0)
    trajs = [{"observations": (rng.standard_normal((50, 11)) * 1e30).astype(np.float32)}]
    with pytest.raises(UserError, match="too large to normalise .*overflows float32"):
        state_stats(trajs)
    trajs[0]["observations"] /= 1e30
    mean, std = state_stats(trajs)
    assert np.isfinite(std).all() and (std > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 9. Damaged and malformed D4RL hdf5 files
# ----------------------------------------------------------------------------------------------------------------

def _write_h5(path, d, compression=None):
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in d.items():
            big = compression is not None and np.ndim(v) > 0 and np.size(v) > 50
            f.create_dataset(k, data=v, compression=compression if big else None)
    return path


def test_hdf5_that_fails_in_its_object_visit_is_a_user_error(tmp_path, monkeypatch):
    """h5py reports some damaged files only while visiting their objects or reading a dataset, as RuntimeError
    ("Object visitation failed"), KeyError or ValueError: each is one line naming the file."""
    import h5py

    p = synthetic.write_hdf5(tmp_path / "hopper_medium-v2.hdf5", make_flat(10, terminal_rows=(9,)))
    for cls, what in ((RuntimeError, "Object visitation failed (unable to offset into local heap data block)"),
                      (KeyError, "Unable to open object"), (ValueError, "Invalid dataset identifier")):
        def broken(self, *a, **k):
            raise cls(what)

        with monkeypatch.context() as m:
            m.setattr(h5py.Group, "visititems", broken)
            with pytest.raises(UserError) as ei:
                load_dataset(tmp_path, "hopper", "medium")
        msg = user_error_message(ei)
        assert msg.startswith(f"{p}: not a readable hdf5 file (") and what in msg


def test_fuzzed_hdf5_files_load_or_raise_user_error(tmp_path):
    """300 seeded corruptions (1 to 5 bytes) of a small gzip-compressed D4RL-layout file: the loader returns
    validated trajectories or raises a one-line UserError naming the file, never anything else."""
    d = make_flat(200, terminal_rows=(150,), timeout_rows=(99,))
    d["infos/qpos"] = np.random.default_rng(1).normal(size=(200, 6))
    d["metadata/algorithm"] = np.bytes_(b"SAC")
    good = _write_h5(tmp_path / "src.hdf5", d, compression="gzip").read_bytes()
    p = tmp_path / "hopper_medium-v2.hdf5"
    rng = np.random.default_rng(0)
    failures = []
    for _ in range(300):
        b = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            b[rng.integers(len(b))] = rng.integers(256)
        p.write_bytes(bytes(b))
        failures += _load_outcome(p)
    assert not failures, f"{len(failures)} bad outcomes, e.g. {sorted(set(failures))[:6]}"


def test_split_episodes_checks_the_shape_of_every_row_array():
    """``rewards``, ``terminals`` and ``timeouts`` of shape (N, 1) are read as (N,), as d4rl does (no N x N
    broadcast of (N, 1) terminals against (N,) timeouts); anything else that is not N rows is one line naming the
    key and the shapes."""
    d = make_flat(12, terminal_rows=(4,), timeout_rows=(9,))
    expected = split_episodes(d)
    assert [len(t["rewards"]) for t in expected] == [5, 5]
    for keys in (("terminals",), ("rewards",), ("timeouts",), ("rewards", "terminals", "timeouts")):
        dd = dict(d, **{k: d[k].reshape(-1, 1) for k in keys})
        assert_trajs_equal(split_episodes(dd), expected)
    bad = {
        "short timeouts": (dict(d, timeouts=d["timeouts"][:8]), ["'timeouts'", "8 rows", "(8,)", "(12,)"]),
        "2-D timeouts": (dict(d, timeouts=np.zeros((12, 2), bool)), ["'timeouts'", "(12, 2)", "(12,)"]),
        "2-D terminals": (dict(d, terminals=np.zeros((12, 3), bool)), ["'terminals'", "(12, 3)", "(12,)"]),
        "2-D rewards": (dict(d, rewards=np.zeros((12, 2), np.float32)), ["'rewards'", "(12, 2)"]),
        "scalar rewards": (dict(d, rewards=np.float32(3.0)), ["'rewards'", "shape ()"]),
        "scalar observations": (dict(d, observations=np.float32(3.0)), ["'observations'", "shape ()"]),
        "string terminals": (dict(d, terminals=np.array([b"a"] * 12)), ["'terminals'", "dtype"]),
        "NaN timeouts": (dict(d, timeouts=np.where(np.arange(12) == 2, np.nan, 0.0)), ["'timeouts'", "NaN"]),
        "inf terminals": (dict(d, terminals=np.where(np.arange(12) == 2, np.inf, 0.0)), ["'terminals'", "NaN or inf"]),
    }
    for name, (dd, words) in bad.items():
        with pytest.raises(UserError) as ei:
            split_episodes(dd, source="x.hdf5")
        msg = user_error_message(ei)
        assert msg.startswith("x.hdf5: ") and all(w in msg for w in words), (name, msg)


@pytest.mark.parametrize("kind", ["no ends", "no ends, no timeouts", "empty"])
def test_hdf5_without_any_episode_end(tmp_path, kind):
    """A file in which no episode ends gives nothing to train on (its unfinished tail is dropped, as D4RL's
    converter does): the message says so, with the row count."""
    d = make_flat(0 if kind == "empty" else 30, timeout_rows=None if "no timeouts" in kind else ())
    p = synthetic.write_hdf5(tmp_path / "hopper_medium-v2.hdf5", d)
    with pytest.raises(UserError) as ei:
        load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert msg.startswith(f"{p}: ")
    if kind == "empty":
        assert "no rows" in msg
    else:
        assert "no episode ends in its 30 rows" in msg and "dropped" in msg and "non-empty list" not in msg
        assert ("fewer than 1000 rows" in msg) == (kind == "no ends, no timeouts")


@pytest.mark.parametrize("fmt", ["pkl", "hdf5"])
def test_values_beyond_float32_range_are_named_as_overflow(tmp_path, fmt):
    """float64 values too large for float32 are reported as such, without numpy's cast RuntimeWarning (not as
    'NaN or inf', which the file does not hold)."""
    if fmt == "pkl":
        trajs = _good_trajs()
        trajs[1]["actions"][2, 1] = 1e300
        _write_bytes(tmp_path, pickle.dumps(trajs))
        p, key = _pkl_path(tmp_path), "actions"
    else:
        d = make_flat(10, dtype=np.float64, terminal_rows=(9,), timeout_rows=())
        d["observations"][3, 4] = -1e200
        p, key = synthetic.write_hdf5(tmp_path / "hopper_medium-v2.hdf5", d), "observations"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(UserError) as ei:
            load_dataset(tmp_path, "hopper", "medium")
    msg = user_error_message(ei)
    assert msg.startswith(f"{p}: ") and f"'{key}'" in msg and "overflow float32" in msg and "NaN" not in msg


# ----------------------------------------------------------------------------------------------------------------
# 10. Writing dataset files
# ----------------------------------------------------------------------------------------------------------------

def test_write_pkl_failures_keep_the_old_file_and_leave_no_temporary_file(tmp_path, monkeypatch):
    import errno

    path = synthetic.write_pkl(tmp_path / "hopper-medium-v2.pkl", make_trajs([3]))
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(synthetic.pickle, "dump", full_disk)
        with pytest.raises(UserError) as ei:
            synthetic.write_pkl(path, make_trajs([5]))
    assert user_error_message(ei) == f"cannot write {path}: no space left on the device"
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):   # not picklable: the temporary file goes
        synthetic.write_pkl(path, [{"observations": lambda: 0}])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(UserError) as ei:
        synthetic.write_pkl(blocker / "x.pkl", make_trajs([3]))
    assert user_error_message(ei) == f"cannot write {blocker / 'x.pkl'}: {blocker} is a file, not a folder"
    (tmp_path / "folder.pkl").mkdir()
    with pytest.raises(UserError) as ei:
        synthetic.write_pkl(tmp_path / "folder.pkl", make_trajs([3]))
    assert user_error_message(ei) == f"cannot write {tmp_path / 'folder.pkl'}: it is a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.pkl", path.name]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()   # a plain file's permissions, not a temp file's 0600


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# 11. data/create_state_stats.py
# ----------------------------------------------------------------------------------------------------------------

def test_create_state_stats_updates_an_existing_table(tmp_path, capsys):
    """Entries of datasets not found now (a shipped 12-entry table, datasets deleted since) are kept; --replace
    writes only what was found; an existing file that is no stats table is refused, not overwritten."""
    from conftest import fails, load_script

    from decision_transformer.data import state_stats

    main = load_script("data/create_state_stats.py").main
    synthetic.write_pkl(tmp_path / "hopper-medium-v2.pkl", make_trajs([20, 30], seed=3))
    out = tmp_path / "state_stats.pkl"
    old = {f"{e}-{q}-v2": {"state_mean": np.full(d, 7.0, np.float32), "state_std": np.ones(d, np.float32)}
           for e, d in (("hopper", 11), ("walker2d", 17)) for q in ("medium", "expert")}
    out.write_bytes(pickle.dumps(old))
    main(["--data_path", str(tmp_path), "--envs", "hopper", "walker2d"])
    printed = capsys.readouterr().out
    assert "4 datasets" in printed and "1 computed now, 3 other entries kept" in printed
    table = pickle.loads(out.read_bytes())
    assert set(table) == set(old)
    mean, std = state_stats(make_trajs([20, 30], seed=3))
    np.testing.assert_array_equal(table["hopper-medium-v2"]["state_mean"], mean)
    np.testing.assert_array_equal(table["hopper-medium-v2"]["state_std"], std)
    for k in ("hopper-expert-v2", "walker2d-medium-v2", "walker2d-expert-v2"):
        np.testing.assert_array_equal(table[k]["state_mean"], old[k]["state_mean"])
    for content, words in ((b"garbage", ["not a readable state statistics table"]),
                           (pickle.dumps([1, 2]), ["holds a list"]),
                           (pickle.dumps({"kept": 1}), ["entry 'kept'"]),
                           (pickle.dumps({"walker2d-medium-v2": {"state_mean": np.full(17, np.nan, np.float32),
                                                                 "state_std": np.ones(17, np.float32)}}),
                            ["entry 'walker2d-medium-v2'", "NaN"]),
                           (pickle.dumps({"walker2d-medium-v2": {"state_mean": np.zeros(11, np.float32),
                                                                 "state_std": np.ones(11, np.float32)}}),
                            ["entry 'walker2d-medium-v2'", "17 dims"]),
                           (pickle.dumps({"walker2d-medium-v2": {"state_mean": np.zeros(17) + 1j,
                                                                 "state_std": np.ones(17, np.float32)}}),
                            ["entry 'walker2d-medium-v2'", "complex numbers"]),
                           (pickle.dumps({"walker2d-medium-v2": {"state_mean": np.zeros(17, np.float32),
                                                                 "state_std": np.full(17, 1e-45, np.float32)}}),
                            ["entry 'walker2d-medium-v2'", "state_std has values below 1e-06"])):
        out.write_bytes(content)
        msg = fails(main, ["--data_path", tmp_path], capsys)
        assert str(out) in msg and "--replace" in msg and all(w in msg for w in words), msg
        assert out.read_bytes() == content
    # a broken entry that this run recomputes is replaced, not refused
    broken = {**old, "hopper-medium-v2": {"state_mean": np.full(11, np.nan, np.float32),
                                          "state_std": np.ones(11, np.float32)}}
    out.write_bytes(pickle.dumps(broken))
    main(["--data_path", str(tmp_path), "--envs", "hopper"])
    np.testing.assert_array_equal(pickle.loads(out.read_bytes())["hopper-medium-v2"]["state_mean"], mean)
    main(["--data_path", str(tmp_path), "--replace"])
    assert set(pickle.loads(out.read_bytes())) == {"hopper-medium-v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hopper-medium-v2.pkl", "state_stats.pkl"]


def test_create_state_stats_refuses_a_broken_kept_entry_before_loading_any_dataset(tmp_path, monkeypatch, capsys):
    """A kept entry with NaN is refused before the datasets are loaded (which takes minutes for the twelve D4RL
    ones), not after; the table is left as it was."""
    from conftest import fails, load_script

    from decision_transformer import data

    main = load_script("data/create_state_stats.py").main
    synthetic.write_pkl(tmp_path / "hopper-medium-v2.pkl", make_trajs([20, 30], seed=3))
    out = tmp_path / "state_stats.pkl"
    content = pickle.dumps({"walker2d-medium-v2": {"state_mean": np.full(17, np.nan, np.float32),
                                                   "state_std": np.ones(17, np.float32)}})
    out.write_bytes(content)
    monkeypatch.setattr(data, "load_trajectories", lambda *a, **k: pytest.fail("a dataset was loaded"))
    msg = fails(main, ["--data_path", tmp_path, "--envs", "hopper", "walker2d"], capsys)
    assert "entry 'walker2d-medium-v2'" in msg and "NaN" in msg, msg
    assert out.read_bytes() == content


def test_protocol_2_pickles_of_numpy_arrays_load_and_codecs_stays_narrow(tmp_path):
    """numpy arrays pickled at protocol 2 (Python 3) rebuild their bytes with _codecs.encode(str, 'latin1'): that
    call is allowed, any other use of _codecs.encode is refused."""
    import pickle

    from decision_transformer.data import safe_pickle_load
    from decision_transformer.errors import UserError

    table = {"hopper-expert-v2": {"state_mean": np.arange(11, dtype=np.float32), "state_std": np.ones(11, np.float32)}}
    p = tmp_path / "state_stats.pkl"
    p.write_bytes(pickle.dumps(table, protocol=2))
    got = safe_pickle_load(p)
    assert np.array_equal(got["hopper-expert-v2"]["state_mean"], np.arange(11, dtype=np.float32))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UserError, match="refused to load .*only for a str in latin-1"):
        safe_pickle_load(bad)


@pytest.mark.parametrize("damage", ["cut", "text"])
def test_a_damaged_pickle_is_said_to_be_damaged_not_refused(tmp_path, damage):
    """A pickle cut short or a file of another format is damage ("not a readable pickle"), not a refused object (the
    message said the file held disallowed objects)."""
    import pickle

    from decision_transformer.data import safe_pickle_load
    from decision_transformer.errors import UserError

    p = tmp_path / "hopper-medium-v2.pkl"
    whole = pickle.dumps([{"rewards": np.arange(500, dtype=np.float32)}])
    p.write_bytes(whole[:300] if damage == "cut" else b"not a pickle at all\n")
    with pytest.raises(UserError) as e:
        safe_pickle_load(p)
    assert str(e.value).startswith(f"{p}: not a readable pickle") and "refused" not in str(e.value)


def test_actions_outside_the_tanh_range_are_warned_about(capsys):
    """Actions beyond [-1, 1] (by more than float rounding) load, as by the originals, with a warning: the tanh head
    cannot output them, so such data is usually unscaled or not this env's."""
    from conftest import tiny_trajectories
    from decision_transformer.data import validate_trajectories
    from decision_transformer.envs import get_env_spec

    trajs = tiny_trajectories()
    trajs[0]["actions"][0, 0] = 1.00001                    # rounding of a clipped action: no warning
    validate_trajectories(trajs, get_env_spec("hopper"), "x.pkl")
    assert capsys.readouterr().err == ""
    trajs[2]["actions"][3, 1], trajs[3]["actions"][0, 2] = -7.5, 1e30
    out = validate_trajectories(trajs, get_env_spec("hopper"), "x.pkl")
    assert len(out) == 4
    assert capsys.readouterr().err.startswith("warning: x.pkl: 2 trajectories (first: 2) have actions outside "
                                              "[-1, 1], up to 1e+30 in size")
    trajs = tiny_trajectories()
    trajs[1]["actions"][5, 0] = 1.5                        # just outside: warned about too
    validate_trajectories(trajs, get_env_spec("hopper"), "x.pkl")
    assert capsys.readouterr().err.startswith("warning: x.pkl: 1 trajectory has actions outside [-1, 1], up to 1.5 "
                                              "in size")


def test_returns_to_go_beyond_float32_are_refused_and_huge_ones_warned_about(capsys):
    """Rewards that each fit float32 can sum beyond it: the sampler would hold inf returns-to-go, so loading stops.
    Returns-to-go far beyond the env's scale load with a warning; D4RL-sized ones load silently."""
    from conftest import tiny_trajectories
    from decision_transformer.data import RTG_WARN_SCALED, validate_trajectories
    from decision_transformer.envs import get_env_spec

    hopper = get_env_spec("hopper")
    trajs = tiny_trajectories()
    for t in trajs:
        t["rewards"] = np.full(len(t["rewards"]), 3.0, dtype=np.float32)    # hopper-sized returns
    validate_trajectories(trajs, hopper, "x.pkl")
    assert capsys.readouterr().err == ""
    n = len(trajs[1]["rewards"])
    trajs[1]["rewards"][:] = 1.01 * RTG_WARN_SCALED * hopper.scale / n      # just beyond: warned about
    assert len(validate_trajectories(trajs, hopper, "x.pkl")) == len(trajs)
    err = capsys.readouterr().err
    assert err.startswith("warning: x.pkl: returns-to-go reach ") and "(trajectory 1)" in err
    assert "usually make training diverge" in err and err.count("\n") == 1
    trajs[1]["rewards"][:] = 0.99 * RTG_WARN_SCALED * hopper.scale / n     # just within: silent
    validate_trajectories(trajs, hopper, "x.pkl")
    assert capsys.readouterr().err == ""
    # rewards of alternating sign: their sizes sum past the threshold, the returns-to-go stay far below it (the
    # cheap bound only selects trajectories to check; the warning is about the returns-to-go themselves)
    x = 3 * RTG_WARN_SCALED * hopper.scale / n
    trajs[1]["rewards"][:] = np.where(np.arange(n) % 2 == 0, x, -x).astype(np.float32)
    validate_trajectories(trajs, hopper, "x.pkl")
    assert capsys.readouterr().err == ""
    trajs[2]["rewards"][:] = 3e38                                            # each fits float32, the sum does not
    assert np.isfinite(trajs[2]["rewards"]).all()
    with pytest.raises(UserError, match=r"x.pkl: trajectory 2: returns-to-go reach .*beyond float32's range"):
        validate_trajectories(trajs, hopper, "x.pkl")


def test_trajectories_longer_than_the_episode_limit_are_warned_about(capsys):
    """A hopper trajectory of 1000 steps fits the timestep table; one of 1001 steps loads with a warning."""
    from conftest import tiny_trajectories
    from decision_transformer.data import validate_trajectories
    from decision_transformer.envs import get_env_spec

    def of_length(n):
        t = tiny_trajectories()[0]
        return {k: np.resize(v, (n,) + v.shape[1:]) for k, v in t.items()}

    assert len(validate_trajectories([of_length(1000), of_length(7)], get_env_spec("hopper"), "x.pkl")) == 2
    assert capsys.readouterr().err == ""
    validate_trajectories([of_length(1000), of_length(1001)], get_env_spec("hopper"), "x.pkl")
    assert capsys.readouterr().err == ("warning: x.pkl: 1 trajectory is longer than hopper's 1000-step episodes "
                                       "(longest 1001); their steps from 999 on share one timestep embedding\n")


def test_loading_an_hdf5_reads_only_the_trajectory_arrays(tmp_path):
    """A D4RL file's infos/* (qpos, qvel, log-probs: about as large as the observations) are not read to load it;
    a huge compressed one no longer turns a load into an out-of-memory error."""
    import h5py

    from decision_transformer.data import load_trajectories, read_hdf5

    d = make_flat(40, terminal_rows=(19, 39))
    path = tmp_path / "hopper_medium-v2.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in d.items():
            f.create_dataset(k, data=v)
        f.create_dataset("infos/qpos", shape=(10**11,), dtype="f4", chunks=(2**20,), compression="gzip")
    assert len(load_trajectories(path, "hopper")) == 2
    assert "infos/qpos" not in read_hdf5(path, ("observations",)) and "observations" in read_hdf5(path, ("observations",))


def test_a_folder_where_the_dataset_belongs_is_said_before_generating(tmp_path, monkeypatch):
    """A folder named like the dataset pickle (or a --data_path that is a file) is one line at once, not minutes of
    generation that then cannot write the file (nor "dataset not found" with --no_generate)."""
    from decision_transformer import generation

    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: pytest.fail("generated"))
    (tmp_path / "hopper-medium-v2.pkl").mkdir()
    for generate in (True, False):
        with pytest.raises(UserError) as e:
            generation.ensure_dataset(tmp_path, "hopper", "medium", generate=generate)
        assert str(e.value) == (f"{tmp_path / 'hopper-medium-v2.pkl'}: a folder (or other non-file) where the dataset "
                                f"file belongs; move it away or pass another --data_path")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"--data_path .*afile: a file, not a folder of datasets"):
        generation.ensure_dataset(tmp_path / "afile", "hopper", "medium")


def test_checked_trajectories_pickled_by_a_user_load_again(tmp_path):
    """load_dataset's trajectories (a checked list) written with plain pickle, as a user saving a subset would: the
    file holds a plain list the restricted loader reads back; the toolkit's own writer stores a plain list too."""
    from decision_transformer.data import CheckedTrajectories, load_trajectories
    from decision_transformer.synthetic import make_dataset, write_pkl

    make_dataset(tmp_path, "hopper", "medium", 300)
    trajs = load_trajectories(tmp_path / "hopper-medium-v2.pkl", "hopper")
    assert isinstance(trajs, CheckedTrajectories) and trajs.env == "hopper"
    with open(tmp_path / "mine.pkl", "wb") as f:
        pickle.dump(trajs, f)
    again = load_trajectories(tmp_path / "mine.pkl", "hopper")
    assert len(again) == len(trajs) and all(np.array_equal(a["rewards"], b["rewards"]) for a, b in zip(again, trajs))
    write_pkl(tmp_path / "w.pkl", trajs)
    assert b"CheckedTrajectories" not in (tmp_path / "w.pkl").read_bytes()
    with open(tmp_path / "w.pkl", "rb") as f:
        assert type(pickle.load(f)) is list


def test_window_rtg_is_divided_by_the_scale_on_the_host(monkeypatch):
    """A GPU divides a tensor by a number as a product with its reciprocal, which differs from the division in the
    last bit for some values: the analyses' batches then depended on the device (cuda_checks.py saw another digest).
    Emulated here by such a division on the CPU: the windows' rtg must still be the float64 quotient rounded to
    float32 (the originals' numbers), bit for bit."""
    trajs = make_trajs([300, 200], seed=3)
    ds = TrajectoryDataset(trajs, "hopper")
    true_div = torch.Tensor.__truediv__
    monkeypatch.setattr(torch.Tensor, "__truediv__", lambda a, b: a * (1.0 / b) if isinstance(b, (int, float))
                        else true_div(a, b))
    pairs = [(0, s) for s in range(0, 280, 7)] + [(1, s) for s in range(0, 175, 5)]    # (whole windows, no padding)
    rtg = windows(ds, pairs, 20).rtg.numpy()[..., 0]
    want = [(discount_cumsum(trajs[i]["rewards"])[s:s + 21].astype(np.float64) / 1000.0).astype(np.float32)
            for i, s in pairs]
    assert np.array_equal(rtg, np.stack(want))
