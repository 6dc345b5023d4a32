"""Results tables of merge experiments: per-env D4RL-normalised scores (×100) of each source model, the plain merge,
the merge after finetuning, the Fisher merge ..., printed and written as CSV and markdown.

Each ``--row LABEL=PATH`` adds one result to the row LABEL (rows are kept in order of first appearance; several
entries may fill one row, e.g. the three source models):

* a checkpoint file is **evaluated** here: a single-task model on its own env, a multi-task model on every env, each at
  the env's first target with ``--num_eval_episodes`` seeded episodes, its stored state statistics (else those of
  ``{data_path}/{env}-{dataset}-v2.pkl``, the dataset being ``--dataset``, else the one the model's config or file
  name records, else medium);
* a run folder (``config.json`` + ``metrics.jsonl`` of ``experiment.py`` or ``experiment_multi.py``) is **read**:
  ``--pick best`` (default; the best training iteration by the run's own selection metric), ``last`` (the last
  training iteration), or ``0`` (an ``experiment.py`` merge run's evaluation before finetuning, recorded in its
  config; ``best`` and ``last`` leave it out, as the run's own selection does). ``@pick`` applies to run folders only.

``--out OUT`` writes ``OUT.csv`` and ``OUT.md`` (the names are appended: ``--out res/merge.v2`` writes
``res/merge.v2.csv``); the CSV's ``envs_averaged`` column counts the envs in each row's average (the markdown's *
marks an average over fewer envs than the table has).

What a run folder's ``config.json`` records is checked, never silently: a run whose last logged iteration is below its
``max_iters`` is named on stderr ("stopped at iteration i of n") and its scores are marked †; the run folders of one
row that differ in a flag of ``COMPARED_FLAGS`` are named on stderr with the flag, and the row's average is marked ‡.
``last`` is the last evaluated iteration even when its score is null (a diverged evaluation): the cell is ``nan``, left
out of the average, with a warning naming the run; ``best`` leaves such iterations out, with a warning.

    python -m decision_transformer.results_table \
        --row source=models/hopper/A_best.pt --row source=models/halfcheetah/B_best.pt \
        --row source=models/walker2d/C_best.pt \
        --row "merge=checkpoints/dt_medium_hopper_666_123456@0" \
        --row merge+finetune=checkpoints/dt_medium_hopper_666_123456 \
        --out results/merge_medium
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from decision_transformer.errors import quiet_startup

quiet_startup(__name__)  # (python -m: Ctrl-C while torch loads is one line, exit 130)

import numpy as np

from decision_transformer.cli import THREADS_HELP, HelpFormatter, check_upper_bounds
from decision_transformer.envs import (D4RL_ENVS, DEFAULT_ENV_VERSION, SUPPORTED_ENV_VERSIONS, check_dataset_name,
                                       get_env_spec)
from decision_transformer.errors import TrainingDiverged, UserError, cli_entry
from decision_transformer.files import atomic_write
from decision_transformer.runlog import cut_last_line
from decision_transformer.paths import project_path
from decision_transformer.legacy_import import stored_state_stats

ENV_ORDER = D4RL_ENVS


def scored_env(env: str, where: str) -> str:
    """``env``, checked to have D4RL reference returns (this table is of D4RL scores; reacher2d has none)."""
    if not get_env_spec(env).has_d4rl_score:
        raise UserError(f"{where}: {env} has no D4RL reference returns, and this table is of D4RL scores "
                        f"(its runs' raw returns are in metrics.jsonl)")
    return env


# ---- what a run's config.json says about its scores ------------------------------------------------------------------

#: Recorded flags that change what a run learns or how it is evaluated. Runs read into one table cell (the seeds of a
#: score-table cell, the run folders of a results-table row) that differ in one of them are named with the flag: a
#: note, not an error (a mix may be intended). Seeds, devices, paths, threads, logging and the like are not compared.
COMPARED_FLAGS = ("model_type", "embed_dim", "n_layer", "n_head", "activation_function", "dropout", "K", "batch_size",
                  "pct_traj", "mode", "learning_rate", "lm_learning_rate", "weight_decay", "warmup_steps",
                  "custom_transformer_decay", "remove_grad_clip", "max_iters", "num_steps_per_iter",
                  "num_eval_episodes", "env_version", "embed_order", "disable_attention", "share_input_output_proj",
                  "extend_positions", "igpt_legacy_ln", "frozen", "freeze_subset", "gpt_kmeans", "gpt_kmeans_const",
                  "kmeans_mean", "kmeans_form",
                  # how a merge run merged (--use_fisher is read as --merge_method fisher; substrings in any order)
                  "merge_method", "include", "exclude", "p", "copy_model", "flip", "copy_include", "merge_frozen",
                  "identity_layers", "merge_lambda", "ties_density", "regmean_alpha",
                  "regmean_n_windows", "fisher_type", "fisher_floor", "fisher_norm", "fisher_favor_target",
                  "f_batch_size", "f_num_batches", "spec_info", "fisher_dataset")
#: Flags only one or two merge methods read: a merge run of another method is not compared on them (their defaults,
#: recorded all the same, change nothing). ``--no_trace_norm`` is read as ``--fisher_norm none``.
METHOD_FLAGS = {"fisher_type": ("fisher",), "fisher_floor": ("fisher",), "fisher_norm": ("fisher",),
                "fisher_favor_target": ("fisher",), "f_batch_size": ("fisher",), "f_num_batches": ("fisher",),
                "spec_info": ("fisher",), "fisher_dataset": ("fisher",), "merge_lambda": ("task_arithmetic", "ties"),
                "ties_density": ("ties",), "regmean_alpha": ("regmean",), "regmean_n_windows": ("regmean",)}
#: Flags read from the recorded architecture (``model_config.backbone``) where there is one: a pretrained LM's config
#: replaces the sizes given on the command line.
_BACKBONE_FIELDS = {"embed_dim": "n_embd", "n_layer": "n_layer", "n_head": "n_head",
                    "activation_function": "activation_function"}
#: Marks of a cell read from a run that stopped early, and of a row (its average) of runs with differing flags.
INCOMPLETE_MARK, MIXED_MARK = "†", "‡"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stopped_early(config: dict | None, last_iteration: int | None, run_dir: str | Path | None = None) -> str | None:
    """``stopped at iteration {last} of {max_iters}`` for a run whose last logged iteration is below the ``max_iters``
    its config records (unfinished, or killed); ``still being trained ...`` where a process holds the run folder's
    lock (``run_dir``: a table read while it trains); None for a finished run and one without a config or
    ``max_iters``."""
    n = config.get("max_iters") if isinstance(config, dict) else None
    if not _is_int(n) or last_iteration is None or last_iteration >= n:
        return None
    if run_dir is not None:
        from decision_transformer.sweep import _lock_holder, folder_lock_path

        holder = _lock_holder(folder_lock_path(Path(run_dir)))
        if holder is not None:
            return f"still being trained, at iteration {last_iteration} of {n} ({holder})"
    return f"stopped at iteration {last_iteration} of {n}"


def recorded_flags(config: dict | None) -> dict:
    """The ``COMPARED_FLAGS`` a run config records (the model sizes from its ``model_config`` where present)."""
    if not isinstance(config, dict):
        return {}
    mc = config.get("model_config")
    backbone = mc.get("backbone") if isinstance(mc, dict) else None
    out = {}
    for k in COMPARED_FLAGS:
        if isinstance(backbone, dict) and backbone.get(_BACKBONE_FIELDS.get(k)) is not None:
            out[k] = backbone[_BACKBONE_FIELDS[k]]
        elif k in config:
            out[k] = config[k]
    if config.get("use_fisher") is True and "merge_method" in out:
        out["merge_method"] = "fisher"
    if config.get("no_trace_norm") is True and "fisher_norm" in out:
        out["fisher_norm"] = "none"
    if "merge_method" in out:
        out = {k: v for k, v in out.items() if out["merge_method"] in METHOD_FLAGS.get(k, (out["merge_method"],))}
    for k in ("include", "exclude"):
        if isinstance(out.get(k), list) and all(isinstance(x, str) for x in out[k]):
            out[k] = sorted(out[k])
    return out


def _same_value(v):
    """A value to compare recorded flags by: 3 and 3.0 alike, lists and objects by their JSON."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v if v is None or isinstance(v, (bool, str)) else json.dumps(v, sort_keys=True, default=str)


