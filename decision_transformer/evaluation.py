"""Return-conditioned evaluation in MuJoCo: all episodes of an evaluation step in lockstep.

At environment step t every live episode has the same history length, so one batched forward of the model
gives every episode its next action. Episode i of every evaluation resets with seed ``10000 * seed + i``
(common random numbers across targets, iterations and checkpoints). ``rollout_episode`` is the originals'
one-episode loop, kept as the slow reference path.
"""
from __future__ import annotations

import collections
import contextlib
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from decision_transformer.cuda_graphs import capture, no_host_sync
from decision_transformer.env_workers import episode_seed, initial_obs, step_envs  # noqa: F401 (episode_seed)
from decision_transformer.envs import DEFAULT_ENV_VERSION, get_env_spec, make_env
from decision_transformer.errors import UserError, checked_device
from decision_transformer.data import check_mode, checked_state_stats
from decision_transformer.training.trainer import (check_model_env, check_timestep_rows, float32_device, module_mode,
                                                   to_device_async)


@dataclass
class EvalResult:
    """The episode returns and lengths of one evaluation at the return target ``target``."""

    target: float
    returns: np.ndarray   # [num_episodes] undiscounted episode returns
    lengths: np.ndarray   # [num_episodes]

    def metrics(self, env: str, prefix: str = "") -> dict[str, float]:
        """Mean and std of the returns and lengths (and of the D4RL scores, where ``env`` has reference returns), keyed
        ``{prefix}target_{int(target)}_...`` (a target that is no whole number: ``target_0.7_...``)."""
        spec = get_env_spec(env)
        t = float(self.target)
        key = f"{prefix}target_{int(t) if t.is_integer() else format(t, 'g')}"   # (0.5 and 0.7 are two keys)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite returns: NaN / inf, reported by the caller
            return self._metrics(spec, key)

    def _metrics(self, spec, key: str) -> dict[str, float]:
        return {
            f"{key}_return_mean": float(np.mean(self.returns)),
            f"{key}_return_std": float(np.std(self.returns)),
            f"{key}_length_mean": float(np.mean(self.lengths)),
            f"{key}_length_std": float(np.std(self.lengths)),
            **spec.score_metrics(key, self.returns),  # none for an env without D4RL reference returns
        }


class LocalEnvs:
    """Envs stepped in this process, with the interface of ``EnvWorkers``. A step happens at ``step_async``, as soon
    as its actions are on the host, so that with overlapped groups the CPU steps one group's envs while the GPU still
    computes the forwards of the later groups; ``step_wait`` hands the results back in the order of the steps."""

    def __init__(self, envs: list):
        self.envs, self._results = envs, collections.deque()

    def reset(self, n: int, seed: int, mode: str) -> np.ndarray:
        """Forget steps never waited for and reset the first ``n`` envs for an evaluation seeded ``seed`` (``mode`` as
        ``initial_obs``); initial observations [n, ds]."""
        self._results.clear()  # steps never waited for (an evaluation interrupted between step_async and step_wait)
        return np.stack([initial_obs(self.envs[i], seed, i, mode) for i in range(n)])

    def step_async(self, idx: np.ndarray, actions: np.ndarray):
        """Step the envs ``idx`` with ``actions`` [len(idx), da] now and queue the result for ``step_wait``."""
        self._results.append(step_envs([self.envs[i] for i in idx], actions))

    def step_wait(self):
        """The oldest queued step's (observations [n, ds], rewards [n], episode over [n])."""
        return self._results.popleft()


class EnvPool:
    """Gymnasium envs reused across evaluations (creating MuJoCo envs is not free). With ``workers`` > 0 the batched
    evaluation steps them in up to that many worker processes (``env_workers.EnvWorkers``, one per episode at most),
    started on first use; started again when an evaluation needs more of them than run, or after one failed or was
    interrupted (Ctrl-C) midway or a worker exited."""

    def __init__(self, env: str, version: str = DEFAULT_ENV_VERSION, workers: int = 0):
        self.env, self.version, self.workers = env, version, int(workers)
        self.envs: list = []
        self._remote = None

    def get(self, n: int) -> list:
        """The first ``n`` envs of the pool, created as needed."""
        while len(self.envs) < n:
            self.envs.append(make_env(self.env, self.version))
        return self.envs[:n]

    def stepper(self, n: int):
        """What steps the envs of an n-episode evaluation: worker processes, or envs of this process."""
        if self.workers > 0 and n > 1:
            want = min(self.workers, n)
            if self._remote is not None and (not self._remote.usable or self._remote.workers < want):
                self._remote.close()
                self._remote = None
            if self._remote is None:
                from decision_transformer.env_workers import EnvWorkers

                self._remote = EnvWorkers(self.env, self.version, want)
            return self._remote
        return LocalEnvs(self.get(n))

    def close(self):
        """Close the pool's envs and worker processes; a later evaluation creates them again."""
        for e in self.envs:
            e.close()
        self.envs = []
        if self._remote is not None:
            self._remote.close()
            self._remote = None


