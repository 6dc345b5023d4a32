"""D4RL-style datasets generated in the gymnasium v4 envs from the project's SAC behaviour policies.

D4RL's recipe (gym-mujoco v2), as reproduced here:

* ``random``: a randomly initialised SAC actor (seeded), sampled;
* ``medium``: the stochastic policy of a SAC run stopped early (about a third of expert return);
* ``expert``: the stochastic policy of the fully trained SAC run;
* ``medium-replay``: the replay buffer of the SAC run up to the medium policy. Without the buffer itself it is
  regenerated from the actor snapshots saved during training (every ``covers`` env steps): steps
  ``[s, s + covers)`` are rolled out with the snapshot taken at step ``s``, sampled as during training, and the
  first ``uniform_before`` steps use uniform actions (the training warm-up). This approximates the real buffer:
  the actor changed after every update, not every ``covers`` steps.
* ``medium-expert``: ``medium`` cut at its last episode end, followed by ``expert``.

Each dataset is written in D4RL's flat hdf5 layout (``observations``, ``next_observations``, ``actions``,
``rewards``, ``terminals``, ``timeouts``, ``infos/qpos``, ``infos/qvel``, ``infos/action_log_probs``,
``metadata/*``) and as the DT pickle, with a stats report beside D4RL's published averages.
Rollouts step many envs in lockstep with one batched NumPy actor call per step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from decision_transformer.data import hdf5_name, pkl_name, split_episodes
from decision_transformer.envs import (
    D4RL_ENVS,
    DATASETS,
    DEFAULT_ENV_VERSION,
    check_dataset_name,
    get_env_spec,
    make_env,
)
from decision_transformer.errors import UserError
from decision_transformer.files import WrittenMeanwhile, exclusive

#: Where the bundled behaviour policies live: ``policies/{env}/{medium,expert}.pt`` and ``policies/{env}/replay/``.
BUNDLED_POLICY_DIR = Path(__file__).resolve().parent / "policies"

#: D4RL-normalised mean episode return of the D4RL v2 datasets. Exact values are computed from the per-trajectory
#: means in shared/reference/evaluation.md section 5; the others are the approximate published figures.
D4RL_AVERAGE_SCORE: dict[tuple[str, str], float] = {
    ("hopper", "medium"): 44.3,        # mean return 1422.06
    ("halfcheetah", "medium"): 40.7,   # 4770.33
    ("walker2d", "medium"): 62.1,      # 2852.09
    ("hopper", "random"): 1.2,         # 18.40
    ("hopper", "expert"): 108.5,       # 3511.36
    ("halfcheetah", "expert"): 88.0,   # approximate
    ("walker2d", "expert"): 107.0,     # approximate
}
#: The medium policy is the first evaluated SAC actor whose stochastic score reaches this minus 5.
MEDIUM_TARGET_SCORE = {env: D4RL_AVERAGE_SCORE[(env, "medium")] for env in D4RL_ENVS}
#: The expert policy is final once a candidate reaches this minus the expert tolerance (or training ends).
EXPERT_TARGET_SCORE = {env: D4RL_AVERAGE_SCORE[(env, "expert")] for env in D4RL_ENVS}

DEFAULT_NUM_TRANSITIONS = 1_000_000
#: The behaviour policies (``{kind}.pt`` in ``policy_dir/{env}/``) each dataset is rolled out from.
POLICIES_NEEDED = {"random": [], "medium": ["medium"], "expert": ["expert"], "medium-expert": ["medium", "expert"],
                   "medium-replay": ["medium"]}


# ----------------------------------------------------------------------------------------------------------------
# Policy files
# ----------------------------------------------------------------------------------------------------------------

def load_policy(path: str | os.PathLike, env: str | None = None):
    """(NumpyActor, metadata) from a behaviour-policy file; any defect is a one-line UserError naming the file."""
    import torch

    from decision_transformer.sac import POLICY_FORMAT, NumpyActor

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: policy file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise UserError(f"{path}: not a readable policy file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict) or obj.get("format") != POLICY_FORMAT or not isinstance(obj.get("actor"), dict):
        raise UserError(f"{path}: not a behaviour-policy file (expected format {POLICY_FORMAT})")
    try:
        actor = NumpyActor(obj["actor"])
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: malformed actor weights ({type(e).__name__}: {e})") from None
    if env is not None:
        spec = get_env_spec(env)
        if obj.get("env") != env or actor.obs_dim != spec.state_dim or actor.act_dim != spec.act_dim:
            raise UserError(f"{path}: policy is for {obj.get('env')!r} ({actor.obs_dim}/{actor.act_dim} dims), "
                            f"expected {env} ({spec.state_dim}/{spec.act_dim})")
    for w in (actor.w1, actor.w2, actor.w3, actor.b1, actor.b2, actor.b3):
        if not np.isfinite(w).all():
            raise UserError(f"{path}: actor weights contain NaN or inf")
    meta = {k: v for k, v in obj.items() if k != "actor"}
    return actor, meta


def random_policy(env: str, seed: int):
    """A freshly initialised (seeded) SAC actor: D4RL's ``random`` behaviour."""
    import torch

    from decision_transformer.sac import Actor, NumpyActor

    spec = get_env_spec(env)
    with torch.random.fork_rng(devices=[]):   # the caller's stream is left as it was (a run generating its data
        torch.manual_seed(seed)               # trains as one that finds it)
        actor = Actor(spec.state_dim, spec.act_dim)
    return NumpyActor({k: v.detach().clone() for k, v in actor.state_dict().items()})