def flag_differences(configs: dict) -> list[str]:
    """``flag value (runs), value (runs)`` for each of ``COMPARED_FLAGS`` on which the configs of ``configs`` (run
    name -> config; None: no config.json, not compared) differ; a flag a config does not record is not compared."""
    flags = {name: recorded_flags(cfg) for name, cfg in configs.items() if isinstance(cfg, dict)}
    out = []
    for k in COMPARED_FLAGS:
        groups: dict = {}
        for name, f in flags.items():
            if k in f:
                groups.setdefault(_same_value(f[k]), (json.dumps(f[k], default=str), []))[1].append(name)
        if len(groups) > 1:
            out.append(f"{k} " + ", ".join(f"{shown} ({', '.join(names)})" for shown, names in groups.values()))
    return out


def warn(msg: str):
    """Print ``warning: {msg}`` to stderr."""
    print(f"warning: {msg}", file=sys.stderr)


class RunScores(dict):
    """{env: D4RL score} of one run folder (``read_run``), with ``incomplete`` (``stopped at iteration i of n`` or
    None) and ``config`` (its config.json) for the table's marks."""

    incomplete: str | None = None
    config: dict | None = None


class TableRow(dict):
    """{env: score} of one table row (``collect``), with ``marks`` ({env or "average": mark}) and ``notes`` (what
    the marks stand for, one line each)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.marks: dict[str, str] = {}
        self.notes: list[str] = []


# ---- scores of one entry ---------------------------------------------------------------------------------------------

def prepare_checkpoint(path: str, device="cpu", *, data_path: str = "data", dataset: str | None = None):
    """(model file, model, envs, stored state statistics per env) of a checkpoint this table can score; every check
    (readable, an env with D4RL reference returns, sound statistics, the dataset file whose statistics stand in for
    missing ones) before any evaluation."""
    from decision_transformer.data import find_dataset_file
    from decision_transformer.legacy_import import build_model, load_model_file

    mf = load_model_file(path)
    model = build_model(mf, device)
    envs = list(model.config.envs) if mf.is_multi else [mf.env]
    if envs == [None]:
        raise UserError(f"{path}: cannot tell which env this model is for")
    envs = [scored_env(env, path) for env in envs]
    stats = {env: stored_state_stats(mf, env) for env in envs}
    for env in envs:
        if stats[env] is None:
            ds = fallback_dataset(mf, dataset)
            check_dataset_name(ds)
            find_dataset_file(data_path, env, ds)
    return mf, model, envs, stats


def fallback_dataset(mf, dataset: str | None) -> str:
    """The dataset whose state statistics a checkpoint without stored ones is evaluated with."""
    return dataset or mf.dataset or "medium"


def evaluate_checkpoint(path: str, *, num_episodes: int = 10, seed: int = 666, data_path: str = "data",
                        dataset: str | None = None, device="cpu", env_version: str = DEFAULT_ENV_VERSION,
                        prepared=None) -> dict[str, float]:
    """{env: mean D4RL score} of a checkpoint, evaluated at each env's first target. A checkpoint without stored state
    statistics (an original pickle) is normalised with those of ``dataset``, by default the model's own training
    dataset (config or file name), else medium. ``prepared``: ``prepare_checkpoint``'s result, if already made."""
    from decision_transformer.data import load_dataset, state_stats
    from decision_transformer.evaluation import env_pool, evaluate_episodes

    mf, model, envs, stats = prepared or prepare_checkpoint(path, device, data_path=data_path, dataset=dataset)
    out = {}
    for env in envs:
        if stats[env] is not None:
            mean, std = stats[env]
        else:
            data_file, trajs = load_dataset(data_path, env, fallback_dataset(mf, dataset))
            mean, std = state_stats(trajs)
            print(f"{path}: no stored state statistics; using those of {data_file}", file=sys.stderr)
        if mf.is_multi:
            model.toggle_env(env)
        pool = env_pool(env, env_version, "auto", device, num_episodes)
        try:
            res = evaluate_episodes(model, env, get_env_spec(env).targets[0], num_episodes, mean, std, seed=seed,
                                    device=device, pool=pool)
        finally:
            pool.close()
        if not np.isfinite(res.returns).all():
            raise TrainingDiverged(f"{path}: the {env} evaluation gave non-finite returns: the model's actions are not "
                                   f"finite numbers (its weights overflow)")
        out[env] = float(np.mean(get_env_spec(env).d4rl_score(res.returns)))
    return out


