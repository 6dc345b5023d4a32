"""Evaluation envs stepped in worker processes, so that stepping 50-100 MuJoCo envs no longer serialises on the one
Python thread that also launches the model's forwards.

Env ``i`` lives in worker ``i % W`` (round robin, so the envs still running late in an evaluation stay spread over
the workers). Each message is one reset or one step of some of a worker's envs; replies come back in order. An
episode's reset seed and actions alone decide its trajectory, so the results equal in-process stepping exactly
(tested). This module imports neither torch nor the model, and the workers do not re-import the main script (no
``if __name__ == "__main__"`` guard needed, scripts read from stdin work): the workers start quickly.

Ctrl-C is the main process's to handle: the workers ignore SIGINT (also while they start), and end when the main
process closes them or goes away (their pipe then reads end-of-file). Steps sent and not waited for (Ctrl-C between
``step_async`` and ``step_wait``) are waited for by the next ``reset``. A round that failed or was cut short while a
message was in transit (a worker error or exit, Ctrl-C during a send or receive) leaves the workers unusable;
``EnvPool`` then starts new ones for its next evaluation.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
import types

import numpy as np

from decision_transformer.envs import DEFAULT_ENV_VERSION, make_env
from decision_transformer.errors import UserError


def episode_seed(seed: int, i: int) -> int:
    """The reset seed of episode ``i`` of an evaluation seeded ``seed``: 10000·seed + i."""
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


class EnvWorkerLost(UserError, RuntimeError):
    """An evaluation env worker that exited or stopped answering: one line from the scripts (a ``UserError``), a
    ``RuntimeError`` for callers of the library."""


#: What a script stopped by a lost worker can do (training scripts keep every finished iteration).
LOST_HINT = "; a training run continues with --resume"


class _WorkerError:
    """A worker's reply when one of its envs raised (the worker then exits)."""

    def __init__(self, e: Exception):
        self.text, self.user = f"{type(e).__name__}: {e}", isinstance(e, UserError)
        self.message = str(e)


def _worker(conn, env: str, version: str):
    if hasattr(signal, "pthread_sigmask"):  # started with SIGINT blocked (see _starting_workers); ignore it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
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
            conn.send(_WorkerError(e))
        except (OSError, ValueError):
            pass
    finally:
        for e in envs:
            e.close()
        conn.close()


