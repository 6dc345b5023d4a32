"""Run metrics (local ``metrics.jsonl`` by default, WandB on request) and the learning-curve figures:
K = 1 vs K = 20 (Figure 8), block replacement (Figure 9), the gradient-clip ablation (Appendix G.3)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from decision_transformer.analysis import common
from decision_transformer.analysis.runs import RunKey, run_depth
from decision_transformer.checkpoint import block_model_name, wandb_run_name
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError, first_line
from decision_transformer.runlog import cut_last_line
from decision_transformer.paths import project_path

#: TAKAGI's evaluation target per env (``target_{3600|6000|5000}_return_mean``).
TAKAGI_TARGETS = {"hopper": 3600, "halfcheetah": 6000, "walker2d": 5000}
#: The EMA weight of the block-replacement curves (TAKAGI's).
DEFAULT_SMOOTHING = 0.8
ACTION_ERROR = "training/action_error"


class RunNotFound(UserError):
    """A run without metrics (no ``metrics.jsonl``, no finished WandB run): figures and tables skip it with a note.
    A metrics file that exists but cannot be read is a plain ``UserError``."""


class MetricNotLogged(UserError):
    """A run whose metrics lack the key asked for: skipped with a note, as a missing run."""


def eval_target(env: str, target: int | None = None) -> int:
    """The evaluation target read: ``target``, else TAKAGI's per env, for other envs (reacher2d) their first one. An
    unknown env name is an error listing the known ones."""
    spec = get_env_spec(env)
    return int(target if target is not None else TAKAGI_TARGETS.get(env, spec.targets[0]))


def return_key(env: str, target: int | None = None) -> str:
    """The metric of the evaluated return at ``eval_target(env, target)``."""
    return f"evaluation/target_{eval_target(env, target)}_return_mean"


def target_tag(args) -> str:
    """``_target{T}`` in the file names of results read at a ``--target`` given; empty for the default targets, so
    the default names stay the originals'."""
    return "" if args.target is None else f"_target{int(args.target)}"


# ---- reading metrics --------------------------------------------------------------------------------------------

