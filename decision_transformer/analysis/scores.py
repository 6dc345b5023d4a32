"""Normalised-score tables: Table 1 (K = 20, Section 4's sanity check) and Table 2 (K = 1, Section 5.5).

Per run: the best (max over evaluated epochs) and the last value of ``evaluation/target_{3600|6000|5000}_return_mean``,
normalised with D4RL's reference returns (default) or TAKAGI's dataset-based reference (``--score_norm dataset``:
100·(R - mean return of the random dataset) / (mean return of the expert dataset - that of the random one)).
The table shows mean ± std (population std, as numpy) over seeds of the ``--select``-ed value; the CSV has both.
``--score_norm dataset --select best`` reproduces TAKAGI's Table 1. ``--target T`` tags the file names
``_target{T}``, so they sit next to the default tables; the CSV's ``target`` column says which target each row read.

"last" is the last evaluated epoch, also where its value is NaN / null (a diverged evaluation): that run's last score
is NaN, left out of its cell's mean; "best" is over the non-NaN values. A cell over fewer seeds than the table's title
names says so ("(2 of 3 seeds)"). Where a run folder has a ``config.json`` (older and WandB-only runs need none), a run
whose last logged iteration is below its ``max_iters`` is named on stderr ("stopped at iteration 1 of 3") and its cell
marked †, and the runs of one cell that differ in a flag of ``results_table.COMPARED_FLAGS`` (model sizes, K, batch
size, learning rate, dropout, iterations, ...; not seed, device or paths) are named with the flag and the cell marked
‡: notes, not errors. The marks are explained under the table, the NaN values left out too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from decision_transformer.analysis import common
from decision_transformer.analysis.curves import (
    TAKAGI_TARGETS,
    MetricNotLogged,
    RunNotFound,
    eval_target,
    metric_series,
    return_key,
    run_metrics,
    target_tag,
)
from decision_transformer.analysis.runs import RunKey
from decision_transformer.data import load_dataset
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.paths import project_path
from decision_transformer.results_table import (
    INCOMPLETE_MARK,
    MIXED_MARK,
    flag_differences,
    stopped_early,
)

#: Mean per-trajectory returns of TAKAGI's converted random / expert pkl datasets, where recorded (hopper, verified);
#: used for ``--score_norm dataset`` only when the datasets themselves are not in ``--data_path``.
RECORDED_DATASET_RETURNS = {"hopper": (18.40, 3511.36)}

#: REID's medium results as quoted in TAKAGI's Table 1 (D4RL-normalised, 3 seeds): (mean, std).
REID_QUOTED = {("gpt2", "hopper"): (79.1, 1.1), ("gpt2", "halfcheetah"): (42.8, 0.1), ("gpt2", "walker2d"): (78.3, 1.5),
               ("igpt", "hopper"): (5.7, 1.5), ("igpt", "halfcheetah"): (1.5, 0.1), ("igpt", "walker2d"): (0.4, 0.4)}


def d4rl_normalize(env: str, returns):
    """D4RL-normalised score (x100) of raw ``returns`` of ``env``; an env without reference returns is refused."""
    return get_env_spec(env).d4rl_score(np.asarray(returns, dtype=np.float64))


def dataset_reference(env: str, data_path) -> tuple[float, float, str]:
    """(random mean return, expert mean return, source) for TAKAGI's dataset-based normalisation."""
    try:
        means = []
        for ds in ("random", "expert"):
            _, trajs = load_dataset(data_path, env, ds)
            means.append(float(np.mean([t["rewards"].sum(dtype=np.float64) for t in trajs])))
    except UserError as e:
        if env in RECORDED_DATASET_RETURNS:
            r, x = RECORDED_DATASET_RETURNS[env]
            return r, x, f"TAKAGI's recorded {env} random/expert means ({r}, {x}); datasets not found in {data_path}"
        raise UserError(f"--score_norm dataset needs the {env} random and expert datasets: {e}") from None
    if not means[1] > means[0]:   # the scale 100 / (expert - random) would be infinite or upside down
        raise UserError(f"--score_norm dataset: the {env} expert data's mean return ({means[1]:.6g}) is not above the "
                        f"random data's ({means[0]:.6g}) in {data_path}; these cannot normalise a score")
    return means[0], means[1], f"{env}-random/expert datasets in {data_path}"


def dataset_normalize(returns, ref: tuple[float, float]):
    """TAKAGI's dataset-based score: 100·(R - random mean) / (expert mean - random mean), ``ref`` =
    (random mean, expert mean, ...)."""
    r, x = ref[:2]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - r) / (x - r)