def env_pool(env: str, version: str, workers, device, num_episodes: int) -> EnvPool:
    """The pool of a run: ``workers`` from ``--eval_workers`` (``auto``: ``default_env_workers``)."""
    if workers in (None, "auto"):
        workers = default_env_workers(device, num_episodes)
    return EnvPool(env, version, workers=int(workers))


def default_env_workers(device, num_episodes: int) -> int:
    """``--eval_workers auto``: on CUDA, where the forward is cheap and stepping the envs one after another in the
    main process is what an evaluation step waits for, up to 8 worker processes (one core left for the main process,
    one env per worker at least); none on CPU, where the forward needs the cores."""
    from decision_transformer.cpu import available_cpus

    if torch.device(device).type != "cuda" or num_episodes < 8:
        return 0
    return max(0, min(8, len(available_cpus()) - 1, num_episodes))


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device: torch.device):
    """The side stream graphs are captured on, one per GPU for the process: cuBLAS keeps a workspace for each stream
    it has run on, so a new stream for each evaluation would keep adding one."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return _CAPTURE_STREAMS[index]


class GraphedActions:
    """``model.get_action`` replayed from CUDA graphs, for the batched evaluation on a GPU, where a forward of the
    paper's DT is bound by kernel launches (about 2 ms each step on an H200, most of an evaluation step). One graph per
    input shape, captured when the shape first comes: the rows rounded up to a power of two (the rows beyond the live
    ones hold earlier inputs, finite; their actions are dropped), the window length 1..K. The graphs share one memory
    pool. The model must not change while this object is used (one evaluation). A capture that fails (an op of a
    custom model that a graph cannot hold) is a warning, and the evaluation goes on with plain forwards."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.eager = False

    def __call__(self, states, actions, rtg, timesteps):
        if self.eager:
            return self.model.get_action(states, actions, rtg, timesteps)
        m, t = states.shape[:2]
        key = (1 << (m - 1).bit_length(), t)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(key[0], (states, actions, rtg, timesteps))
            if entry is None:
                return self.model.get_action(states, actions, rtg, timesteps)
        inputs, out, graph = entry
        for buf, x in zip(inputs, (states, actions, rtg, timesteps)):
            buf[:m].copy_(x)
        graph.replay()
        return out[:m].clone()

    def _capture(self, rows: int, xs):
        import warnings

        inputs = [torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=self.device) for x in xs]
        for buf, x in zip(inputs, xs):
            buf[:len(x)].copy_(x)
        main, side = torch.cuda.current_stream(self.device), _capture_stream(self.device)
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                with no_host_sync():   # warm-up: lazy initialisations happen outside the capture
                    self.model.get_action(*inputs)
                out = capture(graph, lambda: self.model.get_action(*inputs), pool=self.pool)
        except Exception as e:  # noqa: BLE001 - any op a graph cannot hold: plain forwards from here on
            main.wait_stream(side)
            warnings.warn(f"evaluation: the model's forward could not be captured as a CUDA graph ({type(e).__name__}: "
                          f"{e}); evaluating with plain forwards", RuntimeWarning, stacklevel=3)
            self.eager = True
            return None
        main.wait_stream(side)
        return inputs, out, graph