def _first_target(config: dict, env: str, source) -> int:
    """The return target a run selects its best iteration by and reports: the first of its recorded
    ``--env_targets`` (experiment.py runs), else the env's first."""
    raw = config.get("env_targets")
    if isinstance(raw, str) and raw.strip():
        from decision_transformer.run import parse_targets

        try:
            return int(parse_targets(raw, ())[0])
        except UserError as e:
            raise UserError(f"{source}: recorded {e}") from None
    return int(get_env_spec(env).targets[0])


def _env_score_keys(env: str, env_version, targets: dict | None = None) -> tuple[str, str]:
    """The metrics keys of ``env``'s D4RL score: multi-task (``target_{T}_{EnvId}_*``), then single-task."""
    spec = get_env_spec(env)
    T = (targets or {}).get(env) or int(spec.targets[0])
    return (f"evaluation/target_{T}_{spec.gym_id(env_version)}_d4rl_score_mean",
            f"evaluation/target_{T}_d4rl_score_mean")


def _evaluated_envs(row: dict, envs, env_version, targets: dict | None = None) -> list[str]:
    """The envs of which ``row`` holds a score key, also one whose value is null (a diverged evaluation: a run logs
    a NaN as null): the envs evaluated at that iteration."""
    return [env for env in envs if any(k in row for k in _env_score_keys(env, env_version, targets))]