@contextlib.contextmanager
def _starting_workers():
    """While worker processes start: SIGINT blocked in this thread, so the workers inherit it blocked (a Ctrl-C during
    their interpreter start-up would print a traceback from each; one that arrives meanwhile reaches this process when
    the block ends), and a stand-in ``__main__`` module, so that spawn does not make them re-run the main script (the
    workers need nothing from it: their target is ``_worker``, their arguments a pipe and two strings)."""
    mask = None
    if hasattr(signal, "pthread_sigmask"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # its first start unblocks SIGINT: start it before blocking
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if main is not None:
            sys.modules["__main__"] = main
        else:
            sys.modules.pop("__main__", None)


class EnvWorkers:
    """``workers`` processes holding the envs of an evaluation; ``reset`` then ``step_async``/``step_wait`` rounds.
    A worker that does not answer within ``reply_timeout_s`` (stuck) fails the round like one that exited."""

    reply_timeout_s = 600.0  # a step of a few MuJoCo envs takes milliseconds; env creation a second

    def __init__(self, env: str, version: str = DEFAULT_ENV_VERSION, workers: int = 2):
        import multiprocessing as mp

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA state
        self.env, self.version = env, version
        self.conns, self.procs = [], []
        self._pending: list = []
        self._broken = False
        try:
            with _starting_workers():
                for _ in range(workers):
                    parent, child = ctx.Pipe()
                    self.conns.append(parent)
                    p = ctx.Process(target=_worker, args=(child, env, version), daemon=True)
                    try:
                        p.start()
                    finally:
                        child.close()
                    self.procs.append(p)
        except BaseException:  # e.g. Ctrl-C while starting: no worker is left behind
            self.close()
            raise

    @property
    def workers(self) -> int:
        """The number of worker processes (0 once closed)."""
        return len(self.conns)

    @property
    def usable(self) -> bool:
        """False once closed, after a round that failed or was cut short (an exception or Ctrl-C in the middle of
        one: replies may be left in the pipes), or when a worker has exited."""
        return bool(self.conns) and not self._broken and all(p.is_alive() for p in self.procs)

    @contextlib.contextmanager
    def _round(self):
        if self._broken or not self.conns:
            raise RuntimeError("evaluation env workers are unusable (closed, or an earlier round failed or was "
                               "interrupted); close them and start new ones")
        try:
            yield
        except BaseException:
            self._broken = True
            raise

    def _exited(self, w: int) -> RuntimeError:
        self.procs[w].join(timeout=1)
        code = self.procs[w].exitcode
        return EnvWorkerLost(f"evaluation env worker {w} exited (exit code {code})"
                             + ("; it was killed (out of memory?)" if code == -9 else "") + LOST_HINT)

    def _send(self, w: int, msg):
        try:
            self.conns[w].send(msg)
        except OSError:  # broken pipe: the worker is gone
            raise self._exited(w) from None

    def _recv(self, w: int):
        try:
            if not self.conns[w].poll(self.reply_timeout_s):
                raise EnvWorkerLost(f"evaluation env worker {w} did not answer within {self.reply_timeout_s:g} s "
                                    f"(stuck?); the pool starts new workers for the next evaluation{LOST_HINT}")
            msg = self.conns[w].recv()
        except (EOFError, OSError):  # end of file or connection reset: the worker is gone
            raise self._exited(w) from None
        if isinstance(msg, _WorkerError):
            if msg.user:
                raise UserError(msg.message)
            raise RuntimeError(f"evaluation env worker {w}: {msg.text}")
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
        """Reset envs 0..n-1 for episodes 0..n-1; their first observations [n, d]. Rounds sent and not waited for
        are waited for first (their results dropped)."""
        while self._pending:
            self.step_wait()
        with self._round():
            idx = np.arange(n)
            parts = list(self._split(idx))
            for w, pos, local in parts:
                self._send(w, ("reset", [(int(j), int(i)) for j, i in zip(local, idx[pos])], seed, mode))
            out = None
            for w, pos, _ in parts:
                obs = self._recv(w)
                if out is None:
                    out = np.zeros((n, obs.shape[1]))
                out[pos] = obs
            return out

    def step_async(self, idx: np.ndarray, actions: np.ndarray):
        """Send env ``idx[j]`` the action ``actions[j]``; the results come from the matching ``step_wait``."""
        with self._round():
            parts = list(self._split(idx))
            self._pending.append((len(idx), parts))
            for w, pos, local in parts:
                self._send(w, ("step", local, np.ascontiguousarray(actions[pos])))

    def step_wait(self):
        """(observations, rewards, episode over) of the oldest ``step_async``, in its order of ``idx``."""
        with self._round():
            n, parts = self._pending.pop(0)
            obs = rewards = done = None
            for w, pos, _ in parts:
                o, r, d = self._recv(w)
                if obs is None:
                    obs, rewards, done = np.zeros((n, o.shape[1])), np.zeros(n), np.zeros(n, dtype=bool)
                obs[pos], rewards[pos], done[pos] = o, r, d
            return obs, rewards, done

    def close(self, timeout: float = 5.0):
        """Stop the workers (idempotent): each is asked to close, its pipe closed (end of file for one still busy),
        and any left after ``timeout`` seconds in all killed. Every worker is waited for: none is left behind."""
        for c in self.conns:
            try:
                c.send(("close",))
            except (OSError, ValueError):
                pass
            c.close()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self.conns, self.procs, self._pending = [], [], []
