"""Minari (the Farama successor of D4RL) as a data source and an export target. Optional: needs ``pip install minari``.

Reading uses the user's local Minari root (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``, or ``root=``), e.g.
``mujoco/hopper/medium-v0``; nothing is downloaded. A Minari episode stores T+1 observations and T actions,
rewards, terminations and truncations; it becomes one DT trajectory with ``observations = obs[:-1]``,
``next_observations = obs[1:]`` and ``terminals = terminations``. Export does the reverse through
``minari.create_dataset_from_buffers`` (HDF5 storage: ``data/main_data.hdf5`` with ``episode_{i}`` groups and
``data/metadata.json``), with the env's gymnasium spec and D4RL's reference scores.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from decision_transformer.envs import ENVS, get_env_spec, registered_id
from decision_transformer.errors import UserError, write_problem


def _minari():
    try:
        import minari
    except ImportError:
        raise UserError("Minari support needs the optional package `minari` (pip install minari)") from None
    return minari


@contextlib.contextmanager
def _root(root):
    """Point Minari at ``root`` (or ``$MINARI_DATASETS_PATH``), made absolute, for the duration (Minari reads the
    variable on every call and joins a relative root to paths it has already joined it to)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    if root is None and old is None:
        yield
        return
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root if root is not None else old).expanduser().resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def env_from_dataset_id(dataset_id: str) -> str:
    """``mujoco/hopper/medium-v0`` -> ``hopper`` (the first path component that names one of our envs)."""
    for part in re.split(r"[/_-]", dataset_id.lower()):
        if part in ENVS:
            return part
    raise UserError(f"{dataset_id}: cannot tell the env from the Minari dataset id; pass the env explicitly")