def _score_keys(row: dict, envs, env_version, where: str = "metrics row", targets: dict | None = None) -> dict:
    """{env: d4rl score} from one metrics row (single-task keys ``target_{T}_*``, multi ``target_{T}_{EnvId}_*``, T
    from ``targets`` or the env's first); a score that is not a finite number is one error line naming ``where``."""
    out = {}
    for env in envs:
        for key in _env_score_keys(env, env_version, targets):
            value = row.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}: {key} is {value!r}, not a finite score (a diverged or damaged run; pick "
                                f"another iteration or rerun it)")
            out[env] = float(value)
            break
    return out


def _read_run_files(d: Path) -> tuple[dict, list[dict]]:
    """config.json (an object) and the rows of metrics.jsonl (objects) of a run folder; one line naming the file
    otherwise."""
    try:
        config = json.loads((d / "config.json").read_text())
        text = (d / "metrics.jsonl").read_text()
        lines = text.splitlines()
    except FileNotFoundError as e:
        raise UserError(f"{d}: not a run folder ({Path(e.filename).name} missing)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{d / 'config.json'}: unreadable ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{d}: unreadable run files ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{d / 'config.json'}: not a run config (a JSON {type(config).__name__}, not an object)")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if cut_last_line(text, n, d / "metrics.jsonl"):
                continue
            raise UserError(f"{d / 'metrics.jsonl'}: line {n} is unreadable ({e})") from None
        if not isinstance(row, dict):
            raise UserError(f"{d / 'metrics.jsonl'}: line {n} is a JSON {type(row).__name__}, not an object")
        rows.append(row)
    return config, rows


