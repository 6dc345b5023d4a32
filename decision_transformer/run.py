"""The single-task pipeline behind ``experiment.py`` and ``lm_cotraining/experiment.py``:
data -> model -> training -> evaluation -> checkpoints.

The two scripts share this pipeline; the ``script`` it is run as (``EXPERIMENT`` or ``LM_COTRAINING``) selects what
differs: ``check_run_flags`` (the LM script needs ``--pretrained_lm``), the ``lm_script`` branches of ``_run_locked``
(run folder and WandB naming, resume, fp16) and ``make_extra_loss`` (the k-means variant). ``SCRIPTS`` only maps each
to its script's name, for messages, the run lock and the config."""
from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from decision_transformer import distributed
from decision_transformer.checkpoint import (atomic_save, check_same_behaviour, load_checkpoint,
                                             load_state_into, make_checkpoint, model_name, new_exp_id, recorded_base,
                                             recorded_count, run_dir_name, same_flag_value, set_aside_previous_run,
                                             wandb_run_name, WORKING_DIR)
from decision_transformer.cli import check_context, check_seed, check_upper_bounds
from decision_transformer.data import TrajectoryDataset, load_dataset
from decision_transformer.envs import check_dataset_name, get_env_spec
from decision_transformer.errors import TrainingDiverged, UserError, deferred_interrupts
from decision_transformer.evaluation import env_pool, evaluate_episodes
from decision_transformer.files import refuse_files_above, refuse_folders
from decision_transformer.runlog import RunLogger, check_wandb_mode, progress, summary_line
from decision_transformer.model_factory import (build_bc_model, build_model_from_args, check_flags_before_data,
                                                locate_pretrained, make_extra_loss)
from decision_transformer.cpu import configure_threads
from decision_transformer.training import GRAD_CLIP, ActTrainer, Trainer, freeze_from_args, optimizer_from_args
from decision_transformer.paths import project_path

TRAIN_STATE = "train_state.pt"
EXPERIMENT, LM_COTRAINING = "experiment", "lm_cotraining"
#: the script each pipeline variant belongs to (for messages)
SCRIPTS = {EXPERIMENT: "experiment.py", LM_COTRAINING: "lm_cotraining/experiment.py"}
#: The LM script's off switches for flags on by default there: a checkpoint trained without one is advised to pass them.
LM_NEGATIONS = {"--extend_positions": "--no_extend_positions"}


# ---- small helpers ----------------------------------------------------------------------------------------------

