"""Mutual Information Neural Estimation (Belghazi et al. 2018), as used by TAKAGI (via gtegner/mine-pytorch).

A statistics network T(x, y) (an MLP on the concatenation [x, y]) is trained to maximise a lower bound on I(X; Y):

* ``mine`` (default): the Donsker-Varadhan bound E_P[T] - log E_{P_X ⊗ P_Y}[e^T], with the moving-average gradient
  correction: the gradient of the log-mean-exp term, Σ_i ∇T_i e^{T_i} / (n · mean e^T), uses a running mean
  μ ← α·batch + (1 - α)·μ (α = 0.01, first value = the first batch) in the denominator, which removes the
  minibatch bias of the plain DV gradient. The forward value is the exact batch log-mean-exp.
* ``mine_biased``: the same bound with the plain (biased) minibatch gradient.
* ``fdiv``: the NWJ / f-divergence bound E_P[T] - E_{P_X ⊗ P_Y}[e^{T - 1}].

Marginal samples pair each x with a y shuffled within the minibatch. Log-mean-exps are computed with ``logsumexp``
and the running mean is kept in log space, so large T never overflows (the original's exp-mean-log did). No global
autograd anomaly detection (upstream switched it on at import, which slows everything down). Estimates are in nats.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from decision_transformer.errors import UserError, checked_device
from decision_transformer.training.trainer import forked_rng

LOSSES = ("mine", "mine_biased", "fdiv")
_LOG_EPS = math.log(1e-6)  # the original's μ + 1e-6 in the corrected gradient


def logmeanexp(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """log(mean(exp(t))) over all elements of ``t`` (or along ``dim``), through ``logsumexp`` (no overflow)."""
    if dim is None:
        return torch.logsumexp(t.reshape(-1), 0) - math.log(t.numel())
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


class StatisticsNetwork(nn.Sequential):
    """T([x, y]): Linear(d_x + d_y, h) → ReLU → (Linear(h, h) → ReLU) × (hidden_layers - 1) → Linear(h, 1).
    TAKAGI used 3 hidden layers of 400 (the paper's text says 2)."""

    def __init__(self, in_dim: int, hidden: int = 400, hidden_layers: int = 3):
        if hidden_layers < 1:
            raise UserError(f"the statistics network needs at least one hidden layer, got {hidden_layers}")
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, 1))
        super().__init__(*layers)


class _CorrectedLogMeanExp(torch.autograd.Function):
    """Forward: log mean exp(t) along the last dimension (t [n], or [E, n] for E estimators, each with its own μ).
    Backward: ∂/∂t_i = e^{t_i} / (n (μ + 1e-6)) with the running mean μ given as log μ (a scalar, or [E])."""

    @staticmethod
    def forward(ctx, t, log_mu):
        """log mean exp(t) along the last dimension; ``t`` and ``log_mu`` are kept for the backward pass."""
        ctx.save_for_backward(t, log_mu)
        return logmeanexp(t, -1)

    @staticmethod
    def backward(ctx, grad_out):
        """The gradient e^{t_i} / (n (μ + 1e-6)) times ``grad_out`` for ``t``; none for ``log_mu``."""
        t, log_mu = ctx.saved_tensors
        log_denom = torch.logaddexp(log_mu, torch.full_like(log_mu, _LOG_EPS)) + math.log(t.shape[-1])
        return grad_out.unsqueeze(-1) * torch.exp(t - log_denom.unsqueeze(-1)), None


def dv_bound(t_joint: torch.Tensor, t_marg: torch.Tensor) -> torch.Tensor:
    """The Donsker-Varadhan bound E_P[T] - log E_{P_X ⊗ P_Y}[e^T] of one minibatch."""
    return t_joint.mean() - logmeanexp(t_marg)


def nwj_bound(t_joint: torch.Tensor, t_marg: torch.Tensor) -> torch.Tensor:
    """The NWJ / f-divergence bound E_P[T] - E_{P_X ⊗ P_Y}[e^{T - 1}] of one minibatch."""
    return t_joint.mean() - torch.exp(t_marg - 1).mean()


def _as_2d(a, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).to(device=device, dtype=torch.float32)
    if t.ndim == 0 or t.shape[0] == 0:
        raise UserError(f"MINE takes samples as rows; an array of shape {tuple(t.shape)} holds none")
    return t.reshape(t.shape[0], -1)