def best_and_last(it: np.ndarray, val: np.ndarray) -> tuple[int, float, int, float]:
    """(best epoch, best value, last epoch, last value): the best over the non-NaN values, the last at the last
    evaluated epoch, NaN where that evaluation is NaN (a diverged run's last is not an earlier epoch's);
    (-1, NaN, -1, NaN) when every value is NaN."""
    ok = ~np.isnan(val)
    if not ok.any():
        return -1, math.nan, -1, math.nan
    i_best = int(np.nanargmax(val))
    i_last = len(val) - 1
    return int(it[i_best]), float(val[i_best]), int(it[i_last]), float(val[i_last])


def mean_std(values: list[float], n_seeds: int | None = None) -> str:
    """A table cell: "mean ± std" of the non-NaN values (population std), "x (1 seed)" or "n/a"; with ``n_seeds``
    (the seeds the table's title names) above the values' number, "(k of n seeds)"."""
    v = np.array([x for x in values if not math.isnan(x)])
    if len(v) == 0:
        return "n/a"
    cell = f"{v[0]:.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std():.1f}"
    if n_seeds is not None and n_seeds > len(v):
        return f"{cell} ({len(v)} of {n_seeds} seeds)"
    return f"{cell} (1 seed)" if len(v) == 1 else cell


def run_config(run_dir) -> dict | None:
    """A run folder's ``config.json`` as a dict; None where there is none (older runs, WandB-only runs). One that
    cannot be read is None with a warning: the scores are read as without it."""
    path = Path(run_dir) / "config.json"
    if path.is_dir():
        common.warn(f"{path}: a folder, not a run config; the run's iterations and flags are not checked")
        return None
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        common.warn(f"{path}: unreadable ({type(e).__name__}); the run's iterations and flags are not checked")
        return None
    if not isinstance(config, dict):
        common.warn(f"{path}: not a run config (a JSON {type(config).__name__}); the run's iterations and flags are "
                    f"not checked")
        return None
    n = config.get("max_iters")
    if "max_iters" in config and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        common.warn(f"{path}: max_iters is {json.dumps(n)}, not a whole number >= 0; whether the run finished is not "
                    f"checked")
    return config


def last_logged_iteration(rows: list[dict]) -> int | None:
    """The highest iteration of a run's logged rows (a row without one counts as its position), None without rows."""
    its = [int(r.get("iteration", i)) for i, r in enumerate(rows, 1)]
    return max(its, default=None)


def build_parser():
    """The command-line parser of the normalised-score tables (Tables 1 and 2)."""
    p = common.parser("Table 1 / Table 2: normalised scores (best and last epoch) per env and model, over seeds.")
    common.add_checkpoint_flags(p)
    # --env_name, --model_name, --seed (one value each) and -pld: the original compute_normalized_score.py's spellings
    p.add_argument("--env_name_list", "--env_name", dest="env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--model_name_list", "--model_name", dest="model_name_list", nargs="+",
                   default=list(common.MODEL_NAMES))
    p.add_argument("--seed_list", "--seed", dest="seed_list", nargs="+", type=int, default=[666, 42])
    p.add_argument("--K", "--run_K", dest="K", type=int, default=20,
                   help="the runs' K (folders ..._K{K}): 20: Table 1; 1: Table 2")
    p.add_argument("--score_norm", choices=["d4rl", "dataset"], default="d4rl")
    p.add_argument("--select", choices=["best", "last"], default="best",
                   help="value shown in the table (the CSV always has both)")
    p.add_argument("--target", type=int, default=None,
                   help="evaluation target (default 3600/6000/5000; other envs: their first; given: results tagged "
                        "_target{T})")
    p.add_argument("--data_path", "--path_to_load_data", "-pld", dest="data_path", type=str,
                   default=project_path("data"), help="random/expert datasets for --score_norm dataset")
    p.add_argument("--no_figure", action="store_true")
    common.add_wandb_flags(p)
    common.add_output_flags(p, "scores")
    return p


