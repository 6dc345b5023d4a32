"""The training loop: device-resident batches, no host synchronisation inside a step."""
from __future__ import annotations

import contextlib
import functools
import time
import warnings

import numpy as np
import torch

from decision_transformer.cuda_graphs import capture, no_host_sync
from decision_transformer.data import TrajectoryDataset, check_batch_shape  # noqa: F401  (also imported from here)
from decision_transformer.errors import TrainingDiverged, UserError, first_line
from decision_transformer.training.losses import masked_action_mse

GRAD_CLIP = 0.25


def forked_rng():
    """``torch.random.fork_rng`` over the CPU generator and every GPU's: code inside that seeds torch
    (``torch.manual_seed`` reseeds every GPU) leaves the caller's random streams as they were."""
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else [])


@contextlib.contextmanager
def module_mode(model, training: bool):
    """``model`` in train (dropout on) or eval mode inside, then back in the mode it was in. Objects without
    ``training`` (stand-ins that only act) are put in the mode and left there."""
    was_training = getattr(model, "training", None)
    model.train(training) if training else model.eval()
    try:
        yield model
    finally:
        if was_training is not None and was_training != training:
            model.train(was_training)


def float32_device(model, what: str):
    """The device of ``model``'s parameters (None for an object without any), after refusing parameters that are
    not float32: ``what`` (evaluation, an analysis, the Fisher) computes with float32 buffers and batches, so a
    half or double model would fail deep inside torch."""
    params = getattr(model, "parameters", None)   # (any object with get_action will do for an evaluation)
    param = next(params(), None) if callable(params) else None
    if param is None:
        return None
    if param.dtype != torch.float32:
        raise UserError(f"{what} runs float32 models; this one's parameters are {param.dtype} (use model.float())")
    return param.device


def check_model_env(model, env: str, what: str, selected: str | None = None):
    """Refuse a model that cannot act in ``env`` (``what`` names the call): a multi-task model without ``env``'s
    layers or with another env's selected (``selected``: the env passed to its forward, which overrides the
    selection), or a model whose state and action sizes are not ``env``'s (walker2d and halfcheetah share theirs, so
    only a multi-task model's selection tells them apart)."""
    from decision_transformer.envs import get_env_spec

    cfg, spec = getattr(model, "config", None), get_env_spec(env)
    envs = getattr(cfg, "envs", None)   # a multi-task model acts with the env layers it has selected
    if isinstance(envs, (list, tuple)) and isinstance(getattr(model, "active", None), int):
        if env not in envs:
            raise UserError(f"{what}: a multi-task model of {', '.join(envs)}; it has no layers for {env}")
        if isinstance(selected, int) and not isinstance(selected, bool) and 0 <= selected < len(envs):
            selected = envs[selected]   # (the forward takes an env's index or its name)
        if selected is not None and selected != env:
            raise UserError(f"{what}: the forward is asked for {selected}'s layers, but the data are {env}'s")
        if selected is None and envs[model.active] != env:
            raise UserError(f"{what}: the multi-task model has {envs[model.active]}'s layers selected; select "
                            f"{env}'s first (model.toggle_env({env!r}))")
    dims = (getattr(cfg, "state_dim", None), getattr(cfg, "act_dim", None))
    if all(isinstance(d, int) for d in dims) and dims != (spec.state_dim, spec.act_dim):
        raise UserError(f"{what}: the model's states and actions have {dims[0]} and {dims[1]} dimensions; {env}'s "
                        f"have {spec.state_dim} and {spec.act_dim}")


def check_timestep_rows(model, last: int, what: str, source: str):
    """Refuse a model whose timestep table (``config.max_ep_len`` rows) has no row for timestep ``last``, the
    largest that ``source`` (the env's episodes, the dataset's windows, a batch) gives it: an ``IndexError`` deep in
    the embedding otherwise."""
    rows = getattr(getattr(model, "config", None), "max_ep_len", None)
    if isinstance(rows, int) and not isinstance(rows, bool) and last >= rows:
        raise UserError(f"{what}: the model embeds timesteps 0..{rows - 1} (max_ep_len {rows}), but {source} reach "
                        f"timestep {last}; build it with max_ep_len of at least {last + 1}")


