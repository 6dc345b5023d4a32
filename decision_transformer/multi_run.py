"""The multi-task pipeline behind ``experiment_multi.py`` (LAWSON): one DT for hopper, halfcheetah and walker2d —
train jointly, finetune per env, merge finetuned models, evaluate on all three envs.

Step: for each training env (hopper, halfcheetah, walker2d order) an independent batch through that env's embeddings
and head; loss = Σ_env masked action MSE (+ ``--init_reg``); one backward, clip, step. Evaluation: every env at its
first target (3600 / 12000 / 5000), per-env metrics and ``average_norm_return_mean`` (mean over envs of return/target,
LAWSON's selection metric) and, a project addition, ``average_d4rl_score_mean``. Files:
``models/multi/dt_gym-experiment-multi-{dataset}-{id}[_best].pt`` (``--save_model``) and
``{outdir}/multi/gym-experiment-multi-{dataset}-{id}/{config.json,metrics.jsonl,train_state.pt}`` (the last for
``--resume``, a project addition).
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch

from decision_transformer import distributed
from decision_transformer import fisher as fisher_mod
from decision_transformer import merging
from decision_transformer.checkpoint import (WORKING_DIR, atomic_save, check_same_behaviour, load_state_into,
                                             make_checkpoint, new_exp_id, weights_digest)
from decision_transformer.cli import THREADS_HELP, HelpFormatter, add_fast_path_flags, add_optim_flags
from decision_transformer.envs import DEFAULT_ENV_VERSION, SUPPORTED_ENV_VERSIONS, get_env_spec
from decision_transformer.errors import UserError, deferred_interrupts
from decision_transformer.legacy_import import (ModelFile, build_model, checked_state_stats, load_model_file,
                                                 stored_state_stats)
from decision_transformer.runlog import RunLogger, progress
from decision_transformer.merge_setup import (check_merged_state, check_multi_sources, merge_multi_states, multi_fisher,
                                              resolve_method)
from decision_transformer.models.multi_decision_transformer import (MODEL_CLASS, MULTI_ENVS,
                                                                    MultiDecisionTransformer, MultiDTConfig)
from decision_transformer.training import (GRAD_CLIP, apply_update, check_batch_shape, compile_module,
                                          freeze_from_args, freeze_unreached, mark_step, masked_action_mse,
                                          optimizer_from_args, rank_slice, warn_context_mismatch)
from decision_transformer.training.trainer import StepGraph
from decision_transformer.paths import project_path

NORM_ENVS = ("medium", "medium-expert", "expert", "medium-replay")
STATE_STATS_FILE = "state_stats.pkl"
TRAIN_STATE = "train_state.pt"


def log(msg: str):
    """Print ``msg`` to stderr."""
    print(msg, file=sys.stderr)


# ---- flags ----------------------------------------------------------------------------------------------------------

def multi_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``experiment_multi.py``."""
    p = argparse.ArgumentParser(description="Multi-task Decision Transformer on hopper, halfcheetah and walker2d: "
                                            "train, finetune per env, merge, evaluate.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data, context")
    g.add_argument("--data_path", default=project_path("data"),
                   help="folder with {env}-{dataset}-v2.pkl for the three envs")
    g.add_argument("--no_generate", action="store_true",
                   help="fail instead of generating a missing dataset from the bundled behaviour policies")
    g.add_argument("--dataset", default="medium", help="the same quality for all three envs")
    # not a flag of this script: caught so that argparse does not expand it to --env_version
    g.add_argument("--env", default=None, help=argparse.SUPPRESS)
    g.add_argument("--mode", default="normal", help="normal, delayed or noise")
    g.add_argument("--K", type=int, default=20)
    g.add_argument("--pct_traj", type=float, default=1.0, help="ignored by the original; applied here")
    g.add_argument("--batch_size", type=int, default=64, help="per env and step")
    g.add_argument("--model_type", default="dt", help="dt (the only model the multi-task script has)")
    g = p.add_argument_group("model (ignored when a --pretrained_model or merged models give the architecture)")
    g.add_argument("--embed_dim", type=int, default=128)
    g.add_argument("--n_layer", type=int, default=3)
    g.add_argument("--n_head", type=int, default=1)
    g.add_argument("--activation_function", default="relu")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--disable_attention", action="store_true", help="never applied by the original; applied here")
    g.add_argument("--share_input_output_proj", action="store_true",
                   help="accepted; the per-env action heads stay untied (as the original)")
    g.add_argument("--embed_order", choices=["ln_then_time", "time_then_ln"], default="ln_then_time")
    g.add_argument("--frozen", action="store_true", help="freeze transformer.h")
    g.add_argument("--freeze_subset", nargs="+", default=None, help="freeze parameters whose name contains any of these")
    g.add_argument("--load_checkpoint", default=None, help="multi-task weights loaded strictly before training")
    g.add_argument("--pretrained_lm", "-plm", default=None,
                   help="initialise the shared backbone from a GPT-2-family or ImageGPT model directory (or hub name "
                        "found in the local cache); its architecture replaces --embed_dim/--n_layer/--n_head")
    g.add_argument("--extend_positions", action="store_true",
                   help="the shared timestep table is the backbone's position table (tiled to 1000 rows)")
    add_optim_flags(p)
    g = p.add_argument_group("schedule, evaluation, logging, saving")
    g.add_argument("--num_eval_episodes", type=int, default=100, help="per env")
    g.add_argument("--max_iters", type=int, default=40)
    g.add_argument("--num_steps_per_iter", type=int, default=2500)
    g.add_argument("--env_version", default=DEFAULT_ENV_VERSION, choices=SUPPORTED_ENV_VERSIONS)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (cuda falls back to cpu with a warning)")
    g.add_argument("--threads", default="auto", help=THREADS_HELP)
    add_fast_path_flags(g)
    g.add_argument("--cuda_graph", action="store_true",
                   help="replay each training step (every env's forward and loss, --init_reg, the backward and "
                        "gradient clipping) from one CUDA graph; the batch sampler and AdamW step as usual. CUDA "
                        "only; not with torchrun or --compile")
    g.add_argument("--seed", type=int, default=None, help="None: drawn from OS entropy, logged and used everywhere")
    g.add_argument("--log_to_wandb", "-w", action="store_true")
    g.add_argument("--project", default="multi-decision-transformer")
    g.add_argument("--outdir", default=project_path("checkpoints"),
                   help="config.json and metrics.jsonl in {outdir}/multi/{run}/; '' disables")
    g.add_argument("--save_model", action="store_true", help="save models/multi/dt_{exp_prefix}[_best].pt")
    g.add_argument("--save_mode", choices=["last", "best", "both"], default="last")
    g.add_argument("--resume", action="store_true",
                   help="continue the newest {outdir}/multi/ run made with the same flags after its last "
                        "iteration (only --max_iters, --device, --threads, --precision, --compile, --cuda_graph, "
                        "--num_eval_episodes, --eval_workers, -w, --project, --save_model, --save_mode, --data_path, "
                        "--outdir, --no_generate and --end_break may differ, and --seed may be left out; every other flag, such "
                        "as --env_version, --p_list, --eval_merge_pre or --mode, must be the run's)")
    g.add_argument("--end_break", action="store_true")
    g.add_argument("--note", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("multi-task training and finetuning")
    g.add_argument("--init_reg", type=float, default=None, help="weight of Σ‖θ−θ_pre‖_F over transformer.h")
    g.add_argument("--selected_training", nargs="+", default=None, help="train on these envs only (and record them "
                                                                         "as the model's specialisations)")
    g.add_argument("--score_selected", action="store_true", help="average (and model selection) over the selected "
                                                                 "envs only")
    g.add_argument("--eval_merge_pre", action="store_true",
                   help="each iteration, evaluate the blocks (1-p)·pre + p·trained for each p of --p_list instead "
                        "of the trained ones (pre: the blocks before training); the best p's scores are the "
                        "iteration's (and best_p), and --save_mode best/both saves that interpolation as _best.pt; "
                        "training goes on from the trained blocks, which the last model keeps")
    g.add_argument("--p_list", nargs="+", type=float, default=[0.5])
    g.add_argument("--eval_only", action="store_true", help="no training")
    g.add_argument("--pretrained_model", default=None, help="multi-task model to start from")
    g.add_argument("--norm_env", choices=NORM_ENVS, default=None,
                   help="normalise states with the statistics of this dataset quality: from "
                        "{data_path}/state_stats.pkl (or those stored in --pretrained_model / --load_checkpoint when "
                        "it was trained on it); equal to --dataset: computed from the loaded data")
    g = p.add_argument_group("merging")
    g.add_argument("--multi_pretrained_models", nargs="+", default=None,
                   help="multi-task models, each finetuned on one distinct env, to merge")
    g.add_argument("--use_fisher", action="store_true", help="Fisher merge (= --merge_method fisher)")
    g.add_argument("--spec_info", action="store_true", help="Fisher on each model's specialisation env only")
    g.add_argument("--no_trace_norm", action="store_true", help="= --fisher_norm none")
    g.add_argument("--f_batch_size", type=int, default=64)
    g.add_argument("--f_num_batches", type=int, default=100)
    g.add_argument("--fisher_type", default="batch", choices=fisher_mod.FISHER_TYPES)
    g.add_argument("--fisher_floor", type=float, default=1e-6)
    g.add_argument("--fisher_norm", default="trace", choices=merging.FISHER_NORMS)
    g.add_argument("--fisher_favor_target", action="store_true")
    g.add_argument("--fisher_dataset", default=None, help="data of the Fisher estimate (default: --dataset)")
    g.add_argument("--merge_method", default="mean", choices=["mean", "fisher", "task_arithmetic", "ties"])
    g.add_argument("--merge_base", default=None, help="task-vector base (default: the --pretrained_model the first "
                                                      "model was finetuned from)")
    g.add_argument("--merge_lambda", type=float, default=None)
    g.add_argument("--ties_density", type=float, default=0.2)
    g.add_argument("--p", type=float, default=0.5, help="2 models: (1-p)·θ1 + p·θ2")
    return p


def check_multi_args(args):
    """Refuse flags the multi-task script cannot honour (another ``--model_type``, ``--env``, unknown
    envs or datasets, flags that exclude each other) before anything is loaded."""
    from decision_transformer.envs import check_dataset_name
    from decision_transformer.run import check_args

    if args.model_type != "dt":
        raise UserError(f"--model_type {args.model_type!r}: the multi-task script trains dt only")
    distributed.check_batch_split(args.batch_size)
    if args.env is not None:
        raise UserError(f"experiment_multi.py has no --env: it trains {', '.join(MULTI_ENVS)} together "
                        f"(--selected_training picks the envs it trains on; experiment.py trains one env)")
    check_args(args)
    check_dataset_name(args.dataset)
    if args.fisher_dataset:
        check_dataset_name(args.fisher_dataset)
    for e in args.selected_training or []:
        if e not in MULTI_ENVS:
            raise UserError(f"--selected_training {e!r}: choose from {', '.join(MULTI_ENVS)}")
    if args.pretrained_model and args.multi_pretrained_models:
        raise UserError("--pretrained_model and --multi_pretrained_models exclude each other")
    for other in ("pretrained_model", "multi_pretrained_models"):
        if args.load_checkpoint and getattr(args, other):  # its weights would replace the loaded or merged model's
            raise UserError(f"--load_checkpoint and --{other} exclude each other: the checkpoint's weights would "
                            f"replace the {'merged' if other == 'multi_pretrained_models' else 'pretrained'} model's")
    if args.eval_merge_pre and not args.p_list:
        raise UserError("--eval_merge_pre needs --p_list")
    twice = next((p for i, p in enumerate(args.p_list or []) if p in args.p_list[:i]), None)
    if twice is not None:   # (a second whole evaluation of one blend, logged over the first)
        raise UserError(f"--p_list gives {twice:g} twice")
    if args.eval_merge_pre and args.num_eval_episodes == 0:
        raise UserError("--eval_merge_pre picks --p_list's p by evaluating each, but --num_eval_episodes 0 evaluates "
                        "nothing")
    if args.multi_pretrained_models:   # (as merge_cli: --p weights the two models of a mean or Fisher merge only)
        from decision_transformer.merge_setup import check_favor_target, resolve_method, warn_inert_p

        method, n = resolve_method(args), len(args.multi_pretrained_models)
        warn_inert_p(args.p, method, n)
        check_favor_target(args, method, n)
    check_idle_run(args)


#: flags that only shape training (warned about in a run that trains nothing)
TRAINING_ONLY_FLAGS = ("init_reg", "frozen", "freeze_subset", "learning_rate", "weight_decay", "warmup_steps")


def check_idle_run(args):
    """Runs that do nothing say so: ``--eval_merge_pre`` without training (every blend is the starting model), and
    runs that neither train nor evaluate (``--eval_only`` / ``--num_steps_per_iter 0`` with ``--num_eval_episodes
    0``, or ``--max_iters 0``, which is said at the end, as ``experiment.py`` does); refused where such a run would
    write nothing either (no ``--outdir``, no ``--save_model``) and merges nothing."""
    train = not args.eval_only and args.num_steps_per_iter > 0
    idle = "--eval_only" if args.eval_only else "--num_steps_per_iter 0"
    if not train:   # the flags that only shape training: given, they would read as applied
        defaults = multi_parser().parse_args([])
        given = [f"--{f}" for f in TRAINING_ONLY_FLAGS if getattr(args, f) != getattr(defaults, f)]
        if given:
            log(f"warning: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with {idle}: "
                f"nothing is trained")
    if args.eval_merge_pre and not train and args.max_iters > 0:
        log(f"warning: --eval_merge_pre with {idle}: nothing is trained, so every blend (1-p)·pre + p·post of "
            f"--p_list is the starting model itself, and each p evaluates the same weights")
    if args.max_iters > 0 and (train or args.num_eval_episodes > 0):
        return
    what = "--max_iters 0" if args.max_iters == 0 else f"{idle} with --num_eval_episodes 0"
    writes = ([f"its run folder in {Path(args.outdir) / 'multi'} (config.json, the starting weights model_0.pt"
               + (", metrics without scores)" if args.max_iters else ")")] if args.outdir else []) + \
        (["the model to models/multi/ (--save_model)"] if args.save_model and args.save_mode != "best" else [])
    if not writes and not args.multi_pretrained_models:
        raise UserError(f"{what} and --outdir '' without --save_model (--save_mode last or both): nothing would be "
                        f"trained, evaluated or written")
    if args.max_iters > 0:
        log(f"warning: {what}: nothing is trained or evaluated; " + (
            f"the run only writes {' and '.join(writes)}" if writes else
            "the merge is computed and checked, then dropped (nothing is written)"))


# ---- state statistics -------------------------------------------------------------------------------------------------

def read_state_stats(data_path: str) -> dict:
    """``{data_path}/state_stats.pkl``: {'{env}-{dataset}-v2': {'state_mean', 'state_std'}} (LAWSON's layout)."""
    from decision_transformer.data import safe_pickle_load

    path = Path(data_path) / STATE_STATS_FILE
    if not path.is_file():
        return {}
    obj = safe_pickle_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict keyed by '{{env}}-{{dataset}}-v2'")
    return obj


def resolve_state_stats(args, envs, ref: ModelFile | None) -> tuple[dict, str]:
    """Per-env (mean, std) overrides, by precedence: ``--norm_env D`` ≠ ``--dataset`` (state_stats.pkl); the
    ``--pretrained_model`` / ``--load_checkpoint``'s dataset if ≠ ``--dataset`` and no ``--norm_env`` is given
    (state_stats.pkl, else the statistics stored in that checkpoint); otherwise {} (each env's statistics come from its
    loaded data; an explicit ``--norm_env`` equal to ``--dataset`` asks for exactly that, as in the original)."""
    source = None
    if args.norm_env:
        source = args.norm_env if args.norm_env != args.dataset else None
    elif ref is not None and ref.dataset and ref.dataset != args.dataset:
        source = ref.dataset
    if source is None:
        return {}, f"computed from the {args.dataset} data"
    table = read_state_stats(args.data_path)
    out = {}
    for env in envs:
        key = f"{env}-{source}-v2"
        stored = stored_state_stats(ref, env) if ref is not None and source == ref.dataset else None
        if key in table:
            d = table[key]
            where = f"{Path(args.data_path) / STATE_STATS_FILE}: {key}: "
            if not isinstance(d, dict) or not {"state_mean", "state_std"} <= set(d):
                raise UserError(f"{where}expected a dict with state_mean and state_std")
            out[env] = checked_state_stats(d["state_mean"], d["state_std"], env, where)
        elif stored is not None:
            out[env] = stored
        else:
            raise UserError(f"{Path(args.data_path) / STATE_STATS_FILE}: no entry {key} (create it with "
                            f"python data/create_state_stats.py --data_path {args.data_path})")
    return out, f"of {source} ({STATE_STATS_FILE} or the checkpoint)"


class EnvData:
    """Each env's ``TrajectoryDataset`` (state statistics fixed by ``stats`` where given), loaded on first use."""

    def __init__(self, args, device, stats: dict):
        self.args, self.device, self.stats = args, device, stats
        self._cache = {}

    def get(self, env: str, dataset: str | None = None):
        """The ``TrajectoryDataset`` of ``env`` and ``dataset`` (default ``--dataset``), loaded on first use."""
        from decision_transformer.data import TrajectoryDataset, load_dataset

        dataset = dataset or self.args.dataset
        if (env, dataset) not in self._cache:
            path, trajs = load_dataset(self.args.data_path, env, dataset,  # --resume never generates data
                                       generate=not self.args.no_generate and not getattr(self.args, "resume", False))
            mean, std = self.stats.get(env, (None, None))
            ds = TrajectoryDataset(trajs, env, mode=self.args.mode, pct_traj=self.args.pct_traj, device=self.device,
                                   state_mean=mean, state_std=std)
            log(f"data: {path} | {len(ds)} trajectories, {ds.num_timesteps} timesteps")
            self._cache[(env, dataset)] = ds
        return self._cache[(env, dataset)]

    def state_stats(self, env: str):
        """The env's state (mean, std): the fixed override where given, else its loaded data's."""
        if env in self.stats:
            return self.stats[env]
        ds = self.get(env)
        return ds.state_mean, ds.state_std


# ---- training -----------------------------------------------------------------------------------------------------------

class MultiTrainer:
    """One step = one batch per training env, loss = Σ_env masked MSE (+ init_reg), one backward/clip/step."""

    def __init__(self, model, optimizer, scheduler, data: EnvData, train_envs, *, batch_size, K, generator,
                 grad_clip=GRAD_CLIP, init_reg=None, amp_dtype: torch.dtype | None = None,
                 compile: bool | str | None = None, rank: int = 0, world_size: int = 1,
                 merge_pre: str | None = None, cuda_graph: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.graph = None                            # --cuda_graph's StepGraph (set last)
        self.merge_pre = merge_pre                   # fingerprint of the --eval_merge_pre "pre" blocks (--resume)
        self.amp_dtype = amp_dtype                   # bf16 autocast of the forward; the losses are taken in fp32
        self.device_type = next(model.parameters()).device.type
        self.datasets = [(model.env_index(e), data.get(e)) for e in train_envs]
        self.train_envs = list(train_envs)
        check_batch_shape(batch_size, K)
        self.batch_size, self.K, self.generator = batch_size, K, generator
        warn_context_mismatch(model, K)
        self.grad_clip, self.init_reg = grad_clip, init_reg
        # data parallel (torchrun): every rank draws the same per-env global batches and trains on its rows
        self.rank, self.world_size = rank, world_size
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.forward = model
        if world_size > 1:
            from decision_transformer.distributed import DistContext, wrap

            gen = torch.Generator(device=generator.device).manual_seed(0)
            freeze_unreached(model, lambda: self._losses(gen)[0])  # e.g. the heads of envs left out of training
            self.forward = wrap(model, DistContext(rank, world_size, rank), next(model.parameters()).device)
        # the module called for the forward: the model, or its DDP and/or torch.compile wrapper (a graph per env)
        self.forward, self.compile_mode = compile_module(self.forward, compile), compile
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        if cuda_graph:   # (training.trainer.StepGraph: the env batches are drawn first, then one graph for the step)
            if self.device_type != "cuda":
                raise ValueError("--cuda_graph needs a CUDA device (it replays each training step as a CUDA graph)")
            for bad, what in ((world_size > 1, "torchrun"), (compile, "--compile")):
                if bad:
                    raise ValueError(f"--cuda_graph cannot be used with {what}")
            self.graph = StepGraph(self, self._graph_losses)

    def _graph_losses(self, batches):
        """``StepGraph``'s losses: (what is backpropagated, (total, per-env losses, init_reg loss or 0))."""
        total, per_env = self._losses_on(batches)
        reg = self.init_reg.loss() if self.init_reg is not None else None
        if reg is not None:
            total = total + reg
        return total, (total.detach(), torch.stack(per_env), reg.detach() if reg is not None else total.detach() * 0)

    def _losses(self, generator):
        """(Σ_env loss, per-env losses): each env's masked action MSE on a batch drawn from ``generator``; under data
        parallelism of this rank's rows, scaled so that DDP's average is the global batch's."""
        return self._losses_on((ds.sample_batch(self.batch_size, self.K, generator) for _, ds in self.datasets))

    def _losses_on(self, batches):
        """``_losses`` on given batches, one per training env in order (drawn lazily: a plain step draws each
        env's batch just before its forward)."""
        total, per_env = 0.0, []
        for (i, ds), b in zip(self.datasets, batches):
            if self.world_size > 1:
                b, scale = rank_slice(b, self.rank, self.world_size)
            with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None, cache_enabled=self.graph is None):
                out = self.forward(b.states, b.actions, b.rtg[:, :-1], b.timesteps, attention_mask=b.mask, env=i)
            loss = masked_action_mse(out.action_preds.float(), b.actions, b.mask)
            if self.world_size > 1:
                loss = loss * scale
            per_env.append(loss.detach())
            total = total + loss
        return total, per_env

    def close(self):
        """Drop the DDP and compile wrappers (see ``Trainer.close``)."""
        self.forward = self.model

    def extra_state(self) -> dict:
        """What ``--resume`` checks beyond the optimiser, schedule and generators: which reference weights
        ``--init_reg`` measures from and which "pre" blocks ``--eval_merge_pre`` blends with (fingerprints)."""
        reg = getattr(self.init_reg, "fingerprint", None)
        return ({"init_reg_reference": reg} if reg else {}) | \
            ({"merge_pre_reference": self.merge_pre} if self.merge_pre else {})

    def load_extra_state(self, state: dict):
        """ValueError when the ``--init_reg`` reference weights or the ``--eval_merge_pre`` "pre" blocks, rebuilt
        from the files the run starts from, are not those the run saved (a state without the record is taken as
        it is)."""
        where = ("the weights training started from: the --pretrained_model, --load_checkpoint or --pretrained_lm "
                 "files, or the merged models")
        saved, reg = state.get("init_reg_reference"), getattr(self.init_reg, "fingerprint", None)
        if reg is not None and saved is not None and saved != reg:
            raise ValueError(f"the --init_reg reference weights ({where}) are not those the run started with (were "
                             f"they replaced?); restore them, or start the run afresh")
        saved = state.get("merge_pre_reference")
        if self.merge_pre is not None and saved is not None and saved != self.merge_pre:
            raise ValueError(f"the --eval_merge_pre \"pre\" blocks ({where}) are not those the run started with "
                             f"(were they replaced?); restore them, or start the run afresh")

    def train_step(self):
        """One step on one batch per training env; returns (total loss, [per-env losses], init_reg loss or
        None), detached."""
        if not self.model.training:   # (an evaluation or analysis in between may have left it in eval mode)
            self.model.train()
        mark_step(self.compile_mode)
        if self.graph is not None:
            batches = [ds.sample_batch(self.batch_size, self.K, self.generator) for _, ds in self.datasets]
            done = self.graph.step(batches)
            if done is not None:
                self.step += 1
                return done[0], done[1], done[2] if self.init_reg is not None else None
            total, per_env = self._losses_on(batches)
        else:
            total, per_env = self._losses(self.generator)
        reg = self.init_reg.loss() if self.init_reg is not None else None
        if reg is not None:
            total = total + reg
        apply_update(total, self.optimizer, self.scheduler, self.params, self.grad_clip)
        self.step += 1
        return total.detach(), torch.stack(per_env), reg.detach() if reg is not None else None

    def train_iteration(self, num_steps: int, iteration: int, bar=None) -> dict:
        """``num_steps`` training steps (losses checked for NaN / inf); returns the iteration's training
        logs: loss mean and std, the last step's action error overall and per env, init_reg's."""
        from decision_transformer.distributed import rank_dropout_stream
        from decision_transformer.training.trainer import CHECK_EVERY, check_losses

        rank_dropout_stream(self.generator, self.rank, self.world_size)
        self.model.train()
        start = time.time()
        totals, envs, regs = [], [], []
        for _ in range(num_steps):
            t, e, r = self.train_step()
            totals.append(t)
            envs.append(e)
            if r is not None:
                regs.append(r)
            if bar is not None:
                bar.update(1)
            if len(totals) % CHECK_EVERY == 0 or len(totals) == num_steps:  # one host sync per CHECK_EVERY steps
                check_losses(torch.stack(totals), num_steps, iteration)
        logs = {"time/training": time.time() - start}
        if not num_steps:
            return {**logs, "training/train_loss_mean": float("nan"), "training/train_loss_std": float("nan"),
                    "training/action_error": float("nan")}
        totals, envs = torch.stack(totals), torch.stack(envs)
        if self.world_size > 1:  # the global batches' losses: the mean over ranks of the scaled slice losses
            import torch.distributed as dist

            for t in (totals, envs):  # (init_reg, the same on every rank, stays as it is)
                dist.all_reduce(t)
            totals /= self.world_size
            envs /= self.world_size
        check_losses(totals, num_steps, iteration)  # (under torchrun: another rank's divergence, averaged in)
        arr = totals.cpu().numpy()
        per_env = envs.cpu().numpy()
        logs.update({"training/train_loss_mean": float(arr.mean()), "training/train_loss_std": float(arr.std()),
                     "training/action_error": float(per_env[-1, -1])})  # the original: the last env's
        for j, env in enumerate(self.train_envs):
            logs[f"training/action_error_{env}"] = float(per_env[-1, j])
        if regs:  # the last step's, as the original's diagnostic (and training/action_error)
            logs["training/init_reg_loss"] = float(regs[-1])
        return logs


# ---- evaluation ---------------------------------------------------------------------------------------------------------

def evaluate_all(model, envs, data: EnvData, args, device, pools, score_envs, prefix: str = "evaluation/") -> dict:
    """Every env at its first target: per-env keys ``{prefix}target_{T}_{EnvId}_*``, ``{prefix}average_norm_return_mean``
    (mean of return/target over ``score_envs``) and ``{prefix}average_d4rl_score_mean``."""
    from decision_transformer.evaluation import evaluate_episodes

    logs, norm, d4rl = {}, {}, {}
    active = model.active
    try:
        for env in envs:
            spec = get_env_spec(env)
            target = spec.targets[0]
            mean, std = data.state_stats(env)
            model.toggle_env(env)
            with progress(args.num_eval_episodes, f"eval {env}") as bar:
                res = evaluate_episodes(model, env, target, args.num_eval_episodes, mean, std, seed=args.seed,
                                        mode=args.mode, device=device, pool=pools[env], progress=bar)
            key = f"{prefix}target_{int(target)}_{spec.gym_id(args.env_version)}"
            scores = spec.d4rl_score(res.returns)
            logs.update({f"{key}_return_mean": float(np.mean(res.returns)),
                         f"{key}_return_std": float(np.std(res.returns)),
                         f"{key}_length_mean": float(np.mean(res.lengths)),
                         f"{key}_length_std": float(np.std(res.lengths)),
                         f"{key}_d4rl_score_mean": float(np.mean(scores)),
                         f"{key}_d4rl_score_std": float(np.std(scores))})
            norm[env] = float(np.mean(res.returns)) / target
            d4rl[env] = float(np.mean(scores))
    finally:
        model.toggle_env(active)
    logs[f"{prefix}average_norm_return_mean"] = float(np.mean([norm[e] for e in score_envs]))
    logs[f"{prefix}average_d4rl_score_mean"] = float(np.mean([d4rl[e] for e in score_envs]))
    return logs


def blocks_state(model) -> dict:
    """Detached copies of the model's ``transformer.h`` tensors, by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("transformer.h.")}


# ---- model setup ----------------------------------------------------------------------------------------------------------

#: the architecture flags a --pretrained_model or merged models override, with their BackboneConfig fields
ARCH_FLAGS = {"embed_dim": "n_embd", "n_layer": "n_layer", "n_head": "n_head",
              "activation_function": "activation_function", "dropout": "resid_pdrop"}


def warn_ignored_architecture(args, model, source: str):
    """A warning naming each architecture flag given (other than its default) that differs from the model built from
    ``source`` (a ``--pretrained_model`` or the merged models), whose stored architecture wins, as in the original
    (which loaded whole pickled models): the flag has no effect, and config.json still records it."""
    defaults = multi_parser().parse_args([])
    backbone = model.config.backbone
    diffs = [f"--{flag} {getattr(args, flag)} (the model has {getattr(backbone, field)})"
             for flag, field in ARCH_FLAGS.items()
             if getattr(args, flag) != getattr(defaults, flag) and getattr(args, flag) != getattr(backbone, field)]
    if diffs:
        log(f"warning: {', '.join(diffs)}: no effect, the architecture is {source}'s")


def new_model_config(args, lm=None) -> MultiDTConfig:
    """The config of the fresh multi-task DT the flags describe (``lm``: the located ``--pretrained_lm``, or None)."""
    from decision_transformer.model_factory import backbone_config_from_args

    max_ep_len = max(get_env_spec(e).max_ep_len for e in MULTI_ENVS)
    return MultiDTConfig(envs=list(MULTI_ENVS), max_length=args.K, max_ep_len=max_ep_len,
                         share_input_output_proj=args.share_input_output_proj, embed_order=args.embed_order,
                         extend_positions=bool(args.extend_positions),
                         backbone=backbone_config_from_args(args, lm, max_ep_len))


def new_model(args) -> MultiDecisionTransformer:
    """A fresh multi-task DT (reseeded with ``--seed``), its backbone from ``--pretrained_lm`` when given."""
    from decision_transformer.model_factory import locate_pretrained

    lm = locate_pretrained(args)
    try:
        model = MultiDecisionTransformer(new_model_config(args, lm), seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    if lm is not None:
        from decision_transformer.models.pretrained import load_lm_into_backbone

        load_lm_into_backbone(model.transformer, lm)
        log(f"pretrained: {lm.path} ({lm.model_type}, hidden {lm.n_embd}, {lm.hf_config.n_layer} layers)")
    return model


def fisher_datasets(src: ModelFile, envs, dataset: str, data: EnvData, args, device, cache: dict):
    """The Fisher data of one model: each env's ``dataset`` normalised with the state statistics the model stores
    (those it was trained with; ``merge_cli`` does the same), else with the run's. Datasets with equal statistics are
    loaded once (``cache``; the run's own data where it is the same). Returns (datasets, number of envs with stored
    statistics)."""
    out, own = [], 0
    for e in envs:
        stored = stored_state_stats(src, e)
        own += stored is not None
        run_mean, run_std = data.state_stats(e)
        mean, std = stored if stored is not None else (run_mean, run_std)
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if dataset == args.dataset and np.array_equal(mean, run_mean) and np.array_equal(std, run_std):
            out.append(data.get(e, dataset))  # the run's data, normalised with these very statistics
            continue
        key = (e, dataset, mean.tobytes(), std.tobytes())
        if key not in cache:
            cache[key] = EnvData(args, device, {e: (mean, std)}).get(e, dataset)
        out.append(cache[key])
    return out, own


def merged_model(args, data: EnvData, device) -> tuple[MultiDecisionTransformer, dict]:
    """``--multi_pretrained_models``: LAWSON's ``setup_multi`` (uniform or Fisher; task arithmetic / TIES added)."""
    sources = [load_model_file(p) for p in args.multi_pretrained_models]
    method = resolve_method(args)
    check_multi_sources(sources, method)  # before any Fisher is computed
    fisher_mod.warn_context(sources, args.K, log)
    for s in sources:
        check_covers_envs(s)
    fishers = None
    if method == "fisher":
        fishers = []
        fdata = args.fisher_dataset or args.dataset
        cache: dict = {}
        for s in sources:
            m = build_model(s, device, max_length=args.K)
            envs = [s.specializations[0]] if args.spec_info and len(s.specializations) == 1 else list(m.config.envs)
            sets, own = fisher_datasets(s, envs, fdata, data, args, device, cache)
            log(f"fisher: {args.fisher_type} Fisher of {s.path} on {', '.join(f'{e}-{fdata}' for e in envs)} "
                f"({args.f_num_batches} x {args.f_batch_size} windows each), states normalised with "
                + ("the statistics it stores" if own == len(envs) else "the run's statistics" if not own else
                   "the statistics it stores where it has them, else the run's"))
            fishers.append(multi_fisher(m, envs, sets, args))
    state, specs = merge_multi_states(sources, args, device, fishers=fishers)
    check_merged_state(state, method, args, [(s.path, s.state_dict) for s in sources])
    model = build_model(ModelFile(sources[0].path, state, sources[0].config, specs), device, max_length=args.K)
    model.specializations = list(specs)
    info = {"method": method, "models": list(args.multi_pretrained_models), "specializations": specs}
    return model, info


# ---- the run ----------------------------------------------------------------------------------------------------------------

def resume_signature(args) -> dict:
    """The flags a resumed multi-task run must share with the run it continues (a missing ``--seed`` matches any)."""
    from decision_transformer.run import resume_signature as flags

    out = {k: v for k, v in flags(args).items() if not (k == "seed" and v is None)}
    if out.get("freeze_subset"):   # substrings any of which freezes a parameter: their order changes nothing (as
        out["freeze_subset"] = sorted(out["freeze_subset"])   # checkpoint.same_flag_value; the sweep's run lock)
    return out


def find_resume_dir(args) -> Path:
    """``--resume``: the newest ``{outdir}/multi/gym-experiment-multi-{dataset}-{id}`` folder with a training state,
    made with the same flags; a missing ``--seed`` takes the seed that run drew."""
    from decision_transformer.run import resumable_run

    if not args.outdir:
        raise UserError("--resume needs --outdir (the run folder holds the state to resume)")
    if args.eval_only or args.num_steps_per_iter <= 0:
        raise UserError("--resume continues training: it cannot be combined with --eval_only or "
                        "--num_steps_per_iter 0")
    return resumable_run(Path(args.outdir) / "multi", f"gym-experiment-multi-{args.dataset}-", resume_signature(args))


def run_multi(args) -> dict:
    """Run ``experiment_multi.py`` with ``args`` (the run folder locked while it is written); returns the last
    iteration's logs."""
    import contextlib

    from decision_transformer.sweep import folder_lock_path, run_lock

    with contextlib.ExitStack() as held:  # the run folder's lock, taken before the folder is first written
        return _run_multi(args, lambda folder: held.enter_context(run_lock(folder_lock_path(folder),
                                                                            "experiment_multi.py")))


def check_covers_envs(mf) -> None:
    """A multi-task model this script trains or evaluates must have layers for each of its envs (hopper,
    halfcheetah, walker2d): else one line, before any data is loaded (it would fail at the first evaluation)."""
    mc = mf.config.get("model_config")
    envs = MultiDTConfig.from_dict(mc).envs if isinstance(mc, dict) else list(MULTI_ENVS)  # (checked on load)
    missing = [e for e in MULTI_ENVS if e not in envs]
    if missing:
        raise UserError(f"{mf.path}: a multi-task model of the envs {envs}, without {', '.join(missing)}; "
                        f"experiment_multi.py trains and evaluates {', '.join(MULTI_ENVS)}")


def _run_multi(args, take_lock) -> dict:
    from decision_transformer.run import (autocast_dtype, check_evaluation, check_graph_device, check_model_paths,
                                          check_own_state, check_same_data, check_state_unchanged, clean_folder,
                                          configure_matmul_precision, end_break, recorded_config, resolve_device, restore_train_state, resumed_past_the_end,
                                          save_train_state, seed_everything, state_identity, warn_short_warmup,
                                          warn_unsaved_best)

    check_multi_args(args)
    warn_short_warmup(args, log)
    check_model_paths(args)
    resume_dir = find_resume_dir(args) if args.resume else None
    if resume_dir is not None and args.seed is None:  # (find_resume_dir has read the run's config)
        seed = (recorded_config(resume_dir, note=False) or {}).get("seed")
        if not isinstance(seed, int):
            raise UserError(f"--resume: {resume_dir} does not record the seed it drew; pass it with --seed")
        args.seed = seed
    if resume_dir is not None:
        check_own_state(resume_dir / TRAIN_STATE, resume_signature(args))
    ctx, device = distributed.setup(resolve_device(args.device, args.threads))  # torchrun: one process per GPU
    check_graph_device(args, device)
    if args.seed is None:  # under torchrun rank 0's draw, so that every rank samples the same global batches
        args.seed = distributed.from_main(ctx, secrets.randbelow(2**31))
        log(f"seed: {args.seed} (drawn from OS entropy; pass --seed {args.seed} to repeat this run)")
    configure_matmul_precision(args.precision, device)
    seed_everything(args.seed)
    envs = list(MULTI_ENVS)
    train_envs = [e for e in envs if e in (args.selected_training or envs)]
    score_envs = train_envs if (args.score_selected and args.selected_training) else envs

    pre = load_model_file(args.pretrained_model) if args.pretrained_model else None
    if pre is not None and pre.bare and pre.is_multi:
        raise UserError(f"{args.pretrained_model}: a bare multi-task state dict: it has no stored config (envs, "
                        f"sizes, flags) to build the model from; --load_checkpoint reads bare state dicts (into the "
                        f"model these flags build)")
    if pre is not None and not pre.is_multi:
        what = "a bare state dict of a single-task DT" if pre.bare else f"config model_class {pre.model_class!r}"
        raise UserError(f"{args.pretrained_model}: not a multi-task model ({what})")
    ckpt_ref = pre or (load_model_file(args.load_checkpoint) if args.load_checkpoint else None)
    if args.load_checkpoint and not ckpt_ref.is_multi:   # (before its statistics are read as a multi-task model's)
        what = "a bare state dict of a single-task DT" if ckpt_ref.bare else f"config model_class " \
                                                                                f"{ckpt_ref.model_class!r}"
        raise UserError(f"{args.load_checkpoint}: not a multi-task model ({what})")
    for mf in [m for m in (pre, ckpt_ref) if m is not None and m.is_multi]:
        check_covers_envs(mf)
    stats, stats_note = resolve_state_stats(args, envs, ckpt_ref)
    data = EnvData(args, device, stats)
    log(f"state statistics: {stats_note}")

    merge_info = None
    if args.multi_pretrained_models:
        model, merge_info = merged_model(args, data, device)
        warn_ignored_architecture(args, model, "the merged models (model 1)")
    elif pre is not None:
        fisher_mod.warn_context([pre], args.K, log)
        model = build_model(pre, device, max_length=args.K)
        warn_ignored_architecture(args, model, args.pretrained_model)
        log(f"pretrained: {args.pretrained_model} (specialisations {model.specializations or 'none'})")
    else:
        model = new_model(args).to(device)
    if args.load_checkpoint:
        mf = load_model_file(args.load_checkpoint)
        fisher_mod.warn_context([mf], args.K, log)   # (as experiment.py: a checkpoint of another K is said)
        check_same_behaviour(args.load_checkpoint, (mf.config or {}).get("model_config"), model.config.to_dict())
        load_state_into(model, mf.state_dict, args.load_checkpoint,
                        recorded=(mf.config or {}).get("model_config"))
    model = model.to(device)
    for e in args.selected_training or []:
        if e not in model.specializations:
            model.specializations.append(e)
    distributed.broadcast_module(ctx, model)  # torchrun: rank 0's merge on every rank (init_reg, the "pre" state)
    transformer_pre = blocks_state(model)      # after loading, before freezing (init_reg, --eval_merge_pre)
    init_reg = None
    if args.init_reg:
        from decision_transformer.training.init_reg import InitReg

        init_reg = InitReg(model, args.init_reg)
    frozen = freeze_from_args(model, args)
    if frozen:
        log(f"frozen: {len(frozen)} parameter tensors")

    train = not args.eval_only and args.num_steps_per_iter > 0
    trainer = None
    if train:
        optimizer, scheduler, generator = optimizer_from_args(model, args, device)
        try:
            trainer = MultiTrainer(model, optimizer, scheduler, data, train_envs, batch_size=args.batch_size,
                                   K=args.K, generator=generator,
                                   grad_clip=None if args.remove_grad_clip else GRAD_CLIP, init_reg=init_reg,
                                   amp_dtype=autocast_dtype(args.precision, device), compile=args.compile,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   merge_pre=weights_digest(transformer_pre) if args.eval_merge_pre else None,
                                   cuda_graph=args.cuda_graph)
        except ValueError as e:
            raise UserError(str(e)) from None

    # one id for all ranks, not yet used by the files it names
    id_folders = [Path(project_path("models")) / "multi"] + ([Path(args.outdir) / "multi"] if args.outdir else [])
    exp_id, start_iter, best_score = distributed.from_main(ctx, new_exp_id(id_folders)), 0, -float("inf")
    elapsed = 0.0  # training and evaluation time of the iterations before a resume (time/total goes on from it)
    if resume_dir is not None:
        st_seen = state_identity(resume_dir / TRAIN_STATE)   # compared once the folder is locked (below)
        st = restore_train_state(resume_dir / TRAIN_STATE, model, trainer, optimizer, scheduler, generator)
        check_same_data(st, resume_dir / TRAIN_STATE, args.data_path, {e: data.state_stats(e) for e in train_envs},
                        {e: data.get(e).num_timesteps for e in train_envs})
        start_iter, best_score, exp_id = int(st["iteration"]), float(st["best_score"]), int(st["exp_id"])
        elapsed = float(st.get("elapsed", 0.0))
        if resumed_past_the_end(resume_dir, start_iter, args.max_iters):
            if trainer is not None:
                trainer.close()
            distributed.cleanup(ctx)
            return {}
    group = f"gym-experiment-multi-{args.dataset}"
    exp_prefix = f"{group}-{exp_id}"
    config = {**vars(args), "model_class": MODEL_CLASS, "model_config": model.config.to_dict(), "exp_id": exp_id,
              "exp_prefix": exp_prefix, "device_used": str(device), "envs": envs, "train_envs": train_envs,
              "targets": {e: get_env_spec(e).targets[0] for e in envs}, "merge_info": merge_info,
              WORKING_DIR: os.getcwd()}
    run_dir = Path(args.outdir) / "multi" / exp_prefix if args.outdir else None
    if resume_dir is not None:
        run_dir = resume_dir  # continued in the folder it was found in (also when copied under another run id)
    with distributed.main_checks(ctx):   # (a refusal here stops every torchrun rank)
        if run_dir is not None and ctx.is_main:   # the checkpoints record every env's state statistics: a dataset
            for e in envs:                        # that is missing or damaged is found before the run folder is
                data.state_stats(e)               # written (a run that trains has loaded its envs' already)
            take_lock(run_dir)  # before the folder is written: a second process training this run stops here
            if resume_dir is not None:
                check_state_unchanged(resume_dir / TRAIN_STATE, st_seen)
                clean_folder(run_dir)
    if not ctx.is_main:  # under torchrun only rank 0 evaluates, logs and writes files
        run_dir, args.save_model, args.num_eval_episodes = None, False, 0
    logger = RunLogger(run_dir, config, use_wandb=args.log_to_wandb and ctx.is_main, project=args.project, group=group,
                       name=exp_prefix, resume=resume_dir is not None, resume_after=start_iter)
    models_dir = Path(project_path("models")) / "multi"
    if args.save_model and ctx.is_main:
        clean_folder(models_dir)  # (shared by runs: only files of processes gone and idle are removed)

    def data_record() -> dict:  # what --resume checks the training data against
        """The training data's state statistics and timestep counts per training env, as ``--resume`` checks
        them."""
        return {"state_stats": {e: {k: torch.as_tensor(np.asarray(v, np.float32))
                                    for k, v in zip(("state_mean", "state_std"), data.state_stats(e))}
                                for e in train_envs},
                "data_timesteps": {e: data.get(e).num_timesteps for e in train_envs}}

    def save(state, path, iteration):
        """Write ``state`` as a checkpoint to ``path`` with the run's config, ``iteration``, specialisations and
        every env's state statistics."""
        st = {e: {"state_mean": torch.as_tensor(np.asarray(m, np.float32)),
                  "state_std": torch.as_tensor(np.asarray(s, np.float32))}
              for e in envs for m, s in [data.state_stats(e)]}
        atomic_save(make_checkpoint(state, config, iteration=iteration, specializations=list(model.specializations),
                                    state_stats=st), path)
        log(f"saved {path}")

    if run_dir is not None and resume_dir is None:   # the initial (or merged) weights, as experiment.py's run folders
        save(model.state_dict(), run_dir / "model_0.pt", 0)
    if run_dir is not None:
        log(f"run folder: {run_dir}")

    from decision_transformer.evaluation import env_pool

    pools = {e: env_pool(e, args.env_version, args.eval_workers, device, args.num_eval_episodes) for e in envs}
    best_key = "evaluation/average_norm_return_mean"
    warn_unsaved_best(args, models_dir / f"dt_{exp_prefix}_best.pt", best_score, start_iter)
    logs, t0 = {}, time.time() - elapsed
    try:
        for it in range(start_iter + 1, args.max_iters + 1):
            if trainer is not None:
                with progress(args.num_steps_per_iter, f"iter {it} train") as bar:
                    logs = trainer.train_iteration(args.num_steps_per_iter, it, bar)
            else:
                logs = {"time/training": 0.0, "training/train_loss_mean": float("nan"),
                        "training/train_loss_std": float("nan"), "training/action_error": float("nan")}
            model.eval()
            eval_start = time.time()
            chosen_state, score = None, None
            if args.num_eval_episodes and not args.eval_merge_pre:
                logs.update(evaluate_all(model, envs, data, args, device, pools, score_envs))
                score = logs[best_key]
            elif args.num_eval_episodes:
                # only the interpolations (1-p)·pre + p·post are evaluated and compete (p = 1 is the trained model);
                # the unprefixed evaluation/ keys repeat the best p's, the model that selection keeps
                post = blocks_state(model)
                best = None
                for p in args.p_list:
                    interp = {k: (1 - p) * transformer_pre[k] + p * post[k] for k in post}
                    model.load_state_dict(interp, strict=False)
                    res = evaluate_all(model, envs, data, args, device, pools, score_envs, prefix=f"evaluation/{p}/")
                    logs.update(res)
                    s = res[f"evaluation/{p}/average_norm_return_mean"]
                    if best is None or s > score:
                        best, score = (p, res), s
                        chosen_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict(post, strict=False)
                p, res = best
                logs.update({"evaluation/" + k[len(f"evaluation/{p}/"):]: v for k, v in res.items()})
                logs["evaluation/best_p"] = p
            logs["time/evaluation"] = time.time() - eval_start
            logs["time/total"] = time.time() - t0
            check_evaluation(logs, it)
            logger.log(logs, it)
            log(_summary(it, args.max_iters, logs, envs, args.env_version))
            improved = score is not None and score > best_score
            if improved:
                best_score = score
            with deferred_interrupts():   # (written together, as experiment.py's)
                if args.save_model and improved and args.save_mode in ("best", "both"):
                    save(chosen_state or model.state_dict(), models_dir / f"dt_{exp_prefix}_best.pt", it)
                if run_dir is not None and trainer is not None:  # for --resume
                    save_train_state(run_dir / TRAIN_STATE, model, config, trainer, optimizer, scheduler, generator,
                                     iteration=it, best_score=best_score, exp_id=exp_id, elapsed=time.time() - t0,
                                     **data_record())
        last = models_dir / f"dt_{exp_prefix}.pt"
        if args.save_model and args.save_mode in ("last", "both") and resume_dir is not None \
                and start_iter >= args.max_iters and last.is_file():   # (as experiment.py; written whole)
            log(f"{last}: the last model is written already (no iteration trained since)")
        elif args.save_model and args.save_mode in ("last", "both"):
            save(model.state_dict(), last, args.max_iters)
        if args.max_iters == 0:   # (as experiment.py)
            what = ("the merged model" if args.multi_pretrained_models else
                    f"the model of {args.load_checkpoint or args.pretrained_model}"
                    if args.load_checkpoint or args.pretrained_model else "the initial model")
            where = f"; {run_dir / 'model_0.pt'} holds {what}" if run_dir is not None else ""
            log(f"--max_iters 0: no iteration trained or evaluated{where}")
    finally:
        logger.finish()
        for p in pools.values():
            p.close()
        if trainer is not None:
            trainer.close()
        distributed.cleanup(ctx)
    if args.end_break:
        end_break()
    return logs


def _summary(it, max_iters, logs, envs, version) -> str:
    parts = [f"iter {it}/{max_iters}"]
    loss = logs.get("training/train_loss_mean")
    if loss is not None and not math.isnan(loss):
        parts.append(f"loss {loss:.4f}")
    for e in envs:
        spec = get_env_spec(e)
        k = f"evaluation/target_{int(spec.targets[0])}_{spec.gym_id(version)}"
        if f"{k}_return_mean" in logs:
            parts.append(f"{e} {logs[f'{k}_return_mean']:.1f} (d4rl {logs[f'{k}_d4rl_score_mean']:.1f})")
    if "evaluation/average_norm_return_mean" in logs:
        parts.append(f"avg return/target {logs['evaluation/average_norm_return_mean']:.3f}")
    if "evaluation/best_p" in logs:
        parts.append(f"best p {logs['evaluation/best_p']}")
    return " | ".join(parts)