def run(args) -> common.Outputs:
    """Tables 1 and 2: each run's best and last normalised score (CSV), the table of the ``--select``-ed value
    per env and model over seeds (markdown) and, unless ``--no_figure``, its bar chart."""
    common.check_positive(args, "K")
    common.check_seeds(args, "seed_list")
    outs = common.Outputs()
    res = common.out_dir(args.results_dir)
    records, missing = [], []
    refs = {}
    extra = {}   # run -> (its config or None, "stopped at ..." or None, its NaN epochs)
    # run_all.py's tables: only the (env, model, seed) runs it found, not every combination of its lists
    only = getattr(args, "only_runs", None)
    for env in args.env_name_list:
        metric = return_key(env, args.target)
        for m in args.model_name_list:
            for seed in args.seed_list:
                if only is not None and (env, m, seed) not in only:
                    continue
                key = RunKey(m, args.dataset_name, env, seed, args.K)
                try:
                    rows = run_metrics(args.checkpoint_dir, key, args.from_wandb, args.wandb_project,
                                       args.wandb_entity)
                except RunNotFound as e:          # a corrupt metrics file is an error, not a missing run
                    missing.append(str(e))
                    continue
                try:
                    it, val = metric_series(rows, metric, str(key.path(args.checkpoint_dir) / "metrics.jsonl")
                                            if not args.from_wandb else key.dir_name, nan_ok=args.from_wandb)
                except MetricNotLogged as e:
                    missing.append(str(e))
                    continue
                be, bv, le, lv = best_and_last(it, val)
                if be < 0:
                    missing.append(f"{key.dir_name}: every {metric} value is null")
                    continue
                config = run_config(key.path(args.checkpoint_dir))
                last_it = last_logged_iteration(rows)
                stopped = stopped_early(config, last_it, key.path(args.checkpoint_dir))
                if stopped:
                    common.warn(f"{key.dir_name}: {stopped}; its cell is marked {INCOMPLETE_MARK}")
                nan_at = [int(i) for i, v in zip(it, val) if math.isnan(v)]
                if nan_at and args.select == "last" and math.isnan(lv):
                    common.warn(f"{key.dir_name}: its last evaluation (epoch {le}) is NaN (diverged): its last score "
                                f"is NaN, left out of its cell")
                elif nan_at and args.select == "best":
                    common.warn(f"{key.dir_name}: NaN at epoch{'s' if len(nan_at) > 1 else ''} "
                                f"{', '.join(map(str, nan_at))} (diverged), left out of its best")
                extra[key.dir_name] = (config, stopped, nan_at)
                if args.score_norm == "dataset" and env not in refs:   # (an env without runs needs no data)
                    refs[env] = dataset_reference(env, args.data_path)
                    outs.notes.append(f"dataset-based normalisation for {env}: {refs[env][2]}")
                norm = (lambda x, env=env: float(d4rl_normalize(env, x))) if args.score_norm == "d4rl" else \
                    (lambda x, env=env: float(dataset_normalize(x, refs[env])))
                records.append({"env": env, "model": m, "seed": seed, "run": key.dir_name,
                                "target": eval_target(env, args.target), "best_epoch": be, "best_return": bv,
                                "best_score": norm(bv), "last_epoch": le, "last_return": lv,
                                "last_score": norm(lv), "last_iteration": last_it,
                                "max_iters": config.get("max_iters", "") if config else ""})
    if not records:
        raise UserError("no runs found for the score table: " + "; ".join(missing[:3]))
    outs.notes += [f"skipped: {msg}" for msg in missing]
    # result_tag: curves.py's single-seed Table 2 (_seed{N}), so that it never replaces the table over seeds
    stem = (f"normalized_scores_{args.dataset_name}_K{args.K}_{args.score_norm}{getattr(args, 'result_tag', '')}"
            f"{target_tag(args)}")
    cols = list(records[0])
    outs.files.append(common.save_csv(res / f"{stem}.csv", cols, [[r[c] for c in cols] for r in records]))
    header = ["env"] + [common.model_label(m) for m in args.model_name_list]
    quoted = args.K == 20 and args.dataset_name == "medium" and args.score_norm == "d4rl"
    seeds = sorted({r["seed"] for r in records})
    rows, footnotes = [], {INCOMPLETE_MARK: [], MIXED_MARK: [], "nan": []}
    for env in args.env_name_list:
        row = [env]
        for m in args.model_name_list:
            cell_records = [r for r in records if r["env"] == env and r["model"] == m]
            cell = mean_std([r[f"{args.select}_score"] for r in cell_records], len(seeds))
            cell += _cell_marks(cell_records, extra, args.select, f"{env}, {common.model_label(m)}", footnotes)
            # REID's values are at TAKAGI's targets
            if quoted and (m, env) in REID_QUOTED and eval_target(env, args.target) == TAKAGI_TARGETS[env]:
                cell += " (REID {:.1f} ± {:.1f})".format(*REID_QUOTED[(m, env)])
            row.append(cell)
        rows.append(row)
    table = common.markdown_table(header, rows) + _footnotes(footnotes, args.select)
    outs.files.append(common.save_text(res / f"{stem}_{args.select}.md", table + "\n"))
    name = "Table 1" if args.K == 20 else ("Table 2" if args.K == 1 else f"K={args.K}")
    at = "" if args.target is None else f", target {int(args.target)}"
    outs.tables.append(((f"{name}: {args.select} normalised score ({args.score_norm}), {args.dataset_name}, "
                         f"K={args.K}{at}, mean ± std over seeds {seeds}"), table))
    if not args.no_figure:
        outs.figures.append(_figure(records, args, stem))
    return outs