def _run_envs(config: dict, d: Path, multi: bool) -> list[str]:
    key = "envs" if multi else "env"
    value = config.get(key)
    envs = value if multi else [value]
    if not isinstance(envs, list) or not envs or not all(isinstance(e, str) for e in envs):
        kind = "a list of env names" if multi else "an env name"
        have = "none" if value is None else repr(value)[:80]
        raise UserError(f"{d / 'config.json'}: {key!r} is not {kind} ({have}); not a run of "
                        f"{'experiment_multi.py' if multi else 'experiment.py'}?")
    return [scored_env(env, str(d)) for env in envs]


def _score(value) -> float:
    """A selection score as the run compares it (``score > best``): missing or NaN never wins."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(value) else value


def _iteration(row: dict) -> int:
    it = row.get("iteration")
    return it if isinstance(it, int) and not isinstance(it, bool) else -1


def read_run(run_dir: str, pick: str = "best") -> RunScores:
    """{env: D4RL score} of an ``experiment.py`` / ``experiment_multi.py`` run folder. ``best`` and ``last`` consider
    the training iterations (1, 2, ...), as the run's own selection does; a merge run's iteration 0 (the merged model
    before finetuning) is read with ``0`` only. ``last`` is the last evaluated iteration, also when its score is null
    (a diverged evaluation): that env's score is then NaN, with a warning naming the run; ``best`` leaves such
    iterations out, with a warning. A run that stopped before its config's ``max_iters`` is named on stderr, and
    recorded in the result's ``incomplete`` (``best`` and ``last`` only: ``0`` is read before any training)."""
    d = Path(run_dir)
    if pick not in ("best", "last", "0"):
        raise UserError(f"unknown pick {pick!r}; use best, last or 0")
    config, rows = _read_run_files(d)
    multi = config.get("model_class") == "multi_dt"
    envs = _run_envs(config, d, multi)
    version = config.get("env_version", DEFAULT_ENV_VERSION)
    targets = {env: _first_target(config, env, d / "config.json") for env in envs}
    out = RunScores()
    out.config = config
    if pick == "0":
        info = config.get("merge_info")
        it0 = info.get("iteration_0") if isinstance(info, dict) else None
        if not isinstance(it0, dict) or not it0:
            raise UserError(f"{d}: no evaluation before finetuning recorded (@0 needs a merge run of experiment.py; "
                            f"multi-task merge runs record none)")
        out.update(_score_keys(it0, envs, version, f"{d / 'config.json'} (merge_info.iteration_0)", targets))
        return out
    seen = {}
    for n, r in enumerate(rows, 1):   # a run writes one row per iteration: two are a file pasted together
        it = r.get("iteration")
        if isinstance(it, int) and it in seen:
            raise UserError(f"{d / 'metrics.jsonl'}: iteration {it} is logged twice (rows {seen[it]} and {n})")
        seen[it] = n
    where = lambda r: f"{d / 'metrics.jsonl'} (iteration {r.get('iteration')})"  # noqa: E731
    for r in rows:   # every score checked, not only the one picked
        _score_keys(r, envs, version, where(r), targets)
    logged = [_iteration(r) for r in rows if _iteration(r) >= 0]
    out.incomplete = stopped_early(config, max(logged, default=0), d)
    # the evaluated rows: a score key, also a null one (a diverged evaluation is the run's last, not skipped)
    rows = [r for r in rows if _evaluated_envs(r, envs, version, targets)]
    trained = [r for r in rows if r.get("iteration") != 0]
    if not trained:
        if rows:
            raise UserError(f"{d}: metrics.jsonl holds only iteration 0 (the merged model before finetuning); "
                            f"read it with @0")
        raise UserError(f"{d}: no evaluation in metrics.jsonl")
    if out.incomplete:
        warn(f"{d}: {out.incomplete}; its scores are marked {INCOMPLETE_MARK} (max_iters: its config.json's)")
    if pick == "last":   # the highest iteration (rows out of order are read in iteration order)
        last = trained[max(range(len(trained)), key=lambda i: (_iteration(trained[i]), i))]
        out.update(_score_keys(last, envs, version, where(last), targets))
        nan = [e for e in _evaluated_envs(last, envs, version, targets) if e not in out]
        if nan:
            warn(f"{d}: its last evaluation (iteration {last.get('iteration')}) has a null {', '.join(nan)} score (a "
                 f"diverged evaluation): its last score is nan, left out of the average")
            out.update({e: math.nan for e in nan})
        return out
    if multi:
        key = "evaluation/average_norm_return_mean"
    else:
        key = f"evaluation/target_{targets[envs[0]]}_return_mean"    # the run's own selection
    scored = [r for r in trained if _score_keys(r, envs, version, where(r), targets)]
    # evaluations that diverged (a null score, or a NaN / null selection value): never the best, but said
    with_score = {id(r) for r in scored}
    nan = [str(r.get("iteration")) for r in trained
           if id(r) not in with_score or (key in r and _score(r[key]) == -math.inf)]
    if not scored:
        warn(f"{d}: every evaluation's score is null (diverged evaluations): its best score is nan")
        out.update({e: math.nan for e in envs})
        return out
    if nan:
        warn(f"{d}: iteration{'s' if len(nan) > 1 else ''} {', '.join(nan)} evaluated NaN or null (a diverged "
             f"evaluation), left out of best")
    best = max(scored, key=lambda r: _score(r.get(key)))  # first of equal bests
    out.update(_score_keys(best, envs, version, where(best), targets))
    return out


