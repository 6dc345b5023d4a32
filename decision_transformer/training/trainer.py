"""The training loop: device-resident batches, no host synchronisation inside a step."""
from __future__ import annotations

import time

import numpy as np
import torch

from decision_transformer.data import TrajectoryDataset
from decision_transformer.errors import TrainingDiverged
from decision_transformer.training.losses import masked_action_mse

GRAD_CLIP = 0.25


class Trainer:
    """Owns the model, optimiser, schedule and batch generator; ``train_iteration`` runs ``num_steps`` steps."""

    def __init__(self, model, optimizer, scheduler, dataset: TrajectoryDataset, *, batch_size: int, K: int,
                 generator: torch.Generator, grad_clip: float | None = GRAD_CLIP, extra_loss=None,
                 amp_dtype: torch.dtype | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataset = dataset
        self.batch_size = batch_size
        self.K = K
        self.generator = generator
        self.grad_clip = grad_clip
        self.extra_loss = extra_loss      # optional callable(model, out, batch, step) -> (loss, logs)
        self.step = 0                     # global step counter, never reset
        self.params = [p for p in model.parameters() if p.requires_grad]
        # bf16 autocast (CUDA): no loss scaling needed; the loss itself is computed in fp32
        self.amp_dtype = amp_dtype
        self.device_type = next(model.parameters()).device.type

    def train_step(self) -> torch.Tensor:
        batch = self.dataset.sample_batch(self.batch_size, self.K, self.generator)
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            out = self.model(batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps,
                             attention_mask=batch.mask)
        loss = masked_action_mse(out.action_preds.float(), batch.actions, batch.mask)
        total = loss
        if self.extra_loss is not None:
            total = total + self.extra_loss(self.model, out, batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.detach()

    def train_iteration(self, num_steps: int, iteration: int, bar=None) -> dict:
        """Run ``num_steps`` steps; return the originals' training log keys. Raises ``TrainingDiverged`` on NaN."""
        self.model.train()
        start = time.time()
        losses = torch.empty(num_steps, device=next(self.model.parameters()).device)
        check_every = 100
        for i in range(num_steps):
            losses[i] = self.train_step()
            if bar is not None:
                bar.update(1)
            if (i + 1) % check_every == 0 or i + 1 == num_steps:
                # one host sync per ``check_every`` steps, to stop soon after a divergence
                window = losses[max(0, i + 1 - check_every):i + 1]
                if not torch.isfinite(window).all():
                    bad = int(torch.nonzero(~torch.isfinite(losses[:i + 1]))[0]) + 1
                    raise TrainingDiverged(f"loss became NaN or inf at iteration {iteration}, step {bad}; "
                                           f"checkpoints of earlier iterations are kept")
        logs = {"time/training": time.time() - start}
        if num_steps:
            arr = losses.cpu().numpy()
            logs["training/train_loss_mean"] = float(np.mean(arr))
            logs["training/train_loss_std"] = float(np.std(arr))
            logs["training/action_error"] = float(arr[-1])
        else:
            logs["training/train_loss_mean"] = float("nan")
            logs["training/train_loss_std"] = float("nan")
            logs["training/action_error"] = float("nan")
        return logs