def _is_iteration(v) -> bool:
    """An ``iteration`` value: an integer (also as a float such as 3.0), not a bool."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def read_metrics_jsonl(path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, one dict per line (blank lines and a last line cut short
    left out); a missing file is ``RunNotFound``, an unreadable one a ``UserError``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not the run's metrics file")
    if not path.parent.is_dir():   # (a run never trained here: not a run whose metrics went missing)
        raise RunNotFound(f"no run {path.parent.name} in {path.parent.parent} (train it, or use --from_wandb to read "
                          f"WandB instead)")
    if not path.is_file():
        raise RunNotFound(f"metrics not found: {path} (runs write it next to their checkpoints; use --from_wandb to "
                          f"read WandB instead)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if cut_last_line(text, i, path):
                continue
            raise UserError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {i} is not a JSON object")
        if not _is_iteration(row.get("iteration", 0)):
            raise UserError(f"{path}: line {i} has a non-integer iteration {row['iteration']!r}")
        rows.append(row)
    return rows


def wandb_history(run_name: str, project: str, entity: str | None = None) -> list[dict]:
    """The logged rows of the finished WandB run called ``run_name`` (unknown names are errors, not TAKAGI's silent
    fall-back to the last run); merge runs of that name, from before merge runs' names carried their run id, are left
    out. ``wandb`` is imported only here."""
    try:
        import wandb
    except ImportError:
        raise UserError("--from_wandb needs the wandb package") from None
    path = f"{entity}/{project}" if entity else project
    try:
        runs = list(wandb.Api().runs(path, filters={"display_name": run_name}))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown project: one line for the user
        first = first_line(e)
        raise UserError(f"cannot query WandB project {path}: {first}") from None
    runs = [r for r in runs if getattr(r, "name", run_name) == run_name]
    # merge runs (--pretrained_models) logged before their names carried the run id share the plain run's name
    merges = [r for r in runs if _merge_run(r)]
    runs = [r for r in runs if not _merge_run(r)]
    finished = [r for r in runs if getattr(r, "state", "finished") == "finished"]
    if not finished:
        left = [f"{len(runs)} unfinished"] if runs else []
        left += [f"{len(merges)} merge run(s) left out"] if merges else []
        raise RunNotFound(f"no finished WandB run named {run_name} in {path}"
                          + (f" ({', '.join(left)})" if left else ""))
    if len(finished) > 1:
        common.warn(f"{len(finished)} finished WandB runs named {run_name}; using the last one listed")
    rows = []
    for i, r in enumerate(finished[-1].scan_history()):
        row = dict(r)
        row.setdefault("iteration", int(row["_step"]) + 1 if "_step" in row else i + 1)
        if not _is_iteration(row["iteration"]):
            raise UserError(f"WandB run {run_name}: row {i + 1} has a non-integer iteration {row['iteration']!r}")
        rows.append(row)
    return rows


def _merge_run(run) -> bool:
    """Whether a WandB run is a merge run: its config lists ``--pretrained_models``."""
    config = getattr(run, "config", None)
    return isinstance(config, dict) and bool(config.get("pretrained_models"))


def run_metrics(checkpoint_dir, key: RunKey, from_wandb: bool = False, project: str = "decision-transformer",
                entity: str | None = None) -> list[dict]:
    """The logged rows of run ``key``: its local ``metrics.jsonl``, or (``from_wandb``) its WandB history."""
    if from_wandb:
        return wandb_history(wandb_run_name(key.env, key.dataset, key.model, key.seed, key.K, key.no_grad_clip,
                                            key.block), project, entity)
    return read_metrics_jsonl(key.path(checkpoint_dir) / "metrics.jsonl")


def _float_or_nan(v) -> bool:
    """Whether the number ``v`` is a float value or NaN (not inf, not an integer too large for a float)."""
    try:
        return not math.isinf(float(v))
    except OverflowError:
        return False


def metric_series(rows: list[dict], key: str, source: str = "metrics",
                  nan_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of ``key`` in iteration order; null entries become NaN (a ``metrics.jsonl`` writes NaN
    as null), rows without the key are left out. Unknown keys, an iteration logged twice and (unless ``nan_ok``: a
    WandB history) a NaN value are errors: a run writes one row per iteration and stops rather than log a NaN return.
    In a WandB history (``nan_ok``) a null is a step that did not log the key and is left out too, while a NaN is a
    logged NaN (a diverged evaluation)."""
    if not any(key in r for r in rows):
        avail = sorted({k for r in rows for k in r if k.endswith("return_mean")})
        raise MetricNotLogged(f"{source}: no metric {key!r}" + (f" (has {', '.join(avail[:6])})" if avail else
                                                                  " (no evaluation metrics logged)"))
    it, val, row_of = [], [], {}
    for i, r in enumerate(rows):
        if key not in r or (nan_ok and r[key] is None):
            continue
        v = r[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not _float_or_nan(v)
                              or (not nan_ok and math.isnan(v))):
            # null is a value not computed; anything else that is not a finite number is damage
            raise UserError(f"{source}: row {i + 1} has {key} = {json.dumps(v)[:40]}, not a number")
        n = int(r.get("iteration", i + 1))
        if n in row_of:
            raise UserError(f"{source}: iteration {n} is logged twice (rows {row_of[n]} and {i + 1})")
        row_of[n] = i + 1
        it.append(n)
        val.append(math.nan if v is None else float(v))
    order = np.argsort(np.array(it, dtype=np.int64), kind="stable")
    return np.array(it, dtype=np.int64)[order], np.array(val, dtype=np.float64)[order]


def ema_smooth(x, weight: float = 0.8, legacy: bool = False) -> np.ndarray:
    """y_n = weight·y_{n-1} + (1 - weight)·x_n with y_0 = x_0 (``legacy``: TAKAGI's filter start y_0 = 1.2·x_0).
    A missing value (NaN: an epoch WandB's history lacks) stays NaN and is passed over: the filter goes on from the
    last value before it (and starts at the first value there is), so one gap does not make the rest of the curve
    NaN."""
    x = np.asarray(x, dtype=np.float64)
    y = np.full_like(x, np.nan)
    prev = None
    for n, v in enumerate(x):
        if np.isnan(v):
            continue
        prev = (1.2 * v if legacy else v) if prev is None else weight * prev + (1 - weight) * v
        y[n] = prev
    return y


