"""The whole analysis suite for one checkpoints folder, and one markdown report with its figures and tables.

The runs present decide what runs: score tables for runs with metrics, learning curves where K = 1 / block /
no-grad-clip runs exist, CKA, MINE, parameter and gradient analyses on the K = 20 runs (``--run_K``), attention
distance on the K = 1 runs. Epochs are the paper's (CKA / MI / parameters 0 vs 40, gradients 1, attention 0 vs 4)
when present, otherwise the nearest available one (said in the report). Each analysis calls the same code as its
script, with its results and figures under ``{out_dir}/{section folder}/``. A failing analysis is reported and the
others go on. ``--from_wandb`` (with ``--wandb_project`` and ``--wandb_entity``) reads the run metrics from WandB.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path

from decision_transformer.analysis import (
    attention,
    cka,
    common,
    curves,
    grads,
    mi,
    params,
    scores,
)
from decision_transformer.analysis.runs import RunKey, checkpoint_epochs, discover_runs
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError, interrupted_by
from decision_transformer.paths import project_path

STEPS = ("scores", "curves", "cka", "mi", "params", "grads", "attention")

TITLES = {
    "scores": "Section 4 / 5.5: normalised scores (Tables 1 and 2)",
    "curves": "Learning curves: no context (Fig. 8), block replacement (Fig. 9), gradient clipping (App. G.3)",
    "cka": "Section 5.1: activation similarity, CKA (Fig. 1)",
    "mi": "Section 5.2: mutual information, MINE (Figs. 2, 16, 22)",
    "params": "Section 5.3: parameter similarity (Figs. 3, 4)",
    "grads": "Section 5.4: gradient confusion and gradient norms (Figs. 5, 6, 7)",
    "attention": "Section 5.6.2: attention distance (Fig. 10)",
}
FOLDER = {"scores": "scores", "curves": "no_context", "cka": "cka", "mi": "mi", "params": "params", "grads": "grads",
          "attention": "attention"}


def build_parser():
    """The command-line parser of run_all.py (every analysis, one report)."""
    p = common.parser("Run every analysis of the pre-training paper on a checkpoints folder; write report.md.")
    p.add_argument("--checkpoint_dir", type=str, default=project_path("checkpoints"))
    p.add_argument("--out_dir", type=str, default=project_path((common.OUTPUT_ROOT / "report").as_posix()),
                   help="report.md and one folder per section (results/, figs/); relative paths resolve against the "
                        "working directory")
    p.add_argument("--dataset_name", type=str, default="medium")
    p.add_argument("--seed", type=int, default=666, help="the seed analysed (score tables use every seed found)")
    p.add_argument("--env_name_list", nargs="+", default=None, help="default: every env with runs")
    p.add_argument("--model_name_list", nargs="+", default=None, help="default: every model with runs")
    p.add_argument("--data_path", type=str, default=None)
    p.add_argument("--device", type=str, default="cpu")
    common.add_threads_flag(p)
    p.add_argument("--batch_size", type=int, default=common.DEFAULT_BATCH_SIZE,
                   help=f"samples of the analysis batches of CKA, MINE, gradient norms and attention (other than "
                        f"{common.DEFAULT_BATCH_SIZE}: results tagged _bs{{n}})")
    p.add_argument("--grad_batch_size", type=int, default=grads.CONFUSION_BATCH_SIZE,
                   help=f"samples of the gradient-confusion analysis (other than {grads.CONFUSION_BATCH_SIZE}: results "
                        f"tagged _bs{{n}})")
    p.add_argument("--K", type=int, default=common.DEFAULT_BATCH_K,
                   help=f"context of the analysis batches (other than {common.DEFAULT_BATCH_K}: results tagged "
                        f"_ctx{{k}})")
    p.add_argument("--batch_seed", type=int, default=common.DEFAULT_BATCH_SEED,
                   help=f"seed of the analysis batches; every model gets the same batch (other than "
                        f"{common.DEFAULT_BATCH_SEED}: results tagged _bseed{{n}})")
    p.add_argument("--run_K", type=int, default=20,
                   help="the K of the runs analysed by CKA, MINE, parameters, gradients and Table 1 (folders "
                        "..._K{K}); the attention distance and Table 2 use the K=1 runs")
    p.add_argument("--epoch2", type=int, default=40, help="CKA / MI / parameter epoch (else the nearest below)")
    p.add_argument("--grad_epoch", type=int, default=1)
    p.add_argument("--attention_epoch2", type=int, default=4)
    p.add_argument("--mine_iters", type=int, default=1000,
                   help="MINE passes per estimate (the original's 1000; other values: MI files tagged _it{n}); the MI "
                        "step is most of a report's time (over an hour per model on 2 CPU cores at 1000): "
                        "--mine_iters 100 for a first look, or --skip mi")
    p.add_argument("--mine_hidden", type=int, default=400,
                   help="MINE's hidden width (other than 400: MI files tagged _h{n})")
    p.add_argument("--score_norm", choices=["d4rl", "dataset"], default="d4rl")
    p.add_argument("--distance_ylim", choices=["paper", "auto"], default="paper",
                   help="parameter-distance axis (see parameter_similarity_analysis.py --help)")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps left out")
    p.add_argument("--only", nargs="*", default=None, choices=STEPS, help="the only steps run (default: all)")
    common.add_wandb_flags(p)   # (--from_wandb, --wandb_project, --wandb_entity: passed on to the readers)
    return p


def _ordered(models) -> list[str]:
    """gpt2, igpt, dt first (the paper's order), then any other model names alphabetically."""
    order = list(common.MODEL_NAMES)
    return sorted(set(models), key=lambda m: (order.index(m) if m in order else len(order), m))


class _Plan:
    def __init__(self, args):
        self.args = args
        self.keys = [k for k in discover_runs(args.checkpoint_dir) if k.dataset == args.dataset_name]
        if not self.keys:
            raise UserError(f"no runs of dataset {args.dataset_name} in {args.checkpoint_dir}")
        for flag, field in (("env_name_list", "env"), ("model_name_list", "model")):
            wanted = getattr(args, flag)
            if not wanted:
                continue
            if field == "env":
                for env in wanted:
                    get_env_spec(env)  # a misspelt env: one line listing the known ones
            have = sorted({getattr(k, field) for k in self.keys})
            self.keys = [k for k in self.keys if getattr(k, field) in wanted]
            if not self.keys:
                raise UserError(f"no runs of --{flag} {' '.join(wanted)} (dataset {args.dataset_name}) in "
                                f"{args.checkpoint_dir}; it has runs of {', '.join(have)}")
        self.envs = sorted({k.env for k in self.keys}, key=lambda e: (list(common.ENV_NAMES) + [e]).index(e))

    def models(self, env, K=None, seed=None, need_ckpt=True, plain=True) -> list[str]:
        """The models of the env's runs of context ``K`` and ``seed`` (default ``--run_K``, ``--seed``), in the paper's
        order; ``plain``: no block-replacement or no-grad-clip runs; ``need_ckpt``: only runs with checkpoints."""
        K = self.args.run_K if K is None else K
        seed = self.args.seed if seed is None else seed
        out = []
        for k in self.keys:
            if ((k.env, k.K, k.seed) == (env, K, seed) and (not plain or (not k.no_grad_clip and k.block is None))
                    and (not need_ckpt or checkpoint_epochs(self.args.checkpoint_dir, k))):
                out.append(k.model)
        return _ordered(out)

    def common_epoch(self, env, models, wanted, K=None, include_zero=False) -> int | None:
        """``wanted`` if every model has it, else the largest shared epoch below it (else above it)."""
        K = self.args.run_K if K is None else K
        sets = [set(checkpoint_epochs(self.args.checkpoint_dir, RunKey(m, self.args.dataset_name, env,
                                                                       self.args.seed, K))) for m in models]
        shared = set.intersection(*sets) if sets else set()
        if not include_zero:
            shared.discard(0)
        if not shared:
            return None
        below = [e for e in shared if e <= wanted]
        return max(below) if below else min(shared)

    def other_k(self, env, K) -> list[int]:
        """The other K of the env's plain runs of the analysed seed."""
        return sorted({k.K for k in self.keys if (k.env, k.seed) == (env, self.args.seed) and k.K != K
                       and not k.no_grad_clip and k.block is None})

    def models_at(self, env, wanted, what: str, notes: list, K=None) -> tuple[list, int | None]:
        """The env's K-context models and their shared epoch for ``what`` (``common_epoch``); a note when the step
        is skipped (no such runs, or no epoch besides 0) or runs at another epoch than asked."""
        K = self.args.run_K if K is None else K
        models = self.models(env, K=K)
        e = self.common_epoch(env, models, wanted, K=K) if models else None
        if not models:
            others = self.other_k(env, K)
            hint = ""
            if others:
                hint = f" (found runs with K={', '.join(map(str, others))}"
                if K == self.args.run_K:
                    hint += f": pass --run_K {others[0]}" if len(others) == 1 else ": pass one with --run_K"
                hint += ")"
            notes.append(f"{env}: no K={K} runs of seed {self.args.seed} with checkpoints{hint}; {what} skipped")
        elif e is None:
            notes.append(f"{env}: no K={K} checkpoints besides epoch 0; {what} skipped")
        elif e != wanted:
            notes.append(f"{env}: epoch {wanted} not in every run; {what} uses epoch {e}")
        return models, e


def _argv(args, section, *extra) -> list[str]:
    base = Path(args.out_dir) / common.SECTIONS[FOLDER[section]]
    return ["--results_dir", str(base / "results"), "--figs_dir", str(base / "figs"), *map(str, extra)]


def _data_flags(args) -> list[str]:
    """The analysis batch's flags but its size (each step passes its own), and the device."""
    flags = ["--device", args.device, "--threads", args.threads, "--K", args.K, "--batch_seed", args.batch_seed]
    return flags + (["--data_path", args.data_path] if args.data_path else [])


def _wandb_flags(args) -> list[str]:
    """``--from_wandb`` and the WandB project (and entity) to read, for the steps that read run metrics."""
    if not args.from_wandb:
        return []
    return ["--from_wandb", "--wandb_project", args.wandb_project,
            *(["--wandb_entity", args.wandb_entity] if args.wandb_entity else [])]


def _batch_read_flags(args, size_flag: str = "--batch_size") -> list:
    """The flags by which a reader (plot_cka.py, run_mi_exp.py and the MI plots: ``size_flag --data_batch_size``)
    finds the results of ``--batch_size``, ``--K`` and ``--batch_seed``, which tag them where not the defaults."""
    return [size_flag, args.batch_size, "--K", args.K, "--batch_seed", args.batch_seed]


def step_scores(plan: _Plan, args) -> common.Outputs:
    """The score tables (Table 1 of the ``--run_K`` runs, Table 2 of the K = 1 runs), by best and by last
    epoch; envs without D4RL reference returns are left out under ``--score_norm d4rl``."""
    outs = common.Outputs()
    # an env without D4RL reference returns (reacher2d) has no normalised score: its runs stay out of the tables
    no_ref = [e for e in plan.envs if not get_env_spec(e).has_d4rl_score] if args.score_norm == "d4rl" else []
    if no_ref:
        outs.notes.append(f"{', '.join(no_ref)}: no D4RL reference returns, so no normalised score; left out of the "
                          f"score tables (their raw returns are in each run's metrics.jsonl)")
    for K in dict.fromkeys((args.run_K, 1)):
        ks = [k for k in plan.keys if k.K == K and k.block is None and not k.no_grad_clip and k.env not in no_ref]
        if not ks:
            table = "Table 1" if K == 20 else ("Table 2" if K == 1 else f"the K={K} table")
            others = sorted({k.K for k in plan.keys if k.K not in (K, 1) and k.block is None and not k.no_grad_clip})
            hint = f" (found runs with K={', '.join(map(str, others))}: pass --run_K)" if others and K != 1 else ""
            outs.notes.append(f"no K={K} runs: {table} skipped{hint}")
            continue
        models = _ordered({k.model for k in ks})
        seeds = sorted({k.seed for k in ks})
        envs = [e for e in plan.envs if any(k.env == e for k in ks)]
        argv = _argv(args, "scores", "--checkpoint_dir", args.checkpoint_dir, "--dataset_name", args.dataset_name,
                     "--K", K, "--score_norm", args.score_norm, "--env_name_list", *envs, "--model_name_list",
                     *models, "--seed_list", *seeds, *_wandb_flags(args),
                     *(["--data_path", args.data_path] if args.data_path else []))
        for select in (["best"], ["last", "--no_figure"]):
            s_args = scores.build_parser().parse_args(argv + ["--select", *select])
            s_args.only_runs = {(k.env, k.model, k.seed) for k in ks}   # no note for combinations never trained
            outs.extend(scores.run(s_args))
    return outs


def step_curves(plan: _Plan, args) -> common.Outputs:
    """The learning curves whose runs exist: Figure 8 (K = 1 runs), Figure 9 per replaced LM (block runs)
    and Appendix G.3 per no-grad-clip run."""
    outs = common.Outputs()
    wb = _wandb_flags(args)
    base = ["--checkpoint_dir", args.checkpoint_dir, "--dataset_name", args.dataset_name, "--seed", args.seed, *wb]
    k1 = [e for e in plan.envs if plan.models(e, K=1, need_ckpt=False)]
    if k1:
        models = _ordered({m for e in k1 for m in plan.models(e, K=1, need_ckpt=False)})
        argv = _argv(args, "curves", *base, "--env_name_list", *k1, "--model_name_list", *models,
                     "--run_K", args.run_K)
        c_args = curves.build_no_context_parser().parse_args(argv)
        c_args.only_runs = {(k.env, k.model, k.seed, k.K) for k in plan.keys if k.block is None and not k.no_grad_clip}
        o = curves.run_no_context(c_args)
        o.tables = []  # Table 2 is in the score section already
        outs.extend(o)
    else:
        outs.notes.append("no K=1 runs: Figure 8 skipped")
    # Figure 9 per LM whose blocks were replaced: GPT-2's runs are dt_..., another LM's dt-{lm}_...
    hosts = sorted({k.model for k in plan.keys if k.block is not None and k.seed == args.seed
                    and (k.model == "dt" or k.model.startswith("dt-"))})
    for host in hosts:
        blk = [e for e in plan.envs if any(k.block is not None and (k.model, k.env, k.seed) == (host, e, args.seed)
                                           for k in plan.keys)]
        lm = "gpt2" if host == "dt" else host[len("dt-"):]
        argv = _argv(args, "curves", *base, "--env_name_list", *blk, "-block", "--replaced_lm", lm)
        outs.extend(curves.run_no_context(curves.build_no_context_parser().parse_args(argv)))
    if not hosts:
        outs.notes.append("no block-replacement runs (*_K1_block{b}): Figure 9 skipped")
    ngc = sorted({(k.model, k.env, k.K) for k in plan.keys if k.no_grad_clip and k.seed == args.seed})
    for m, e, K in ngc:
        argv = _argv(args, "grads", *base, "--model_name", m, "--env_name_list", e, "--K", K)
        try:
            outs.extend(curves.run_grad_clip(curves.build_grad_clip_parser().parse_args(argv)))
        except UserError as err:
            outs.notes.append(f"gradient-clip curves of {m}/{e}: {err}")
    if not ngc:
        outs.notes.append("no *_no_grad_clip runs: Appendix G.3 skipped")
    return outs


def step_cka(plan: _Plan, args) -> common.Outputs:
    """Per env: CKA of each model with itself, epoch 0 vs ``--epoch2`` (or the nearest shared epoch), and
    Figure 1."""
    outs = common.Outputs()
    for env in plan.envs:
        models, e2 = plan.models_at(env, args.epoch2, "CKA", outs.notes)
        if e2 is None:
            continue
        for m in models:
            argv = _argv(args, "cka", "--checkpoint_dir", args.checkpoint_dir, "--dataset_name", args.dataset_name,
                         "--env_name_list", env, "--seed", args.seed, "--model_name1", m, "--model_name2", m,
                         "--epoch1", 0, "--epoch2", e2, "--batch_size", args.batch_size, *_data_flags(args),
                         "--run_K", args.run_K, "--heatmap_token_list", "state")  # one heatmap per model in the report
            outs.extend(cka.run(cka.build_parser().parse_args(argv)))
        argv = _argv(args, "cka", "--env_name_list", env, "--model_name_list", *models, "--epoch1", 0, "--epoch2", e2,
                     "--dataset_name", args.dataset_name, "--seed", args.seed, "--run_K", args.run_K,
                     *_batch_read_flags(args))
        outs.extend(cka.plot(cka.build_plot_parser().parse_args(argv)))
    return outs


def step_mi(plan: _Plan, args) -> common.Outputs:
    """Per env: the activations, the MINE estimates (normal, no_context, data) and Figures 2 and 16; then
    Figure 22 of every env (a missing one is a note)."""
    outs = common.Outputs()
    res = Path(args.out_dir) / common.SECTIONS["mi"] / "results"
    figs = res.parent / "figs"
    # the MINE settings and the batch tag run_mi_exp.py's files where not the defaults (the batch also
    # save_activation.py's): run_mi_exp.py and the plots read them given the same flags
    setting = ["--iters", args.mine_iters, "--mine_hidden", args.mine_hidden,
               *_batch_read_flags(args, "--data_batch_size")]
    mine_flags = [*setting, "--device", args.device, "--threads", args.threads, "--dataset_name", args.dataset_name,
                  "--seed", args.seed, "--run_K", args.run_K]
    for env in plan.envs:
        models, e = plan.models_at(env, args.epoch2, "mutual information", outs.notes)
        if e is None:
            continue
        argv = ["--checkpoint_dir", args.checkpoint_dir, "--dataset_name", args.dataset_name, "--env_name_list", env,
                "--model_name", *models, "--epoch", e, "--seed", args.seed, "--batch_size", args.batch_size,
                "--results_dir", res, "--run_K", args.run_K, *_data_flags(args)]
        outs.files += mi.run_save(mi.build_save_parser().parse_args(list(map(str, argv)))).files
        io = ["-psm", res, "-pd", res, "-pa", res, "--env_name", env, "--epoch", e]
        for m in models:
            for exp in ("normal", "no_context"):
                a = mi.build_mi_parser().parse_args(list(map(str, io + mine_flags + ["--model_name", m,
                                                                                      "--exp_type", exp])))
                outs.files += mi.run_mi(a).files
        a = mi.build_mi_parser().parse_args(list(map(str, io + mine_flags + ["--exp_type", "data"])))
        outs.files += mi.run_mi(a).files
        for exp in ("normal", "no_context"):
            a = mi.build_plot_parser().parse_args(list(map(str, [
                "--exp_type", exp, "--env_name", env, "--epoch", e, "--model_name_list", *models, "--seed", args.seed,
                "--dataset_name", args.dataset_name, "--results_dir", res, "--figs_dir", figs, "--run_K", args.run_K,
                *setting])))
            outs.extend(mi.plot_mi(a))
    a = mi.build_plot_data_parser().parse_args(list(map(str, ["--env_name_list", *plan.envs, "--seed", args.seed,
                                                             "--dataset_name", args.dataset_name, "--results_dir", res,
                                                             "--figs_dir", figs, "--run_K", args.run_K,
                                                             *setting])))
    try:
        outs.extend(mi.plot_mi_data(a))
    except UserError as err:
        outs.notes.append(str(err))
    return outs


def step_params(plan: _Plan, args) -> common.Outputs:
    """Per env: the parameter similarity of epoch 0 vs ``--epoch2`` (or the nearest shared epoch)."""
    outs = common.Outputs()
    for env in plan.envs:
        models, e2 = plan.models_at(env, args.epoch2, "parameter similarity", outs.notes)
        if e2 is None:
            continue
        argv = _argv(args, "params", "-plm", args.checkpoint_dir, "--dataset_name", args.dataset_name, "--env_name",
                     env, "--seed", args.seed, "--model_name_list", *models, "--epoch1", 0, "--epoch2", e2,
                     "--run_K", args.run_K, "--distance_ylim", args.distance_ylim)
        outs.extend(params.run(params.build_parser().parse_args(argv)))
    return outs


def step_grads(plan: _Plan, args) -> common.Outputs:
    """Per env: gradient confusion and gradient norms at ``--grad_epoch`` (or the nearest shared epoch)."""
    outs = common.Outputs()
    for env in plan.envs:
        models, e = plan.models_at(env, args.grad_epoch, "gradient analysis", outs.notes)
        if e is None:
            continue
        base = ["--checkpoint_dir", args.checkpoint_dir, "--dataset_name", args.dataset_name, "--env_name_list", env,
                "--seed", args.seed, "--model_name_list", *models, "--epoch", e, "--run_K", args.run_K,
                *_data_flags(args)]
        outs.extend(grads.run_confusion(grads.build_confusion_parser().parse_args(
            _argv(args, "grads", *base, "--batch_size", args.grad_batch_size))))
        outs.extend(grads.run_norms(grads.build_norm_parser().parse_args(
            _argv(args, "grads", *base, "--batch_size", args.batch_size))))
    return outs


def step_attention(plan: _Plan, args) -> common.Outputs:
    """Per env: the attention-distance change of the K = 1 runs, epoch 0 vs ``--attention_epoch2``."""
    outs = common.Outputs()
    for env in plan.envs:
        models, e2 = plan.models_at(env, args.attention_epoch2, "attention distance", outs.notes, K=1)
        if e2 is None:
            continue
        argv = _argv(args, "attention", "--checkpoint_dir", args.checkpoint_dir, "--dataset_name", args.dataset_name,
                     "--env_name_list", env, "--seed", args.seed, "--model_name_list", *models, "--epoch1", 0,
                     "--epoch2", e2, "--run_K", 1, "--batch_size", args.batch_size, *_data_flags(args))
        outs.extend(attention.run(attention.build_parser().parse_args(argv)))
    return outs


def _rel(path, start) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def write_report(args, plan: _Plan, results: dict, failures: dict, skipped: list) -> Path:
    """Write ``{out_dir}/report.md``: the runs found, then each step's tables, figures and notes, or why
    it failed or was skipped; returns its path."""
    out = Path(args.out_dir)
    intro = (f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `analysis/run_all.py`; "
             f"dataset `{args.dataset_name}`, seed {args.seed}, batches of {args.batch_size} samples with "
             f"K={args.K}, batch seed {args.batch_seed} (every model sees the same batch); CKA, MINE, parameters "
             f"and gradients on the K={args.run_K} runs. Every figure also exists as PDF next to "
             f"its PNG; raw results are in each section's `results/` folder.")
    lines = [f"# Analysis report: `{args.checkpoint_dir}`", "", intro, "", "## Runs found", ""]
    by = defaultdict(list)
    for k in plan.keys:
        by[(k.env, k.model)].append(k.dir_name[len(f"{k.model}_{k.dataset}_{k.env}_"):])
    lines.append(common.markdown_table(["env", "model", "runs (seed and suffix)"],
                                       [[e, m, ", ".join(v)] for (e, m), v in sorted(by.items())]))
    for step in STEPS:
        lines += ["", f"## {TITLES[step]}", ""]
        if step in skipped:
            lines.append("Skipped (--skip / --only).")
            continue
        if step in failures:
            lines.append(f"**Failed:** {failures[step]}")
            continue
        o = results[step]
        for title, table in o.tables:
            lines += [f"**{title}**", "", table, ""]
        for f in o.figures:
            lines += [f"![{Path(f).stem}]({_rel(f, out)})", ""]
        for n in common.unique(o.notes):  # e.g. a run missing from both score tables: one line
            lines.append(f"- {n}")
        if not (o.tables or o.figures or o.notes):
            lines.append("Nothing to show for these runs.")
    return common.save_text(out / "report.md", "\n".join(lines).rstrip() + "\n")


#: the steps that run models on each env's data, with the epoch flag and the context of the runs they analyse
#: (None: ``--run_K``)
DATA_STEPS = {"cka": ("epoch2", None), "mi": ("epoch2", None), "grads": ("grad_epoch", None),
              "attention": ("attention_epoch2", 1)}


def check_model_step_inputs(plan: _Plan, args, steps):
    """``--device`` and ``--data_path``'s datasets, checked before any step: a misspelt device or a missing dataset
    would otherwise fail only the steps that run models, after the others had written their results. Only the envs
    a selected step analyses need a dataset (one whose runs a step skips, e.g. of another seed or K, needs none)."""
    from decision_transformer.run import check_device_flags

    check_device_flags(args)
    if args.data_path is None:
        return
    from decision_transformer.data import check_dataset_place, find_dataset_file

    for env in plan.envs:
        if any(plan.models_at(env, getattr(args, epoch), step, [], K=K)[1] is not None
               for step, (epoch, K) in DATA_STEPS.items() if step in steps):
            check_dataset_place(args.data_path, env, args.dataset_name)
            find_dataset_file(args.data_path, env, args.dataset_name, quiet=True)


def run(args) -> Path:
    """Check the flags, run the selected steps (a failing one is recorded and the others go on), write the report
    and return its path; any failure is then raised as one ``UserError``."""
    common.check_positive(args, "run_K", "K", "mine_iters", "mine_hidden")
    common.check_min(args, 4, "batch_size")       # the debiased CKA needs 4 examples (MI 2)
    common.check_min(args, 2, "grad_batch_size")  # gradient confusion compares pairs of samples
    for name in ("batch_size", "grad_batch_size"):
        if getattr(args, name) > common.MAX_ANALYSIS_BATCH:
            raise UserError(f"--{name} {getattr(args, name)} is too large (at most {common.MAX_ANALYSIS_BATCH:,})")
    common.check_min(args, 0, "grad_epoch")
    for name in ("epoch2", "attention_epoch2"):   # compared with epoch 0, so not 0 itself
        if getattr(args, name) < 1:
            raise UserError(f"invalid --{name} {getattr(args, name)}: the analyses compare epoch 0 with it; use an "
                            f"integer >= 1")
    common.check_seeds(args, "seed", "batch_seed")
    both = [s for s in (args.only or []) if s in args.skip]
    if both:
        raise UserError(f"--only and --skip both name {', '.join(both)}")
    plan = _Plan(args)  # (no runs, a misspelt env: before the output folder is made)
    steps = [s for s in (args.only or STEPS) if s not in args.skip]
    check_model_step_inputs(plan, args, steps)
    common.out_dir(args.out_dir)
    results, failures = {}, {}
    for step in STEPS:
        if step not in steps:
            continue
        print(f"== {step}", file=sys.stderr)
        try:
            try:
                results[step] = globals()[f"step_{step}"](plan, args)
            except Exception as e:   # an error raised while an interrupt was handled (a figure's file being
                if interrupted_by(e, context=True):   # closed): the interrupt, which stops the whole report
                    raise KeyboardInterrupt from e
                raise
        except UserError as e:
            failures[step] = str(e)
            print(f"error in {step}: {e}", file=sys.stderr)
        except OSError as e:  # a file or figure that cannot be written (full disk, no permission): one line
            from decision_transformer.errors import write_problem

            where = getattr(e, "filename", None)
            failures[step] = f"cannot write {where}: {write_problem(where, e)}" if where else str(e)
            print(f"error in {step}: {failures[step]}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - keep the other analyses going; the report says what broke
            failures[step] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    report = write_report(args, plan, results, failures, [s for s in STEPS if s not in steps])
    print(f"wrote {report}")
    if failures:
        raise UserError(f"{len(failures)} analyses failed ({', '.join(failures)}); see {report}")
    return report
