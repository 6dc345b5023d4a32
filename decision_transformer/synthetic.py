"""Small real-MuJoCo datasets from a seeded random (or given) policy, in the D4RL and DT layouts.

Used by the tests and for smoke runs on a fresh machine; real experiments use D4RL-style datasets.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from decision_transformer.envs import DEFAULT_ENV_VERSION, check_dataset_name, get_env_spec, make_env
from decision_transformer.errors import UserError
from decision_transformer.files import WrittenMeanwhile, atomic_write  # noqa: F401  (the writers below, and their importers)


def rollout_flat(env: str, num_transitions: int | None, seed: int = 0, policy=None, max_ep_len: int | None = None,
                 env_version: str = DEFAULT_ENV_VERSION, num_episodes: int | None = None) -> dict[str, np.ndarray]:
    """Flat D4RL-layout arrays (observations, next_observations, actions, rewards, terminals, timeouts) of
    ``num_transitions`` steps, or of ``num_episodes`` whole episodes. ``policy(obs, rng) -> action``; default
    uniform random in [-1, 1]."""
    if (num_transitions is None) == (num_episodes is None):
        raise ValueError("give one of num_transitions and num_episodes")
    spec = get_env_spec(env)
    max_ep_len = max_ep_len or spec.max_ep_len
    rng = np.random.default_rng(seed)
    e = make_env(env, env_version)
    cols = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")}
    obs, _ = e.reset(seed=seed)
    t, ep = 0, 0
    n = 0
    while (n < num_transitions) if num_episodes is None else (ep < num_episodes):
        n += 1
        a = rng.uniform(-1, 1, spec.act_dim) if policy is None else policy(obs, rng)
        a = np.asarray(a, dtype=np.float32)
        nobs, r, term, trunc, _ = e.step(a)
        t += 1
        timeout = (t >= max_ep_len or trunc) and not term
        for k, v in zip(cols, (obs, nobs, a, r, term, timeout)):
            cols[k].append(v)
        obs = nobs
        if term or timeout:
            ep += 1
            obs, _ = e.reset(seed=seed + ep)
            t = 0
    e.close()
    out = {k: np.asarray(v) for k, v in cols.items()}
    for k in ("observations", "next_observations", "actions", "rewards"):
        out[k] = out[k].astype(np.float32)
    out["terminals"] = out["terminals"].astype(bool)
    out["timeouts"] = out["timeouts"].astype(bool)
    return out


#: The root attribute that marks an hdf5 file as a smoke-test stand-in (``download_d4rl_datasets.py --synthetic``)
SYNTHETIC_ATTR = "dt_toolkit_synthetic"


def write_hdf5(path: str | os.PathLike, data: dict[str, np.ndarray], attrs: dict | None = None,
               replace: bool = True) -> Path:
    """Flat arrays (keys with '/' become groups) as an hdf5 file, written whole and then renamed into place; ``attrs``
    become the file's root attributes. ``replace`` False: only where no file of that name is (``files.place``).

    The file is built in memory and only its finished bytes go to disk: HDF5 writing into a file on a full disk
    crashes the process (a segfault while h5py closes it), where a plain write gives the one-line error of
    ``atomic_write``."""
    import h5py

    with h5py.File(f"{os.fspath(path)}.image", "w", driver="core", backing_store=False) as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.attrs.update(attrs or {})
        f.flush()
        image = f.id.get_file_image()

    def write(tmp):
        """The finished file's bytes into ``tmp``."""
        with open(tmp, "wb") as out:
            out.write(image)

    return atomic_write(path, write, replace)


def write_pkl(path: str | os.PathLike, trajectories: list[dict[str, np.ndarray]], stand_in: str | None = None,
              replace: bool = True) -> Path:
    """The DT pickle, written whole and then renamed into place. ``stand_in`` (what the data is, for random-policy
    data under D4RL's name): its mark file is written *before* the pickle takes the name, so that no interruption
    leaves such data unmarked (the training scripts warn on a marked file). Otherwise a mark left by an earlier
    pickle of that name goes once the new one is in place. ``replace`` False: written only where no pickle of that
    name is, also one another process wrote since the caller's check (``files.WrittenMeanwhile``)."""
    from decision_transformer.data import stand_in_mark_path

    def write(tmp):
        """Pickle the trajectories into ``tmp``."""
        with open(tmp, "wb") as f:
            pickle.dump(list(trajectories), f)   # (a plain list, as the originals' files)

    mark = stand_in_mark_path(path)
    if stand_in is None:
        out = atomic_write(path, write, replace)
        mark.unlink(missing_ok=True)
        return out
    if not replace and os.path.lexists(path):   # (no mark for another process's file)
        raise WrittenMeanwhile(path)
    new_mark = not mark.exists()
    atomic_write(mark, lambda tmp: Path(tmp).write_text(stand_in + "\n"))
    try:
        return atomic_write(path, write, replace)
    except BaseException:   # the pickle was not replaced: a mark made for it alone goes again
        if new_mark:
            mark.unlink(missing_ok=True)
        raise


def make_dataset(data_path: str | os.PathLike, env: str, dataset: str, num_transitions: int, seed: int = 0,
                 max_ep_len: int | None = None, overwrite: bool = False) -> Path:
    """Write ``{data_path}/{env}-{dataset}-v2.pkl`` from random-policy rollouts; returns its path. Too few
    transitions for one episode to end is an error (the unfinished tail is dropped), not an empty file. An existing
    file of that name (perhaps a real D4RL dataset) is kept, with a ``UserError``, unless ``overwrite``; ``dataset``
    must be one of D4RL's names (``medium``, ...), the names the training scripts read. Under a name other than
    ``random`` the pickle is marked as a stand-in (see :func:`write_pkl`): the scripts that read it say it is not
    D4RL's dataset."""
    from decision_transformer.data import pkl_name, split_episodes

    get_env_spec(env)
    check_dataset_name(dataset)
    path = Path(data_path) / pkl_name(env, dataset)
    keep = (f"{path} exists; make_dataset keeps it (pass overwrite=True to replace it with random-policy data)")
    if os.path.lexists(path) and not overwrite:
        raise UserError(keep)
    trajs = split_episodes(rollout_flat(env, num_transitions, seed, max_ep_len=max_ep_len),
                           source=f"{num_transitions} random-policy steps of {env}", require_episode=True)
    try:
        stand_in = None if dataset == "random" else f"random-policy data made by make_dataset, {num_transitions} steps"
        return write_pkl(path, trajs, stand_in=stand_in, replace=overwrite)
    except WrittenMeanwhile:   # (another process wrote it since the check above)
        raise UserError(keep) from None