def check_data_timesteps(model, dataset, what: str):
    """``check_timestep_rows`` for the windows of a ``TrajectoryDataset`` (timesteps up to the longest trajectory's
    last step, clipped to the env's ``max_ep_len - 1`` as the sampler does)."""
    lens, cap = getattr(dataset, "traj_lens_all", None), getattr(dataset, "max_ep_len", None)
    if lens is not None and len(lens) and isinstance(cap, int):
        check_timestep_rows(model, min(int(max(lens)), cap) - 1, what, "the dataset's windows")


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: on CUDA through pinned memory with a non-blocking
    copy (a plain copy from pageable memory waits for every kernel queued before it); elsewhere ``t.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compile_module(module, mode):
    """``torch.compile(module)`` in ``mode`` (True = ``default``); the module itself for None/False."""
    if not mode:
        return module
    return torch.compile(module) if mode in (True, "default") else torch.compile(module, mode=mode)


def mark_step(mode):
    """Under CUDA graphs (``reduce-overhead``) tell torch that a new training step begins: the previous step's graph
    outputs may then be overwritten (each step keeps only detached copies of them)."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def apply_update(total, optimizer, scheduler, params, grad_clip: float | None):
    """One optimiser step, in the originals' order: zero_grad, backward, global grad-norm clip, step, schedule."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer_step(optimizer, scheduler)


def optimizer_step(optimizer, scheduler):
    """The optimiser's step, then the schedule's; an overflowing step is ``TrainingDiverged``."""
    try:
        optimizer.step()
    except RuntimeError as e:   # a step size beyond float32 (a finite but huge --learning_rate): the run diverged
        if "overflow" not in str(e):
            raise
        raise TrainingDiverged(f"the optimiser's step overflowed float32 ({first_line(e)}); the learning rate is far "
                               f"too large. Checkpoints of earlier iterations are kept") from None
    scheduler.step()


def freeze_unreached(module, probe_loss):
    """Freeze the parameters of ``module`` that ``probe_loss()`` (one loss on a probe batch, drawn from its own
    generator) does not reach; the probe runs in eval mode and its gradients are dropped. AdamW skips parameters
    without gradients anyway, so training is unchanged; DDP needs every parameter it tracks to receive a gradient."""
    was_training = module.training
    module.eval()
    try:
        probe_loss().backward()
    finally:
        module.train(was_training)
    for p in module.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None


def rank_slice(batch, rank: int, world_size: int):
    """This rank's rows of the global batch (equal slices), and the loss scale W * n_rank / n_global (real steps):
    DDP averages gradients over ranks, so the scaled slice losses average to the global batch's masked mean."""
    from dataclasses import fields, replace

    b = batch.states.shape[0] // world_size
    rows = slice(rank * b, (rank + 1) * b)
    part = replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})
    return part, world_size * part.mask.sum() / batch.mask.sum()


def warn_context_mismatch(model, K: int):
    """A warning when the training windows' length ``K`` is not the model's context ``config.max_length``, which
    evaluation uses: the model would act on histories of another length than it learnt from (the scripts build the
    model with ``max_length`` = ``--K``)."""
    max_length = getattr(getattr(model, "config", None), "max_length", None)
    if isinstance(max_length, int) and max_length != K:
        warnings.warn(f"training on windows of K={K} steps a model whose context (config.max_length, used by "
                      f"evaluation) is {max_length}", stacklevel=3)