def _snapshot_interval(path: Path) -> int | None:
    """The steps between two training snapshots that snapshot ``path`` records (``covers``), None if unreadable."""
    import torch

    try:
        covers = torch.load(path, map_location="cpu", weights_only=True).get("covers")
    except Exception:  # noqa: BLE001 - an unreadable snapshot is reported where it is loaded for the rollouts
        return None
    return int(covers) if isinstance(covers, int) and covers > 0 else None


def replay_snapshots(policy_dir: Path, env: str, until: int) -> list[tuple[int, Path]]:
    """(step, file) of the training snapshots before env step ``until``, sorted; a gap is an error."""
    folder = policy_dir / env / "replay"
    snaps = []
    for p in sorted(folder.glob("actor_*.pt")) if folder.is_dir() else []:
        try:
            step = int(p.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if step < until:
            snaps.append((step, p))
    if not snaps or snaps[0][0] != 0:
        raise UserError(f"{folder}: no training snapshots from step 0; medium-replay cannot be regenerated")
    # snapshots are taken every `covers` steps (recorded in each; else the smallest spacing): a missing one would
    # stretch its neighbour's policy over its steps
    steps = [s for s, _ in snaps] + [until]
    every = _snapshot_interval(snaps[0][1]) or (min(b - a for a, b in zip(steps[:-2], steps[1:-1]))
                                                if len(snaps) > 1 else None)
    if every is not None:
        gap = next(((a, b) for a, b in zip(steps, steps[1:]) if b - a > every), None)
        if gap is not None:
            raise UserError(f"{folder}: the training snapshots have a gap between steps {gap[0]} and {gap[1]} (they "
                            f"are {every} steps apart); medium-replay cannot be regenerated")
    return snaps


# ----------------------------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------------------------

_FIELDS = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts",
           "infos/action_log_probs", "infos/qpos", "infos/qvel")


class _Episode:
    __slots__ = ("rows",)

    def __init__(self):
        self.rows = {k: [] for k in _FIELDS}


def _stack(episodes: list[dict], n: int) -> dict[str, np.ndarray]:
    out = {}
    for k in _FIELDS:
        arr = np.concatenate([e[k] for e in episodes])[:n]
        out[k] = arr.astype(bool) if k in ("terminals", "timeouts") else arr.astype(np.float32)
    return out


def _finish(ep: _Episode) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ep.rows.items()}


class _one_thread:
    """Small batched forwards are fastest single-threaded; on a shared machine a second spinning torch thread
    made rollouts several times slower. Usable as a context manager or a decorator."""

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            """``fn(*args, **kwargs)`` with torch on one thread."""
            with _one_thread():
                return fn(*args, **kwargs)

        return wrapped

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