def load_minari_trajectories(dataset_id: str, root: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """Trajectories (the DT pkl layout, float32) of a locally stored Minari dataset."""
    minari = _minari()
    with _root(root):
        where = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets")) / dataset_id
        # Minari checks metadata.json with asserts and opens main_data.hdf5 only when the episodes are read: any of
        # these from either step is a damaged or missing dataset
        # (a metadata.json that is JSON but no object: Minari calls .keys() on it, an AttributeError or TypeError)
        unreadable = (FileNotFoundError, ValueError, KeyError, OSError, AssertionError, AttributeError, TypeError)
        try:
            ds = minari.load_dataset(dataset_id, download=False)
        except unreadable as e:
            why = _why(e) if not isinstance(e, AssertionError) else \
                "its data/metadata.json lacks entries Minari needs (AssertionError)"
            raise UserError(f"Minari dataset {dataset_id!r} not found or unreadable under {where} ({why})") from None
        trajs = []
        try:
            for ep in ds.iterate_episodes():
                obs = np.asarray(ep.observations)
                if obs.ndim != 2 or len(obs) != len(ep.rewards) + 1:
                    raise UserError(f"{where}: episode {ep.id} has observations of shape {obs.shape} for "
                                    f"{len(ep.rewards)} steps; only flat Box observations are supported")
                trajs.append({
                    "observations": obs[:-1].astype(np.float32),
                    "next_observations": obs[1:].astype(np.float32),
                    "actions": np.asarray(ep.actions, dtype=np.float32),
                    "rewards": np.asarray(ep.rewards, dtype=np.float32).reshape(-1),
                    "terminals": np.asarray(ep.terminations, dtype=bool).reshape(-1),
                    "timeouts": np.asarray(ep.truncations, dtype=bool).reshape(-1),
                })
        except unreadable as e:
            raise UserError(f"Minari dataset {dataset_id!r} under {where}: episode data unreadable "
                            f"({_why(e)})") from None
    if not trajs:
        raise UserError(f"{where}: the Minari dataset has no episodes")
    return trajs


#: how an exported smoke-test stand-in's Minari description begins; the rest up to ``]`` is its mark
STAND_IN_PREFIX = "[smoke-test stand-in: "


def minari_stand_in(dataset_id: str, root: str | os.PathLike | None = None) -> str | None:
    """The stand-in mark (``data.synthetic_stand_in``) an exported smoke-test stand-in carries in its Minari
    description; None for any other dataset (also one whose metadata cannot be read: loading it says why)."""
    with _root(root):
        base = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    try:
        meta = json.loads((base / dataset_id / "data" / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    text = meta.get("description") if isinstance(meta, dict) else None
    if not isinstance(text, str) or not text.startswith(STAND_IN_PREFIX) or "]" not in text:
        return None
    return text[len(STAND_IN_PREFIX):text.index("]")] or "random-policy data"


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split())[:150]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# Minari's dataset id: an optional namespace (path components), the name, and a version (required here)
DATASET_ID = re.compile(r"(?:[-_\w][-_\w/]*[-_\w]/)?[-_\w]+?-v\d+")


def check_dataset_id(dataset_id: str) -> str:
    """``dataset_id`` if it has Minari's form ``namespace/name-vN`` (the namespace optional), else one line."""
    if not DATASET_ID.fullmatch(dataset_id):
        raise UserError(f"{dataset_id!r} is not a Minari dataset id of the form namespace/name-vN "
                        f"(e.g. dt/hopper/medium-v0)")
    return dataset_id


def export_minari(trajs: list[dict[str, np.ndarray]], dataset_id: str, env: str,
                  root: str | os.PathLike | None = None, *, algorithm_name: str = "SAC behaviour policy",
                  description: str | None = None, env_version: str | None = None, author: str | None = None,
                  author_email: str | None = None, code_permalink: str | None = None, stand_in: str | None = None):
    """Write ``trajs`` (DT layout with ``next_observations``) as the Minari dataset ``dataset_id``. The last episode
    is marked truncated if it neither terminated nor timed out. ``stand_in``: the data is a smoke-test stand-in
    (``data.synthetic_stand_in``), said at the start of the description (``minari_stand_in`` reads it back). Returns
    the dataset's folder. Minari's warnings that optional metadata (author, e-mail, code link, evaluation env) is
    unset are not shown: the metadata is optional and the evaluation env is the collection env.

    Minari writes the dataset in a child process, into a hidden temporary root beside the datasets, and the finished
    dataset is then renamed into place: HDF5 writing on a full disk crashes the process that writes (a segfault in
    h5py), so a failure of any kind is one line here, and no partial dataset is left to block the next try."""
    _minari()
    from decision_transformer.envs import DEFAULT_ENV_VERSION

    check_dataset_id(dataset_id)
    spec = get_env_spec(env)
    episodes = []
    for i, t in enumerate(trajs):
        if "next_observations" not in t:
            raise UserError(f"trajectory {i} has no next_observations; Minari needs the final observation")
        n = len(t["rewards"])
        term = np.asarray(t.get("terminals", np.zeros(n, bool)), dtype=bool).reshape(-1)
        trunc = np.asarray(t.get("timeouts", np.zeros(n, bool)), dtype=bool).reshape(-1)
        if not term[-1] and not trunc[-1]:
            trunc = trunc.copy()
            trunc[-1] = True  # Minari episodes end with a termination or a truncation
        episodes.append(dict(observations=np.concatenate([t["observations"], t["next_observations"][-1:]]).astype(
                                 np.float32),
                             actions=np.asarray(t["actions"], dtype=np.float32),
                             rewards=np.asarray(t["rewards"], dtype=np.float64).reshape(-1),
                             terminations=term, truncations=trunc))
    env_key = (env, env_version or DEFAULT_ENV_VERSION)
    options = dict(env=registered_id(*env_key), algorithm_name=algorithm_name,
                   author=author, author_email=author_email, code_permalink=code_permalink,
                   ref_min_score=spec.ref_min_score, ref_max_score=spec.ref_max_score,
                   description=(f"{STAND_IN_PREFIX}{stand_in.replace(']', ')')}] " if stand_in else "")
                   + (description or f"{env} dataset exported by decision_transformer.minari_io"),
                   data_format="hdf5")
    with _root(root):
        where = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets")).resolve()
    target = where / dataset_id
    if os.path.lexists(target):
        raise UserError(f"cannot create Minari dataset {dataset_id!r}: {target} exists already")
    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dt-export-", dir=where))
    except OSError as e:
        raise UserError(f"cannot write Minari dataset {dataset_id!r} into {where}: {write_problem(where, e)}") from None
    proc = None
    try:
        proc = multiprocessing.get_context("spawn").Process(
            target=_create_dataset, args=(str(tmp), dataset_id, episodes, env_key, options), daemon=True)
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise UserError(f"cannot create Minari dataset {dataset_id!r} in {where}: "
                            f"{_export_failure(tmp, proc.exitcode)}")
        _place_export(tmp, where, dataset_id)
    finally:
        if proc is not None and proc.is_alive():   # (interrupted)
            proc.terminate()
            proc.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_CHILD_ERROR = ".error"


def _create_dataset(root: str, dataset_id: str, episodes: list[dict], env_key: tuple[str, str], options: dict):
    """(In the child process of ``export_minari``.) Minari's ``create_dataset_from_buffers`` into the root ``root``,
    with the env ``env_key`` (name, version) registered (the project's own envs are registered per process);
    its stderr goes to a file there (what a crash prints is not the user's), an exception's one line to
    ``root/.error`` with exit status 3."""
    import sys

    with contextlib.suppress(OSError):
        log = open(Path(root) / ".stderr", "w")
        os.dup2(log.fileno(), 2)
    os.environ["MINARI_DATASETS_PATH"] = root
    try:
        import minari
        from minari.data_collector import EpisodeBuffer

        registered_id(*env_key)
        buffers = [EpisodeBuffer(id=i, infos={}, **e) for i, e in enumerate(episodes)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is set to None\.", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*out of date.*")  # gymnasium on the v4 envs
            minari.create_dataset_from_buffers(dataset_id, buffers, **options)
    except Exception as e:
        with contextlib.suppress(OSError):
            (Path(root) / _CHILD_ERROR).write_text(str(e) if isinstance(e, ValueError) else _why(e))
        sys.exit(3)


def _export_failure(tmp: Path, exitcode: int) -> str:
    """Why the child of ``export_minari`` failed: its error, else a full disk (under 1 MiB free where it wrote),
    else the crash and the last line it printed."""
    with contextlib.suppress(OSError):
        return (tmp / _CHILD_ERROR).read_text().strip() or "failed"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(tmp).free < 2 ** 20:
            return "no space left on the device"
    last = ""
    with contextlib.suppress(OSError):
        lines = (tmp / ".stderr").read_text(errors="replace").strip().splitlines()
        last = f" ({' '.join(lines[-1].split())[:150]})" if lines else ""
    return (f"the writer process was killed by signal {-exitcode}" if exitcode < 0
            else f"the writer process exited with status {exitcode}") + last


def _place_export(tmp: Path, where: Path, dataset_id: str):
    """The dataset ``dataset_id`` made under the temporary root ``tmp`` renamed into ``where``, with the namespace
    metadata files Minari made that ``where`` lacks."""
    parts = Path(dataset_id).parts
    try:
        for k in range(1, len(parts)):
            (where / Path(*parts[:k])).mkdir(exist_ok=True)
            meta = Path(*parts[:k]) / "namespace_metadata.json"
            if (tmp / meta).exists() and not (where / meta).exists():
                os.replace(tmp / meta, where / meta)
        os.rename(tmp / dataset_id, where / dataset_id)
    except OSError as e:
        if os.path.lexists(where / dataset_id) and not isinstance(e, (NotADirectoryError, PermissionError)):
            raise UserError(f"cannot create Minari dataset {dataset_id!r}: {where / dataset_id} was written by "
                            f"another process meanwhile; it is kept and this one is not written") from None
        raise UserError(f"cannot write Minari dataset {dataset_id!r} into {where}: {write_problem(where, e)}") from None