# ---- the table -------------------------------------------------------------------------------------------------------

def _finite(v) -> bool:
    return v is not None and not math.isnan(v)


def build_table(rows: dict[str, dict[str, float]], envs=ENV_ORDER) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows: label, one column per env (— where the row has no score, nan for a diverged last
    evaluation), average over the envs the row has a finite score of; a row's ``marks`` (``TableRow``) follow their
    cells."""
    envs = list(dict.fromkeys(envs))  # each env once
    header = ["model", *envs, "average"]
    body = []
    for label, scores in rows.items():
        marks = getattr(scores, "marks", {})
        vals = [scores.get(e) for e in envs]
        have = [v for v in vals if _finite(v)]
        avg = float(np.mean(have)) if have else None
        body.append([label, *[("—" if v is None else f"{v:.1f}") + marks.get(e, "") for e, v in zip(envs, vals)],
                     (f"{avg:.1f}" if avg is not None else "—") + ("" if len(have) in (0, len(envs)) else "*")
                     + marks.get("average", "")])
    return header, body


def to_markdown(header, body, notes=()) -> str:
    """The table (``build_table``'s header and rows) as markdown, score columns right-aligned, with a footnote
    when an average covers only some envs, and ``notes`` (``table_notes``: what the † and ‡ marks stand for)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if any(r[-1].rstrip(INCOMPLETE_MARK + MIXED_MARK).endswith("*") for r in body):
        lines += ["", "\\* average over the envs that have a score only"]
    for n in notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


def table_notes(rows: dict[str, dict[str, float]]) -> list[str]:
    """The footnotes of the rows' marks (``TableRow.notes``), once each."""
    return list(dict.fromkeys(n for scores in rows.values() for n in getattr(scores, "notes", [])))


def to_csv(rows: dict[str, dict[str, float]], envs=ENV_ORDER) -> str:
    """The table as CSV, at full precision (the markdown table rounds to one decimal): empty cells where a row has
    no score (nan: a diverged last evaluation), the average over the envs the row has a finite score of, and a last
    column ``envs_averaged`` with their number (fewer than the env columns: a partial average, the markdown table's
    *)."""
    envs = list(dict.fromkeys(envs))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *envs, "average", "envs_averaged"])
    for label, scores in rows.items():
        vals = [scores.get(e) for e in envs]
        have = [float(v) for v in vals if _finite(v)]
        w.writerow([label, *["" if v is None else float(v) for v in vals],
                    float(np.mean(have)) if have else "", len(have) if have else ""])
    return buf.getvalue()


