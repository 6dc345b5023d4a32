"""Soft Actor-Critic for the behaviour policies of the D4RL-style datasets (D4RL trained its policies with SAC).

Hyper-parameters are the usual SAC ones that D4RL's behaviour policies used: 256-256 ReLU MLPs, batch 256, Adam
3e-4 for actor, critics and temperature, discount 0.99, Polyak 5e-3, automatic entropy tuning with target
-|A|, tanh-squashed Gaussian actor, one gradient update per environment step.

Speed on a few CPU cores (measured by ``benchmarks/bench_sac.py``) comes from:

* the two critics are one ensemble: weights ``[E, in, out]`` and one ``baddbmm`` per layer instead of two MLPs;
* the actor loss reads the critics through *detached* weights, so autograd computes only the gradient with
  respect to the action (no wasted weight-gradient matmuls), and critic, actor and temperature losses share one
  backward pass and one fused (foreach) Adam step over all parameters;
* target networks are updated with a single ``_foreach_lerp_``; no ``.item()`` per update (statistics stay tensors
  and are read every few thousand steps);
* optionally the whole loss computation is compiled with ``torch.compile`` (``compile=True``);
* environment interaction uses a NumPy view of the actor weights (no torch dispatch per env step).

``update_reference`` is the textbook formulation (two separate critic modules, three backward passes, three
optimisers, per-parameter Polyak loop, ``.item()`` logging); the benchmark compares both and a test checks that
they compute the same gradients.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
#: matmul types of the hidden layers in the training update (``SAC(precision=...)``); weights, optimiser state, output
#: layers, losses and environment interaction stay float32
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class SACConfig:
    """SAC hyper-parameters: MLP width, batch size, Adam learning rate, discount, Polyak rate, number of critics and
    initial temperature."""

    hidden: int = 256
    batch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 5e-3
    num_critics: int = 2
    init_alpha: float = 1.0


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------

class Actor(nn.Module):
    """obs [B, ds] -> tanh-squashed Gaussian over actions [B, da]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.l1 = nn.Linear(obs_dim, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 2 * act_dim)
        self.act_dim = act_dim

    def dist_params(self, obs, dtype: torch.dtype | None = None):
        """``dtype`` (e.g. bfloat16): the hidden layers' matmuls in that type; the head stays in float32."""
        if dtype is None:
            h = F.relu(self.l2(F.relu(self.l1(obs))))
        else:
            h = F.relu(F.linear(obs.to(dtype), self.l1.weight.to(dtype), self.l1.bias.to(dtype)))
            h = F.relu(F.linear(h, self.l2.weight.to(dtype), self.l2.bias.to(dtype))).float()
        mean, log_std = self.head(h).chunk(2, dim=-1)                     # [B, da] each
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs, generator=None):
        """Reparameterised sample and its log-probability (with the tanh change of variables)."""
        mean, log_std = self.dist_params(obs)
        std = log_std.exp()
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        u = mean + std * eps
        # log N(u; mean, std) - sum log(1 - tanh(u)^2), the latter in the stable form 2 (log 2 - u - softplus(-2u))
        logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), logp


class CriticEnsemble(nn.Module):
    """E independent Q-functions evaluated with batched matmuls: (obs [B, ds], act [B, da]) -> Q [E, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, num: int = 2):
        super().__init__()
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            # nn.Linear's default init, drawn independently per member
            layers = [nn.Linear(fan_in, fan_out) for _ in range(num)]
            self.weights.append(nn.Parameter(torch.stack([l.weight.detach().T for l in layers])))   # [E, in, out]
            self.biases.append(nn.Parameter(torch.stack([l.bias.detach()[None] for l in layers])))  # [E, 1, out]
        self.num = num

    def forward(self, obs, act, detach_params: bool = False, dtype: torch.dtype | None = None):
        """``dtype`` (e.g. bfloat16): the hidden layers' matmuls in that type; the output layer stays in float32."""
        x = torch.cat([obs, act], dim=-1).unsqueeze(0).expand(self.num, -1, -1)   # [E, B, ds + da]
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            if i < n - 1:
                if dtype is not None:
                    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
                x = F.relu(torch.baddbmm(b, x, w))                                 # [E, B, out]
            else:
                x = torch.baddbmm(b, x.float(), w)
        return x.squeeze(-1)                                                       # [E, B]


# ----------------------------------------------------------------------------------------------------------------
# NumPy actor: fast single-observation (or small-batch) inference for environment interaction and dataset rollouts
# ----------------------------------------------------------------------------------------------------------------

class NumpyActor:
    """The actor's forward pass in NumPy (float32). Built from a state dict; with ``share=True`` on a live torch
    actor the arrays are views of its parameters, so optimiser updates are seen without copying."""

    def __init__(self, state: dict):
        def arr(k):
            """State-dict entry ``k`` as a float32 array: a view of a float32 tensor, anything else a converted copy."""
            v = state[k]
            return v.detach().numpy() if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else \
                np.asarray(v.float().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)

        self.w1, self.b1 = arr("l1.weight"), arr("l1.bias")
        self.w2, self.b2 = arr("l2.weight"), arr("l2.bias")
        self.w3, self.b3 = arr("head.weight"), arr("head.bias")
        self.act_dim = self.w3.shape[0] // 2
        self.obs_dim = self.w1.shape[1]
        self._t = [torch.from_numpy(a) for a in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)]

    @classmethod
    def from_module(cls, actor: Actor) -> NumpyActor:
        """A NumPy actor on views of ``actor``'s live parameters, so it follows the optimiser's updates."""
        return cls(dict(actor.state_dict(keep_vars=True)))

    def dist_params(self, obs: np.ndarray):
        """``obs`` [ds] or [B, ds] -> (mean, log-std clipped to [LOG_STD_MIN, LOG_STD_MAX]) as float32 arrays
        [..., da]."""
        # The matmuls go through torch on zero-copy views: NumPy's BLAS starts its own thread pool, which on a
        # shared few-core machine made a [16, 17] x [17, 256] product ~20x slower than single-threaded.
        x = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
        with torch.no_grad():
            h = torch.relu(F.linear(x, self._t[0], self._t[1]))
            h = torch.relu(F.linear(h, self._t[2], self._t[3]))
            out = F.linear(h, self._t[4], self._t[5]).numpy()
        mean, log_std = out[..., : self.act_dim], out[..., self.act_dim:]
        return mean, np.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)

    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None):
        """(action, log-probability). With ``rng`` a sample from the squashed Gaussian, else tanh(mean) and the
        log-density of that mean action."""
        mean, log_std = self.dist_params(obs)
        eps = rng.standard_normal(mean.shape).astype(np.float32) if rng is not None else np.zeros_like(mean)
        u = mean + np.exp(log_std) * eps
        logp = (-0.5 * eps ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))).sum(-1)
        return np.tanh(u).astype(np.float32), logp.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Agent