# ---- figures ----------------------------------------------------------------------------------------------------

def _series(args, key: RunKey, metric: str, max_epoch: int | None = None):
    rows = run_metrics(args.checkpoint_dir, key, args.from_wandb, args.wandb_project, args.wandb_entity)
    it, val = metric_series(rows, metric, str(key.path(args.checkpoint_dir) / "metrics.jsonl")
                            if not args.from_wandb else key.dir_name, nan_ok=args.from_wandb)
    if max_epoch is not None:
        keep = it <= max_epoch
        it, val = it[keep], val[keep]
    return it, val


def _try_series(args, key, metric, max_epoch=None, missing=None):
    """``_series``, or None for a run that does not exist or lacks the metric (a corrupt metrics file raises)."""
    try:
        return _series(args, key, metric, max_epoch)
    except (RunNotFound, MetricNotLogged) as e:
        if missing is not None:
            missing.append(str(e))
        return None


def build_no_context_parser():
    """The command-line parser of the K = 1 vs K = 20 figure (Figure 8, Table 2) and, with
    ``-block``, the block-replacement figure (Figure 9)."""
    p = common.parser("Figure 8 and Table 2 (K = 1 vs K = 20 learning curves); with -block, Figure 9 (block "
                      "replacement).")
    common.add_checkpoint_flags(p)
    p.add_argument("--model_name_list", nargs="+", default=["gpt2", "dt"])
    # --env_name, --block_replacement_exp, -pld and -psf: the original plot_learning_curve_no_context.py's spellings
    p.add_argument("--env_name_list", "--env_name", dest="env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--seed", type=int, default=666,
                   help="the runs' seed (Table 2 of this one seed: files tagged _seed{N})")
    p.add_argument("-block", "--block", "--block_replacement_exp", dest="block", action="store_true",
                   help="block-replacement curves (runs {dt}_..._K1_block{b}) instead")
    p.add_argument("--replaced_lm", type=str, default="gpt2",
                   help="-block: the LM whose blocks were replaced, by its run name (gpt2: runs dt_..._K1_block{b}; "
                        "igpt: dt-igpt_..._K1_block{b}), drawn against that LM's and the random init's K=1 runs")
    p.add_argument("--max_epoch", type=int, default=None,
                   help="epochs shown (default: all; with -block 10 for hopper, 5 for the others, as TAKAGI)")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"EMA weight of the block-replacement curves (other than {DEFAULT_SMOOTHING}: their files "
                        f"tagged _smooth{{w}})")
    p.add_argument("--legacy_smoothing", action="store_true",
                   help="TAKAGI's filter start y0 = 1.2 x0 (block-replacement files tagged _legacysmooth)")
    p.add_argument("--target", type=int, default=None,
                   help="evaluation target (default 3600/6000/5000; other envs: their first; given: the files, Table "
                        "2's too, tagged _target{T})")
    p.add_argument("--score_norm", choices=["d4rl", "dataset"], default="d4rl",
                   help="Table 2's normalisation (its files are named by it; the curves are raw returns)")
    p.add_argument("--run_K", type=int, default=20, help="the K of the runs with context drawn against the K=1 runs")
    p.add_argument("--data_path", "--path_to_load_data", "-pld", dest="data_path", type=str,
                   default=project_path("data"), help="random/expert datasets for --score_norm dataset")
    common.add_wandb_flags(p)
    common.add_curve_output_flags(p, "no_context")
    return p


def seed_tag(seed: int) -> str:
    """``_seed{N}``: the file-name tag of the single-seed Table 2 this script writes, so that it sits next to the
    table over seeds of ``compute_normalized_score.py --K 1`` (same results folder) instead of replacing it."""
    return f"_seed{int(seed)}"