def collect(entries: list[str], *, pick: str, **eval_kw) -> dict[str, TableRow]:
    """Parse ``LABEL=PATH[@pick]`` entries and gather their scores by label. Every entry is read and checked before
    the first checkpoint is evaluated. A score from a run folder that stopped before its ``max_iters`` is marked †;
    a row whose run folders differ in a flag of ``COMPARED_FLAGS`` is named on stderr with the flag, its average
    marked ‡ (each mark explained in the row's ``notes``)."""
    parsed = []
    for entry in entries:
        if "=" not in entry:
            raise UserError(f"--row {entry!r}: expected LABEL=PATH")
        label, path = entry.split("=", 1)
        if not label.strip():
            raise UserError(f"--row {entry!r}: empty LABEL (the row's name in the table)")
        p_pick, explicit = pick, False
        if "@" in path and not Path(path).exists():
            path, p_pick = path.rsplit("@", 1)
            explicit = True
        if Path(path).is_dir():
            parsed.append((label, path, read_run(path, p_pick)))
        elif Path(path).is_file():
            if explicit:
                raise UserError(f"--row {entry!r}: @{p_pick} picks an iteration of a run folder; {path} is a "
                                f"checkpoint file (evaluated as it is)")
            parsed.append((label, path, prepare_checkpoint(path, eval_kw.get("device", "cpu"),
                                                           data_path=eval_kw.get("data_path", "data"),
                                                           dataset=eval_kw.get("dataset"))))
        else:
            raise UserError(f"--row {entry!r}: {path} is neither a checkpoint nor a run folder")
    rows: dict[str, TableRow] = {}
    configs: dict[str, dict] = {}   # label -> {run folder: its config}
    stopped: dict[tuple, str] = {}  # (label, env) -> the note of the run folder that stopped early its score is from
    for label, path, got in parsed:
        scores = got if isinstance(got, dict) else evaluate_checkpoint(path, prepared=got, **eval_kw)
        row = rows.setdefault(label, TableRow())
        if isinstance(scores, RunScores):
            configs.setdefault(label, {})[path] = scores.config
        for env, v in scores.items():
            if env in row:
                print(f"warning: row {label!r} has two {env} scores; keeping the later one ({path})", file=sys.stderr)
            row[env] = v
            stopped.pop((label, env), None)
            if getattr(scores, "incomplete", None):
                stopped[(label, env)] = f"{path} ({scores.incomplete})"
    for (label, env), note in stopped.items():
        rows[label].marks[env] = INCOMPLETE_MARK
        rows[label].notes.append(f"{INCOMPLETE_MARK} from a run that had not reached its max_iters: {note}")
    for label, named in configs.items():
        differ = flag_differences(named) if len(named) > 1 else []
        if differ:
            warn(f"row {label!r}: its run folders differ in {'; '.join(differ)}")
            rows[label].marks["average"] = MIXED_MARK
            rows[label].notes.append(f"{MIXED_MARK} row {label}: run folders with other flags: {'; '.join(differ)}")
    return rows


