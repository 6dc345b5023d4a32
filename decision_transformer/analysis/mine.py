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

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from decision_transformer.errors import UserError, checked_device
from decision_transformer.training.trainer import forked_rng

LOSSES = ("mine", "mine_biased", "fdiv")
_LOG_EPS = math.log(1e-6)  # the original's μ + 1e-6 in the corrected gradient


def logmeanexp(t: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(t))) over all elements of ``t``, through ``logsumexp`` (no overflow)."""
    return torch.logsumexp(t.reshape(-1), 0) - math.log(t.numel())


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
    """Forward: log mean exp(t). Backward: ∂/∂t_i = e^{t_i} / (n (μ + 1e-6)) with the running mean μ given as log μ."""

    @staticmethod
    def forward(ctx, t, log_mu):
        """log mean exp(t); ``t`` and ``log_mu`` are kept for the backward pass."""
        ctx.save_for_backward(t, log_mu)
        return logmeanexp(t)

    @staticmethod
    def backward(ctx, grad_out):
        """The gradient e^{t_i} / (n (μ + 1e-6)) times ``grad_out`` for ``t``; none for ``log_mu``."""
        t, log_mu = ctx.saved_tensors
        log_denom = torch.logaddexp(log_mu, torch.full_like(log_mu, _LOG_EPS)) + math.log(t.numel())
        return grad_out * torch.exp(t - log_denom), None


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
        for _ in range(iters):
            perm = self._perm(n)
            for b in range(n // bs):
                idx = perm[b * bs:(b + 1) * bs]
                xb, yb = x[idx], y[idx]
                t_joint = self._T(xb, yb)
                t_marg = self._T(xb, yb[self._perm(bs)])
                bound = self._objective(t_joint, t_marg)
                if not torch.isfinite(bound):
                    raise FloatingPointError("MINE bound became NaN or inf")
                self.opt.zero_grad(set_to_none=True)
                (-bound).backward()
                self.opt.step()
                self.history.append(float(bound.detach()))
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


def gaussian_mi(rho: float, dim: int) -> float:
    """I(X; Y) in nats for X, Y ∈ R^dim with independent coordinate pairs of correlation rho."""
    return -0.5 * dim * math.log(1 - rho ** 2)


def correlated_gaussians(n: int, dim: int, rho: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n samples with y = rho x + sqrt(1 - rho²) ε, x, ε ~ N(0, I_dim)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.float32)
