"""Evaluation envs stepped in worker processes, so that stepping 50-100 MuJoCo envs no longer serialises on the one
Python thread that also launches the model's forwards.

Env ``i`` lives in worker ``i % W`` (round robin, so the envs still running late in an evaluation stay spread over
the workers). Each message is one reset or one step of some of a worker's envs; replies come back in order. An
episode's reset seed and actions alone decide its trajectory, so the results equal in-process stepping exactly
(tested). This module imports neither torch nor the model: the workers start quickly.
"""
from __future__ import annotations

import numpy as np

from decision_transformer.envs import DEFAULT_ENV_VERSION, make_env


def episode_seed(seed: int, i: int) -> int:
    return 10000 * int(seed) + int(i)


def initial_obs(env, seed: int, i: int, mode: str) -> np.ndarray:
    """Reset env for episode ``i`` of an evaluation seeded ``seed`` (``noise`` mode perturbs the first observation)."""
    obs, _ = env.reset(seed=episode_seed(seed, i))
    if mode == "noise":
        obs = obs + np.random.default_rng(episode_seed(seed, i)).normal(0, 0.1, size=obs.shape)
    return obs


def step_envs(envs: list, actions: np.ndarray):
    """Step each env with its row of ``actions``: (observations [n, d], rewards [n], episode over [n])."""
    obs, rewards, done = [], np.zeros(len(envs)), np.zeros(len(envs), dtype=bool)
    for j, e in enumerate(envs):
        o, r, terminated, truncated, _ = e.step(actions[j])
        obs.append(o)
        rewards[j], done[j] = r, terminated or truncated
    return np.asarray(obs, dtype=np.float64).reshape(len(envs), -1), rewards, done


def _worker(conn, env: str, version: str):
    envs: list = []
    try:
        while True:
            cmd, *payload = conn.recv()
            if cmd == "reset":  # [(local index, episode index)], seed, mode
                items, seed, mode = payload
                while len(envs) <= max((j for j, _ in items), default=-1):
                    envs.append(make_env(env, version))
                conn.send(np.stack([initial_obs(envs[j], seed, i, mode) for j, i in items]) if items else None)
            elif cmd == "step":  # local indices, actions
                local, actions = payload
                conn.send(step_envs([envs[j] for j in local], actions))
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt):  # the main process went away or was interrupted
        pass
    except Exception as e:  # noqa: BLE001 - reported to the main process, which raises it
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (OSError, ValueError):
            pass
    finally:
        for e in envs:
            e.close()
        conn.close()


class EnvWorkers:
    """``workers`` processes holding the envs of an evaluation; ``reset`` then ``step_async``/``step_wait`` rounds."""

    def __init__(self, env: str, version: str = DEFAULT_ENV_VERSION, workers: int = 2):
        import multiprocessing as mp

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA state
        self.env, self.version = env, version
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, env, version), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self._pending: list = []

    @property
    def workers(self) -> int:
        return len(self.conns)

    def _recv(self, w: int):
        try:
            msg = self.conns[w].recv()
        except EOFError:
            raise RuntimeError(f"evaluation env worker {w} exited (exit code {self.procs[w].exitcode})") from None
        if isinstance(msg, tuple) and len(msg) == 2 and isinstance(msg[0], str) and msg[0] == "error":
            raise RuntimeError(f"evaluation env worker {w}: {msg[1]}")
        return msg

    def _split(self, idx: np.ndarray):
        """(worker, positions in idx, local env indices) for each worker that holds some of the envs ``idx``."""
        idx = np.asarray(idx)
        W = self.workers
        for w in range(W):
            pos = np.flatnonzero(idx % W == w)
            if len(pos):
                yield w, pos, idx[pos] // W

    def reset(self, n: int, seed: int, mode: str) -> np.ndarray:
        """Reset envs 0..n-1 for episodes 0..n-1; their first observations [n, d]."""
        idx = np.arange(n)
        parts = list(self._split(idx))
        for w, pos, local in parts:
            self.conns[w].send(("reset", [(int(j), int(i)) for j, i in zip(local, idx[pos])], seed, mode))
        out = None
        for w, pos, _ in parts:
            obs = self._recv(w)
            if out is None:
                out = np.zeros((n, obs.shape[1]))
            out[pos] = obs
        return out

    def step_async(self, idx: np.ndarray, actions: np.ndarray):
        """Send env ``idx[j]`` the action ``actions[j]``; the results come from the matching ``step_wait``."""
        parts = list(self._split(idx))
        for w, pos, local in parts:
            self.conns[w].send(("step", local, np.ascontiguousarray(actions[pos])))
        self._pending.append((len(idx), parts))

    def step_wait(self):
        """(observations, rewards, episode over) of the oldest ``step_async``, in its order of ``idx``."""
        n, parts = self._pending.pop(0)
        obs = rewards = done = None
        for w, pos, _ in parts:
            o, r, d = self._recv(w)
            if obs is None:
                obs, rewards, done = np.zeros((n, o.shape[1])), np.zeros(n), np.zeros(n, dtype=bool)
            obs[pos], rewards[pos], done[pos] = o, r, d
        return obs, rewards, done

    def close(self):
        for c in self.conns:
            try:
                c.send(("close",))
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []
