"""The Decision Transformer: (R̂, s, a) token triples through a GPT-2 backbone, action read at the state token."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from decision_transformer.models.gpt2 import BackboneConfig, GPT2Backbone

EMBED_ORDERS = ("ln_then_time", "time_then_ln")
#: ``last_action_only`` runs the last block for the final tokens of each history. One row (the state token) would do,
#: but CPU GEMM kernels round a row the same way for any number of rows only from a threshold on: 4 rows with AVX2,
#: 16 with AVX-512 (MKL 2024, torch 2.13); with 16 rows per history an episode's actions are bit-identical whether it
#: is evaluated alone or with others on both.
LAST_ACTION_TAIL = 16
#: The fewest rows (histories × steps) any matrix product of an evaluation forward runs on: a short context with few
#: live episodes (K=1 alone is one row: a matrix-vector product, rounded otherwise) is padded with copies of its first
#: history up to this, so an episode's actions do not depend on how many others run beside it.
MIN_EVAL_ROWS = LAST_ACTION_TAIL


def positive_int(name: str, v) -> None:
    """ValueError unless ``v`` is an integer >= 1 (not a bool)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_fields(cfg, sizes) -> None:
    """A DT config's ``sizes`` positive integers and its switches booleans (a recorded ``True`` is no context length,
    a string "false" no switch)."""
    for name in sizes:
        positive_int(name, getattr(cfg, name))
    for name in ("action_tanh", "share_input_output_proj", "extend_positions"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")


class BackboneHolder:
    """What the single- and multi-task configs share: a ``backbone`` field, a dict form without unknown keys."""

    backbone: BackboneConfig

    @property
    def hidden_size(self) -> int:
        """The backbone's width H (``n_embd``)."""
        return self.backbone.n_embd

    def to_dict(self) -> dict:
        """The configuration as a plain dict, the backbone's nested in it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """A configuration from ``to_dict``'s form: unknown keys are dropped, ``backbone`` is rebuilt with
        ``BackboneConfig.from_dict`` (defaults when absent)."""
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["backbone"] = BackboneConfig.from_dict(d.get("backbone", {}))
        return cls(**d)


@dataclass
class DTConfig(BackboneHolder):
    """Configuration of the single-task ``DecisionTransformer``: state and action sizes, context K, timestep table,
    heads and embedding order; sizes and switches are checked on construction."""

    state_dim: int
    act_dim: int
    max_length: int = 20             # K, context timesteps
    max_ep_len: int = 1000           # rows of the timestep table
    action_tanh: bool = True
    share_input_output_proj: bool = False
    # ``ln_then_time``: LayerNorm on the stacked modality embeddings, then the timestep embedding is added
    # (REID / TAKAGI / LAWSON, the default). ``time_then_ln``: the original DT paper's order (KZL, transformers).
    embed_order: str = "ln_then_time"
    # --extend_positions: the timestep table *is* ``transformer.wpe`` (one module, both state-dict keys). Needs
    # ``backbone.n_positions >= max_ep_len`` (model_factory tiles a shorter pretrained table).
    extend_positions: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def __post_init__(self):
        """Sizes positive integers and switches booleans (a recorded ``True`` is no context length)."""
        check_fields(self, ("state_dim", "act_dim", "max_length", "max_ep_len"))


@dataclass
class DTOutput:
    """What a DT forward returns (shapes beside the fields); with ``last_action_only``, ``state_preds`` and
    ``return_preds`` are None and ``action_preds`` is [B, 1, da]."""

    state_preds: torch.Tensor      # [B, K, ds], from the action token
    action_preds: torch.Tensor     # [B, K, da], from the state token
    return_preds: torch.Tensor     # [B, K, 1], from the action token
    all_embs: torch.Tensor         # [B, 3K, H] post-LN modality embeddings (``ln_then_time``) for the k-means loss
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def timestep_table(cfg, transformer: GPT2Backbone) -> nn.Embedding:
    """The timestep embedding of a DT config: ``transformer.wpe`` itself with ``extend_positions`` (one module under
    both names, as the originals), else a fresh ``max_ep_len``-row table."""
    if not cfg.extend_positions:
        return nn.Embedding(cfg.max_ep_len, cfg.hidden_size)
    if cfg.backbone.n_positions < cfg.max_ep_len:
        raise ValueError(f"extend_positions needs at least max_ep_len={cfg.max_ep_len} position embeddings, "
                         f"the backbone has {cfg.backbone.n_positions}")
    return transformer.wpe


def check_timesteps(timesteps: torch.Tensor):
    """Refuse float timesteps with a ``TypeError``: what a call in the originals' order (states, actions, rewards,
    returns_to_go, timesteps) passes here, the returns-to-go landing in ``timesteps``."""
    if timesteps.is_floating_point():
        raise TypeError(f"timesteps must be an integer tensor, got {timesteps.dtype}; the forward takes (states, "
                        f"actions, returns_to_go, timesteps, attention_mask=...), without the originals' rewards")


def last_k_padded(K: int, states, actions, returns_to_go, timesteps):
    """The last K steps of M equal-length histories, left-padded with zeros to length K, and the attention mask
    (0 at padding, 1 at real steps): the model input of one evaluation step. Fewer than ``MIN_EVAL_ROWS`` / K
    histories are followed by copies of the first (rows of the output beyond M are theirs: drop them)."""
    states, actions = states[:, -K:], actions[:, -K:]
    returns_to_go, timesteps = returns_to_go[:, -K:], timesteps[:, -K:]
    M, t = states.shape[:2]
    extra = -(-MIN_EVAL_ROWS // K) - M
    if extra > 0:
        rows = torch.cat([torch.arange(M, device=states.device), torch.zeros(extra, dtype=torch.long,
                                                                             device=states.device)])
        states, actions, returns_to_go, timesteps = (x[rows] for x in (states, actions, returns_to_go, timesteps))
    pad = K - t
    mask = torch.cat([torch.zeros(states.shape[0], pad, device=states.device),
                      torch.ones(states.shape[0], t, device=states.device)], dim=1)
    states, actions, returns_to_go = (F.pad(x, (0, 0, pad, 0)) for x in (states, actions, returns_to_go))
    return states, actions, returns_to_go, F.pad(timesteps, (pad, 0)), mask


class DecisionTransformer(nn.Module):
    """Decision Transformer over a GPT-2 backbone (no position embedding added inside the backbone).

    Parameter names follow the originals (``embed_timestep``, ``embed_return``, ``embed_state``, ``embed_action``,
    ``embed_ln``, ``transformer.*``, ``predict_state``, ``predict_action.0``, ``predict_return``), so their state dicts
    load. With ``share_input_output_proj`` the heads are x @ W_embed (no bias, no parameters of their own).
    ``seed`` reseeds torch's global generator (``torch.manual_seed``) before the weights are drawn.
    """

    def __init__(self, cfg: DTConfig, seed: int | None = None):
        if seed is not None:
            # As TAKAGI: the initial weights are a function of the seed only, so epoch-0 models can be rebuilt.
            torch.manual_seed(seed)
        super().__init__()
        if cfg.embed_order not in EMBED_ORDERS:
            raise ValueError(f"embed_order must be one of {EMBED_ORDERS}, got {cfg.embed_order!r}")
        self.config = cfg
        H = cfg.hidden_size
        self.transformer = GPT2Backbone(cfg.backbone)
        self.embed_timestep = timestep_table(cfg, self.transformer)
        self.embed_return = nn.Linear(1, H)
        self.embed_state = nn.Linear(cfg.state_dim, H)
        self.embed_action = nn.Linear(cfg.act_dim, H)
        self.embed_ln = nn.LayerNorm(H)
        if not cfg.share_input_output_proj:
            self.predict_state = nn.Linear(H, cfg.state_dim)
            self.predict_action = nn.Sequential(nn.Linear(H, cfg.act_dim), *([nn.Tanh()] if cfg.action_tanh else []))
            self.predict_return = nn.Linear(H, 1)

    # ---- heads -------------------------------------------------------------------------------------------------
    def _action_head(self, x):
        """State-token outputs [..., H] -> actions [..., da]."""
        if not self.config.share_input_output_proj:
            return self.predict_action(x)
        # Tied: x @ W where W is the [H, d] weight of the input embedding, no bias.
        action = x @ self.embed_action.weight
        return torch.tanh(action) if self.config.action_tanh else action

    def _heads(self, x):
        """x: [B, 3, K, H] (token type, step) -> (state, action, return) predictions."""
        if self.config.share_input_output_proj:
            return x[:, 2] @ self.embed_state.weight, self._action_head(x[:, 1]), x[:, 2] @ self.embed_return.weight
        return self.predict_state(x[:, 2]), self._action_head(x[:, 1]), self.predict_return(x[:, 2])

    def forward(self, states, actions, returns_to_go, timesteps, attention_mask=None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                last_action_only: bool = False) -> DTOutput:
        """states [B, K, ds], actions [B, K, da], returns_to_go [B, K, 1], timesteps [B, K] (long),
        attention_mask [B, K] (1 = real step; None = all real). ``last_action_only``: compute only the action at the
        last state token (``action_preds`` [B, 1, da], no state or return predictions); the last block then runs
        ``LAST_ACTION_TAIL`` queries instead of 3K, which is all evaluation needs."""
        B, K = states.shape[:2]
        H = self.config.hidden_size
        if attention_mask is None:
            attention_mask = torch.ones(B, K, dtype=states.dtype, device=states.device)
        check_timesteps(timesteps)
        time_emb = self.embed_timestep(timesteps)                                        # [B, K, H]
        embs = [self.embed_return(returns_to_go), self.embed_state(states), self.embed_action(actions)]
        if self.config.embed_order == "time_then_ln":
            embs = [e + time_emb for e in embs]
        # interleave (R̂_1, s_1, a_1, R̂_2, ...): [B, K, 3, H] -> [B, 3K, H]
        stacked = torch.stack(embs, dim=2).reshape(B, 3 * K, H)
        all_embs = self.embed_ln(stacked)
        if self.config.embed_order == "ln_then_time":
            inputs = all_embs + time_emb.repeat_interleave(3, dim=1)
        else:
            inputs = all_embs
        mask = attention_mask.repeat_interleave(3, dim=1)                                  # [B, 3K]
        out = self.transformer(inputs, attention_mask=mask, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states,
                               tail=LAST_ACTION_TAIL if last_action_only else None)
        if last_action_only:
            action = self._action_head(out.last_hidden_state)[:, -2:-1]  # head on all rows (LAST_ACTION_TAIL)
            return DTOutput(None, action, None, all_embs, out.hidden_states, out.attentions)
        x = out.last_hidden_state.reshape(B, K, 3, H).permute(0, 2, 1, 3)                 # [B, 3, K, H]
        state_preds, action_preds, return_preds = self._heads(x)
        return DTOutput(state_preds, action_preds, return_preds, all_embs, out.hidden_states, out.attentions)

    @torch.no_grad()
    def get_action(self, states, actions, returns_to_go, timesteps):
        """Next actions for M histories of equal length t: states [M, t, ds], actions [M, t, da],
        returns_to_go [M, t, 1], timesteps [M, t]. Keeps the last K steps, left-pads with zeros (mask 0), and
        returns the action predicted at the last state token, [M, da]."""
        M = states.shape[0]
        states, actions, returns_to_go, timesteps, mask = last_k_padded(self.config.max_length, states, actions,
                                                                        returns_to_go, timesteps)
        out = self(states, actions, returns_to_go, timesteps, attention_mask=mask, last_action_only=True)
        return out.action_preds[:M, -1]