@dataclass
class Mine:
    """A MINE estimator for samples x [n, d_x], y [n, d_y] (TAKAGI: ``Mine(T, loss="mine", method="concat")``)."""

    x_dim: int
    y_dim: int
    loss: str = "mine"
    hidden: int = 400
    hidden_layers: int = 3
    alpha: float = 0.01
    lr: float = 1e-4
    seed: int = 0
    device: str | torch.device = "cpu"
    history: list = field(default_factory=list)      # training bound per step

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserError(f"unknown MINE loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        with forked_rng():
            torch.manual_seed(self.seed)
            self.net = StatisticsNetwork(self.x_dim + self.y_dim, self.hidden, self.hidden_layers).to(self.device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.log_mu: torch.Tensor | None = None

    def _T(self, x, y) -> torch.Tensor:
        return self.net(torch.cat([x, y], dim=1)).squeeze(1)

    def _perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator).to(self.device)

    def _objective(self, t_joint, t_marg) -> torch.Tensor:
        """The bound whose gradient is followed (its value is the batch bound in every case)."""
        if self.loss == "fdiv":
            return nwj_bound(t_joint, t_marg)
        if self.loss == "mine_biased":
            return dv_bound(t_joint, t_marg)
        batch = logmeanexp(t_marg.detach())
        if self.log_mu is None:
            self.log_mu = batch
        else:
            self.log_mu = torch.logaddexp(math.log(self.alpha) + batch, math.log(1 - self.alpha) + self.log_mu)
        return t_joint.mean() - _CorrectedLogMeanExp.apply(t_marg, self.log_mu)

    def fit(self, x, y, iters: int = 1000, batch_size: int = 50) -> Mine:
        """``iters`` passes; each reshuffles the n pairs into n // batch_size minibatches (remainder dropped). With
        fewer than ``batch_size`` pairs the minibatch is all n of them (the original then took no step at all and
        reported its untrained network's bound)."""
        x, y = _as_2d(x, self.device), _as_2d(y, self.device)
        n = x.shape[0]
        if y.shape[0] != n:
            raise UserError(f"x has {n} samples, y has {y.shape[0]}")
        bs = min(batch_size, n)
        if bs < 2:
            raise UserError(f"MINE needs at least 2 samples per batch, got {n} samples")
        self.net.train()
        # no host synchronisation a step: the bounds stay on the device until the end, and a NaN or inf bound stops
        # the training from then on (its gradient masked) instead of being tested for at once
        finite, bounds = torch.ones((), dtype=torch.bool, device=self.device), []
        for _ in range(iters):
            perm = self._perm(n)
            for b in range(n // bs):
                idx = perm[b * bs:(b + 1) * bs]
                xb, yb = x[idx], y[idx]
                t_joint = self._T(xb, yb)
                t_marg = self._T(xb, yb[self._perm(bs)])
                bound = self._objective(t_joint, t_marg)
                finite &= torch.isfinite(bound.detach())
                self.opt.zero_grad(set_to_none=True)
                (-torch.where(finite, bound, torch.zeros_like(bound))).backward()
                self.opt.step()
                bounds.append(bound.detach())
        if bounds:
            history = torch.stack(bounds).cpu()
            if not bool(finite):
                first = int(torch.nonzero(~torch.isfinite(history))[0])
                self.history += history[:first].tolist()
                raise FloatingPointError("MINE bound became NaN or inf")
            self.history += history.tolist()
        return self

    @torch.no_grad()
    def estimate(self, x, y) -> float:
        """The bound on all n pairs with one fresh permutation for the marginal: DV for ``mine``/``mine_biased``,
        NWJ for ``fdiv`` (TAKAGI evaluated on the training pairs; pass held-out samples to avoid the optimism)."""
        x, y = _as_2d(x, self.device), _as_2d(y, self.device)
        if y.shape[0] != x.shape[0]:
            raise UserError(f"x has {x.shape[0]} samples, y has {y.shape[0]}")
        self.net.eval()
        t_joint = self._T(x, y)
        t_marg = self._T(x, y[self._perm(x.shape[0])])
        bound = nwj_bound(t_joint, t_marg) if self.loss == "fdiv" else dv_bound(t_joint, t_marg)
        return float(bound)


def estimate_mi(x, y, *, iters: int = 1000, batch_size: int = 50, loss: str = "mine", hidden: int = 400,
                hidden_layers: int = 3, lr: float = 1e-4, alpha: float = 0.01, seed: int = 0, device="cpu",
                eval_x=None, eval_y=None) -> float:
    """Train MINE on (x, y) and return the estimate in nats (on (eval_x, eval_y) if given, else on the training
    pairs, as TAKAGI; give both or neither). A diverging run returns NaN (the originals recorded NaN or None)."""
    device = checked_device(device)
    if (eval_x is None) != (eval_y is None):
        raise UserError(f"estimate_mi got eval_{'y' if eval_x is None else 'x'} without "
                        f"eval_{'x' if eval_x is None else 'y'}: give both held-out samples or neither")
    if eval_x is not None:
        ne, nye = _as_2d(eval_x, "cpu").shape[0], _as_2d(eval_y, "cpu").shape[0]
        if ne != nye:
            raise UserError(f"eval_x has {ne} samples, eval_y has {nye}")
    xd = _as_2d(x, "cpu").shape[1]
    yd = _as_2d(y, "cpu").shape[1]
    est = Mine(xd, yd, loss=loss, hidden=hidden, hidden_layers=hidden_layers, alpha=alpha, lr=lr, seed=seed,
               device=device)
    try:
        est.fit(x, y, iters=iters, batch_size=batch_size)
        value = est.estimate(x if eval_x is None else eval_x, y if eval_y is None else eval_y)
    except FloatingPointError:
        return float("nan")
    return value if math.isfinite(value) else float("nan")


class MineEnsemble:
    """E MINE estimators trained at once, as one batched network: member e is ``Mine(*dims[e], seed=seeds[e])``
    with the same initial weights, minibatches, marginal shuffles and Adam steps, so each estimate equals the
    separate run's up to float rounding. One step trains every member (3 + hidden_layers batched matrix products
    instead of as many per estimator): far fewer kernel launches on a GPU, about the same arithmetic on a CPU.

    Members may differ in ``x``/``y`` widths: inputs are zero-padded to the widest and the first layer's padded
    weights start at zero; their gradients are exactly zero, so they stay zero and change nothing. All members train
    on the same number of pairs. A member whose bound turns NaN or inf stops counting (its estimate is NaN, as
    ``estimate_mi`` returns); the others go on. No host synchronisation inside the training loop."""

    def __init__(self, dims, seeds, *, loss: str = "mine", hidden: int = 400, hidden_layers: int = 3,
                 alpha: float = 0.01, lr: float = 1e-4, device: str | torch.device = "cpu"):
        if loss not in LOSSES:
            raise UserError(f"unknown MINE loss {loss!r}; choose one of {', '.join(LOSSES)}")
        dims, seeds = [tuple(map(int, d)) for d in dims], [int(s) for s in seeds]
        if not dims or len(dims) != len(seeds):
            raise UserError(f"MineEnsemble takes one seed per member: {len(dims)} members, {len(seeds)} seeds")
        self.loss, self.alpha, self.device = loss, alpha, torch.device(device)
        self.x_pad, self.y_pad = max(d[0] for d in dims), max(d[1] for d in dims)
        nets = []
        for (dx, dy), seed in zip(dims, seeds):
            with forked_rng():
                torch.manual_seed(seed)
                nets.append(StatisticsNetwork(dx + dy, hidden, hidden_layers))
        linears = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
        first = torch.zeros(len(nets), self.x_pad + self.y_pad, hidden)
        for e, ((dx, dy), layers) in enumerate(zip(dims, linears)):
            w = layers[0].weight.detach().T                                     # [dx + dy, hidden]
            first[e, :dx], first[e, self.x_pad:self.x_pad + dy] = w[:dx], w[dx:]
        self.weights = [first] + [torch.stack([ls[i].weight.detach().T for ls in linears])
                                  for i in range(1, len(linears[0]))]          # [E, in, out]
        self.biases = [torch.stack([ls[i].bias.detach()[None] for ls in linears])
                       for i in range(len(linears[0]))]                         # [E, 1, out]
        self.params = [t.to(self.device).requires_grad_() for t in self.weights + self.biases]
        self.weights, self.biases = self.params[:len(self.weights)], self.params[len(self.weights):]
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.log_mu: torch.Tensor | None = None
        self.alive = torch.ones(len(nets), dtype=torch.bool, device=self.device)
        self.history: list[torch.Tensor] = []                                    # the [E] training bounds per step

    def __len__(self) -> int:
        return len(self.generators)

    def _T(self, z: torch.Tensor) -> torch.Tensor:
        """T of [E, b, x_pad + y_pad] inputs -> [E, b]."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(b, z, w)
            if i < last:
                z = torch.relu(z)
        return z.squeeze(-1)

    def _stack(self, xs, ys) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' samples as zero-padded [E, n, x_pad] and [E, n, y_pad] tensors on the device."""
        xs, ys = [_as_2d(a, "cpu") for a in xs], [_as_2d(a, "cpu") for a in ys]
        if len(xs) != len(self) or len(ys) != len(self):
            raise UserError(f"MineEnsemble of {len(self)} members got {len(xs)} x and {len(ys)} y samples")
        n = xs[0].shape[0]
        for e, (x, y) in enumerate(zip(xs, ys)):
            if x.shape[0] != n or y.shape[0] != n:
                raise UserError(f"the members of a MineEnsemble take the same number of samples: member 0 has {n}, "
                                f"member {e} has x {x.shape[0]} and y {y.shape[0]}")
        X, Y = torch.zeros(len(self), n, self.x_pad), torch.zeros(len(self), n, self.y_pad)
        for e, (x, y) in enumerate(zip(xs, ys)):
            if x.shape[1] > self.x_pad or y.shape[1] > self.y_pad:
                raise UserError(f"member {e} has samples of width {x.shape[1]} and {y.shape[1]}; the ensemble was "
                                f"built for at most {self.x_pad} and {self.y_pad}")
            X[e, :, :x.shape[1]], Y[e, :, :y.shape[1]] = x, y
        return X.to(self.device), Y.to(self.device)

    def _perms(self, n: int, shuffles: int = 0, bs: int = 0) -> torch.Tensor:
        """Per member, from its own generator and in ``Mine``'s order: a permutation of n, then ``shuffles``
        permutations of bs, side by side: [E, n + shuffles * bs] on the device (from pinned memory on a GPU, so the
        copy does not wait for the device)."""
        p = torch.stack([torch.cat([torch.randperm(n, generator=g)] + [torch.randperm(bs, generator=g)
                                                                        for _ in range(shuffles)])
                         for g in self.generators])
        if self.device.type == "cuda":
            return p.pin_memory().to(self.device, non_blocking=True)
        return p.to(self.device)

    @staticmethod
    def _rows(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """a[e, idx[e]] for every member e: [E, n, d] x [E, b] -> [E, b, d]."""
        return torch.gather(a, 1, idx.unsqueeze(-1).expand(-1, -1, a.shape[-1]))

    def _objective(self, t_joint, t_marg) -> torch.Tensor:
        """The members' bounds [E] whose gradients are followed (as ``Mine._objective``)."""
        if self.loss == "fdiv":
            return t_joint.mean(-1) - torch.exp(t_marg - 1).mean(-1)
        if self.loss == "mine_biased":
            return t_joint.mean(-1) - logmeanexp(t_marg, -1)
        batch = logmeanexp(t_marg.detach(), -1)
        if self.log_mu is None:
            self.log_mu = batch
        else:
            self.log_mu = torch.logaddexp(math.log(self.alpha) + batch, math.log(1 - self.alpha) + self.log_mu)
        return t_joint.mean(-1) - _CorrectedLogMeanExp.apply(t_marg, self.log_mu)

    def fit(self, xs, ys, iters: int = 1000, batch_size: int = 50, progress=None) -> MineEnsemble:
        """Member e trains on (xs[e], ys[e]) as ``Mine.fit`` does; ``progress`` (a bar) advances once per step."""
        X, Y = self._stack(xs, ys)
        n = X.shape[1]
        bs = min(batch_size, n)
        if bs < 2:
            raise UserError(f"MINE needs at least 2 samples per batch, got {n} samples")
        nb = n // bs
        for _ in range(iters):
            perms = self._perms(n, nb, bs)
            order, shuffles = perms[:, :n], perms[:, n:].reshape(len(self), nb, bs).unbind(1)
            for b, shuffle in enumerate(shuffles):
                idx = order[:, b * bs:(b + 1) * bs]
                xb, yb = self._rows(X, idx), self._rows(Y, idx)
                t = self._T(torch.cat([torch.cat([xb, yb], -1), torch.cat([xb, self._rows(yb, shuffle)], -1)], 1))
                bound = self._objective(t[:, :bs], t[:, bs:])
                self.alive &= torch.isfinite(bound.detach())
                self.opt.zero_grad(set_to_none=True)
                (-torch.where(self.alive, bound, torch.zeros_like(bound)).sum()).backward()
                self.opt.step()
                self.history.append(bound.detach())
                if progress is not None:
                    progress.update(1)
        return self

    @torch.no_grad()
    def estimate(self, xs, ys) -> list[float]:
        """Each member's bound on all its n pairs with one fresh permutation (as ``Mine.estimate``); NaN for a member
        that diverged."""
        X, Y = self._stack(xs, ys)
        t_joint = self._T(torch.cat([X, Y], -1))
        t_marg = self._T(torch.cat([X, self._rows(Y, self._perms(X.shape[1]))], -1))
        if self.loss == "fdiv":
            bound = t_joint.mean(-1) - torch.exp(t_marg - 1).mean(-1)
        else:
            bound = t_joint.mean(-1) - logmeanexp(t_marg, -1)
        bound = torch.where(self.alive & torch.isfinite(bound), bound, torch.full_like(bound, float("nan")))
        return bound.cpu().tolist()


def estimate_mi_many(pairs, seeds, *, iters: int = 1000, batch_size: int = 50, loss: str = "mine",
                     hidden: int = 400, hidden_layers: int = 3, lr: float = 1e-4, alpha: float = 0.01, device="cpu",
                     ensemble: int = 128, eval_pairs=None, desc: str | None = None) -> list[float]:
    """``estimate_mi`` of every (x, y) in ``pairs`` with ``seeds[i]``, trained ``ensemble`` at a time
    (``MineEnsemble``: pairs with the same numbers of training and evaluation samples train together). Equals
    ``[estimate_mi(x, y, seed=s, ...) for ...]`` up to float rounding. ``desc``: a progress bar (Adam steps) with
    this title."""
    from decision_transformer.runlog import progress

    device = checked_device(device)
    pairs = [(_as_2d(x, "cpu"), _as_2d(y, "cpu")) for x, y in pairs]
    if len(seeds) != len(pairs):
        raise UserError(f"estimate_mi_many takes one seed per pair: {len(pairs)} pairs, {len(seeds)} seeds")
    if eval_pairs is not None:
        eval_pairs = [(_as_2d(x, "cpu"), _as_2d(y, "cpu")) for x, y in eval_pairs]
        if len(eval_pairs) != len(pairs):
            raise UserError(f"estimate_mi_many got {len(eval_pairs)} held-out pairs for {len(pairs)} pairs")
    if ensemble < 1:
        raise UserError(f"the MINE ensemble size must be at least 1, got {ensemble}")
    evals = eval_pairs if eval_pairs is not None else pairs
    for i, ((x, y), (xe, ye)) in enumerate(zip(pairs, evals)):
        if y.shape[0] != x.shape[0] or ye.shape[0] != xe.shape[0]:
            raise UserError(f"pair {i}: x has {x.shape[0]} samples, y has {y.shape[0]}" if y.shape[0] != x.shape[0]
                            else f"pair {i}: eval x has {xe.shape[0]} samples, eval y has {ye.shape[0]}")
        if (xe.shape[1], ye.shape[1]) != (x.shape[1], y.shape[1]):
            raise UserError(f"pair {i}: held-out samples of width {xe.shape[1]} and {ye.shape[1]}, training samples "
                            f"of width {x.shape[1]} and {y.shape[1]}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, ((x, _), (xe, _)) in enumerate(zip(pairs, evals)):
        groups.setdefault((x.shape[0], xe.shape[0]), []).append(i)
    chunks = [members[c:c + ensemble] for members in groups.values() for c in range(0, len(members), ensemble)]
    steps = sum(iters * (n // min(batch_size, n)) for (n, _), members in groups.items()
                for _ in range(0, len(members), ensemble))
    out = [float("nan")] * len(pairs)
    done, start = 0, time.perf_counter()
    with progress(steps, desc) if desc else contextlib.nullcontext() as bar:
        for chunk in chunks:
            est = MineEnsemble([(pairs[i][0].shape[1], pairs[i][1].shape[1]) for i in chunk], [seeds[i] for i in chunk],
                               loss=loss, hidden=hidden, hidden_layers=hidden_layers, alpha=alpha, lr=lr,
                               device=device)
            est.fit([pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk], iters=iters, batch_size=batch_size,
                    progress=bar)
            for i, v in zip(chunk, est.estimate([evals[i][0] for i in chunk], [evals[i][1] for i in chunk])):
                out[i] = v
            done += len(chunk)
            if desc and len(chunks) > 1 and not sys.stderr.isatty():   # (a log file gets no bar: a line a chunk)
                print(f"{desc}: {done} of {len(pairs)} estimates trained ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr)
    return out


def gaussian_mi(rho: float, dim: int) -> float:
    """I(X; Y) in nats for X, Y ∈ R^dim with independent coordinate pairs of correlation rho."""
    return -0.5 * dim * math.log(1 - rho ** 2)


def correlated_gaussians(n: int, dim: int, rho: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n samples with y = rho x + sqrt(1 - rho²) ε, x, ε ~ N(0, I_dim)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.float32)
