"""Data-parallel training under ``torchrun``: process group set-up, device per rank, DDP wrapping.

Every rank draws the same global batch (same seeded generator) and trains on its slice of rows; the Trainer scales
each slice's loss so that DDP's gradient average equals the gradient of the global batch's masked mean. Results
match one process at the same global batch up to float summation order (with dropout off; dropout masks differ).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns the context and this rank's
    device (``cuda:LOCAL_RANK`` on GPUs, the given device otherwise). A no-op for plain runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist

    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Parameters that no loss reaches (the compatibility tables wte/wpe, the state and return heads) must be frozen
    # first (Trainer does it), so that every parameter DDP tracks receives a gradient in every step.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup(ctx: DistContext):
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