# ----------------------------------------------------------------------------------------------------------------

class SAC:
    """Actor, critic ensemble, target critics, temperature and one Adam over all of them."""

    def __init__(self, obs_dim: int, act_dim: int, config: SACConfig | None = None, *, seed: int = 0,
                 compile: bool = False, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.matmul_dtype = PRECISIONS[precision]
        self.config = config or SACConfig()
        c = self.config
        self.obs_dim, self.act_dim = obs_dim, act_dim
        torch.manual_seed(seed)
        self.actor = Actor(obs_dim, act_dim, c.hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, c.hidden, c.num_critics)
        self.critic_target = CriticEnsemble(obs_dim, act_dim, c.hidden, c.num_critics)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(c.init_alpha)))
        self.target_entropy = -float(act_dim)
        self.params = list(self.actor.parameters()) + list(self.critic.parameters()) + [self.log_alpha]
        self.optimizer = torch.optim.Adam(self.params, lr=c.lr, foreach=True)
        self._online = list(self.critic.parameters())
        self._target = list(self.critic_target.parameters())
        self.generator = torch.Generator().manual_seed(seed)
        self.num_updates = 0
        self._loss_fn = torch.compile(self._losses, dynamic=False) if compile else self._losses
        # the foreach Adam step compiled into one fused loop over all parameters
        self._opt_step = torch.compile(self.optimizer.step, dynamic=False) if compile else self.optimizer.step

    # -- the fast update ---------------------------------------------------------------------------------------
    def _losses(self, obs, act, rew, next_obs, done, noise_next, noise_pi):
        c = self.config
        dt = self.matmul_dtype
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_a, next_logp = self._sample_with_noise(next_obs, noise_next)
            q_next = self.critic_target(next_obs, next_a, dtype=dt).min(dim=0).values    # [B]
            y = rew + c.gamma * (1.0 - done) * (q_next - alpha * next_logp)              # [B]
        q = self.critic(obs, act, dtype=dt)                                                # [E, B]
        critic_loss = 0.5 * (q - y).pow(2).mean(dim=1).sum()
        a_pi, logp = self._sample_with_noise(obs, noise_pi)
        q_pi = self.critic(obs, a_pi, detach_params=True, dtype=dt).min(dim=0).values    # grads reach a_pi only
        actor_loss = (alpha * logp - q_pi).mean()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        total = critic_loss + actor_loss + alpha_loss
        return total, torch.stack([critic_loss, actor_loss, alpha_loss, alpha, logp.detach().mean()])

    def _sample_with_noise(self, obs, eps):
        mean, log_std = self.actor.dist_params(obs, self.matmul_dtype)
        u = mean + log_std.exp() * eps
        logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), logp

    def update(self, obs, act, rew, next_obs, done) -> torch.Tensor:
        """One SAC step on a batch (tensors [B, ...]); returns a stats tensor (critic, actor, alpha loss, alpha,
        mean log-prob) without synchronising."""
        b = obs.shape[0]
        noise = torch.randn((2, b, self.act_dim), generator=self.generator)
        total, stats = self._loss_fn(obs, act, rew, next_obs, done, noise[0], noise[1])
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._opt_step()
        with torch.no_grad():
            torch._foreach_lerp_(self._target, self._online, self.config.tau)
        self.num_updates += 1
        return stats

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resume needs: config, sizes, actor, critics and target critics, temperature, Adam state, the noise
        generator's state and the update count."""
        return {
            "config": asdict(self.config), "obs_dim": self.obs_dim, "act_dim": self.act_dim,
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the networks, temperature, Adam state, noise generator and update count of a ``state_dict`` (its
        config and sizes are not read)."""
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.num_updates = int(state["num_updates"])


# ----------------------------------------------------------------------------------------------------------------
# The textbook update (baseline for the benchmark and the equivalence test)
# ----------------------------------------------------------------------------------------------------------------

class _MLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))

    def forward(self, x):
        """``x`` [B, sizes[0]] -> [B, sizes[-1]]: the Linear layers, a ReLU between each two (none after the last)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ReferenceSAC:
    """Plain SAC as usually written: two critic modules, three optimisers and backward passes, a Python Polyak
    loop and ``.item()`` statistics. Shares the actor class so both can start from the same weights."""

    def __init__(self, obs_dim, act_dim, config: SACConfig | None = None, seed: int = 0):
        self.config = c = config or SACConfig()
        torch.manual_seed(seed)
        self.actor = Actor(obs_dim, act_dim, c.hidden)
        self.qs = nn.ModuleList(_MLP([obs_dim + act_dim, c.hidden, c.hidden, 1]) for _ in range(c.num_critics))
        self.q_targets = nn.ModuleList(_MLP([obs_dim + act_dim, c.hidden, c.hidden, 1]) for _ in range(c.num_critics))
        self.q_targets.load_state_dict(self.qs.state_dict())
        self.log_alpha = nn.Parameter(torch.tensor(math.log(c.init_alpha)))
        self.target_entropy = -float(act_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.lr)
        self.critic_opt = torch.optim.Adam(self.qs.parameters(), lr=c.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=c.lr)
        self.act_dim = act_dim

    def load_from(self, fast: SAC):
        """Copy weights from a fast agent (ensemble member e -> critic module e)."""
        self.actor.load_state_dict(fast.actor.state_dict())
        for src, dst in ((fast.critic, self.qs), (fast.critic_target, self.q_targets)):
            for e, mlp in enumerate(dst):
                for layer, w, b in zip(mlp.layers, src.weights, src.biases):
                    layer.weight.data.copy_(w.data[e].T)
                    layer.bias.data.copy_(b.data[e, 0])
        self.log_alpha.data.copy_(fast.log_alpha.data)

    def q_all(self, modules, obs, act):
        """Q-values of every critic in ``modules``: obs [B, ds], act [B, da] -> [E, B]."""
        x = torch.cat([obs, act], dim=-1)
        return torch.stack([m(x).squeeze(-1) for m in modules])

    def update(self, obs, act, rew, next_obs, done, noise_next=None, noise_pi=None):
        """One textbook SAC step on a batch (tensors [B, ...]): all losses from the pre-update networks, then actor,
        critic and temperature steps and a Polyak update. ``noise_next``/``noise_pi`` [B, da]: the action noise (drawn
        when None). Returns critic loss, actor loss and alpha as floats."""
        c = self.config
        b = obs.shape[0]
        noise_next = torch.randn(b, self.act_dim) if noise_next is None else noise_next
        noise_pi = torch.randn(b, self.act_dim) if noise_pi is None else noise_pi
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            mean, log_std = self.actor.dist_params(next_obs)
            u = mean + log_std.exp() * noise_next
            logp = (-0.5 * noise_next ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) \
                - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
            q_next = self.q_all(self.q_targets, next_obs, torch.tanh(u)).min(0).values
            y = rew + c.gamma * (1 - done) * (q_next - alpha * logp)
        q = self.q_all(self.qs, obs, act)
        critic_loss = sum(0.5 * F.mse_loss(q[e], y) for e in range(len(self.qs)))
        mean, log_std = self.actor.dist_params(obs)
        u = mean + log_std.exp() * noise_pi
        logp = (-0.5 * noise_pi ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) \
            - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        q_pi = self.q_all(self.qs, obs, torch.tanh(u)).min(0).values
        actor_loss = (alpha * logp - q_pi).mean()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        # all losses from the same pre-update networks (as rlkit), then one step per optimiser
        self.actor_opt.zero_grad()
        actor_loss.backward()          # also leaves gradients on the critics: cleared before their own backward
        self.actor_opt.step()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            for p, tp in zip(self.qs.parameters(), self.q_targets.parameters()):
                tp.mul_(1 - c.tau).add_(c.tau * p)
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item()}