def _cell_marks(cell_records, extra, select: str, cell: str, footnotes: dict) -> str:
    """The marks of one table cell (``INCOMPLETE_MARK``: a run that had not reached its max_iters, ``MIXED_MARK``:
    runs that differ in a compared flag), with their footnote lines added to ``footnotes``; the runs whose
    ``select``-ed value is NaN go to ``footnotes["nan"]``."""
    marks = ""
    stopped = [f"{r['run']} ({extra[r['run']][1]})" for r in cell_records if extra[r["run"]][1]]
    if stopped:
        marks += f" {INCOMPLETE_MARK}"
        footnotes[INCOMPLETE_MARK] += stopped
    differ = flag_differences({r["run"]: extra[r["run"]][0] for r in cell_records}) if len(cell_records) > 1 else []
    if differ:
        marks += f" {MIXED_MARK}"
        footnotes[MIXED_MARK].append(f"{cell}: {'; '.join(differ)}")
        common.warn(f"the runs of {cell} differ in {'; '.join(differ)}; its cell is marked {MIXED_MARK}")
    for r in cell_records:
        nan_at = extra[r["run"]][2]
        if select == "last" and math.isnan(r["last_score"]):
            footnotes["nan"].append(f"{r['run']} (epoch {r['last_epoch']})")
        elif select == "best" and nan_at:
            footnotes["nan"].append(f"{r['run']} (epoch{'s' if len(nan_at) > 1 else ''} {', '.join(map(str, nan_at))})")
    return marks


def _footnotes(footnotes: dict, select: str) -> str:
    """The lines under a score table that explain its marks and name the NaN values left out ("" for none)."""
    lines = []
    if footnotes[INCOMPLETE_MARK]:
        lines.append(f"{INCOMPLETE_MARK} includes a run that had not reached its max_iters: "
                     + ", ".join(footnotes[INCOMPLETE_MARK]))
    if footnotes[MIXED_MARK]:
        lines.append(f"{MIXED_MARK} runs with other recorded flags in one cell: " + " | ".join(footnotes[MIXED_MARK]))
    if footnotes["nan"]:
        what = "last evaluation NaN (diverged), left out of the mean" if select == "last" else \
            "NaN evaluations (diverged) left out of the best"
        lines.append(f"{what}: " + ", ".join(footnotes["nan"]))
    return "".join(f"\n\n{ln}" for ln in lines)


def _figure(records, args, stem):
    """Grouped bars: one group per env, one bar per model (mean over seeds), only envs and models with a score;
    error bars (std over seeds) where there are at least two seeds."""
    plt = common.pyplot()
    vals = {}
    for env in args.env_name_list:
        for m in args.model_name_list:
            v = np.array([r[f"{args.select}_score"] for r in records if r["env"] == env and r["model"] == m])
            v = v[~np.isnan(v)]
            if len(v):
                vals[(env, m)] = v
    envs = [e for e in args.env_name_list if any(k[0] == e for k in vals)]
    models = [m for m in args.model_name_list if any(k[1] == m for k in vals)]
    colors = common.model_colors(models)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(len(envs), 1), 3.2))
    w = 0.8 / max(len(models), 1)
    for j, m in enumerate(models):
        x = np.array([i + (j - (len(models) - 1) / 2) * w for i, env in enumerate(envs) if (env, m) in vals])
        v = [vals[(env, m)] for env in envs if (env, m) in vals]
        means = np.array([a.mean() for a in v])
        ax.bar(x, means, w, color=colors[m], label=common.model_label(m))
        multi = np.array([len(a) >= 2 for a in v])
        if multi.any():  # a single seed has no spread: no (zero-height) error cap
            ax.errorbar(x[multi], means[multi], yerr=[a.std() for a, k in zip(v, multi) if k], fmt="none",
                        ecolor="k", elinewidth=1, capsize=3)
    ax.set_xticks(np.arange(len(envs)), envs)
    ax.set_ylabel(f"{args.select} normalised score ({args.score_norm})")
    ax.set_title(f"{args.dataset_name}, K={args.K}")
    common.legend(ax, fontsize=7)
    return common.save_figure(fig, args.figs_dir, f"{stem}_{args.select}")