class Trainer:
    """Owns the model, optimiser, schedule and batch generator; ``train_iteration`` runs ``num_steps`` steps."""

    def __init__(self, model, optimizer, scheduler, dataset: TrajectoryDataset, *, batch_size: int, K: int,
                 generator: torch.Generator, grad_clip: float | None = GRAD_CLIP, extra_loss=None,
                 amp_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
                 compile: bool | str | None = None, cuda_graph: bool = False):
        self.model = model                # the module called for the forward (DistributedDataParallel under torchrun)
        self.module = model               # the plain DT
        self.graph: StepGraph | None = None   # --cuda_graph's (set last)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataset = dataset
        check_batch_shape(batch_size, K)
        self.batch_size = batch_size
        self.K = K
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (torch.Generator(device=dataset.device)), got "
                            f"{type(generator).__name__}")
        if torch.device(generator.device).type != torch.device(dataset.device).type:
            raise ValueError(f"the batch generator is on {generator.device}, the dataset on {dataset.device}: make it "
                             f"with torch.Generator(device=dataset.device)")
        self.generator = generator
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type != torch.device(dataset.device).type:
            raise ValueError(f"the model is on {param.device}, the dataset on {dataset.device}: build the dataset with "
                             f"device={param.device.type!r} (TrajectoryDataset(trajectories, env, device=...)) or move "
                             f"the model")
        if isinstance(getattr(dataset, "env", None), str):
            check_model_env(model, dataset.env, "training")
        check_data_timesteps(model, dataset, "training")
        self.grad_clip = grad_clip
        # optional callable(model, out, batch, step) -> loss, or (loss, {log key: scalar tensor}); each key logs its
        # value at the iteration's last step, as the originals' diagnostics (and ``training/action_error``) do
        self.extra_loss = extra_loss
        self.extra_logs: dict[str, torch.Tensor] = {}
        self.step = 0                     # global step counter, never reset
        # bf16 autocast (CUDA): no loss scaling needed; the loss itself is computed in fp32
        self.amp_dtype = amp_dtype
        self.device_type = next(model.parameters()).device.type
        # Data parallel: every rank draws the same global batch and trains on its slice of rows
        self.rank, self.world_size = rank, world_size
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        if world_size > 1:
            from decision_transformer.distributed import DistContext, wrap

            self._freeze_unreached()
            self.model = wrap(model, DistContext(rank, world_size, rank), next(model.parameters()).device)
        self.compile_mode = compile
        self.model = compile_module(self.model, compile)
        self.params = [p for p in model.parameters() if p.requires_grad]
        warn_context_mismatch(model, K)
        if cuda_graph and self.device_type != "cuda":
            raise ValueError("--cuda_graph needs a CUDA device (it replays each training step as a CUDA graph)")
        self.graph = StepGraph(self) if cuda_graph else None

    def _freeze_unreached(self):
        """Freeze what the loss does not reach (``freeze_unreached``). The probe's text batch (``--joint``) is put
        back, so training reads the same text as without DDP."""
        gen = torch.Generator(device=self.dataset.device).manual_seed(0)
        stream = self.extra_state()
        try:
            freeze_unreached(self.module, lambda: self._loss(self.dataset.sample_batch(self.batch_size, self.K,
                                                                                       gen))[1])
        finally:
            self.extra_logs = {}
            self.load_extra_state(stream)

    def train_step(self) -> torch.Tensor:
        """One update; returns the step's total loss (action MSE plus any auxiliary loss, what the originals logged
        as the training loss) and keeps the action MSE in ``last_action_error``, both without a host sync."""
        if not self.module.training:   # (an evaluation or analysis in between may have left it in eval mode)
            self.model.train()
        mark_step(self.compile_mode)
        batch = self.dataset.sample_batch(self.batch_size, self.K, self.generator)
        done = self.graph.step([batch]) if self.graph is not None else None
        if done is not None:
            self.step += 1
            self.last_action_error = done[0]
            return done[1]
        loss, total = self._loss(batch)
        apply_update(total, self.optimizer, self.scheduler, self.params, self.grad_clip)
        self.step += 1
        self.last_action_error = loss.detach()
        return total.detach()

    def extra_state(self) -> dict:
        """What ``--resume`` needs beyond the optimiser, schedule and generators: the ``--joint`` text stream, and
        which k-means centres the alignment loss and which reference weights ``--init_reg`` use."""
        lm, km = getattr(self.extra_loss, "lm", None), getattr(self.extra_loss, "kmeans", None)
        reg = getattr(self.extra_loss, "init_reg", None)
        return ({"text_batches": lm.batches.state_dict()} if lm is not None else {}) | \
            ({"kmeans_centres": km.fingerprint} if getattr(km, "fingerprint", None) else {}) | \
            ({"init_reg_reference": reg.fingerprint} if getattr(reg, "fingerprint", None) else {})

    def load_extra_state(self, state: dict):
        """Restore ``extra_state``'s ``--joint`` text stream; ValueError when the k-means centres or the ``--init_reg``
        reference weights are not those the run saved, KeyError when a ``--joint`` run resumes a state without a text
        stream."""
        lm, km = getattr(self.extra_loss, "lm", None), getattr(self.extra_loss, "kmeans", None)
        reg = getattr(self.extra_loss, "init_reg", None)
        saved = state.get("kmeans_centres")
        if km is not None and saved is not None and saved != getattr(km, "fingerprint", saved):
            # (another run with another seed replaced a shared --kmeans_cache, say): it would go on with other centres
            raise ValueError("the k-means centres (read from --kmeans_cache, or computed from the LM's token "
                             "embeddings) are not those the run started with (was the cache or the LM replaced?); "
                             "restore the files, or start the run afresh")
        saved = state.get("init_reg_reference")
        if reg is not None and saved is not None and saved != getattr(reg, "fingerprint", saved):
            raise ValueError("the --init_reg reference weights (the model training started from: the --pretrained_lm "
                             "files or the --load_checkpoint file) are not those the run started with (were they "
                             "replaced?); restore them, or start the run afresh")
        if lm is not None:
            if "text_batches" not in state:
                raise KeyError("text_batches (the run was not made with --joint)")
            lm.batches.load_state_dict(state["text_batches"])

    def close(self):
        """Drop the DDP (and compiled) wrapper. DDP's reducer holds the process group: left to the garbage collector,
        it may be freed during interpreter shutdown, after the group is gone, and abort the process. Training ends
        here; the plain model stays usable."""
        self.model = self.module

    def _loss(self, batch):
        """(action MSE, total loss) of a batch; under data parallelism of this rank's slice, scaled."""
        if self.world_size > 1:
            batch, scale = self._rank_slice(batch)
        # (no cast cache under a CUDA graph: the cached casts of the weights would be the capture's)
        autocast = functools.partial(torch.autocast, self.device_type, dtype=self.amp_dtype or torch.bfloat16,
                                     enabled=self.amp_dtype is not None, cache_enabled=self.graph is None)
        with autocast():
            out = self.model(batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps,
                             attention_mask=batch.mask)
        loss = masked_action_mse(out.action_preds.float(), batch.actions, batch.mask)
        if self.world_size > 1:
            # DDP averages gradients over ranks: scale so that the average is the gradient of the global batch's
            # masked mean, whatever the number of real steps in each rank's slice
            loss = loss * scale
        total = loss
        if self.extra_loss is not None:
            with autocast():   # the auxiliary forwards too (--joint's LM pass); the losses themselves are fp32
                extra = self.extra_loss(self.module, out, batch, self.step)
            if isinstance(extra, tuple):
                extra, logs = extra
                for k, v in logs.items():
                    self.extra_logs[k] = torch.as_tensor(v).detach().float()  # kept on device: no host sync
            total = total + extra
        return loss, total

    def _rank_slice(self, batch):
        return rank_slice(batch, self.rank, self.world_size)

    def train_iteration(self, num_steps: int, iteration: int, bar=None) -> dict:
        """Run ``num_steps`` steps; return the originals' training log keys. Raises ``TrainingDiverged`` on NaN."""
        from decision_transformer.distributed import rank_dropout_stream

        rank_dropout_stream(self.generator, self.rank, self.world_size)
        self.model.train()
        start = time.time()
        losses = torch.empty(num_steps, device=next(self.model.parameters()).device)
        for i in range(num_steps):
            losses[i] = self.train_step()
            if bar is not None:
                bar.update(1)
            check_losses(losses[:i + 1], num_steps, iteration)
        logs = {"time/training": time.time() - start}
        if self.world_size > 1:  # the global batch's loss: the mean over ranks of the scaled slice losses
            import torch.distributed as dist

            dist.all_reduce(losses)
            losses /= self.world_size
            if num_steps:
                dist.all_reduce(self.last_action_error)
                self.last_action_error /= self.world_size
            if self.extra_logs:   # the auxiliary terms' logs too: the global batch's, as one process logs them
                keys = sorted(self.extra_logs)
                both = torch.stack([self.extra_logs[k].to(losses.device) for k in keys])
                dist.all_reduce(both)
                self.extra_logs = dict(zip(keys, both / self.world_size))
        for k, v in self.extra_logs.items():
            logs[k] = float(v)
        self.extra_logs = {}
        if num_steps:
            arr = losses.cpu().numpy()
            logs["training/train_loss_mean"] = float(np.mean(arr))
            logs["training/train_loss_std"] = float(np.std(arr))
            logs["training/action_error"] = float(self.last_action_error)  # the last step's action MSE
        else:
            logs["training/train_loss_mean"] = float("nan")
            logs["training/train_loss_std"] = float("nan")
            logs["training/action_error"] = float("nan")
        return logs


