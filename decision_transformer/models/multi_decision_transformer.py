"""The multi-task Decision Transformer of LAWSON's ``experiment_multi.py``: one shared transformer and timestep table,
per-environment input embeddings, embedding LayerNorm and action head.

The original kept the per-env modules in plain Python lists and pointed the parent DT's ``embed_state`` & co. at the
toggled env's entries, so only the last-toggled env's modules were registered: the optimiser, gradient clipping and
state-dict snapshots saw walker2d's only, and hopper's and halfcheetah's embeddings and heads kept their random init.
Here they live in registered ``nn.ModuleList``s (``embed_returns``, ``embed_states``, ``embed_actions``, ``embed_lns``,
``predict_actions``; keys ``embed_states.{i}.weight``, ``predict_actions.{i}.0.weight`` ...), and ``toggle_env`` only
selects an index, never registering aliases, so every env's layers are trained, clipped and saved.

``predict_state`` / ``predict_return`` exist once with the first env's dims (the parent constructor's, unused by the
loss) as in the original. The action heads are always untied: the original's ``toggle_env`` replaced the parent's tied
action head, so ``share_input_output_proj`` has no effect on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from decision_transformer.envs import get_env_spec
from decision_transformer.models.decision_transformer import (EMBED_ORDERS, LAST_ACTION_TAIL, BackboneHolder,
                                                                 DTOutput, check_fields, check_timesteps, last_k_padded,
                                                                 positive_int, timestep_table)
from decision_transformer.models.gpt2 import BackboneConfig, GPT2Backbone

#: The original's env order (index 0, 1, 2).
MULTI_ENVS = ("hopper", "halfcheetah", "walker2d")
#: ``config["model_class"]`` of multi-task checkpoints (single-task ones have none, or ``dt``).
MODEL_CLASS = "multi_dt"


@dataclass
class MultiDTConfig(BackboneHolder):
    """Configuration of ``MultiDecisionTransformer``: its envs (in index order) and their state and action sizes, taken
    from the env table when left empty; the other fields as in ``DTConfig``."""

    envs: list[str] = field(default_factory=lambda: list(MULTI_ENVS))
    state_dims: list[int] = field(default_factory=list)   # per env; empty -> from the env table
    act_dims: list[int] = field(default_factory=list)
    max_length: int = 20
    max_ep_len: int = 1000
    action_tanh: bool = True
    share_input_output_proj: bool = False     # accepted; per-env action heads are untied regardless (as the original)
    embed_order: str = "ln_then_time"
    # --extend_positions: the shared timestep table *is* ``transformer.wpe`` (as the single-task DT)
    extend_positions: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def __post_init__(self):
        self.envs = list(self.envs)
        if not self.state_dims:
            self.state_dims = [get_env_spec(e).state_dim for e in self.envs]
        if not self.act_dims:
            self.act_dims = [get_env_spec(e).act_dim for e in self.envs]
        if not (len(self.envs) == len(self.state_dims) == len(self.act_dims)):
            raise ValueError("envs, state_dims and act_dims must have the same length")
        for name in ("state_dims", "act_dims"):
            for v in getattr(self, name):
                positive_int(f"each of {name}", v)
        check_fields(self, ("max_length", "max_ep_len"))


class MultiDecisionTransformer(nn.Module):
    """Shared GPT-2 backbone and timestep table; per-env (R̂, s, a) embeddings, ``embed_ln`` and tanh action head.

    ``forward(..., env=i)`` runs env i (index or name); without ``env`` the env chosen by ``toggle_env`` (default 0).
    """

    def __init__(self, cfg: MultiDTConfig, seed: int | None = None):
        if seed is not None:
            torch.manual_seed(seed)  # as the single-task DT: initial weights are a function of the seed
        super().__init__()
        if cfg.embed_order not in EMBED_ORDERS:
            raise ValueError(f"embed_order must be one of {EMBED_ORDERS}, got {cfg.embed_order!r}")
        self.config = cfg
        H = cfg.hidden_size
        # built first, as in the single-task DT, so that equal seeds and backbone configs give equal blocks
        self.transformer = GPT2Backbone(cfg.backbone)
        self.embed_timestep = timestep_table(cfg, self.transformer)
        self.embed_returns = nn.ModuleList([nn.Linear(1, H) for _ in cfg.envs])
        self.embed_states = nn.ModuleList([nn.Linear(d, H) for d in cfg.state_dims])
        self.embed_actions = nn.ModuleList([nn.Linear(d, H) for d in cfg.act_dims])
        self.embed_lns = nn.ModuleList([nn.LayerNorm(H) for _ in cfg.envs])
        self.predict_actions = nn.ModuleList([
            nn.Sequential(nn.Linear(H, d), *([nn.Tanh()] if cfg.action_tanh else [])) for d in cfg.act_dims])
        if not cfg.share_input_output_proj:
            # the parent constructor's heads (first env's dims); unused by the loss, kept for state-dict compatibility
            self.predict_state = nn.Linear(H, cfg.state_dims[0])
            self.predict_return = nn.Linear(H, 1)
        self.active = 0
        self.specializations: list[str] = []

    # ---- env selection ---------------------------------------------------------------------------------------------
    def env_index(self, env) -> int:
        """The index of ``env``, given as an index (range-checked) or an env name; IndexError or KeyError otherwise."""
        if isinstance(env, int) and not isinstance(env, bool):   # (True is no env index)
            if not 0 <= env < len(self.config.envs):
                raise IndexError(f"env index {env} out of range for {self.config.envs}")
            return env
        try:
            return self.config.envs.index(env)
        except ValueError:
            raise KeyError(f"env {env!r} is not one of this model's envs {self.config.envs}") from None

    def toggle_env(self, env) -> "MultiDecisionTransformer":
        """Select the env used by ``forward``/``get_action`` when no ``env`` is passed (an index, never an alias)."""
        self.active = self.env_index(env)
        return self

    @property
    def state_dim(self) -> int:
        """State size of the selected env."""
        return self.config.state_dims[self.active]

    @property
    def act_dim(self) -> int:
        """Action size of the selected env."""
        return self.config.act_dims[self.active]

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(self, states, actions, returns_to_go, timesteps, attention_mask=None, env=None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                last_action_only: bool = False) -> DTOutput:
        """states [B, K, d_s(env)], actions [B, K, d_a(env)], returns_to_go [B, K, 1], timesteps [B, K],
        attention_mask [B, K]; the single-task DT's forward with env's embeddings and head (``last_action_only``
        as there)."""
        i = self.active if env is None else self.env_index(env)
        B, K = states.shape[:2]
        H = self.config.hidden_size
        if attention_mask is None:
            attention_mask = torch.ones(B, K, dtype=states.dtype, device=states.device)
        check_timesteps(timesteps)
        time_emb = self.embed_timestep(timesteps)                                         # [B, K, H]
        embs = [self.embed_returns[i](returns_to_go), self.embed_states[i](states), self.embed_actions[i](actions)]
        if self.config.embed_order == "time_then_ln":
            embs = [e + time_emb for e in embs]
        stacked = torch.stack(embs, dim=2).reshape(B, 3 * K, H)                          # (R̂_1, s_1, a_1, ...)
        all_embs = self.embed_lns[i](stacked)
        inputs = all_embs + time_emb.repeat_interleave(3, dim=1) if self.config.embed_order == "ln_then_time" \
            else all_embs
        out = self.transformer(inputs, attention_mask=attention_mask.repeat_interleave(3, dim=1),
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               tail=LAST_ACTION_TAIL if last_action_only else None)
        if last_action_only:
            action = self.predict_actions[i](out.last_hidden_state)[:, -2:-1]  # head on all rows (LAST_ACTION_TAIL)
            return DTOutput(None, action, None, all_embs, out.hidden_states, out.attentions)
        x = out.last_hidden_state.reshape(B, K, 3, H).permute(0, 2, 1, 3)                  # [B, 3, K, H]
        action_preds = self.predict_actions[i](x[:, 1])                                     # from the state token
        if self.config.share_input_output_proj:
            state_preds = x.new_zeros(B, K, 0)
            return_preds = x.new_zeros(B, K, 0)
        else:
            state_preds = self.predict_state(x[:, 2])
            return_preds = self.predict_return(x[:, 2])
        return DTOutput(state_preds, action_preds, return_preds, all_embs, out.hidden_states, out.attentions)

    @torch.no_grad()
    def get_action(self, states, actions, returns_to_go, timesteps):
        """Next actions of the toggled env for M histories of equal length (as ``DecisionTransformer.get_action``)."""
        M = states.shape[0]
        states, actions, returns_to_go, timesteps, mask = last_k_padded(self.config.max_length, states, actions,
                                                                        returns_to_go, timesteps)
        return self(states, actions, returns_to_go, timesteps, attention_mask=mask,
                    last_action_only=True).action_preds[:M, -1]