def _host_copy_event(device: torch.device):
    """What tells that a group's actions, copied to the host without blocking, have arrived: on CUDA an event
    recorded after the copy on ``device``'s stream, where the copy was queued (``synchronize`` waits for it); None on
    the CPU, where the copy is done on return."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _eval_setup(model, env: str, device, pool: EnvPool | None, env_version: str | None, mode: str):
    """(device, pool) of an evaluation: ``device`` None is the model's; a given pool must hold ``env`` (walker2d and
    halfcheetah share their state and action sizes, so another env's pool would run without an error) and, where
    ``env_version`` is given, that version. The model must compute in float32, as the rollout buffers do."""
    check_mode(mode)
    own = float32_device(model, "evaluation")
    check_model_env(model, env, "evaluation")
    check_timestep_rows(model, get_env_spec(env).max_ep_len - 1, "evaluation", f"{env}'s episodes")
    device = checked_device(device) if device is not None else (own if own is not None else torch.device("cpu"))
    if pool is None:
        return device, EnvPool(env, env_version or DEFAULT_ENV_VERSION)
    if pool.env != env or (env_version is not None and pool.version != env_version):
        raise UserError(f"the env pool holds {pool.env} {pool.version} envs; this evaluation is of {env} "
                        f"{env_version or pool.version} (use one pool per env)")
    return device, pool


def _checked_conditioning(env: str, target, state_mean, state_std) -> tuple[float, np.ndarray, np.ndarray]:
    """(target, state_mean, state_std) of an evaluation: a finite target; the statistics as
    ``data.checked_state_stats`` wants them (a zero or NaN std turned every state into inf or NaN)."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(target):
        raise UserError(f"evaluation: the return target must be a finite number, got {target!r}")
    mean, std = checked_state_stats(state_mean, state_std, env, "evaluation: ", stored=False)
    return float(target), mean, std


@torch.no_grad()
def evaluate_episodes(model, env: str, target: float, num_episodes: int, state_mean, state_std, *,
                      seed: int = 0, mode: str = "normal", device=None, pool: EnvPool | None = None,
                      env_version: str | None = None, progress=None,
                      overlap_groups: int | None = None, cuda_graphs: bool | None = None) -> EvalResult:
    """Roll out ``num_episodes`` return-conditioned episodes in lockstep with one batched forward per env step.

    ``device`` defaults to the model's; ``pool`` (envs kept between evaluations, ``EnvPool``) must be of ``env``;
    ``env_version`` defaults to the pool's, or v4. The model runs in eval mode and is left in the mode it was in.
    ``overlap_groups`` (default 1) splits the live episodes into groups whose forwards are all launched before any
    env is stepped, so the GPU computes later groups while the CPU steps earlier ones. ``cuda_graphs`` (default: on
    CUDA) replays the forwards from CUDA graphs (``GraphedActions``); the CPU has none."""
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, numbers.Integral) or num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes!r} (an integer number of episodes)")
    device, pool = _eval_setup(model, env, device, pool, env_version, mode)
    target, state_mean, state_std = _checked_conditioning(env, target, state_mean, state_std)
    # on a GPU other than the current one, the pinned host copies and their events belong to the model's GPU
    on_gpu = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with module_mode(model, False), on_gpu:
        graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device; this evaluation runs on {device}")
        get_action = GraphedActions(model, device) if graphs else model.get_action
        return _evaluate_batched(get_action, model.config.max_length, env, target, num_episodes, state_mean,
                                 state_std, seed, mode, device, pool, progress, overlap_groups)