def _device_of(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None


def check_device_flags(args):
    """``--device`` and ``--threads`` well-formed, checked without touching torch's settings (the sweep planner
    runs this too)."""
    from decision_transformer.cpu import choose_threads

    name = getattr(args, "device", None)
    if name not in (None, "", "auto"):
        _device_of(name)
    threads = getattr(args, "threads", None)
    if threads is not None and str(threads) != "auto":
        choose_threads(threads, available=1, busy=0.0, current=1)
    if getattr(args, "cuda_graph", False):   # (the Trainer refuses these too, but only once the data is loaded)
        if name not in (None, "", "auto") and _device_of(name).type != "cuda":   # (no GPU here: check_graph_device)
            raise UserError(CUDA_GRAPH_NEEDS_CUDA)
        for bad, what in ((args.compile is not None, "--compile"),
                          (int(os.environ.get("WORLD_SIZE", "1") or 1) > 1, "torchrun")):
            if bad:
                raise UserError(f"--cuda_graph cannot be used with {what}")


CUDA_GRAPH_NEEDS_CUDA = "--cuda_graph needs a CUDA device (it replays each training step as a CUDA graph)"


def check_graph_device(args, device: torch.device):
    """``--cuda_graph`` on the run's resolved device: refused where it is not a GPU, as the run starts (before its
    data). Not among the flag checks: the sweep planner, which runs those, may plan on a machine without a GPU."""
    if getattr(args, "cuda_graph", False) and device.type != "cuda":
        raise UserError(CUDA_GRAPH_NEEDS_CUDA)


#: the --device names whose CPU fallback has been warned about in this process
_CPU_FALLBACKS_SAID: set = set()


def resolve_device(name: str, threads: str | int | None = "auto") -> torch.device:
    """The torch device for ``--device name``; also sets torch's CPU threads (``--threads``, see cpu.py)."""
    if name in (None, "", "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = _device_of(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            if name not in _CPU_FALLBACKS_SAID:   # (once per process: a report resolves the device per analysis)
                _CPU_FALLBACKS_SAID.add(name)
                print(f"warning: --device {name} requested but CUDA is not available; running on cpu",
                      file=sys.stderr)
            dev = torch.device("cpu")
        elif dev.type == "cuda" and dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
            # the current device too: what uses it implicitly (streams, events, pinned copies) works on the run's GPU
            torch.cuda.set_device(dev)
    configure_threads(threads, dev)
    return dev


def configure_matmul_precision(precision: str, device: torch.device):
    """TF32 matmuls and convolutions on CUDA, except with ``--precision fp32``: that run keeps full fp32 arithmetic,
    as the originals trained."""
    if device.type == "cuda":
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast on CUDA GPUs that support it (``auto``/``bf16``) and on CPU when asked (``bf16``); None = fp32."""
    if precision == "fp32" or (device.type != "cuda" and precision == "auto"):
        return None
    if device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if "AVX512" not in cap and "AMX" not in cap:
            print(f"warning: --precision bf16 on a CPU without AVX512 ({cap}) is emulated and slow", file=sys.stderr)
        return torch.bfloat16
    if device.type != "cuda":
        print(f"warning: --precision bf16 applies on CUDA and CPU only; training in fp32 on {device}", file=sys.stderr)
        return None
    if not native_bf16(device):
        if precision == "bf16":
            raise UserError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no native bfloat16 "
                            f"(compute capability 8.0 or later, Ampere on)")
        return None
    return torch.bfloat16


def native_bf16(device) -> bool:
    """Whether the CUDA ``device`` computes bfloat16 natively (compute capability 8.0 on; torch's
    ``is_bf16_supported`` also counts the emulation of older GPUs, which is slower than fp32)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


def seed_everything(seed: int):
    """Seed Python's ``random``, numpy's global generator (``seed`` mod 2^32) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device=None) -> dict:
    """The global random states of torch (CPU, and the run's CUDA device when ``device`` is one), numpy and Python,
    as plain values for a training-state file. Under torchrun rank 0's states are saved: the other ranks reseed their
    dropout stream at each iteration's start from the batch sampler's state (``distributed.rank_dropout_stream``)."""
    st = np.random.get_state()
    device = torch.device(device) if device is not None else torch.device("cpu")
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            "cuda_of_run": True,   # (older states hold every visible GPU's, in device order)
            "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
            "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]]}  # + gauss's cache


def set_rng_state(st: dict, device=None):
    """Restore the global random states that ``rng_state`` recorded; the CUDA state goes to the run's ``device``
    (each torchrun rank's own), only where both runs had CUDA."""
    torch.set_rng_state(st["torch"])
    device = torch.device(device) if device is not None else torch.device("cpu")
    saved = st.get("cuda") or []
    if saved and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # an older state's list is by device number; a GPU it does not hold gets the first one's
        state = saved[0] if st.get("cuda_of_run") or index >= len(saved) else saved[index]
        torch.cuda.set_rng_state(state, device)
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = st["python"]   # (states saved before the Gaussian cache was recorded: without it)
    random.setstate((py[1], tuple(py[0]), py[2] if len(py) > 2 else None))


def restore_generator(generator: torch.Generator, saved: torch.Tensor, seed: int, iteration: int):
    """The batch sampler's saved stream into ``generator``. A CUDA generator's state (seed and offset) and a CPU
    one's (the Mersenne Twister) cannot stand for each other: a run resumed on the other kind of device draws its
    batches from a fresh stream seeded from its ``seed`` and ``iteration`` (a warning says so)."""
    current = generator.get_state()
    if saved.numel() != current.numel():
        print(f"warning: the run's batch sampler stream was saved on another kind of device than {generator.device}; "
              f"the batches after iteration {iteration} are drawn from a new stream (seeded from the run's seed and "
              f"the iteration), so they differ from an uninterrupted run's", file=sys.stderr)
        generator.manual_seed((seed * 1_000_003 + iteration) % 2**63)
        return
    generator.set_state(saved.to(current.device))


#: param-group settings that choose how an optimiser computes its step on this machine, not what it has learnt: a
#: resume keeps the ones its optimiser was built with (fused AdamW on CUDA), not those of the machine that saved it
OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, state: dict):
    """``optimizer.load_state_dict(state)`` with the ``OPTIMIZER_IMPLEMENTATION`` settings of ``optimizer``'s own
    param groups written into the saved ones first: torch places each ``step`` by the saved groups' settings (on
    the parameters' device only where fused or capturable), so setting them after the load left a CPU-saved state's
    steps on the CPU for a fused CUDA step, which refuses them."""
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the saved optimiser has {len(groups)} parameter groups, this one {len(optimizer.param_groups)}")
    groups = [{**g, **{k: cur[k] for k in OPTIMIZER_IMPLEMENTATION if k in cur}}
              for g, cur in zip(groups, optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def save_train_state(path: Path, model, config: dict, trainer, optimizer, scheduler, generator, *, iteration: int,
                     best_score: float, exp_id: int, **extra):
    """What ``--resume`` restores: weights, optimiser, schedule, sampler generator, RNG states, run counters and the
    trainer's own state (the ``--joint`` text stream, the fp16 loss scaler)."""
    trainer_extra = trainer.extra_state() if hasattr(trainer, "extra_state") else {}
    atomic_save({**make_checkpoint(model.state_dict(), config, **extra), "iteration": iteration, "step": trainer.step,
                 "best_score": best_score, "exp_id": exp_id, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "rng": rng_state(generator.device),
                 "trainer_extra": trainer_extra}, path)


def restore_train_state(path: Path, model, trainer, optimizer, scheduler, generator) -> dict:
    """Loads a ``save_train_state`` file into the run's objects; returns it (iteration, best_score, exp_id, config)."""
    st = load_checkpoint(path)
    load_state_into(model, st["state_dict"], str(path))
    try:
        load_optimizer_state(optimizer, st["optimizer"])
        fresh = scheduler.state_dict()
        scheduler.load_state_dict(st["scheduler"])
        unlike = _unlike(scheduler.state_dict(), fresh)
        if unlike:   # (torch takes any values; a wrong one failed only at the first step, as a traceback)
            raise ValueError(f"its scheduler state has {unlike}")
        restore_generator(generator, st["generator"], int((st.get("config") or {}).get("seed") or 0),
                          recorded_count(st, "iteration"))
        set_rng_state(st["rng"], generator.device)
        if hasattr(trainer, "load_extra_state"):
            trainer.load_extra_state(st.get("trainer_extra") or {})
        trainer.step = recorded_count(st, "step")
        st.update(iteration=recorded_count(st, "iteration"), best_score=float(st["best_score"]),
                  exp_id=int(st["exp_id"]))
    except Exception as e:  # noqa: BLE001 - a damaged or crafted state fails in many ways; each is one line
        raise UserError(f"{path}: cannot restore the training state ({type(e).__name__}: {e})") from None
    return st


def _unlike(value, like, name: str = "") -> str | None:
    """Where ``value`` differs in form from ``like`` (types, list lengths, dict keys; floats must be finite): e.g.
    ``last_epoch 'x' (an int is expected)``; None when it has the same form."""
    if isinstance(like, dict):
        if not isinstance(value, dict):
            return f"{name or 'the state'} {value!r:.60} (a dict is expected)"
        return next((u for k in like for u in [_unlike(value.get(k), like[k], k)] if u), None)
    if isinstance(like, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(like):
            return f"{name} {value!r:.60} ({len(like)} values are expected)"
        return next((u for v, w in zip(value, like) for u in [_unlike(v, w, name)] if u), None)
    if isinstance(like, bool) or like is None or isinstance(like, str):
        return None if type(value) is type(like) else f"{name} {value!r:.60} ({type(like).__name__} is expected)"
    if isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or like < 0)
        return None if ok else f"{name} {value!r:.60} (an integer{' ≥ 0' if like >= 0 else ''} is expected)"
    if isinstance(like, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"{name} {value!r:.60} (a finite number is expected)"
    return None


def state_identity(path: Path) -> tuple | None:
    """What tells one version of a training state file from another (inode, size, modification time)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_state_unchanged(path: Path, seen: tuple | None):
    """``--resume`` read ``path`` before it held the run folder's lock: another process that trained the run (or set
    it aside for a fresh one) in the meantime would be overwritten by a continuation of the older state."""
    if state_identity(path) != seen:
        raise UserError(f"{path} changed while this --resume was starting (another process trained this run, or "
                        f"started it afresh, meanwhile); nothing was written: run the --resume again")


def check_same_data(st: dict, path, data_file, stats: dict, timesteps: dict):
    """``--resume`` on the data the run started on: the state statistics (single-task ``state_mean``/``state_std``,
    multi-task ``state_stats`` by env) and the timestep counts (``data_timesteps``) its training state recorded must
    be the data's now; else one line (a state written before this record was kept is taken as it is)."""
    recorded = dict(st.get("state_stats") or {})
    if "state_mean" in st and len(stats) == 1:
        recorded[next(iter(stats))] = {"state_mean": st["state_mean"], "state_std": st["state_std"]}
    for env, (mean, std) in stats.items():
        old, n_old = recorded.get(env), (st.get("data_timesteps") or {}).get(env)
        same_stats = old is None or (np.allclose(np.asarray(old["state_mean"], np.float64), mean, rtol=1e-5, atol=1e-6)
                                     and np.allclose(np.asarray(old["state_std"], np.float64), std, rtol=1e-5,
                                                     atol=1e-6))
        if not same_stats or (n_old is not None and int(n_old) != int(timesteps[env])):
            what = (f"{n_old} timesteps then, {timesteps[env]} now" if n_old is not None and
                    int(n_old) != int(timesteps[env]) else "other state statistics")
            raise UserError(f"--resume: the {env} data ({data_file}) is not the data {Path(path).parent} was trained "
                            f"on ({what}); resume with the run's own dataset, or start a new run")


def parse_targets(env_targets: str | None, default) -> list[float]:
    """``--env_targets`` as a list of whole-number returns (``default``'s when None); an empty entry, a
    non-number, a repeat or an out-of-range value is a ``UserError``."""
    if env_targets is None:
        return list(default)
    parts = env_targets.split(",")
    if env_targets.strip() and any(not t.strip() for t in parts):
        raise UserError(f"--env_targets has an empty entry (a missing number between commas?): {env_targets!r}")
    try:
        targets = [float(t) for t in parts if t.strip()]
    except ValueError:
        raise UserError(f"--env_targets must be comma-separated numbers, got {env_targets!r}") from None
    if not targets:
        raise UserError("--env_targets is empty")
    for t in targets:
        if not (math.isfinite(t) and abs(t) < 1e7):  # returns of these envs stay far below 1e5
            raise UserError(f"--env_targets: {t} is not a return target (finite, below 1e7 in magnitude)")
        if t != int(t):  # metric keys name a target by its integer (target_3600_...), as the originals' int targets
            raise UserError(f"--env_targets: {t} is not a whole number (the metric keys name targets as integers)")
    if len(set(targets)) != len(targets):
        raise UserError(f"--env_targets lists a target twice: {env_targets!r}")
    return targets


#: Float flags of the three training scripts and what a valid value is (a flag left at None is not checked).
_NUMBER_RULES = {
    "learning_rate": ("a positive number", lambda v: v > 0),
    "lm_learning_rate": ("a positive number", lambda v: v > 0),
    "weight_decay": ("a number >= 0", lambda v: v >= 0),
    "init_reg": ("a number >= 0", lambda v: v >= 0),
    "gpt_kmeans_const": ("a number >= 0 (a loss weight)", lambda v: v >= 0),
    "gpt_lm_const": ("a number >= 0 (a loss weight)", lambda v: v >= 0),
    "p": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "merge_lambda": ("a number", lambda v: True),
    "fisher_floor": ("a number >= 0", lambda v: v >= 0),
    "ties_density": ("a number in (0, 1] (the fraction of each task vector kept)", lambda v: 0 < v <= 1),
    "regmean_alpha": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
}
#: the merge flags among them, which merge_cli checks too
MERGE_NUMBER_RULES = {k: _NUMBER_RULES[k] for k in ("ties_density", "regmean_alpha")}


def check_numbers(args, rules: dict | None = None):
    """Finite, in-range float flags (``rules``: name -> (what a valid value is, test); default: the training
    scripts') and a seed that every seeded library accepts, before anything is written (a NaN learning rate would
    otherwise surface as a diverged run, a negative seed as an env error)."""
    for name, (what, ok) in (rules or _NUMBER_RULES).items():
        v = getattr(args, name, None)
        if v is None or isinstance(v, bool):
            continue
        if not (math.isfinite(v) and ok(v)):
            raise UserError(f"--{name} must be {what}, got {v}")
    for v in getattr(args, "p_list", None) or []:
        if not (math.isfinite(v) and 0 <= v <= 1):
            raise UserError(f"--p_list values must be numbers in [0, 1], got {v}")
    lr, wd = getattr(args, "learning_rate", None), getattr(args, "weight_decay", None)
    if rules is None and lr is not None and wd is not None and lr * wd >= 1:
        # AdamW's decoupled decay scales every decayed weight by 1 - lr * wd each step (lr at its warm-up peak)
        raise UserError(f"--weight_decay {wd} with --learning_rate {lr}: AdamW would scale the weights by "
                        f"1 - lr * wd = {1 - lr * wd:.3g} each step; lr * wd must be below 1")
    check_seed(getattr(args, "seed", None))


def load_run_data(args, device) -> tuple[Path, TrajectoryDataset]:
    """(data file, dataset) of a single-task run, and its ``data:`` line. Called once everything that needs no data
    is checked (the resume state, the model files, the freezing): a missing dataset is generated, which takes
    minutes. ``--resume`` never generates: a run continues on the data it started on, or not at all."""
    data_file, trajs = load_dataset(args.data_path, args.env, args.dataset,
                                    generate=not args.no_generate and not args.resume)
    dataset = TrajectoryDataset(trajs, args.env, mode=args.mode, pct_traj=args.pct_traj, device=device)
    print(f"data: {data_file} | {len(dataset)} trajectories, {dataset.num_timesteps} timesteps | returns "
          f"mean {dataset.traj_returns_all.mean():.2f} std {dataset.traj_returns_all.std():.2f} "
          f"max {dataset.traj_returns_all.max():.2f} min {dataset.traj_returns_all.min():.2f} | "
          f"training on {len(dataset.kept)} trajectories", file=sys.stderr)
    return data_file, dataset


def check_model_paths(args):
    """The model files the flags name exist, before the data step (which may generate a dataset for minutes); in their
    loaders' words. (Not a flag check: a sweep may plan runs whose models an earlier run has yet to write.)"""
    for flag, kind in (("load_checkpoint", "checkpoint"), ("pretrained_models", "model file"),
                       ("pretrained_model", "model file"), ("multi_pretrained_models", "model file"),
                       ("merge_base", "model file")):
        given = getattr(args, flag, None)
        if flag == "merge_base" and not (getattr(args, "pretrained_models", None)
                                         or getattr(args, "multi_pretrained_models", None)):
            continue   # (no merge: the flag has no effect, and is warned about as such)
        for path in [given] if isinstance(given, str) else given or []:
            if Path(path).is_dir():
                from decision_transformer.legacy_import import not_a_model_file

                raise UserError(f"{path}: {not_a_model_file(path).replace('model file', kind)}")
            if not Path(path).is_file():
                raise UserError(f"{path}: {kind} not found")


def activation_applies(args) -> bool:
    """Whether ``--activation_function`` shapes the model these flags build: not for the BC MLP, an LM backbone
    (``--pretrained_lm`` without ``--pretrained_block``: the LM's config sets it) or a multi-task model taken from
    ``--pretrained_model`` / ``--multi_pretrained_models`` (its recorded architecture), where it has no effect."""
    if getattr(args, "model_type", "dt") == "bc":
        return False
    if getattr(args, "pretrained_model", None) or getattr(args, "multi_pretrained_models", None):
        return False
    return not (args.pretrained_lm and getattr(args, "pretrained_block", None) is None)


def check_args(args):
    """Refuse invalid flag values and combinations of the training scripts before any data is loaded or
    file written (sizes, ranges, devices, saving, merging, freezing, ``--model_type bc``)."""
    checks = [("K", args.K >= 1), ("batch_size", args.batch_size >= 1), ("max_iters", args.max_iters >= 0),
              ("num_steps_per_iter", args.num_steps_per_iter >= 0), ("num_eval_episodes", args.num_eval_episodes >= 0),
              ("dropout", 0.0 <= args.dropout < 1.0), ("learning_rate", args.learning_rate > 0),
              ("warmup_steps", args.warmup_steps >= 0), ("embed_dim", args.embed_dim >= 1),
              ("n_layer", args.n_layer >= 1), ("n_head", args.n_head >= 1),
              ("regmean_n_windows", getattr(args, "regmean_n_windows", 1) >= 1),   # as merge_cli
              ("f_batch_size", getattr(args, "f_batch_size", 1) >= 1),
              ("f_num_batches", getattr(args, "f_num_batches", 1) >= 1)]
    for name, ok in checks:
        if not ok:
            raise UserError(f"invalid --{name} {getattr(args, name)}")
    from decision_transformer.data import check_mode, check_pct_traj

    check_mode(args.mode)             # (the dataset checks them too, but only once it is loaded or generated)
    check_pct_traj(args.pct_traj)
    check_upper_bounds(args)
    check_numbers(args)
    check_device_flags(args)
    if args.embed_dim % args.n_head:
        raise UserError(f"--embed_dim {args.embed_dim} is not divisible by --n_head {args.n_head}")
    check_context(args.K)
    if getattr(args, "log_to_wandb", False):
        check_wandb_mode()
    # (experiment_multi.py, which has no --env, saves to models/multi/)
    models_dir = (Path(project_path("models")) / (getattr(args, "env", None) or "multi")
                  if getattr(args, "save_model", False) else None)
    if models_dir is not None:   # (written after the first iteration)
        refuse_files_above(models_dir, "--save_model")
    if getattr(args, "outdir", None):   # (written once the model is built, merged, ...)
        refuse_files_above(Path(args.outdir), "--outdir")
    cache = getattr(args, "kmeans_cache", None)
    if cache and getattr(args, "gpt_kmeans", None) is not None:   # (written once the centres are computed)
        refuse_folders([cache])
        refuse_files_above(Path(cache).parent, "--kmeans_cache", writable=not Path(cache).is_file())   # (one there: read)
    if (getattr(args, "save_model", False) and getattr(args, "save_mode", "last") in ("best", "both")
            and args.num_eval_episodes == 0 and args.max_iters > 0):
        if args.save_mode == "best":  # the best-evaluated model is the only file this mode writes
            raise UserError("--save_mode best saves the best-evaluated model, but --num_eval_episodes 0 evaluates "
                            "nothing, so no model would be saved; use --save_mode last, or evaluate")
        print("warning: --save_mode both with --num_eval_episodes 0: nothing is evaluated, so no _best.pt is written "
              "(the last model is)", file=sys.stderr)
    if getattr(args, "pretrained_models", None) and getattr(args, "load_checkpoint", None):
        # the original loads the checkpoint and silently skips the merge; the merge's log would describe another model
        raise UserError("--load_checkpoint and --pretrained_models exclude each other: the checkpoint's weights would "
                        "replace the merged model's")
    if getattr(args, "pretrained_models", None):  # a merge method that one model cannot take: before the data
        from decision_transformer.merge_setup import check_experiment_merge

        check_experiment_merge(args)
    for name in ("load_checkpoint", "pretrained_lm", "pretrained_model"):  # '' would read as "not given"
        if getattr(args, name, None) == "":
            raise UserError(f"--{name} '': give a path (or leave the flag out)")
    from decision_transformer.models.gpt2 import check_activation

    try:   # (the model is built after the data step, which may generate a dataset for minutes)
        if activation_applies(args):
            check_activation(args.activation_function)
    except ValueError as e:
        raise UserError(f"--activation_function: {e}") from None
    if "" in (args.freeze_subset or []):  # before the data and any merge: nothing left to train (see optim.py)
        raise UserError("--freeze_subset '' matches every parameter: nothing is left to train")
    if getattr(args, "model_type", "dt") == "bc":
        transformer_only = [("pretrained_lm", args.pretrained_lm), ("pretrained_models", args.pretrained_models),
                            ("gpt_kmeans", getattr(args, "gpt_kmeans", None)),
                            ("init_reg", getattr(args, "init_reg", False)), ("joint", getattr(args, "joint", False)),
                            ("frozen", args.frozen), ("freeze_subset", args.freeze_subset),
                            ("extend_positions", args.extend_positions),
                            # (a block index of 0 is given too; a _block{b} run name would say it was used)
                            ("pretrained_block", getattr(args, "pretrained_block", None) is not None),
                            ("disable_attention", getattr(args, "disable_attention", False)),
                            ("share_input_output_proj", getattr(args, "share_input_output_proj", False)),
                            ("embed_order", getattr(args, "embed_order", "ln_then_time") != "ln_then_time"),
                            # (its own decay group is the transformer's blocks, which the MLP has none of)
                            ("custom_transformer_decay", getattr(args, "custom_transformer_decay", False))]
        for name, value in transformer_only:
            if value:
                raise UserError(f"--{name} applies to the Decision Transformer, not to --model_type bc")
        from decision_transformer.models.mlp_bc import BC_DROPOUT

        if args.dropout != BC_DROPOUT:   # (the run's config.json still records the value given)
            print(f"warning: --dropout {args.dropout:g} has no effect with --model_type bc: its MLP's dropout is "
                  f"fixed at {BC_DROPOUT:g}, as the originals'", file=sys.stderr)


def resume_state_path(args, run_dir: Path | None, lm_script: bool = False) -> Path:
    """The training state ``--resume`` continues from. A merge run's folder carries its run id
    (``{run}_{exp_id}``): the newest one made with the same flags is taken (``resumable_run``). The LM script's runs are
    ``{outdir}/dt_gym-experiment-{env}-{dataset}-{exp_id}``: the newest one made with the same flags is taken."""
    if run_dir is None:
        if lm_script:
            raise UserError("--resume needs a run folder: --outdir '' writes none (leave --outdir out for "
                            "models/{env}, or give the folder the run was made in)")
        raise UserError("--resume needs --outdir (the run folder holds the state to resume)")
    if lm_script:
        st_path = lm_resume_dir(args, run_dir) / TRAIN_STATE
        check_own_state(st_path, resume_signature(args))
        return st_path
    if args.pretrained_models:   # of several runs of these merge flags, the newest made with all these flags
        run_dir = resumable_run(run_dir.parent, f"{run_dir.name}_", resume_signature(args), "merge run")
    st_path = run_dir / TRAIN_STATE
    if st_path.is_dir():
        raise UserError(f"cannot resume: {st_path} is a folder, not the run's training state")
    if not st_path.is_file():
        from decision_transformer.sweep import _lock_holder, folder_lock_path

        holder = _lock_holder(folder_lock_path(run_dir))
        if holder:
            raise UserError(f"nothing to resume yet: this run is being trained by another process: {holder}, which "
                            f"has not finished its first iteration ({st_path} does not exist yet); wait for it to end "
                            f"(then --resume continues it if it stopped early)")
        aside = sorted((p for p in (run_dir / "previous").glob(f"*/{TRAIN_STATE}") if p.is_file()),
                       key=lambda p: p.stat().st_mtime)
        hint = (f"; the run there before the last fresh start was set aside in {aside[-1].parent}: move its files "
                f"back into {run_dir} to resume it" if aside else "")
        raise UserError(f"nothing to resume: {st_path} does not exist{hint}")
    differ = resume_mismatches(args, run_dir / "config.json")
    if differ:
        free = sorted(k for k in RESUME_FREE if hasattr(args, k) and k not in ("resume", "note"))
        raise UserError(f"--resume: {run_dir} was made with other flags: {'; '.join(differ)}. Resume with the run's "
                        f"flags (only {', '.join('--' + f for f in free)} may change)")
    check_own_state(st_path, resume_signature(args))
    return st_path


def check_evaluation(logs: dict, iteration: int):
    """``TrainingDiverged`` when an evaluation return is NaN or inf: the model's actions were not finite numbers (its
    weights have overflowed although the loss was still finite), so nothing of this iteration is written."""
    bad = [k for k, v in logs.items() if k.startswith("evaluation/") and k.endswith("return_mean")
           and isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"the evaluation of iteration {iteration} gave non-finite returns ({bad[0]}): the "
                               f"model's actions are not finite numbers, its weights have diverged; checkpoints of "
                               f"earlier iterations are kept")


def clean_folder(folder: Path):
    """Remove what a killed run left half-written in ``folder`` (``files.remove_stale_temporaries``), saying so."""
    from decision_transformer.files import remove_stale_temporaries

    removed = remove_stale_temporaries(folder)
    if removed:
        print(f"removed {len(removed)} temporary file(s) a killed run left in {folder}: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr)


def resumed_past_the_end(run_dir: Path, start_iter: int, max_iters: int) -> bool:
    """Say how a resume starts. True (and nothing may be written) when the run has trained more iterations than
    ``--max_iters``: its record and its last model stay as they are. A run that has trained exactly ``--max_iters``
    goes on (nothing to train; a last model that a stop before the end did not write is written)."""
    if start_iter > max_iters:
        print(f"resuming {run_dir}: it has trained {start_iter} iterations, more than --max_iters {max_iters}; "
              f"nothing to do, nothing written (give --max_iters above {start_iter} to continue it)", file=sys.stderr)
        return True
    print(f"resuming {run_dir} after iteration {start_iter}" + ("" if start_iter < max_iters else
          f": it has finished all {max_iters} iterations, nothing to do (raise --max_iters to continue)"),
          file=sys.stderr)
    return False


def warn_unsaved_best(args, path: Path, best_score: float, start_iter: int):
    """A resumed run that saves its best model, when the part before the resume did not save it (``--save_model``
    added on resume, or the file removed): the next file is written only when a later iteration beats that score."""
    if (args.save_model and args.save_mode in ("best", "both") and start_iter > 0 and math.isfinite(best_score)
            and not path.exists()):
        print(f"warning: {path} is missing: the best model before the resume (score {best_score:.4g}) was not saved; "
              f"it is written once a later iteration scores higher", file=sys.stderr)


def resume_signature(args) -> dict:
    """The flags a resumed run must share with the run it continues (all but ``RESUME_FREE``)."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_FREE}


def lm_resume_dir(args, parent: Path) -> Path:
    """The newest LM-script run folder ``{parent}/dt_gym-experiment-{env}-{dataset}-{id}`` to resume."""
    return resumable_run(parent, f"dt_gym-experiment-{args.env}-{args.dataset}-", resume_signature(args))


def resumable_run(parent: Path, prefix: str, signature: dict, kind: str = "run") -> Path:
    """The newest ``{parent}/{prefix}{id}`` folder with a training state made with the flags ``signature``; when none
    matches, the error names the flags in which the newest such run differs. A run whose ``config.json`` is missing, not
    JSON or not a JSON object is judged by the config its ``train_state.pt`` records (``recorded_config``). Flags a run
    does not record are not compared."""
    import json

    want = json.loads(json.dumps(signature, default=str))
    runs = []
    for d in Path(parent).glob(f"{prefix}*"):
        if d.name[len(prefix):].isdigit() and (d / TRAIN_STATE).is_file():
            newest = max((f.stat().st_mtime for f in d.iterdir() if f.suffix in (".pt", ".json")), default=0.0)
            runs.append((newest, d.name, d))
    if not runs:
        raise UserError(f"nothing to resume: no {kind} {prefix}<id> in {parent} has finished an iteration")
    first, unreadable = None, []
    for _, _, d in sorted(runs, reverse=True):
        cfg = recorded_config(d)
        if cfg is None:
            unreadable.append(d.name)
            continue
        if all(k not in cfg or same_flag_value(k, cfg[k], v, recorded_base(cfg)) for k, v in want.items()):
            return d
        first = first or (d, cfg)
    if first is None:
        raise UserError(f"nothing to resume: the runs {prefix}<id> in {parent} that have finished an iteration "
                        f"({', '.join(sorted(unreadable))}) have neither a readable config.json nor a readable "
                        f"{TRAIN_STATE}")
    other, cfg = first
    differ = [f"--{k} {v!r} (the run: {cfg[k]!r})" for k, v in want.items()
              if k in cfg and not same_flag_value(k, cfg[k], v, recorded_base(cfg))]
    raise UserError(f"nothing to resume: no {kind} {prefix}<id> in {parent} was made with these flags; the newest, "
                    f"{other.name}, differs in {'; '.join(differ) or 'its flags'}")


#: Flags a resumed run may change (where it runs, how it reports and saves, how long it goes on); every other flag
#: must match the run it continues.
RESUME_FREE = frozenset({"max_iters", "resume", "device", "threads", "log_to_wandb", "project", "end_break", "note",
                         "num_eval_episodes", "save_model", "save_mode", "precision", "compile", "data_path",
                         "outdir", "no_generate", "eval_workers", "no_token_cache", "cuda_graph"})


def resume_mismatches(args, config_path: Path | dict) -> list[str]:
    """``--flag value (the run: value)`` for each flag outside ``RESUME_FREE`` that differs from the run's
    ``config.json`` (or a config dict; flags the file does not record are not compared)."""
    import json

    saved = config_path if isinstance(config_path, dict) else recorded_config(config_path.parent)
    if saved is None:  # unreadable too: restore_train_state reports the damage
        return []
    now = json.loads(json.dumps(vars(args), default=str))
    return [f"--{k} {now[k]!r} (the run: {saved[k]!r})" for k in now
            if k not in RESUME_FREE and k in saved and not same_flag_value(k, saved[k], now[k], recorded_base(saved))]


def recorded_config(run_dir: Path, note: bool = True) -> dict | None:
    """The flags a run was made with: its ``config.json``, or, when that file is missing, not JSON or not a JSON
    object, the config its ``train_state.pt`` records (with a note); None when neither can be read."""
    import json

    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        if isinstance(cfg, dict):
            return cfg
    except (OSError, ValueError):
        pass
    cfg = state_config(run_dir / TRAIN_STATE)   # the training state records the run's config too
    if cfg is not None and note:
        print(f"note: {run_dir / 'config.json'} is missing or not JSON (a JSON object); the run's flags are read "
              f"from its {TRAIN_STATE}", file=sys.stderr)
    return cfg


def state_config(path: Path) -> dict | None:
    """The config (flags and more, as JSON values) a training state file records; None where it cannot be read."""
    import json

    try:
        cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception:  # noqa: BLE001 - damaged: the run's flags cannot be told (restoring it says why)
        return None
    return json.loads(json.dumps(cfg, default=str)) if isinstance(cfg, dict) else None


def check_own_state(st_path: Path, signature: dict):
    """``--resume``: the training state ``st_path`` must record the flags ``signature`` that its folder's config.json
    matched. A ``train_state.pt`` copied in from another run (another seed, say) was continued silently as this run;
    one line instead. A state whose config cannot be read is left to ``restore_train_state`` to report."""
    import json

    saved = state_config(st_path)
    if saved is None:
        return
    want = json.loads(json.dumps(signature, default=str))
    differ = [f"--{k} {saved[k]!r} (this run: {want[k]!r})" for k in want
              if k in saved and not same_flag_value(k, saved[k], want[k], recorded_base(saved))]
    if differ:
        raise UserError(f"--resume: {st_path} was saved by a run with other flags than the run in {st_path.parent}: "
                        f"{'; '.join(differ)}. It is another run's training state (copied in?): put this run's own "
                        f"back, or start the run afresh without --resume")


# ---- the run ----------------------------------------------------------------------------------------------------


def check_inputs_outside(run_dir: Path, args):
    """A fresh run moves what its folder holds to ``previous/`` first: refuse one that starts from a model file in that
    folder (``--load_checkpoint``, ``--pretrained_models``), such as a finetune of the run's own ``model_2.pt`` under
    the same folder name. The file would be moved away under the run, and ``--resume`` could no longer find it."""
    folders = {Path(run_dir).resolve(), Path(os.path.abspath(run_dir))}

    def moved(path: Path) -> bool:
        """Whether ``path`` is in the folder, below it (subfolders move too) but not in its ``previous/``."""
        for folder in folders:
            try:
                rel = path.relative_to(folder).parts
            except ValueError:
                continue
            if rel and rel[0] != "previous":
                return True
        return False

    for flag, paths in (("--load_checkpoint", [getattr(args, "load_checkpoint", None)]),
                        ("--pretrained_models", getattr(args, "pretrained_models", None) or [])):
        for p in paths:   # (a link in the folder moves too, wherever it points)
            if p and (moved(Path(os.path.abspath(p))) or moved(Path(p).resolve())):
                raise UserError(f"{flag} {p} lies in the folder this run writes ({run_dir}), whose files a fresh run "
                                f"moves to previous/; copy it elsewhere first, or give this run another --outdir")


def run_experiment(args) -> dict:
    """Train and evaluate as ``experiment.py``; returns the last iteration's logs."""
    return _run(args, EXPERIMENT)


def run_lm_cotraining(args) -> dict:
    """Train and evaluate as ``lm_cotraining/experiment.py`` (LM-initialised DT, k-means alignment with the LM
    script's normalisation and annealing, ``--init_reg``, ``--joint``, ``--fp16``)."""
    check_lm_script_flags(args)
    return _run(args, LM_COTRAINING)


def check_lm_script_flags(args):
    """``lm_cotraining/experiment.py`` needs ``--pretrained_lm``."""
    if not args.pretrained_lm:
        raise UserError("lm_cotraining/experiment.py needs --pretrained_lm (a GPT-2-family model directory such as "
                        "checkpoints/ChibiT, or gpt2); see checkpoints/README.md")


def warn_short_warmup(args, log=None):
    """A learning-rate warm-up longer than the whole run (the default 10k steps in a short first run) leaves the rate
    at a small fraction of ``--learning_rate``: said once, so that a run that learns little is not taken for broken."""
    total = args.max_iters * args.num_steps_per_iter
    if 0 < total < args.warmup_steps and not getattr(args, "eval_only", False):
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"warning: --warmup_steps {args.warmup_steps} is longer than this run's {total} training steps: the "
            f"learning rate rises to {100 * total / args.warmup_steps:.2g}% of --learning_rate by the end (a shorter "
            f"--warmup_steps reaches it)")


def check_run_flags(args, script: str):
    """Every check of a single-task run's flags that needs no dataset or model (also the sweep launcher's, which
    lists a point that fails one as invalid); returns (the env's spec, the evaluation targets)."""
    if script == LM_COTRAINING:
        check_lm_script_flags(args)
    spec = get_env_spec(args.env)
    spec.gym_id(args.env_version)  # an env that does not exist in that version: before anything is written
    check_dataset_name(args.dataset)
    check_args(args)
    check_context(args.K, spec.max_ep_len, spec.name)   # (check_args bounds it by the longest env's episodes)
    distributed.check_batch_split(args.batch_size)
    if getattr(args, "gpt_kmeans", None) is not None and args.gpt_kmeans_const is None:
        raise UserError("--gpt_kmeans needs --gpt_kmeans_const (the loss weight; the papers use 0.1)")
    if getattr(args, "cuda_graph", False):   # (a graphed step has no auxiliary losses, nor --fp16's GradScaler)
        aux = [f for f in ("gpt_kmeans", "init_reg", "joint") if getattr(args, f, None) not in (None, False, 0, 0.0)]
        if aux:
            raise UserError(f"--cuda_graph cannot be used with an auxiliary loss (--{aux[0]})")
        if script == LM_COTRAINING and args.fp16:
            raise UserError("--cuda_graph cannot be used with --fp16 (its GradScaler step); --precision bf16 is the "
                            "graphed mixed precision")
    return spec, parse_targets(args.env_targets, spec.targets)


def _run(args, script: str) -> dict:
    import contextlib

    from decision_transformer.sweep import folder_lock_path, run_lock

    with contextlib.ExitStack() as held:  # the run folder's lock, taken before the folder is first written
        return _run_locked(args, script,
                           lambda folder: held.enter_context(run_lock(folder_lock_path(folder), SCRIPTS[script])))


def _recorded_lm_hint(config, pretrained_lm) -> str:
    """``; its run used --pretrained_lm X`` (or ``no --pretrained_lm``) when a checkpoint's recorded run flags name
    another --pretrained_lm than this command's; empty otherwise (or without a record)."""
    if not isinstance(config, dict) or "pretrained_lm" not in config:
        return ""
    recorded = config["pretrained_lm"] or None
    if not isinstance(recorded, (str, type(None))) or recorded == (pretrained_lm or None):
        return ""
    return f"; its run used --pretrained_lm {recorded}" if recorded else "; its run used no --pretrained_lm"


def _run_locked(args, script: str, take_lock) -> dict:
    lm_script = script == LM_COTRAINING
    spec, targets = check_run_flags(args, script)
    warn_short_warmup(args)
    check_model_paths(args)
    if args.outdir == "" and not args.log_to_wandb and not args.save_model:
        print("warning: --outdir '' writes no run folder, and without -w or --save_model nothing of this run is kept "
              "but the lines printed here", file=sys.stderr)
    bc = args.model_type == "bc"
    # the originals' BC rollouts had no noise branch (--mode changes a BC run's data only)
    eval_mode = "normal" if bc else args.mode
    if bc:
        targets = targets[:1]  # the MLP ignores the target: one evaluation (the originals' first target)
    ctx, device = distributed.setup(resolve_device(args.device, args.threads))  # torchrun: one process per GPU
    check_graph_device(args, device)
    configure_matmul_precision(args.precision, device)
    lm = None if bc else locate_pretrained(args)  # before the data: a missing model is reported at once
    if lm is not None:   # and damaged weights too (read once, kept), before a missing dataset takes minutes to make
        lm.state_dict()
    if not bc:
        check_flags_before_data(args, spec, lm)
    seed_everything(args.seed)

    mname = "bc" if bc else model_name(args.pretrained_lm, args.pretrained_block)
    group = f"gym-experiment-{args.env}-{args.dataset}"
    run_dir = Path(args.outdir) / run_dir_name(mname, args.dataset, args.env, args.seed, args.K,
                                               args.remove_grad_clip, args.pretrained_block) if args.outdir else None
    if lm_script:  # LAWSON: {outdir or models/{env}}/dt_{exp_prefix}/ (named once the run id is drawn, below)
        run_dir = None if args.outdir == "" else Path(args.outdir or Path(project_path("models")) / args.env)
    st_path = resume_state_path(args, run_dir, lm_script) if args.resume else None  # before the merge: nothing to redo if absent
    if not args.resume and run_dir is not None and not lm_script and not args.pretrained_models:
        # the folder is named already (LM-script and merge runs get a fresh one, named once the run id is drawn):
        # said before the model is built and the data loaded or generated, not after
        check_inputs_outside(run_dir, args)

    model = (build_bc_model(args, spec) if bc else build_model_from_args(args, spec, lm)).to(device)
    cfg = model.config
    if args.pretrained_models:
        from decision_transformer.merge_setup import apply_merge, prepare_merge

        plan = prepare_merge(args, model, spec)   # the models loaded and checked before the data step
        data_file, dataset = load_run_data(args, device)   # (before the merge and its evaluation of the merged model)
        model = apply_merge(args, plan, model, spec, device, evaluate=ctx.is_main)   # (only rank 0 evaluates)
        cfg = model.config  # --copy_model / --flip train a model with model 1's (or 2's) own architecture
    if args.load_checkpoint:
        ckpt = load_checkpoint(args.load_checkpoint)
        from decision_transformer.models.multi_decision_transformer import MODEL_CLASS as MULTI_CLASS

        if isinstance(ckpt.get("config"), dict) and ckpt["config"].get("model_class") == MULTI_CLASS:
            raise UserError(f"{args.load_checkpoint}: a multi-task model; load it with experiment_multi.py "
                            f"--load_checkpoint (or --pretrained_model to finetune it)")
        mc = ckpt["config"].get("model_config") if isinstance(ckpt.get("config"), dict) else None
        negations = LM_NEGATIONS if lm_script else None
        lm_backbone = lm is not None and args.pretrained_block is None   # (its config sets heads, sizes ...)
        try:
            check_same_behaviour(args.load_checkpoint, mc, cfg.to_dict(), negations, lm_backbone)
            if isinstance(mc, dict) and isinstance(mc.get("max_length"), int) and mc["max_length"] != args.K:
                print(f"warning: {args.load_checkpoint} was trained with K={mc['max_length']}; this run uses "
                      f"K={args.K} (--K)", file=sys.stderr)
            load_state_into(model, ckpt["state_dict"], args.load_checkpoint, recorded=mc, negations=negations,
                            lm_backbone=lm_backbone)
        except UserError as e:
            raise UserError(f"{e}{_recorded_lm_hint(ckpt.get('config'), args.pretrained_lm)}") from None
    distributed.broadcast_module(ctx, model)  # torchrun: every rank starts from (and regularises towards) rank 0's
    frozen = freeze_from_args(model, args)
    if frozen:
        print(f"frozen: {len(frozen)} parameter tensors", file=sys.stderr)
    if not args.pretrained_models:
        data_file, dataset = load_run_data(args, device)

    optimizer, scheduler, generator = optimizer_from_args(model, args, device)
    extra_loss = make_extra_loss(args, model, script=script, lm=lm, device=device)
    trainer_cls = ActTrainer if bc else Trainer
    if lm_script and args.fp16:
        if device.type == "cuda":
            from decision_transformer.training.lm_cotrain import AmpTrainer

            trainer_cls = AmpTrainer
        else:
            print("warning: --fp16 uses CUDA autocast + GradScaler; on cpu training stays in fp32", file=sys.stderr)
    try:
        trainer = trainer_cls(model, optimizer, scheduler, dataset, batch_size=args.batch_size, K=args.K,
                              generator=generator, grad_clip=None if args.remove_grad_clip or bc else GRAD_CLIP,
                              extra_loss=extra_loss, amp_dtype=autocast_dtype(args.precision, device),
                              rank=ctx.rank, world_size=ctx.world_size, compile=args.compile,
                              cuda_graph=getattr(args, "cuda_graph", False))
    except ValueError as e:
        raise UserError(str(e)) from None

    # one id for all ranks, not yet used by the files it names (models/{env}/..., merge and LM-script run folders)
    id_folders = [Path(project_path("models")) / args.env] + ([run_dir.parent, run_dir] if run_dir is not None else [])
    start_iter, best_score, exp_id = 0, -float("inf"), distributed.from_main(ctx, new_exp_id(id_folders))
    elapsed = 0.0  # training and evaluation time of the iterations before a resume (time/total goes on from it)
    if st_path is not None:
        st_seen = state_identity(st_path)   # compared once the folder is locked (below)
        st = restore_train_state(st_path, model, trainer, optimizer, scheduler, generator)
        check_same_data(st, st_path, data_file, {args.env: (dataset.state_mean, dataset.state_std)},
                        {args.env: dataset.num_timesteps})
        start_iter, best_score, exp_id = int(st["iteration"]), float(st["best_score"]), int(st["exp_id"])
        elapsed = float(st.get("elapsed", 0.0))
        saved_merge = (st.get("config") or {}).get("merge_info") or {}
        if args.pretrained_models and "iteration_0" in saved_merge:  # the merge's evaluation is not repeated
            args.merge_info["iteration_0"] = saved_merge["iteration_0"]
        if resumed_past_the_end(st_path.parent, start_iter, args.max_iters):
            trainer.close()
            distributed.cleanup(ctx)
            return {}
    exp_prefix = f"{group}-{exp_id}"
    if lm_script and run_dir is not None:
        run_dir = run_dir / f"dt_{exp_prefix}"
    if args.pretrained_models and run_dir is not None:
        # merge runs share (model, dataset, env, seed): a per-run suffix keeps them from overwriting each other
        run_dir = run_dir.with_name(f"{run_dir.name}_{exp_id}")
    if st_path is not None and run_dir is not None:
        run_dir = st_path.parent  # a resumed run continues in the folder it was found in (also when renamed)
    with distributed.main_checks(ctx):   # (a refusal here stops every torchrun rank)
        if run_dir is not None and ctx.is_main:
            take_lock(run_dir)  # before the folder is written: a second process training this run stops here
            if st_path is not None:
                check_state_unchanged(st_path, st_seen)
        if run_dir is not None and ctx.is_main:
            clean_folder(run_dir)
        if not args.resume and run_dir is not None and ctx.is_main:
            check_inputs_outside(run_dir, args)
            moved = set_aside_previous_run(run_dir)
            if moved is not None:
                print(f"warning: {run_dir} held an earlier run; moved it to {moved} (use --resume to continue a "
                      f"run)", file=sys.stderr)

    config = {**vars(args), "exp_id": exp_id, "exp_prefix": exp_prefix, "model_name": mname,
              "data_file": str(Path(data_file).resolve()), "device_used": str(device), "targets": targets,
              "model_config": cfg.to_dict(), "script": SCRIPTS[script],
              "pretrained_lm_path": str(lm.path) if lm is not None else None, WORKING_DIR: os.getcwd()}
    ckpt_extra = dict(state_mean=dataset.state_mean, state_std=dataset.state_std)
    state_extra = dict(data_timesteps={args.env: dataset.num_timesteps})  # what --resume checks the data against
    if not ctx.is_main:  # under torchrun only rank 0 evaluates, logs and writes files
        run_dir, args.save_model, args.num_eval_episodes = None, False, 0
    wandb_name = exp_prefix if lm_script else wandb_run_name(args.env, args.dataset, mname, args.seed, args.K,
                                                             args.remove_grad_clip, args.pretrained_block)
    if args.pretrained_models and not lm_script:  # (as its folder) a merge run is not the plain run of its name
        wandb_name = f"{wandb_name}-{exp_id}"
    logger = RunLogger(run_dir, config, use_wandb=args.log_to_wandb and ctx.is_main, project=args.project,
                       group=group, name=wandb_name, resume=args.resume, resume_after=start_iter)
    if run_dir is not None and not args.resume:  # (after WandB started: a WandB that cannot start leaves no files)
        atomic_save(make_checkpoint(model.state_dict(), config, iteration=0, **ckpt_extra), run_dir / "model_0.pt")
    models_dir = Path(project_path("models")) / args.env
    if args.save_model and ctx.is_main:
        clean_folder(models_dir)  # (shared by runs: only files of processes gone and idle are removed)
    if run_dir is not None:   # (a merge or LM-script run's folder carries a run id: where to find it)
        print(f"run folder: {run_dir}", file=sys.stderr)
    best_key = f"evaluation/target_{int(targets[0])}_return_mean"
    warn_unsaved_best(args, models_dir / f"{args.model_type}_{exp_prefix}_best.pt", best_score, start_iter)
    pool = env_pool(args.env, args.env_version, args.eval_workers, device, args.num_eval_episodes)
    t0 = time.time() - elapsed
    logs: dict = {}
    if start_iter == 0 and (getattr(args, "merge_info", None) or {}).get("iteration_0"):
        logger.log({**args.merge_info["iteration_0"], "time/total": 0.0}, 0)  # the merged model before finetuning
    try:
        for it in range(start_iter + 1, args.max_iters + 1):
            with progress(args.num_steps_per_iter, f"iter {it} train") as bar:
                logs = trainer.train_iteration(args.num_steps_per_iter, it, bar)
            model.eval()
            eval_start = time.time()
            if args.num_eval_episodes:
                for target in targets:
                    with progress(args.num_eval_episodes, f"iter {it} eval {int(target)}") as bar:
                        res = evaluate_episodes(model, args.env, target, args.num_eval_episodes, dataset.state_mean,
                                                dataset.state_std, seed=args.seed, mode=eval_mode, device=device,
                                                pool=pool, progress=bar)
                    logs.update({f"evaluation/{k}": v for k, v in res.metrics(args.env).items()})
            logs["time/evaluation"] = time.time() - eval_start
            logs["time/total"] = time.time() - t0
            check_evaluation(logs, it)
            logger.log(logs, it)
            print(summary_line(it, args.max_iters, logs, [f"target_{int(t)}" for t in targets]), file=sys.stderr)

            improved = best_key in logs and logs[best_key] > best_score
            if improved:
                best_score = logs[best_key]
            # the iteration's files are written together: a Ctrl-C or SIGTERM meanwhile stops the run right after
            # them (one between the first best model and the first training state left a model no --resume finds)
            with deferred_interrupts():
                if run_dir is not None:
                    atomic_save(make_checkpoint(model.state_dict(), config, iteration=it, **ckpt_extra),
                                run_dir / f"model_{it}.pt")
                # the best model before the training state that records its score: a run stopped between the two
                # (SIGKILL) redoes this iteration on resume instead of never writing the model
                if args.save_model and improved and args.save_mode in ("best", "both"):
                    path = atomic_save(make_checkpoint(model.state_dict(), config, iteration=it,
                                                       specializations=[args.env], **ckpt_extra),
                                       models_dir / f"{args.model_type}_{exp_prefix}_best.pt")
                    print(f"saved {path} (best so far, iteration {it})", file=sys.stderr)
                if run_dir is not None:
                    save_train_state(run_dir / TRAIN_STATE, model, config, trainer, optimizer, scheduler, generator,
                                     iteration=it, best_score=best_score, exp_id=exp_id, elapsed=time.time() - t0,
                                     **ckpt_extra, **state_extra)
        last = models_dir / f"{args.model_type}_{exp_prefix}.pt"
        if args.save_model and args.save_mode in ("last", "both") and st_path is not None \
                and start_iter >= args.max_iters and last.is_file():   # (written whole: atomic_save)
            print(f"{last}: the last model is written already (no iteration trained since)", file=sys.stderr)
        elif args.save_model and args.save_mode in ("last", "both"):
            path = atomic_save(make_checkpoint(model.state_dict(), config, iteration=args.max_iters,
                                               specializations=[args.env], **ckpt_extra), last)
            print(f"saved {path}", file=sys.stderr)
        if args.max_iters == 0:
            what = ("the merged model" if args.pretrained_models else
                    f"the model of {args.load_checkpoint}" if getattr(args, "load_checkpoint", None) else
                    "the initial model")
            where = f"; {run_dir / 'model_0.pt'} holds {what}" if run_dir is not None else ""
            if (getattr(args, "merge_info", None) or {}).get("iteration_0"):  # (apply_merge evaluated it)
                held = f"{run_dir / 'model_0.pt'} holds {what}," if run_dir is not None else f"{what} was"
                print(f"--max_iters 0: no iteration trained; {held} evaluated as iteration 0", file=sys.stderr)
            else:
                print(f"--max_iters 0: no iteration trained or evaluated{where}", file=sys.stderr)
    finally:
        logger.finish()
        pool.close()
        trainer.close()
        distributed.cleanup(ctx)
    if args.end_break:
        end_break()
    return logs


def end_break() -> bool:
    """``--end_break``: the debugger once the run is done (as the originals' ``pdb.set_trace()``). Quitting it (``q``,
    or end of input with no terminal) ends the finished run normally, not with a traceback."""
    import bdb

    try:
        breakpoint()
        stopped_here = True   # the debugger's first stop: a line inside the try, so that quitting is caught here
    except bdb.BdbQuit:
        stopped_here = False
    return stopped_here