# ----------------------------------------------------------------------------------------------------------------
# Behaviour-policy training: resumable, in chunks, with the snapshots that medium-replay is regenerated from
# ----------------------------------------------------------------------------------------------------------------

POLICY_FORMAT = "dt-toolkit-sac-actor-v1"
#: a resume without its replay buffer first refills it with this many steps of the current policy (at most its steps)
REFILL_STEPS = 25_000


class ReplayBuffer:
    """Flat ring buffer of tensors (no per-sample Python)."""

    def __init__(self, obs_dim, act_dim, capacity):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.obs = torch.zeros(capacity, obs_dim)
        self.act = torch.zeros(capacity, act_dim)
        self.rew = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.done = torch.zeros(capacity)

    def add(self, obs, act, rew, next_obs, done):
        """Store one transition (NumPy observations and action, scalar reward and done) at the pointer, overwriting the
        oldest once full."""
        i = self.ptr
        self.obs[i] = torch.from_numpy(obs)
        self.act[i] = torch.from_numpy(act)
        self.rew[i] = float(rew)
        self.next_obs[i] = torch.from_numpy(next_obs)
        self.done[i] = float(done)
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, generator):
        """``batch_size`` stored transitions, drawn uniformly with replacement: obs [B, ds], act [B, da], rew [B],
        next_obs [B, ds], done [B]."""
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx]

    def save(self, path):
        """Write the filled rows and the pointer to ``path`` as an ``.npz``, atomically."""
        from decision_transformer.files import atomic_write

        n = self.size

        def write(tmp):
            """Write the ``.npz`` to the temporary file ``tmp``."""
            with open(tmp, "wb") as f:
                np.savez(f, obs=self.obs[:n].numpy(), act=self.act[:n].numpy(), rew=self.rew[:n].numpy(),
                         next_obs=self.next_obs[:n].numpy(), done=self.done[:n].numpy(), ptr=np.int64(self.ptr))

        atomic_write(path, write)

    def load(self, path):
        """Read a ``save``d buffer into the first rows; size and pointer as saved. A file that is not such a buffer
        for this buffer's sizes (not an ``.npz``, missing arrays, other shapes, more rows than the capacity, a pointer
        that does not fit them, NaN or inf) raises (``ValueError`` for the checks here) and leaves the buffer empty."""
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ("obs", "act", "rew", "next_obs", "done")}
            ptr = np.asarray(z["ptr"])
        n = len(arrays["rew"]) if arrays["rew"].ndim else -1
        shapes = {"obs": (n, self.obs.shape[1]), "act": (n, self.act.shape[1]), "rew": (n,),
                  "next_obs": (n, self.obs.shape[1]), "done": (n,)}
        for k, shape in shapes.items():
            if arrays[k].shape != shape or not np.issubdtype(arrays[k].dtype, np.number):
                raise ValueError(f"{k} has shape {arrays[k].shape} ({arrays[k].dtype}), expected {shape}")
            if not np.isfinite(arrays[k]).all():
                raise ValueError(f"{k} holds NaN or inf")
        if n > self.capacity:
            raise ValueError(f"{n} rows, more than the capacity {self.capacity}")
        if ptr.shape != () or not np.issubdtype(ptr.dtype, np.integer) or \
                not (0 <= int(ptr) < self.capacity if n == self.capacity else int(ptr) == n):
            raise ValueError(f"pointer {ptr.tolist()} does not fit {n} rows of capacity {self.capacity}")
        for k, a in arrays.items():
            getattr(self, k)[:n] = torch.from_numpy(a.astype(np.float32))
        self.size, self.ptr = n, int(ptr)

    def fingerprint(self) -> dict:
        """What the buffer holds, as the training state records it: capacity, size, pointer and a CRC-32 of the filled
        rows (a resume continues with a buffer on disk only when it is the one its state was saved with)."""
        import zlib

        crc = 0
        for k in ("obs", "act", "rew", "next_obs", "done"):
            crc = zlib.crc32(np.ascontiguousarray(getattr(self, k)[: self.size].numpy()), crc)
        return {"capacity": self.capacity, "size": self.size, "ptr": self.ptr, "crc32": crc}