class StepGraph:
    """``--cuda_graph``: a training step's forward, loss, backward and gradient clipping replayed from one CUDA graph.
    The batch is drawn as in a plain step and copied into the graph's input tensors; AdamW (fused on CUDA) and the
    schedule step outside it, so the optimiser's state, learning rate and ``--resume`` work as in a plain run. The
    first ``WARMUP`` steps run as plain steps on the capture stream (torch's lazy initialisations), the next is
    captured; dropout draws from torch's CUDA generator inside the graph, a new mask at each replay. The gradients
    live in the graph's memory: the graph writes them (it was captured with none), so nothing zeroes them, and they
    are put back on the parameters after each replay. Refused with torchrun, ``--compile``, auxiliary losses and a
    loss scaler; a warm-up step that waits for the GPU, or a capture that fails, is a warning and plain steps from then
    on. What the capture saw stays: the trainable parameters, the modules' train/eval modes, the TF32 setting (a
    parameter frozen afterwards would still be updated)."""

    WARMUP = 3

    def __init__(self, trainer, losses=None):
        """``trainer``: its ``params``, ``optimizer``, ``scheduler`` and ``grad_clip`` are used. ``losses(batches)``
        -> (the loss to backpropagate, a tuple of detached tensors a step returns); default: a ``Trainer``'s
        ``(action loss, total loss)`` of one batch, with its refusals."""
        if losses is None:
            for bad, what in ((trainer.world_size > 1, "torchrun"), (trainer.compile_mode, "--compile"),
                              (trainer.extra_loss is not None, "an auxiliary loss (--joint, k-means, --init_reg ...)"),
                              (type(trainer).train_step is not Trainer.train_step,
                               f"{type(trainer).__name__}'s own step")):
                if bad:
                    raise ValueError(f"--cuda_graph cannot be used with {what}")

            def losses(batches):
                loss, total = trainer._loss(batches[0])
                return total, (loss.detach(), total.detach())

        self.trainer, self.losses = trainer, losses
        self.warm = 0
        self.graph = None
        self.failed = False

    def step(self, batches: list):
        """One training step on ``batches`` (the batches a plain step would draw, in its order): the tuple of
        ``losses``, each a fresh tensor; None where the caller is to take a plain step (after a failed capture). A
        warm-up step is a plain step on the capture stream; the step after the warm-up captures the graph, then
        replays it like every later one."""
        if self.failed:
            return None
        t = self.trainer
        if self.graph is None:
            if self.warm < self.WARMUP:
                self.warm += 1
                main, side = self._side()
                try:
                    with torch.cuda.stream(side):
                        t.optimizer.zero_grad(set_to_none=True)
                        with no_host_sync():   # what the graph will hold, run once where a wait is a plain error
                            outs = self.body(batches)
                except RuntimeError as e:
                    main.wait_stream(side)
                    return self._give_up(e)   # (no update was made: these batches get a plain step)
                with torch.cuda.stream(side):
                    optimizer_step(t.optimizer, t.scheduler)
                main.wait_stream(side)
                return outs
            if not self._capture(batches):
                return None
        for inputs, batch in zip(self.inputs, batches):
            for name, x in inputs.items():
                x.copy_(getattr(batch, name))
        self.graph.replay()
        for p, g in zip(t.params, self.grads):
            p.grad = g
        optimizer_step(t.optimizer, t.scheduler)
        return tuple(o.clone() for o in self.outputs)

    def body(self, batches=None):
        """What the graph holds: the losses of the input batches (``batches`` in a warm-up step), the backward and
        the gradient clipping; returns the ``losses`` outputs."""
        t = self.trainer
        total, outs = self.losses(self.batches if batches is None else batches)
        total.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(t.params, t.grad_clip)
        return outs

    def _give_up(self, e: BaseException):
        """Plain steps from here on, with a warning that names why; None (the caller takes a plain step)."""
        self.trainer.optimizer.zero_grad(set_to_none=True)
        warnings.warn(f"--cuda_graph: the training step could not be captured ({type(e).__name__}: {first_line(e)}); "
                      f"training goes on with plain steps", RuntimeWarning, stacklevel=5)
        self.failed = True
        return None

    def _side(self):
        t = self.trainer
        main = torch.cuda.current_stream(t.params[0].device)
        if not hasattr(self, "side"):
            self.side = torch.cuda.Stream(t.params[0].device)
        self.side.wait_stream(main)
        return main, self.side

    def _capture(self, batches):
        from dataclasses import fields

        t = self.trainer
        main, side = self._side()
        self.inputs = [{f.name: getattr(b, f.name).clone() for f in fields(b)} for b in batches]
        self.batches = [type(b)(**inputs) for b, inputs in zip(batches, self.inputs)]
        t.optimizer.zero_grad(set_to_none=True)      # captured with no gradients: the backward writes them
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                outs = capture(graph, self.body)
        except Exception as e:  # noqa: BLE001 - an op a graph cannot hold: plain steps from here on
            main.wait_stream(side)
            self._give_up(e)
            return False
        main.wait_stream(side)
        self.graph, self.outputs = graph, outs
        self.grads = [p.grad for p in t.params]
        return True