def run_no_context(args) -> common.Outputs:
    """Figure 8: the K = 1 and ``--run_K`` learning curves, one panel per env, with their CSV and Table 2's
    normalised scores of the K = 1 runs of ``--seed`` (files tagged ``_seed{N}``:
    ``normalized_scores_{dataset}_K1_{norm}_seed{N}[_target{T}]``); with ``--block``, Figure 9 instead."""
    common.check_positive(args, "max_epoch")
    common.check_numbers(args, smoothing=("a number in [0, 1) (the EMA weight of the previous value)",
                                          lambda v: 0 <= v < 1))
    common.check_seeds(args, "seed")
    common.run_k(args)  # checks --run_K
    common.check_curve_output_flags(args)
    if args.block:
        return run_block_replacement(args)
    plt = common.pyplot()
    outs = common.Outputs()
    res = common.out_dir(args.results_dir)
    envs = args.env_name_list
    colors = common.model_colors(args.model_name_list)
    rows, missing, curves = [], [], {}
    # run_all.py's figure: only the (env, model, seed, K) runs it found, not every combination of its lists
    only = getattr(args, "only_runs", None)
    for env in envs:
        metric = return_key(env, args.target)
        for m in args.model_name_list:
            for K, ls in ((1, "-"),) + (((args.run_K, "--"),) if args.run_K != 1 else ()):
                if only is not None and (env, m, args.seed, K) not in only:
                    continue
                s = _try_series(args, RunKey(m, args.dataset_name, env, args.seed, K), metric, args.max_epoch, missing)
                if s is None:
                    continue
                curves.setdefault(env, []).append((m, K, ls, s))
                rows += [[env, m, K, int(i), float(v)] for i, v in zip(*s)]
    if not curves:
        raise UserError("no runs found for the no-context figure: " + "; ".join(missing[:3]))
    # one panel per env with something to draw (an env without runs is a note, not an empty panel)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False, layout="constrained")
    for ax, (env, drawn) in zip(axes[0], curves.items()):
        for m, K, ls, s in drawn:
            ax.plot(s[0], s[1], ls=ls, color=colors[m], label=f"{common.model_label(m)} K={K}")
        ax.set_title(env)
        ax.set_xlabel("epoch")
        common.integer_ticks(ax)
        ax.set_ylabel("return (mean)")
        common.legend(ax, fontsize=7)
    outs.notes += common.unique(f"skipped: {msg}" for msg in missing)
    stem = (f"learning_curve_no_context_{'_'.join(args.model_name_list)}_{args.dataset_name}_{args.seed}"
            + common.run_k_tag(args.run_K) + target_tag(args))
    outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
    outs.files.append(common.save_csv(res / f"{stem}.csv", ["env", "model", "K", "epoch", "return_mean"], rows))
    # Table 2: the K = 1 runs' normalised scores
    from decision_transformer.analysis import scores

    t_args = scores.build_parser().parse_args([])
    for k in ("checkpoint_dir", "dataset_name", "from_wandb", "wandb_project", "wandb_entity", "target",
              "score_norm", "data_path", "results_dir", "figs_dir"):
        setattr(t_args, k, getattr(args, k))
    t_args.env_name_list, t_args.model_name_list, t_args.seed_list = envs, args.model_name_list, [args.seed]
    t_args.K, t_args.select, t_args.no_figure = 1, "best", True
    # one seed's table: tagged _seed{N}, next to (not over) compute_normalized_score.py --K 1's table over seeds
    t_args.result_tag = seed_tag(args.seed)
    if only is not None:
        t_args.only_runs = {(e, m, seed) for e, m, seed, K in only if K == 1}
    try:
        outs.extend(scores.run(t_args))
    except UserError as e:
        outs.notes.append(f"Table 2 not written: {e}")
    return outs


def block_curve_tag(args) -> str:
    """The block-replacement files' tag of the settings that change them, where not the default: ``_target{T}``,
    ``_smooth{w}`` (``--smoothing``), ``_legacysmooth`` (``--legacy_smoothing``), in this order."""
    return target_tag(args) + (f"_smooth{args.smoothing:g}" if args.smoothing != DEFAULT_SMOOTHING else "") \
        + ("_legacysmooth" if args.legacy_smoothing else "")


