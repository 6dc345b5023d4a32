"""MLP behaviour cloning (``--model_type bc``): the action from the last K normalised states, flattened."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

#: dropout between the MLP's layers: fixed, not ``--dropout`` (as the originals)
BC_DROPOUT = 0.1


@dataclass
class MLPBCConfig:
    """Configuration of ``MLPBCModel``: state and action sizes, hidden width, layers, context K and dropout."""

    state_dim: int
    act_dim: int
    hidden_size: int = 128
    n_layer: int = 3                 # Linear layers of width hidden_size before the output layer
    max_length: int = 20             # K: states in the input window
    dropout: float = BC_DROPOUT

    def to_dict(self) -> dict:
        """The configuration as a plain dict, tagged ``model_class: mlp_bc``."""
        return {"model_class": "mlp_bc", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MLPBCConfig":
        """A configuration from ``to_dict``'s form (unknown keys, ``model_class`` too, are dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class MLPBCModel(nn.Module):
    """Linear(K*ds, H), then ``n_layer - 1`` times (ReLU, Dropout, Linear(H, H)), then ReLU, Dropout,
    Linear(H, da), Tanh. Parameter names ``model.{i}.*`` follow the originals' ``nn.Sequential``."""

    def __init__(self, cfg: MLPBCConfig, seed: int | None = None):
        if seed is not None:
            torch.manual_seed(seed)
        super().__init__()
        if cfg.n_layer < 1 or cfg.hidden_size < 1 or cfg.max_length < 1:
            raise ValueError(f"invalid MLP: {cfg}")
        self.config = cfg
        H = cfg.hidden_size
        layers: list[nn.Module] = [nn.Linear(cfg.max_length * cfg.state_dim, H)]
        for _ in range(cfg.n_layer - 1):
            layers += [nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(H, H)]
        layers += [nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(H, cfg.act_dim), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states [B, T >= K, ds] -> the action after the last state, [B, da]."""
        K = self.config.max_length
        return self.model(states[:, -K:].reshape(states.shape[0], K * self.config.state_dim))

    @torch.no_grad()
    def get_action(self, states, actions=None, returns_to_go=None, timesteps=None):
        """The DT's evaluation interface: histories [M, t, ds] (other inputs ignored) -> [M, da]; fewer than K states
        are left-padded with zeros. Fewer than ``MIN_EVAL_ROWS`` histories are run with copies of the first up to that
        many rows (as the DT's ``last_k_padded``): CPU GEMM rounds a row the same way for any number of rows only from
        a threshold on, so an episode's actions do not depend on how many others are evaluated beside it."""
        from decision_transformer.models.decision_transformer import MIN_EVAL_ROWS

        K, M = self.config.max_length, states.shape[0]
        states = states[:, -K:]
        if M < MIN_EVAL_ROWS:
            rows = torch.cat([torch.arange(M, device=states.device),
                              torch.zeros(MIN_EVAL_ROWS - M, dtype=torch.long, device=states.device)])
            states = states[rows]
        return self(F.pad(states, (0, 0, K - states.shape[1], 0)))[:M]