@cli_entry
def main(argv=None):
    """``results_table`` entry point: check the flags and outputs, gather every ``--row``'s scores, print the
    markdown table and, with ``--out``, write ``OUT.csv`` and ``OUT.md``."""
    from decision_transformer.run import resolve_device

    p = argparse.ArgumentParser(description="Per-env D4RL-normalised scores of merge-experiment models as a table.",
                                formatter_class=HelpFormatter)
    p.add_argument("--row", action="append", required=True, metavar="LABEL=PATH[@pick]",
                   help="a checkpoint (evaluated) or a run folder (read); repeat, same label = same row")
    p.add_argument("--pick", default="best", choices=["best", "last", "0"], help="iteration read from run folders")
    p.add_argument("--envs", nargs="+", default=list(ENV_ORDER))
    p.add_argument("--num_eval_episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--data_path", default=project_path("data"), help="default: the project's data/")
    p.add_argument("--dataset", default=None, help="state statistics for checkpoints that store none (default: the "
                                                     "dataset the model was trained on, from its config or file name; "
                                                     "else medium)")
    p.add_argument("--env_version", default=DEFAULT_ENV_VERSION)
    p.add_argument("--device", default="auto", help="auto = the GPU when there is one, else cpu")
    p.add_argument("--threads", default="auto", help=THREADS_HELP)
    p.add_argument("--out", default=None, help="write OUT.csv and OUT.md")
    args = p.parse_args(argv)
    if args.num_eval_episodes < 1:
        raise UserError(f"--num_eval_episodes must be >= 1 (got {args.num_eval_episodes})")
    check_upper_bounds(args)   # (--num_eval_episodes: as the training scripts, at most 10,000)
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    for env in args.envs:
        scored_env(env, "--envs")
    if args.dataset is not None:
        check_dataset_name(args.dataset)
    if args.env_version not in SUPPORTED_ENV_VERSIONS:
        raise UserError(f"unsupported --env_version {args.env_version!r}; choose one of "
                        f"{', '.join(SUPPORTED_ENV_VERSIONS)}")
    out_files = None
    if args.out:
        out = Path(args.out)
        if out.name in ("", ".", "..") or args.out.endswith(("/", os.sep)):
            raise UserError(f"--out {args.out}: give a file name without extension (writes OUT.csv and OUT.md), "
                            f"not a folder (e.g. {out / 'table'})")
        out_files = out.with_name(out.name + ".csv"), out.with_name(out.name + ".md")  # appended, not replaced
        for f in out_files:
            if f.is_dir():
                raise UserError(f"--out {args.out}: {f} is a folder")
        for parent in [out.parent, *out.parent.parents]:  # before the rows are evaluated: a path below a file
            if parent.exists() and not parent.is_dir():
                raise UserError(f"--out {args.out}: {parent} is a file, not a folder")
        from decision_transformer.files import refuse_files_above

        refuse_files_above(out.parent, "--out")   # (a folder that cannot be written: before the rows are evaluated)
    device = resolve_device(args.device, args.threads)
    rows = collect(args.row, pick=args.pick, num_episodes=args.num_eval_episodes, seed=args.seed,
                   data_path=args.data_path, dataset=args.dataset, device=device, env_version=args.env_version)
    envs = list(dict.fromkeys(args.envs))
    if out_files and rows and not any(env in envs for scores in rows.values() for env in scores):
        have = sorted({env for scores in rows.values() for env in scores})   # (a table of empty cells: a mistake)
        raise UserError(f"no row has a score for --envs {' '.join(envs)} (the rows have scores for "
                        f"{', '.join(have) or 'no env'}); --out {args.out} not written")
    for label, scores in rows.items():
        if scores and not any(env in envs for env in scores):
            print(f"warning: row {label!r} has scores for {', '.join(scores)} only, none of --envs "
                  f"{' '.join(envs)}; its cells are empty", file=sys.stderr)
    header, body = build_table(rows, envs)
    md = to_markdown(header, body, table_notes(rows))
    print(md, end="")
    if out_files:
        csv_path, md_path = out_files
        csv_text = to_csv(rows, envs)   # each written whole (another process may write the same table)
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(csv_text))
        atomic_write(md_path, lambda tmp: Path(tmp).write_text(md))
        print(f"wrote {csv_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