class NoBlockRuns(RunNotFound):
    """An env without block-replacement runs: its figure is skipped with a note (an error when no env has any)."""


#: The part of viridis the block-replacement curves use: its top (light yellow) is hard to see on white.
# violet to orange: away from the reference curves' colours (GPT2 blue, Random Init green), dark enough on white
BLOCK_CMAP, BLOCK_CMAP_RANGE = "plasma", (0.1, 0.8)


def block_color(b: int, depth: int):
    """The colour of block ``b``'s curve of ``depth``: violet (block 0) to orange (the deepest block)."""
    import matplotlib

    lo, hi = BLOCK_CMAP_RANGE
    return matplotlib.colormaps[BLOCK_CMAP](lo + (hi - lo) * b / max(depth - 1, 1))


def run_block_replacement(args) -> common.Outputs:
    """Figure 9 per env of ``--env_name_list``; envs without runs are skipped with a note."""
    plt = common.pyplot()
    outs = common.Outputs()
    res = common.out_dir(args.results_dir)
    skipped = []
    for env in args.env_name_list:
        try:
            outs.extend(_block_figure(args, env, plt, res))
        except NoBlockRuns as e:
            skipped.append(str(e))
    if not outs.figures:
        raise UserError("; ".join(skipped))
    outs.notes += [f"skipped: {msg}" for msg in skipped]
    return outs


def _block_figure(args, env: str, plt, res: Path) -> common.Outputs:
    outs = common.Outputs()
    host = block_model_name(args.replaced_lm)
    ref_keys = [RunKey(m, args.dataset_name, env, args.seed, 1) for m in (args.replaced_lm, "dt")]
    depth = None
    for k in ref_keys[:1] + [RunKey(host, args.dataset_name, env, args.seed, 1, block=0)]:
        if k.path(args.checkpoint_dir).is_dir():
            depth = run_depth(args.checkpoint_dir, k)
            if depth:
                break
    if not depth:
        pattern = f"{host}_{args.dataset_name}_{env}_{args.seed}_K1_block*"
        found = sorted(p.name for p in Path(args.checkpoint_dir).glob(pattern))
        if not found:
            first = RunKey(host, args.dataset_name, env, args.seed, 1, block=0).dir_name
            raise NoBlockRuns(f"no block-replacement runs for {env}: looked for "
                              f"{Path(args.checkpoint_dir) / first} ...")
        depth = 1 + max(int(n.rsplit("block", 1)[1]) for n in found)
    max_epoch = args.max_epoch or (10 if env == "hopper" else 5)
    metric = return_key(env, args.target)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    missing, rows = [], []
    curves = [(f"block {b}", RunKey(host, args.dataset_name, env, args.seed, 1, block=b),
               {"color": block_color(b, depth), "lw": 1.2}) for b in range(depth)]
    curves += [(f"{common.model_label(k.model)} K=1", k,
                {"color": common.model_color(k.model), "ls": "--", "lw": 1.6}) for k in ref_keys]
    drawn = 0                       # block curves of the return drawn: the reference runs alone are no figure
    for n, (label, key, style) in enumerate(curves):
        for ax, met in zip(axes, (metric, ACTION_ERROR)):
            s = _try_series(args, key, met, max_epoch, missing if met == metric else None)
            if s is None:
                continue
            y = ema_smooth(s[1], args.smoothing, args.legacy_smoothing)
            ax.plot(s[0], y, label=label, **style)
            rows += [[label, met, int(i), float(v), float(w)] for i, v, w in zip(s[0], s[1], y)]
            drawn += met == metric and n < depth
    if not drawn:
        plt.close(fig)
        raise NoBlockRuns(f"no block-replacement runs for {env}: " + "; ".join(missing[:2]))
    outs.notes += [f"skipped: {msg}" for msg in missing]
    axes[0].set_ylabel("return (mean, smoothed)")
    axes[1].set_ylabel("action error (smoothed)")
    for ax in axes:
        ax.set_xlabel("epoch")
        common.integer_ticks(ax)
    common.legend(axes[1], fontsize=6, ncol=2)
    lm = "" if host == "dt" else f" {common.model_label(args.replaced_lm)}"
    fig.suptitle(f"{env}: one pretrained{lm} block replaced into a K=1 Random Init DT ({depth} blocks)")
    stem = (f"learning_curve_block_{env}_{args.dataset_name}_{args.seed}"
            + ("" if host == "dt" else f"_{args.replaced_lm}") + block_curve_tag(args))
    outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
    outs.files.append(common.save_csv(res / f"{stem}.csv", ["curve", "metric", "epoch", "value", "smoothed"], rows))
    return outs