@_one_thread()
def rollout_policy(env: str, actor, num_transitions: int, seed: int = 0, num_envs: int | None = None,
                   env_version: str = DEFAULT_ENV_VERSION, progress: bool = False) -> dict[str, np.ndarray]:
    """``num_transitions`` rows of D4RL-layout data from ``actor`` (a NumpyActor, sampled), ``num_envs`` envs in
    lockstep. Episodes are laid out one after the other in the order they end; the last one is cut off unfinished
    (no terminal or timeout on its last row), as in D4RL's files."""
    spec = get_env_spec(env)
    if num_envs is None:
        # Up to 16 envs amortise the batched forward, but the episodes still running at the end are left out (all but
        # the cut-off tail), and those are the long ones: with 16 envs on a 20k request, hopper-medium came out 5
        # points below its policy. At least 20 episodes' worth of steps per env keeps that under a few percent of
        # the episodes; a request under 20 episodes is rolled out in one env, as D4RL's were.
        num_envs = int(np.clip(num_transitions // (20 * spec.max_ep_len), 1, 16))
    envs = [make_env(env, env_version) for _ in range(num_envs)]
    raw = [e.unwrapped for e in envs]  # the time limit is applied here; skipping wrappers saves per-step overhead
    rng = np.random.default_rng(seed)
    obs = np.zeros((num_envs, spec.state_dim), dtype=np.float32)
    t = np.zeros(num_envs, dtype=np.int64)
    eps = [_Episode() for _ in range(num_envs)]
    for i, e in enumerate(envs):
        obs[i] = e.reset(seed=seed * 1_000_003 + i)[0]
    done_eps, total = [], 0
    bar = _progress(num_transitions, f"{env} rollout") if progress else None
    while True:
        actions, logps = actor.act(obs, rng)                                    # [N, da], [N]
        for i in range(num_envs):
            u = raw[i]
            qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
            nobs, r, term, _, _ = u.step(actions[i])
            t[i] += 1
            timeout = (t[i] >= spec.max_ep_len) and not term
            rows = eps[i].rows
            rows["observations"].append(obs[i].copy())
            rows["next_observations"].append(nobs)
            rows["actions"].append(actions[i])
            rows["rewards"].append(r)
            rows["terminals"].append(term)
            rows["timeouts"].append(timeout)
            rows["infos/action_log_probs"].append(logps[i])
            rows["infos/qpos"].append(qpos)
            rows["infos/qvel"].append(qvel)
            if term or timeout:
                done_eps.append(_finish(eps[i]))
                total += int(t[i])
                if bar is not None:  # (episodes of several envs can end past the request: the bar stops at it)
                    bar.update(max(0, min(int(t[i]), num_transitions - bar.n)))
                eps[i] = _Episode()
                t[i] = 0
                nobs = envs[i].reset()[0]  # each env was seeded once; reseeding every reset costs ~1 ms
            obs[i] = nobs
        # Stop once finished episodes + the longest running one can fill the request: the cut-off tail is taken
        # from the env whose episode has run longest (deterministic choice).
        if total + int(t.max()) >= num_transitions:
            break
    if bar is not None:
        bar.update(num_transitions - bar.n)  # the running episode's tail completes the request
        bar.close()
    for e in envs:
        e.close()
    longest = int(np.argmax(t))
    if t[longest] > 0:
        tail = _finish(eps[longest])
        tail["timeouts"] = np.zeros_like(tail["timeouts"])  # the unfinished tail carries no end flag
        done_eps.append(tail)
    return _stack(done_eps, num_transitions)


@_one_thread()
def rollout_schedule(env: str, schedule: list[tuple[int, object]], num_transitions: int, seed: int = 0,
                     uniform_before: int = 0, env_version: str = DEFAULT_ENV_VERSION,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """One env, one continuous stream of episodes as in SAC training: step s uses uniform actions if
    ``s < uniform_before``, else the last policy of ``schedule`` (sorted (start step, NumpyActor)) with start ≤ s.
    The last row of the stream is left without an end flag unless its episode really ended there."""
    spec = get_env_spec(env)
    e = make_env(env, env_version)
    u = e.unwrapped
    rng = np.random.default_rng(seed)
    obs = e.reset(seed=seed * 1_000_003)[0].astype(np.float32)
    t = 0
    ep, eps = _Episode(), []
    k = 0
    bar = _progress(num_transitions, f"{env} replay rollout") if progress else None
    for s in range(num_transitions):
        while k + 1 < len(schedule) and schedule[k + 1][0] <= s:
            k += 1
        actor = schedule[k][1]
        a, logp = actor.act(obs, rng)
        if s < uniform_before:
            a = rng.uniform(-1.0, 1.0, spec.act_dim).astype(np.float32)
            logp = np.float32(-spec.act_dim * np.log(2.0))  # density of the uniform box
        qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
        nobs, r, term, _, _ = u.step(a)
        t += 1
        timeout = t >= spec.max_ep_len and not term
        for key, v in zip(_FIELDS, (obs, nobs, a, r, term, timeout, logp, qpos, qvel)):
            ep.rows[key].append(v)
        obs = np.asarray(nobs, dtype=np.float32)
        if term or timeout:
            eps.append(_finish(ep))
            ep, t = _Episode(), 0
            obs = e.reset()[0].astype(np.float32)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    e.close()
    if ep.rows["rewards"]:
        eps.append(_finish(ep))
    return _stack(eps, num_transitions)


def _progress(total, desc):
    from tqdm import tqdm

    # silent when stderr is not a terminal, as every progress bar here (a log file keeps only the summaries)
    return tqdm(total=total, desc=desc, unit="step", unit_scale=True, mininterval=2.0, disable=None, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------

def _policy_path(policy_dir: Path, env: str, kind: str) -> Path:
    return policy_dir / env / f"{kind}.pt"


def check_generatable(env: str, dataset: str, policy_dir=None):
    """An env outside D4RL has no bundled behaviour policies: only its random dataset can be made without
    ``policy_dir``."""
    check_dataset_name(dataset)
    if policy_dir is None and dataset != "random" and not get_env_spec(env).d4rl:
        raise UserError(f"{env} has no bundled behaviour policies: only --dataset random can be generated for it; "
                        f"supply {pkl_name(env, dataset)} yourself (or behaviour policies with --policy_dir)")


def check_policies(env: str, dataset: str, policy_dir=None) -> dict[str, tuple[Path, dict]]:
    """Load every behaviour policy that ``dataset`` is rolled out from (for medium-replay also list its training
    snapshots), so that a missing or damaged one is a one-line UserError before any rollout; returns (file,
    metadata) by kind, e.g. ``{"expert": (Path(".../hopper/expert.pt"), {"step": ..., "final": True, ...})}``."""
    check_generatable(env, dataset, policy_dir)
    policy_dir = Path(policy_dir) if policy_dir is not None else BUNDLED_POLICY_DIR
    found = {}
    for kind in POLICIES_NEEDED[dataset]:
        path = _policy_path(policy_dir, env, kind)
        found[kind] = (path, load_policy(path, env)[1])
    if dataset == "medium-replay":
        replay_snapshots(policy_dir, env, int(found["medium"][1]["step"]))
    return found


def generate_flat(env: str, dataset: str, num_transitions: int | None = None, seed: int = 0,
                  policy_dir: str | os.PathLike | None = None, progress: bool = False):
    """(flat D4RL-layout arrays, metadata) for one dataset. ``num_transitions`` defaults to 1M (medium-expert: 1M
    of each; medium-replay: every step up to the medium policy)."""
    check_generatable(env, dataset, policy_dir)
    policy_dir = Path(policy_dir) if policy_dir is not None else BUNDLED_POLICY_DIR
    n = num_transitions or DEFAULT_NUM_TRANSITIONS
    with _one_thread():
        return _generate_flat(env, dataset, n, num_transitions, seed, policy_dir, progress)


def _generate_flat(env, dataset, n, num_transitions, seed, policy_dir, progress):
    meta = {"algorithm": "SAC", "generator": "decision_transformer.generation", "env_id": get_env_spec(env).gym_id(),
            "dataset": dataset, "seed": seed}
    if dataset == "random":
        data = rollout_policy(env, random_policy(env, seed), n, seed=seed, progress=progress)
        meta.update(policy="random-init", iteration=0)
    elif dataset in ("medium", "expert"):
        actor, pm = load_policy(_policy_path(policy_dir, env, dataset), env)
        if dataset == "expert" and not pm.get("final"):
            import warnings

            warnings.warn(f"{_policy_path(policy_dir, env, dataset)}: expert policy from unfinished training "
                          f"(step {pm.get('step')}, eval score {pm.get('eval_score')})", RuntimeWarning, stacklevel=2)
        # different env seeds per dataset, so medium-expert's halves equal the medium and expert datasets
        data = rollout_policy(env, actor, n, seed=seed + (0 if dataset == "medium" else 1), progress=progress)
        meta.update(policy=f"{env}/{dataset}.pt", iteration=int(pm["step"]))
    elif dataset == "medium-expert":
        check_policies(env, dataset, policy_dir)   # a broken expert.pt is found before the medium half is rolled out
        med, _ = _generate_flat(env, "medium", n, n, seed, policy_dir, progress)
        exp, em = _generate_flat(env, "expert", n, n, seed, policy_dir, progress)
        ends = np.flatnonzero(med["terminals"] | med["timeouts"])
        cut = int(ends[-1]) + 1 if len(ends) else 0
        data = {k: np.concatenate([med[k][:cut], exp[k]]) for k in med}
        meta.update(policy=f"{env}/medium.pt+{env}/expert.pt", iteration=em["iteration"])
    else:  # medium-replay
        _, pm = load_policy(_policy_path(policy_dir, env, "medium"), env)
        until = int(pm["step"])
        snaps = replay_snapshots(policy_dir, env, until)
        schedule, uniform_before = [], 0
        for step, path in snaps:
            actor, sm = load_policy(path, env)
            uniform_before = int(sm.get("uniform_before", 0))
            schedule.append((step, actor))
        total = until if num_transitions is None else min(num_transitions, until)
        data = rollout_schedule(env, schedule, total, seed=seed + 2, uniform_before=uniform_before,
                                progress=progress)
        meta.update(policy=f"{env}/replay/*.pt", iteration=until, snapshots=len(schedule))
    return data, meta


def write_d4rl_hdf5(path: str | os.PathLike, data: dict[str, np.ndarray], metadata: dict | None = None,
                    replace: bool = True) -> Path:
    """Atomically write flat arrays (keys with '/' become groups) and ``metadata/*`` scalars (``replace`` False:
    only where no file of that name is)."""
    from decision_transformer.synthetic import write_hdf5

    return write_hdf5(path, {**data, **{f"metadata/{k}": v for k, v in (metadata or {}).items()}}, replace=replace)


def dataset_stats(env: str, dataset: str, trajs: list[dict]) -> dict:
    """Transitions, episodes, return mean/std and D4RL-normalised score of complete episodes, with D4RL's average."""
    spec = get_env_spec(env)
    rets = np.array([float(t["rewards"].sum()) for t in trajs])
    return {"env": env, "dataset": dataset, "episodes": len(trajs),
            "transitions": int(sum(len(t["rewards"]) for t in trajs)),
            "return_mean": float(rets.mean()) if len(rets) else float("nan"),
            "return_std": float(rets.std()) if len(rets) else float("nan"),
            "score": (None if not spec.has_d4rl_score  # null in the JSON: no D4RL reference for the env
                      else float(spec.d4rl_score(rets.mean())) if len(rets) else float("nan")),
            "d4rl_average_score": D4RL_AVERAGE_SCORE.get((env, dataset))}


def format_stats(s: dict) -> str:
    """One line of ``dataset_stats``: transitions, episodes, return mean +- std and, where the env has D4RL
    reference returns, the normalised score next to D4RL's average."""
    ref = s["d4rl_average_score"]
    line = (f"{s['env']}-{s['dataset']}: {s['transitions']} transitions, {s['episodes']} episodes, return "
            f"{s['return_mean']:.1f} +- {s['return_std']:.1f}")
    if not get_env_spec(s["env"]).has_d4rl_score:
        return line + " (no D4RL reference for this env)"
    return line + f", normalised score {s['score']:.1f} (D4RL average {'n/a' if ref is None else f'{ref:.1f}'})"


def generate_dataset(data_path: str | os.PathLike, env: str, dataset: str, *, num_transitions: int | None = None,
                     seed: int = 0, policy_dir: str | os.PathLike | None = None, write_hdf5: bool = True,
                     progress: bool = True, log=print, replace: bool = True) -> dict:
    """Generate one dataset into ``data_path`` (``{env}-{dataset}-v2.pkl``, optionally D4RL's hdf5 and a
    ``.stats.json``); returns its stats (with ``seconds`` and file paths). ``replace`` False: a pkl or hdf5 that
    another process wrote while this one was generated is kept (``files.WrittenMeanwhile``)."""
    from decision_transformer.files import atomic_write
    from decision_transformer.synthetic import write_pkl

    t0 = time.perf_counter()
    data, meta = generate_flat(env, dataset, num_transitions, seed, policy_dir, progress)
    data_path = Path(data_path)
    trajs = split_episodes(data, source=f"generated {env}-{dataset}")
    if not trajs:  # checked before anything is written: an existing dataset is not replaced by an empty one
        n = len(data["rewards"])
        raise UserError(f"{env}-{dataset}: no episode ended within the {n} generated transitions (episodes of {env} "
                        f"last up to {get_env_spec(env).max_ep_len} steps), so there is no trajectory to save; pass a "
                        f"larger --num_transitions")
    out = {}
    if write_hdf5:
        out["hdf5"] = str(write_d4rl_hdf5(data_path / hdf5_name(env, dataset), data, meta, replace))
    try:
        out["pkl"] = str(write_pkl(data_path / pkl_name(env, dataset), trajs, replace=replace))
    except UserError as e:
        if "hdf5" not in out or replace:
            raise
        # the hdf5 was written a moment ago only where none was (replace=False): it is this call's own, and would
        # now sit beside another process's pkl of other data, or alone (a full disk), refusing the next try
        Path(out["hdf5"]).unlink(missing_ok=True)
        also = f"the hdf5 generated with this one, {out['hdf5']}, is removed with it"
        if isinstance(e, WrittenMeanwhile):
            raise WrittenMeanwhile(e.path, also=also) from None
        raise UserError(f"{e}; {also}") from None
    stats = dataset_stats(env, dataset, trajs)
    stats.update(seconds=round(time.perf_counter() - t0, 1), policy=meta["policy"], seed=seed, files=out)
    stats_path = data_path / f"{env}-{dataset}-v2.stats.json"
    atomic_write(stats_path, lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1)))
    log(format_stats(stats) + f" [{stats['seconds']:.0f} s]")
    return stats


def missing_policies(env: str, dataset: str, policy_dir: str | os.PathLike | None = None) -> str | None:
    """None if the behaviour policies for ``dataset`` are there (and, for expert data, final); else why not."""
    policy_dir = Path(policy_dir) if policy_dir is not None else BUNDLED_POLICY_DIR
    need = POLICIES_NEEDED[dataset]
    for k in need:
        if not _policy_path(policy_dir, env, k).is_file():
            return f"no {k} behaviour policy at {_policy_path(policy_dir, env, k)}"
    if dataset == "medium-replay" and not (policy_dir / env / "replay" / "actor_0000000.pt").is_file():
        return f"no training snapshots in {policy_dir / env / 'replay'}"
    if "expert" in need:
        _, meta = load_policy(_policy_path(policy_dir, env, "expert"), env)
        if not meta.get("final"):
            return (f"the expert policy {_policy_path(policy_dir, env, 'expert')} is from unfinished training "
                    f"(step {meta.get('step')}); generate it explicitly with data/generate_datasets.py if wanted")
    return None


def ensure_dataset(data_path: str | os.PathLike, env: str, dataset: str, *, generate: bool = True,
                   num_transitions: int | None = None, seed: int = 0, policy_dir: str | os.PathLike | None = None,
                   log=print) -> Path:
    """The dataset file the scripts should read: an existing ``{env}-{dataset}-v2.pkl`` (or D4RL hdf5, found as
    ``data.find_dataset_file`` does), else one generated from the bundled behaviour policies (``generate=True``).
    Raises a one-line UserError when neither is possible."""
    from decision_transformer.data import check_dataset_place, find_dataset_file

    get_env_spec(env)
    check_dataset_name(dataset)
    check_dataset_place(data_path, env, dataset)
    try:
        return find_dataset_file(data_path, env, dataset)
    except UserError:
        if not generate or (not get_env_spec(env).d4rl and dataset != "random" and policy_dir is None):
            raise  # (an env outside D4RL: the message says the data must be the user's)
    target = Path(data_path) / pkl_name(env, dataset)
    why = missing_policies(env, dataset, policy_dir)
    if why is not None:
        raise UserError(
            f"dataset not found: {target}, and it cannot be generated: {why}; convert D4RL files with "
            f"`python data/download_d4rl_datasets.py --hdf5 FILE --data_path {data_path}`")
    from decision_transformer.files import refuse_files_above

    refuse_files_above(Path(data_path), "generating the missing dataset")   # (not after minutes of generation)
    with exclusive(target, "a generated dataset"):   # runs started together on a fresh machine generate it once
        if target.is_file():
            return target
        source = "a randomly initialised SAC actor" if dataset == "random" else "the bundled behaviour policies"
        log(f"{target} not found: generating {env}-{dataset} from {source} (a few minutes; pass --no_generate to "
            f"turn this off)")
        try:
            generate_dataset(data_path, env, dataset, num_transitions=num_transitions, seed=seed,
                             policy_dir=policy_dir, write_hdf5=False, log=log, replace=False)
        except WrittenMeanwhile:   # (a conversion, say, that takes no part in this lock)
            log(f"{target} was written by another process while this one was generated: using that file")
    return target


__all__ = [
    "D4RL_AVERAGE_SCORE",
    "DATASETS",
    "MEDIUM_TARGET_SCORE",
    "EXPERT_TARGET_SCORE",
    "check_policies",
    "dataset_stats",
    "ensure_dataset",
    "generate_dataset",
    "generate_flat",
    "load_policy",
    "rollout_policy",
    "rollout_schedule",
    "write_d4rl_hdf5",
]