def _evaluate_batched(get_action, K, env, target, num_episodes, state_mean, state_std, seed, mode, device, pool,
                      progress, overlap_groups) -> EvalResult:
    spec = get_env_spec(env)
    envs = pool.stepper(num_episodes)
    M, L = num_episodes, spec.max_ep_len
    mean = torch.as_tensor(state_mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(state_std, dtype=torch.float32, device=device)

    # History buffers, [M, L(+1), ...]: states hold normalised observations, rtg the conditioning returns.
    states = torch.zeros(M, L + 1, spec.state_dim, device=device)
    actions = torch.zeros(M, L, spec.act_dim, device=device)
    rtg = torch.zeros(M, L + 1, 1, device=device)
    timesteps = torch.arange(L + 1, device=device).unsqueeze(0).expand(M, -1)
    obs0 = envs.reset(M, seed, mode)
    states[:, 0] = (torch.as_tensor(obs0, device=device).to(torch.float32) - mean) / std
    rtg[:, 0, 0] = torch.tensor(target / spec.scale, dtype=torch.float32)

    returns = np.zeros(M)
    lengths = np.zeros(M, dtype=np.int64)
    live = np.ones(M, dtype=bool)
    cuda = device.type == "cuda"
    groups = overlap_groups or 1
    for t in range(L):
        idx = np.flatnonzero(live)
        if len(idx) == 0:
            break
        lo = max(0, t + 1 - K)
        # Launch the forward of every group first; on a GPU they run while the CPU steps the envs of the groups
        # whose actions are already back. Each episode's action depends on its own history only.
        pending = []
        splits = np.array_split(idx, min(groups, len(idx)))
        # the indices go to the device in one copy that does not wait for it (a blocking copy per group would wait
        # for the previous group's forward, and the groups would run one after another)
        on_device = torch.split(to_device_async(torch.from_numpy(idx), device), [len(g) for g in splits])
        for g, ti in zip(splits, on_device):
            # the current step's action slot is zero, as the originals' placeholder
            act = get_action(states[ti, lo:t + 1], actions[ti, lo:t + 1], rtg[ti, lo:t + 1], timesteps[ti, lo:t + 1])
            actions[ti, t] = act
            host = act.detach().to("cpu", torch.float32, non_blocking=cuda)
            pending.append((g, ti, host, _host_copy_event(device)))
        # Each group's envs step as soon as its actions are on the host (in this process at step_async, in worker
        # processes meanwhile), while the GPU still computes the forwards of the groups after it.
        for g, ti, host, done_event in pending:
            if done_event is not None:
                done_event.synchronize()
            envs.step_async(g, host.numpy())
        for g, ti, host, done_event in pending:
            new_obs, rewards, done = envs.step_wait()
            returns[g] += rewards
            lengths[g] += 1
            live[g[done]] = False
            states[ti, t + 1] = (torch.as_tensor(new_obs, device=device).to(torch.float32) - mean) / std
            decrement = torch.as_tensor(rewards, device=device).to(torch.float32) / spec.scale
            if mode == "delayed":
                decrement = torch.zeros_like(decrement)
            rtg[ti, t + 1, 0] = rtg[ti, t, 0] - decrement
            if progress is not None:
                progress.update(int(len(g) - live[g].sum()))
    return EvalResult(target, returns, lengths)


@torch.no_grad()
def rollout_episode(model, env_obj, target: float, state_mean, state_std, *, env: str, seed: int, index: int,
                    mode: str = "normal", device="cpu") -> tuple[float, int]:
    """One episode with a batch-1 forward per step: the originals' ``evaluate_episode_rtg`` loop (slow path)."""
    check_mode(mode)
    spec = get_env_spec(env)
    model.eval()
    device = torch.device(device)
    mean = torch.as_tensor(state_mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(state_std, dtype=torch.float32, device=device)
    obs = initial_obs(env_obj, seed, index, mode)
    states = torch.as_tensor(obs, device=device).reshape(1, spec.state_dim).to(torch.float32)
    actions = torch.zeros((0, spec.act_dim), device=device, dtype=torch.float32)
    target_return = torch.tensor(target / spec.scale, device=device, dtype=torch.float32).reshape(1, 1)
    timesteps = torch.tensor(0, device=device, dtype=torch.long).reshape(1, 1)
    ep_return, ep_len = 0.0, 0
    for t in range(spec.max_ep_len):
        actions = torch.cat([actions, torch.zeros((1, spec.act_dim), device=device)], dim=0)
        action = model.get_action(((states - mean) / std)[None], actions[None],
                                  target_return.reshape(1, -1, 1), timesteps)[0]
        actions[-1] = action
        obs, reward, terminated, truncated, _ = env_obj.step(action.detach().cpu().numpy())
        states = torch.cat([states, torch.as_tensor(obs, device=device).reshape(1, spec.state_dim).to(torch.float32)])
        pred_return = target_return[0, -1] - (torch.tensor(reward, dtype=torch.float32, device=device) / spec.scale
                                              if mode != "delayed" else 0)
        target_return = torch.cat([target_return, pred_return.reshape(1, 1)], dim=1)
        timesteps = torch.cat([timesteps, torch.ones((1, 1), device=device, dtype=torch.long) * (t + 1)], dim=1)
        ep_return += reward
        ep_len += 1
        if terminated or truncated:
            break
    return ep_return, ep_len


def evaluate_episodes_sequential(model, env: str, target: float, num_episodes: int, state_mean, state_std, *,
                                 seed: int = 0, mode: str = "normal", device=None, pool: EnvPool | None = None,
                                 env_version: str | None = None) -> EvalResult:
    """The slow path: episodes one after another with batch-1 forwards (benchmarks and equivalence tests). Arguments
    as ``evaluate_episodes``."""
    device, pool = _eval_setup(model, env, device, pool, env_version, mode)
    target, state_mean, state_std = _checked_conditioning(env, target, state_mean, state_std)
    env_obj = pool.get(1)[0]
    with module_mode(model, False):
        out = [rollout_episode(model, env_obj, target, state_mean, state_std, env=env, seed=seed, index=i, mode=mode,
                               device=device) for i in range(num_episodes)]
    return EvalResult(target, np.array([r for r, _ in out]), np.array([n for _, n in out], dtype=np.int64))