def build_grad_clip_parser():
    """The command-line parser of the gradient-clip ablation figure (Appendix G.3)."""
    p = common.parser("Appendix G.3: learning curves with and without the 0.25 gradient clip.")
    common.add_checkpoint_flags(p)
    p.add_argument("--model_name", type=str, default="gpt2", help="TAKAGI plotted igpt (pass --model_name igpt)")
    # --env_name and -psf: the original plot_learning_curve_grad_clip.py's spellings
    p.add_argument("--env_name_list", "--env_name", dest="env_name_list", nargs="+", default=["hopper"])
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--K", "--run_K", dest="K", type=int, default=20, help="the runs' K (folders ..._K{K})")
    p.add_argument("--max_epoch", type=int, default=10)
    p.add_argument("--target", type=int, default=None,
                   help="evaluation target (default 3600/6000/5000; other envs: their first; given: files tagged "
                        "_target{T})")
    common.add_wandb_flags(p)
    common.add_curve_output_flags(p, "grads")
    return p


def run_grad_clip(args) -> common.Outputs:
    """Appendix G.3: per env, the return and action-error curves of the runs with and without the
    gradient clip, as a figure and a CSV."""
    common.check_positive(args, "K", "max_epoch")
    common.check_seeds(args, "seed")
    common.check_curve_output_flags(args)
    plt = common.pyplot()
    outs = common.Outputs()
    res = common.out_dir(args.results_dir)
    missing = []
    for env in args.env_name_list:
        metric = return_key(env, args.target)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
        rows, drawn = [], 0
        for ngc, label, ls in ((False, "with grad clip", "-"), (True, "without grad clip", "--")):
            key = RunKey(args.model_name, args.dataset_name, env, args.seed, args.K, no_grad_clip=ngc)
            for ax, met in zip(axes, (metric, ACTION_ERROR)):
                # a run without metrics (or without this metric) is skipped with a note, as in the other curves
                s = _try_series(args, key, met, args.max_epoch, missing)
                if s is None:
                    continue
                it, val = s
                ax.plot(it, val, ls=ls, marker=".", label=label, color=common.model_color(args.model_name))
                rows += [[label, met, int(i), float(v)] for i, v in zip(it, val)]
                drawn += met == metric
        if not drawn:                   # neither run of this env has the return: no figure (an empty one was drawn)
            plt.close(fig)
            continue
        axes[0].set_ylabel("return (mean)")
        axes[1].set_ylabel("action error")
        for ax in axes:
            ax.set_xlabel("epoch")
            common.integer_ticks(ax)
            common.legend(ax, fontsize=7)
        fig.suptitle(f"{common.model_label(args.model_name)}, {env}")
        stem = (f"learning_curve_grad_clip_{args.model_name}_{env}_{args.dataset_name}_{args.seed}"
                f"{common.run_k_tag(args.K)}{target_tag(args)}")   # (each K's figure its own: run_all draws one per K)
        outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
        outs.files.append(common.save_csv(res / f"{stem}.csv", ["curve", "metric", "epoch", "value"], rows))
    if not outs.figures:
        raise UserError("no runs found for the gradient-clip figure: " + "; ".join(common.unique(missing)[:3]))
    outs.notes += common.unique(f"skipped: {msg}" for msg in missing)
    return outs