#: steps between the host syncs that check the losses for NaN/inf
CHECK_EVERY = 100


def check_losses(losses: torch.Tensor, num_steps: int, iteration: int):
    """``losses`` of the iteration's steps so far: after every ``CHECK_EVERY`` steps and the last, one host sync
    checks the latest window, so a divergence stops the run soon; ``TrainingDiverged`` names the first bad step."""
    n = len(losses)
    if n % CHECK_EVERY and n != num_steps:
        return
    if not torch.isfinite(losses[max(0, n - CHECK_EVERY):]).all():
        bad = int(torch.nonzero(~torch.isfinite(losses))[0]) + 1
        raise TrainingDiverged(f"loss became NaN or inf at iteration {iteration}, step {bad}; checkpoints of earlier "
                               f"iterations are kept")


class ActTrainer(Trainer):
    """Behaviour cloning (``--model_type bc``): MSE between the MLP's action and the last action of each window
    (always a real step: windows are left-padded). Used without gradient clipping, as the originals."""

    def _loss(self, batch):
        if self.world_size > 1:  # equal rows per rank: DDP's average is the global batch's mean as it is
            batch, _ = self._rank_slice(batch)
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None, cache_enabled=self.graph is None):
            preds = self.model(batch.states)
        loss = torch.nn.functional.mse_loss(preds.float(), batch.actions[:, -1])
        return loss, loss
