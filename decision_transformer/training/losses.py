"""Losses."""
from __future__ import annotations

import torch


def masked_action_mse(action_preds: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real (mask = 1) steps: [B, K, da] predictions and targets, [B, K] mask.

    Equal to the originals' ``mean((pred[mask > 0] - a[mask > 0]) ** 2)``, written without boolean indexing so that
    it needs no host synchronisation.
    """
    m = mask.to(action_preds.dtype).unsqueeze(-1)                      # [B, K, 1]
    se = ((action_preds - actions) ** 2 * m).sum()
    return se / (m.sum() * action_preds.shape[-1])
