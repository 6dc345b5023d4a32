"""Data-parallel training under ``torchrun``: process group set-up, device per rank, DDP wrapping.

Every rank draws the same global batch (same seeded generator) and trains on its slice of rows; the Trainer scales
each slice's loss so that DDP's gradient average equals the gradient of the global batch's masked mean. Results
match one process at the same global batch up to float summation order (with dropout off: each rank other than 0
draws its own dropout masks, see ``rank_dropout_stream``).
Ranks other than 0 print only their errors and warnings.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import sys
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    """This process's place in a torchrun launch: rank, world size, local rank (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains (a torchrun launch)."""
        return self.world_size > 1


def check_batch_split(batch_size: int) -> None:
    """Under torchrun (``WORLD_SIZE`` processes) the global batch splits evenly over them: checked with the flags,
    before any data is loaded or generated."""
    from decision_transformer.errors import UserError

    world = os.environ.get("WORLD_SIZE", "1")
    world = int(world) if world.isdigit() else 1
    if world > 1 and batch_size % world:
        raise UserError(f"batch size {batch_size} is not divisible by {world} processes (torchrun's WORLD_SIZE): "
                        f"give a --batch_size that is")


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns the context and this rank's
    device (``cuda:LOCAL_RANK`` on GPUs, the given device otherwise). A no-op for plain runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist

    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if ctx.local_rank >= count:
            from decision_transformer.errors import UserError

            raise UserError(f"torchrun's local rank {ctx.local_rank} needs GPU {ctx.local_rank}, but this machine has "
                            f"{count}: give --nproc_per_node at most {count}")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # a run that stops with an error before ``cleanup`` (a missing dataset, a damaged file) leaves the group at
        # exit: a rank exiting with it alive could abort ("terminate called without an active exception")
        atexit.register(_leave_at_exit)
    quiet_other_ranks()
    return ctx, device


def _leave_at_exit():
    """At interpreter exit: leave the process group if ``cleanup`` did not."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks() -> None:
    """Under torchrun, a rank other than 0 prints through ``QuietRank`` (its own warning and error lines, prefixed
    ``[rank N]``): called by the scripts first thing, so that the flag warnings given before the process group is
    joined are prefixed too (they came out twice, alike), and by ``setup``; rank 0's stderr is made line-buffered.
    A no-op for plain runs."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if not (world.isdigit() and int(world) > 1 and rank.isdigit()):
        return
    if int(rank) != 0 and not isinstance(sys.stderr, QuietRank):
        sys.stderr = QuietRank(sys.stderr, int(rank))
    elif int(rank) == 0 and hasattr(sys.stderr, "reconfigure"):
        # rank 0 writes each line whole (``print`` writes the text, then the newline): another rank's line, written
        # in one piece by QuietRank, never lands between the two halves of one of rank 0's on a shared terminal
        sys.stderr.reconfigure(write_through=False, line_buffering=True)


def rank_dropout_stream(generator: torch.Generator, rank: int, world_size: int) -> None:
    """At the start of a training iteration under torchrun, a rank other than 0 reseeds torch's global generators
    (its dropout masks) from the batch sampler's state and its rank. Every rank is seeded alike, so without this
    each rank's slice of the global batch got the same dropout masks as rank 0's. The sampler's state is the same on
    every rank and is restored by ``--resume``, so a resumed run draws the masks of an uninterrupted one. Rank 0
    keeps its stream, a plain run's. A no-op without torchrun."""
    if world_size <= 1 or rank == 0:
        return
    import hashlib

    digest = hashlib.sha256(generator.get_state().numpy().tobytes() + rank.to_bytes(4, "little")).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def from_main(ctx: DistContext, value):
    """``value`` as rank 0 has it (a picklable object), on every rank; ``value`` itself without torchrun."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_checks(ctx: DistContext):
    """Around what only rank 0 does before training (the run folder's lock, the checks of its files): a refusal there
    (a ``UserError``) stops every rank with its line, instead of the others training on until their first gradient
    exchange fails. Without torchrun the block runs as it is."""
    from decision_transformer.errors import UserError

    failed = None
    try:
        yield
    except UserError as e:
        if not ctx.enabled:
            raise
        failed = e
    if ctx.enabled:
        why = from_main(ctx, None if failed is None else str(failed))
        if failed is not None:
            raise failed
        if why is not None:
            raise UserError(why)


def broadcast_module(ctx: DistContext, module: torch.nn.Module):
    """Give every rank rank 0's parameters and buffers, in place. Merges (a Fisher merge estimates on each rank's
    own batches of its own device) and other set-up can differ between ranks; DDP would copy rank 0's weights at
    wrapping time anyway, but the states taken before it (init_reg's reference, ``--eval_merge_pre``'s "pre"
    weights) must be rank 0's too. A no-op without torchrun."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            dist.broadcast(t.data, src=0)


class QuietRank(io.TextIOBase):
    """The stderr of a rank other than 0: rank 0 already prints the progress, data and summary lines, so only this
    rank's ``error``/``warning`` lines and tracebacks pass, prefixed ``[rank N]``. Not a terminal, so progress bars
    stay off."""

    def __init__(self, stream, rank: int):
        self.stream, self.rank = stream, rank
        self._buf, self._traceback = "", False
        self._torch_tag = f"[rank{rank}]: "

    def write(self, s: str) -> int:
        """Buffer ``s``; pass on its complete lines that start with ``error`` or ``warning``, and every line from a
        traceback on, prefixed ``[rank N]``. Returns ``len(s)``."""
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.startswith(self._torch_tag):   # torch.distributed's excepthook tags each traceback line
                line = line[len(self._torch_tag):]
            self._traceback = self._traceback or line.startswith("Traceback")
            if self._traceback or line.startswith(("error", "warning")):
                self.stream.write(f"[rank {self.rank}] {line}\n")
        return len(s)

    def flush(self):
        """Flush the wrapped stream (an unfinished line stays buffered)."""
        self.stream.flush()

    def isatty(self) -> bool:
        """False: not a terminal, so progress bars stay off."""
        return False


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel on this rank's device under torchrun; ``model`` itself
    otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Parameters that no loss reaches (the compatibility tables wte/wpe, the state and return heads) must be frozen
    # first (Trainer does it), so that every parameter DDP tracks receives a gradient in every step.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup(ctx: DistContext):
    """Leave the process group. Call ``Trainer.close`` first: wrappers that are no longer referenced are collected
    here, while the group is still alive (see ``Trainer.close``)."""
    if ctx.enabled:
        import gc

        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    if isinstance(sys.stderr, QuietRank):   # (kept: the error line a script may still end with gets its prefix)
        sys.stderr.flush()