def _first_non_finite(obj, prefix: str = "") -> str | None:
    """The dotted name of the first floating-point tensor or float in the nested dicts/lists ``obj`` that holds NaN
    or inf (e.g. ``actor.l1.weight``, ``optimizer.state.3.exp_avg``); None when all are finite."""
    if isinstance(obj, torch.Tensor):
        return prefix if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    if isinstance(obj, float):
        return prefix if not math.isfinite(obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _first_non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def actor_file_dict(actor_state: dict, env: str, *, step: int, half: bool = False, **meta) -> dict:
    """The on-disk form of a behaviour policy: plain tensors and scalars (``torch.load(weights_only=True)``)."""
    tensors = {k: (v.detach().to(torch.float16) if half else v.detach().clone()) for k, v in actor_state.items()}
    return {"format": POLICY_FORMAT, "env": env, "step": int(step), "actor": tensors, **meta}


def _atomic_torch_save(obj, path):
    """``checkpoint.atomic_save``: a temporary file of this process's own, synced, then renamed (a failed write is one
    line naming the file)."""
    from decision_transformer.checkpoint import atomic_save

    atomic_save(obj, path)


def evaluate_policy(actor: NumpyActor, env_name: str, episodes: int, seed: int) -> np.ndarray:
    """Returns of ``episodes`` episodes of the stochastic policy (the behaviour that generates the data)."""
    from decision_transformer.envs import make_env
    env = make_env(env_name)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            a, _ = actor.act(obs, rng)
            obs, r, term, trunc, _ = env.step(a)
            total += r
            done = term or trunc
        out.append(total)
    env.close()
    return np.asarray(out)


def _long_eval(actor_np, env_name, spec, episodes, step) -> tuple[float, float]:
    """(mean return, D4RL score) over ``episodes`` episodes, seeded apart from the screening evaluations."""
    rets = evaluate_policy(actor_np, env_name, episodes, seed=20_000_000 + step)
    return float(rets.mean()), float(spec.d4rl_score(rets.mean()))


def train_behaviour_policy(env_name: str, state_dir, policy_dir, **kwargs) -> dict:
    """``_train_behaviour_policy`` (see there) holding ``state_dir``'s lock: a second process training into the same
    state folder (its state, replay buffer and policy files) is a one-line ``UserError`` before anything is written."""
    from pathlib import Path

    from decision_transformer.envs import get_env_spec
    from decision_transformer.errors import UserError
    from decision_transformer.sweep import _lock_holder, _take_lock, _unlock, folder_lock_path

    get_env_spec(env_name)   # the flags' checks before the lock file is made beside state_dir
    roles = tuple(kwargs.get("roles", ("medium", "expert")))
    if not roles or set(roles) - {"medium", "expert"}:
        raise UserError(f"roles must be 'medium' and/or 'expert', got {list(roles)}")
    if "medium" in roles and kwargs.get("medium_score") is None:
        raise UserError("the medium role needs a target score (medium_score)")
    from decision_transformer.files import refuse_files_above

    refuse_files_above(state_dir, "--state_dir")   # (both before the locks and folders are made)
    refuse_files_above(Path(policy_dir) / "replay", "--policy_dir")
    fds = []
    try:
        # the state folder, and each role's policy files (medium.pt with replay/, expert.pt; the lock is a hidden
        # file beside the policy folder): runs of other state folders may write one policy folder, each its own role
        pol = Path(policy_dir)
        for where, lock, what, fix in [
                (state_dir, folder_lock_path(Path(state_dir)), "this behaviour policy", "--state_dir"),
                *[(policy_dir, pol.parent / f".{pol.name}.policy-{role}.lock", f"the {role} policy of {policy_dir}",
                   "--policy_dir (or another --roles)") for role in roles]]:
            taken, fd = _take_lock(lock)
            if not taken:
                raise UserError(f"{where}: another process is training {what} ({_lock_holder(lock) or lock}); wait "
                                f"for it to end (the same command then continues it), or give another {fix}")
            fds.append(fd)
        return _train_behaviour_policy(env_name, state_dir, policy_dir, **kwargs)
    finally:
        for fd in fds:
            _unlock(fd)


def _train_behaviour_policy(env_name: str, state_dir, policy_dir, *, total_steps: int = 1_000_000, seed: int = 0,
                           max_seconds: float | None = None, checkpoint_every_s: float = 300.0,
                           eval_every: int = 10_000, eval_episodes: int = 10, snapshot_every: int = 10_000,
                           start_steps: int = 5_000, medium_score: float | None = None, compile: bool = False,
                           config: SACConfig | None = None, buffer_capacity: int = 1_000_000,
                           keep_buffer: bool = True, roles: tuple[str, ...] = ("medium", "expert"),
                           long_eval_episodes: int = 50, medium_window: float = 15.0, medium_tolerance: float = 5.0,
                           medium_patience: int = 10, expert_window: float = 10.0, expert_score: float | None = None,
                           expert_tolerance: float = 5.0, precision: str = "fp32", log=print) -> dict:
    """Train (or continue training) SAC on ``env_name`` until ``total_steps`` env steps or ``max_seconds``.

    ``state_dir`` holds the small resumable state (``state.pt``: networks, Adam, RNGs, counters; ``progress.jsonl``)
    and, git-ignored, ``replay_buffer.npz``. ``policy_dir`` receives the behaviour policies named in ``roles``:

    * ``medium``: every ``eval_every`` steps the stochastic actor is screened with ``eval_episodes`` episodes; one
      whose D4RL score is within ``medium_window`` of ``medium_score`` is evaluated again over
      ``long_eval_episodes`` episodes, and the candidate closest to the target so far is ``medium.pt``. The search
      ends (the medium policy is final) at the first candidate within ``medium_tolerance`` of the target (5 points:
      about twice the standard error of a 50-episode mean), after ``medium_patience`` evaluations without a closer
      candidate, or at ``total_steps`` with a candidate (without one it stays open for a later call). Until then
      ``replay/actor_{step}.pt`` (float16 actor snapshots every ``snapshot_every`` steps, from which medium-replay
      is regenerated) are written, also by a run that does not search it; when it ends, the snapshots after the
      medium step are removed. A run whose only role is ``medium`` stops there.
    * ``expert``: an actor screened within ``expert_window`` of the best screen so far is evaluated over
      ``long_eval_episodes`` episodes; the best of those is ``expert.pt``, marked ``final`` once ``total_steps``
      is reached or, when ``expert_score`` (the target level, D4RL's expert average) is given, as soon as a
      candidate scores at least ``expert_score - expert_tolerance`` (a resume applies this to the best candidate
      in hand). The run stops when all of its roles are final.

    A fresh run (no ``state.pt``) first moves the policy files of its roles that another run left in ``policy_dir``
    to ``state_dir/previous/``, so that a medium policy and its replay snapshots always come from one run.
    Checkpoints are written at episode boundaries every ``checkpoint_every_s`` seconds and at the end.

    The state records which replay buffer it was saved with (size, pointer, CRC-32): a resume continues with
    ``replay_buffer.npz`` when it is that buffer. Without it (fresh machine, another buffer, or a damaged file: a
    ``note:`` line, and the file is replaced at the next checkpoint), training resumes after refilling the buffer with
    ``min(steps, REFILL_STEPS)`` steps of the current policy, which are not counted as training steps. A state
    holding NaN or inf (a diverged run) is refused, and a NaN score is never a candidate. An interrupt during an
    evaluation (or the update just before it) leaves that evaluation due: the resume runs it first. A resume keeps
    the state's ``seed``. ``precision`` (``fp32`` or ``bf16``: the hidden layers' matmuls of the update) may change
    between resumes; the state records from which step each was used.
    """
    import json
    import time
    from pathlib import Path

    from decision_transformer.envs import get_env_spec, make_env
    from decision_transformer.errors import UserError

    spec = get_env_spec(env_name)
    state_dir, policy_dir = Path(state_dir), Path(policy_dir)
    state_path, buffer_path = state_dir / "state.pt", state_dir / "replay_buffer.npz"
    progress_path = state_dir / "progress.jsonl"
    try:
        agent = SAC(spec.state_dim, spec.act_dim, config, seed=seed, compile=compile, precision=precision)
    except ValueError as e:
        raise UserError(str(e)) from None
    buffer = ReplayBuffer(spec.state_dim, spec.act_dim, buffer_capacity)
    rng = np.random.default_rng(seed)
    roles = tuple(roles)   # (checked by train_behaviour_policy)
    state_dir.mkdir(parents=True, exist_ok=True)
    (policy_dir / "replay").mkdir(parents=True, exist_ok=True)
    meta = {"env_steps": 0, "episodes": 0, "medium_step": None, "medium_eval": None, "medium_final": False,
            "medium_stale": 0,
            "best_eval": None, "best_step": None, "expert_screen": None, "expert_final": False, "seed": seed,
            "start_steps": start_steps,
            "snapshot_every": snapshot_every, "wall_seconds": 0.0}
    if state_path.exists():
        try:
            state = torch.load(state_path, weights_only=True, map_location="cpu")
            agent.load_state_dict(state["agent"])
            saved = json.loads(state["meta"])
            if "medium_final" not in saved:  # a state from before the medium search: its first pick stays
                saved["medium_final"] = saved.get("medium_step") is not None
            # a role final without any policy: what earlier versions stored for a role a run did not train
            if saved.get("medium_final") and saved.get("medium_step") is None:
                saved["medium_final"] = False
            if saved.get("expert_final") and saved.get("best_step") is None:
                saved["expert_final"] = False
            meta.update(saved)
            rng.bit_generator.state = json.loads(state["numpy_rng"])
        except Exception as e:  # noqa: BLE001 - any failure to read the state is the same user-facing problem
            raise UserError(f"{state_path}: cannot resume from this training state ({type(e).__name__}: {e}); "
                            f"move it away to start again") from None
        # a diverged (or damaged) state would train on NaN and write NaN policies marked final
        bad = _first_non_finite(state["agent"])
        if bad is not None:
            raise UserError(f"{state_path}: cannot resume from this training state: {bad} holds NaN or inf (training "
                            f"diverged, or the file is damaged); move it away to start again")
        # a NaN score that an earlier version stored is no score: the next finite candidate replaces it
        for score, reset in (("best_eval", ("best_step", "expert_final")), ("expert_screen", ()),
                             ("medium_eval", ("medium_step", "medium_final"))):
            if isinstance(meta[score], float) and not math.isfinite(meta[score]):
                log(f"note: {state_path}: its {score} is {meta[score]}; treated as none yet")
                meta[score] = None
                meta.update({k: False if k.endswith("_final") else None for k in reset})
        if meta["seed"] != seed:
            log(f"note: resuming with the state's seed {meta['seed']} (asked {seed})")
            seed = meta["seed"]   # the env seeds of the episodes to come follow the state's
        resumed_buffer = False
        if buffer_path.exists():
            try:
                buffer.load(buffer_path)
            except Exception as e:  # noqa: BLE001 - an optional file: a damaged one is as good as a missing one
                buffer = ReplayBuffer(spec.state_dim, spec.act_dim, buffer_capacity)
                log(f"note: {buffer_path}: not a usable replay buffer ({type(e).__name__}: {str(e)[:120]}); refilling "
                    f"the buffer as if it were missing (the file is replaced at the next checkpoint)")
            else:
                if "buffer" in meta:   # the state records the buffer saved with it (None: none was saved)
                    resumed_buffer = meta["buffer"] is not None and buffer.fingerprint() == meta["buffer"]
                else:                  # a state from before that record: a buffer that never was refilled
                    resumed_buffer = buffer.ptr == meta["env_steps"] % buffer_capacity and \
                        buffer.size == min(meta["env_steps"], buffer_capacity)
        log(f"{env_name}: resuming at {meta['env_steps']} env steps "
            f"({'with' if resumed_buffer else 'without'} its replay buffer)")
    else:
        resumed_buffer = True
        _move_previous_policies(policy_dir, state_dir / "previous", roles, log)
    loaded = json.dumps(meta, sort_keys=True) if state_path.exists() else None
    # which update precision trained which steps (a resume may change it)
    meta.setdefault("precision_from_step", [])
    if not meta["precision_from_step"] or meta["precision_from_step"][-1][1] != precision:
        meta["precision_from_step"].append([meta["env_steps"], precision])
    medium_target = medium_score if "medium" in roles else None
    # the final flags of a role this run does not train are set for this run only: the state keeps what it had, so a
    # later run of that role carries on with its search
    kept_flags = {}
    if medium_target is None:
        kept_flags["medium_final"] = meta["medium_final"]
        meta["medium_final"] = True  # this run does not search (or touch) the medium policy
        if not kept_flags["medium_final"] and meta["env_steps"] > 0:
            log(f"note: {env_name}: this state's medium search is open, but a run without the medium role takes no "
                f"replay snapshots (they are the medium role's files): a medium policy this state finds later cannot "
                f"be turned into medium-replay")
    elif not meta["medium_final"] and meta["medium_step"] is not None and \
            abs(meta["medium_eval"] - medium_target) <= medium_tolerance:
        meta["medium_final"] = True  # already close enough under this tolerance
        _prune_snapshots(policy_dir / "replay", meta["medium_step"])
        log(f"{env_name}: the medium policy of step {meta['medium_step']} (score {meta['medium_eval']:.1f}) is final")
    expert_path = policy_dir / "expert.pt"

    def finalise_expert(why, reached=True):
        """Mark the best-evaluated actor as the final expert policy (``reached``: the search is over for good; at
        ``total_steps`` it is not, a later call with more steps trains on and may replace it)."""
        meta["expert_final"] = reached
        if not expert_path.exists():
            return
        best = torch.load(expert_path, weights_only=True)
        if not best.get("final"):
            best["final"] = True
            best["trained_steps"] = int(meta["env_steps"])
            _atomic_torch_save(best, expert_path)
            log(f"{env_name}: the expert policy of step {best.get('step')} (score {best.get('eval_score')}) is "
                f"final ({why})" + ("" if reached else "; a call with more --total_steps trains on and may replace it"))

    def expert_reached():
        """Whether the best long-evaluation score reaches ``expert_score - expert_tolerance`` (False without a
        target)."""
        return expert_score is not None and meta["best_eval"] is not None and \
            meta["best_eval"] >= expert_score - expert_tolerance

    if "expert" not in roles:
        kept_flags["expert_final"] = meta["expert_final"]
        meta["expert_final"] = True  # this run does not write the expert policy
    elif not meta.get("expert_final") and expert_reached():
        finalise_expert(f"it reaches the target {expert_score:.1f} within {expert_tolerance:g}")
    def end_of_training():
        """What reaching ``total_steps`` decides: the medium search ends with the closest candidate found (without
        one, a later call with more steps searches on), and the best expert so far is written final (a later call
        with more steps trains on and may replace it)."""
        if meta["env_steps"] < total_steps:
            return
        if not meta["medium_final"] and meta["medium_step"] is not None:
            meta["medium_final"] = True
            _prune_snapshots(policy_dir / "replay", meta["medium_step"])
        if "expert" in roles and not meta["expert_final"]:
            finalise_expert(f"training reached {total_steps} steps", reached=False)

    # (an evaluation that an interrupt cut short is still to run, also at total_steps)
    if loaded is not None and (meta["medium_final"] and meta["expert_final"] or
                               meta["env_steps"] >= total_steps and meta.get("eval_pending") is None):
        # nothing left to train: the state is left as it was (no refill that would advance its RNG, no wall time),
        # unless this call made a policy final under the rules asked for now
        end_of_training()
        changed = {k: v for k, v in {**meta, **kept_flags}.items() if k != "precision_from_step"} != \
            {k: v for k, v in json.loads(loaded).items() if k != "precision_from_step"}
        if changed:
            _atomic_torch_save({"agent": agent.state_dict(), "meta": json.dumps({**meta, **kept_flags}),
                                "numpy_rng": json.dumps(rng.bit_generator.state)}, state_path)
        log(f"{env_name}: nothing left to train for {' and '.join(roles)}"
            + ("" if meta["medium_final"] and meta["expert_final"] else
               f" up to {total_steps} env steps (more --total_steps trains on)") + f" (state: {state_path})")
        return meta
    actor_np = NumpyActor.from_module(agent.actor)  # views of the live weights
    env = make_env(env_name)
    t_start = time.perf_counter()
    wall0 = meta["wall_seconds"]

    def checkpoint():
        """Save the resumable state (agent, ``meta`` with the wall time so far, NumPy RNG) and, with ``keep_buffer``,
        the replay buffer (``meta["buffer"]`` records which: a resume continues with the file only if it is that
        one)."""
        meta["wall_seconds"] = wall0 + time.perf_counter() - t_start
        meta["buffer"] = buffer.fingerprint() if keep_buffer else None
        _atomic_torch_save({"agent": agent.state_dict(), "meta": json.dumps({**meta, **kept_flags}),
                            "numpy_rng": json.dumps(rng.bit_generator.state)}, state_path)
        if keep_buffer:
            buffer.save(buffer_path)

    if not resumed_buffer:  # refill so that updates do not start from an empty buffer
        buffer = ReplayBuffer(spec.state_dim, spec.act_dim, buffer_capacity)
        refill = min(meta["env_steps"], REFILL_STEPS)
        obs, _ = env.reset(seed=seed * 1_000_003 + 999_999)
        for _ in range(refill):
            a, _ = actor_np.act(obs, rng)
            nobs, r, term, trunc, _ = env.step(a)
            buffer.add(obs, a, r, nobs, term)
            obs = nobs
            if term or trunc:
                obs, _ = env.reset()

    obs, _ = env.reset(seed=seed * 1_000_003 + meta["episodes"])
    try:
        _train_loop(**locals())
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (see the script): keep the progress, then stop
        checkpoint()
        raise
    end_of_training()
    checkpoint()
    env.close()
    return meta


def _move_previous_policies(policy_dir, dest, roles, log):
    """Move the policy files of ``roles`` that an earlier run left in ``policy_dir`` to ``dest`` (nothing is lost)."""
    import shutil
    import time

    names = (["medium.pt", "replay"] if "medium" in roles else []) + (["expert.pt"] if "expert" in roles else [])
    found = [n for n in names if (policy_dir / n).exists() and not (
        (policy_dir / n).is_dir() and not any((policy_dir / n).iterdir()))]
    if not found:
        return
    target = dest / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for n in found:
        shutil.move(str(policy_dir / n), str(target / n))
    (policy_dir / "replay").mkdir(parents=True, exist_ok=True)
    log(f"moved the previous run's {', '.join(found)} from {policy_dir} to {target}")


def _prune_snapshots(folder, medium_step):
    """Remove the replay snapshots taken after the medium policy (medium-replay stops there)."""
    if medium_step is None:
        return
    for p in folder.glob("actor_*.pt"):
        try:
            step = int(p.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if step >= medium_step:
            p.unlink()


def expert_screen(best: float | None, score: float, window: float) -> float | None:
    """The best screening score so far once ``score`` has been screened, when ``score`` is within ``window`` of the
    best before it (or the first): that actor gets the long evaluation. None when it is not (no evaluation). A best
    of exactly 0.0 is a score like any other, not "none yet"; a NaN or infinite score (a diverged actor) is never a
    candidate, and a NaN best (stored by an earlier version) counts as none."""
    if not math.isfinite(score):
        return None
    if best is None or not math.isfinite(best):
        return score
    return max(score, best) if score >= best - window else None


def _train_loop(*, env_name, spec, agent, buffer, rng, meta, env, obs, actor_np, policy_dir, progress_path,
                total_steps, seed, snapshot_every, start_steps, eval_every, eval_episodes, medium_target,
                checkpoint, checkpoint_every_s, max_seconds, t_start, wall0, roles, long_eval_episodes,
                medium_window, medium_tolerance, medium_patience, expert_window, log, expert_reached,
                finalise_expert, expert_score, expert_tolerance, **_):
    import copy
    import json
    import time

    t_last_ckpt = t_start
    stats = None
    steps_at_start, t_rate = meta["env_steps"], time.perf_counter()
    def done():
        """Whether the medium and expert roles are both final (nothing left to train)."""
        return meta["medium_final"] and meta["expert_final"]

    def evaluate(step):
        """The evaluation due at ``step`` (``meta["eval_pending"]``): the screen, the medium and expert candidates'
        long evaluations and policy files, the progress record and the log line. An interrupt (Ctrl-C, SIGTERM) in
        it puts ``meta`` back as it was before, still pending, so the checkpoint that follows keeps it due and a
        resume runs it (its evaluations are seeded by the step: the same actor gets the same scores)."""
        before = copy.deepcopy(meta)
        try:
            _evaluate(step)
        except KeyboardInterrupt:
            meta.clear()
            meta.update(before)
            raise
        meta.pop("eval_pending", None)

    def _evaluate(step):
        nonlocal steps_at_start, t_rate
        rets = evaluate_policy(actor_np, env_name, eval_episodes, seed=10_000_000 + step)
        score = float(spec.d4rl_score(rets.mean()))
        now = time.perf_counter()
        rate = (step - steps_at_start) / max(now - t_rate, 1e-9)
        steps_at_start, t_rate = step, now
        rec = {"step": step, "return_mean": float(rets.mean()), "return_std": float(rets.std()),
               "score": score, "steps_per_s": rate,
               "wall_s": wall0 + now - t_start}
        if stats is not None:
            s = stats.tolist()
            rec.update(critic_loss=s[0], actor_loss=s[1], alpha=s[3], logp=s[4])
        closer, was_final = False, meta["medium_final"]
        if not meta["medium_final"] and abs(score - medium_target) <= medium_window:
            long = _long_eval(actor_np, env_name, spec, long_eval_episodes, step)
            rec["medium_candidate"] = long[1]
            # (a NaN long score is no candidate: it compares False either way)
            if math.isfinite(long[1]) and (meta["medium_step"] is None or
                                           abs(long[1] - medium_target) < abs(meta["medium_eval"] - medium_target)):
                closer = True
                meta["medium_step"], meta["medium_eval"] = step, long[1]
                _atomic_torch_save(actor_file_dict(agent.actor.state_dict(), env_name, step=step,
                                                   eval_return=long[0], eval_score=long[1],
                                                   eval_episodes=long_eval_episodes, kind="medium"),
                                   policy_dir / "medium.pt")
                rec["medium"] = True
            if abs(long[1] - medium_target) <= medium_tolerance:
                meta["medium_final"] = True
        if not meta["medium_final"] and meta["medium_step"] is not None:
            meta["medium_stale"] = 0 if closer else meta.get("medium_stale", 0) + 1
            if meta["medium_stale"] >= medium_patience:
                meta["medium_final"] = True
        if meta["medium_final"] and not was_final:      # the search ended here: medium-replay stops there
            _prune_snapshots(policy_dir / "replay", meta["medium_step"])
        screen = None if meta["expert_final"] else expert_screen(meta["expert_screen"], score, expert_window)
        if screen is not None:
            meta["expert_screen"] = screen
            long = _long_eval(actor_np, env_name, spec, long_eval_episodes, step)
            rec["expert_candidate"] = long[1]
            if math.isfinite(long[1]) and (meta["best_eval"] is None or long[1] > meta["best_eval"]):
                meta["best_eval"], meta["best_step"] = long[1], step
                _atomic_torch_save(actor_file_dict(agent.actor.state_dict(), env_name, step=step,
                                                   eval_return=long[0], eval_score=long[1],
                                                   eval_episodes=long_eval_episodes, kind="expert"),
                                   policy_dir / "expert.pt")
                rec["expert"] = True
            if expert_reached():
                finalise_expert(f"it reaches the target {expert_score:.1f} within {expert_tolerance:g}")
        try:
            with open(progress_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:   # (the state saved last resumes the run)
            from decision_transformer.errors import UserError, write_problem

            raise UserError(f"cannot write {progress_path}: {write_problem(progress_path, e)}") from None
        notes = [f"medium candidate {rec['medium_candidate']:.1f}" if "medium_candidate" in rec else "",
                 "medium policy saved" + (" (final)" if meta["medium_final"] else "") if rec.get("medium") else "",
                 f"medium policy of step {meta['medium_step']} final ({meta['medium_stale']} evaluations without "
                 f"a closer one)" if meta["medium_final"] and not was_final and not rec.get("medium") else "",
                 f"expert candidate {rec['expert_candidate']:.1f}" if "expert_candidate" in rec else "",
                 "expert policy saved" if rec.get("expert") else ""]
        notes = "; ".join(n for n in notes if n)
        log(f"{env_name} step {step}: return {rec['return_mean']:.1f} +- {rec['return_std']:.1f} "
            f"(score {score:.1f}), {rate:.1f} steps/s" + (f" -> {notes}" if notes else ""))

    if done():
        return  # nothing left to do for this run
    pending = meta.get("eval_pending")
    if pending is not None:
        if pending == meta["env_steps"]:   # an interrupt cut it short (or came before it): run it now
            log(f"{env_name}: running the evaluation of step {pending} that an interrupt cut short")
            evaluate(pending)
            if done():
                return
        meta.pop("eval_pending", None)
    while meta["env_steps"] < total_steps:
        step = meta["env_steps"]
        if step % snapshot_every == 0 and not meta["medium_final"]:
            _atomic_torch_save(actor_file_dict(agent.actor.state_dict(), env_name, step=step, half=True,
                                               covers=snapshot_every, uniform_before=start_steps),
                               policy_dir / "replay" / f"actor_{step:07d}.pt")
        if step < start_steps:
            a = rng.uniform(-1.0, 1.0, spec.act_dim).astype(np.float32)
        else:
            a, _ = actor_np.act(obs, rng)
        nobs, r, term, trunc, _ = env.step(a)
        buffer.add(obs, a, r, nobs, term)  # bootstrap through time-limit truncations
        obs = nobs
        meta["env_steps"] = step = step + 1
        if step % eval_every == 0:
            # due from here on: an interrupt in the update or the evaluation leaves it due in the checkpoint
            meta["eval_pending"] = step
        if buffer.size >= agent.config.batch_size and step > min(start_steps, 1000):
            stats = agent.update(*buffer.sample(agent.config.batch_size, agent.generator))
        if step % eval_every == 0:
            evaluate(step)
            if done():
                break
        if term or trunc:
            meta["episodes"] += 1
            obs, _ = env.reset(seed=seed * 1_000_003 + meta["episodes"])
            now = time.perf_counter()
            if now - t_last_ckpt >= checkpoint_every_s:
                checkpoint()
                t_last_ckpt = now
            if max_seconds is not None and now - t_start >= max_seconds:
                break
