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
import sys
from pathlib import Path

from decision_transformer.errors import quiet_startup

quiet_startup(__name__)  # (python -m: Ctrl-C while torch loads is one line, exit 130)

import numpy as np

from decision_transformer.cli import HelpFormatter, check_upper_bounds
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


def _score_keys(row: dict, envs, env_version, where: str = "metrics row", targets: dict | None = None) -> dict:
    """{env: d4rl score} from one metrics row (single-task keys ``target_{T}_*``, multi ``target_{T}_{EnvId}_*``, T
    from ``targets`` or the env's first); a score that is not a finite number is one error line naming ``where``."""
    out = {}
    for env in envs:
        spec = get_env_spec(env)
        T = (targets or {}).get(env) or int(spec.targets[0])
        for key in (f"evaluation/target_{T}_{spec.gym_id(env_version)}_d4rl_score_mean",
                    f"evaluation/target_{T}_d4rl_score_mean"):
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


def read_run(run_dir: str, pick: str = "best") -> dict[str, float]:
    """{env: D4RL score} of an ``experiment.py`` / ``experiment_multi.py`` run folder. ``best`` and ``last`` consider
    the training iterations (1, 2, ...), as the run's own selection does; a merge run's iteration 0 (the merged model
    before finetuning) is read with ``0`` only."""
    d = Path(run_dir)
    if pick not in ("best", "last", "0"):
        raise UserError(f"unknown pick {pick!r}; use best, last or 0")
    config, rows = _read_run_files(d)
    multi = config.get("model_class") == "multi_dt"
    envs = _run_envs(config, d, multi)
    version = config.get("env_version", DEFAULT_ENV_VERSION)
    targets = {env: _first_target(config, env, d / "config.json") for env in envs}
    if pick == "0":
        info = config.get("merge_info")
        it0 = info.get("iteration_0") if isinstance(info, dict) else None
        if not isinstance(it0, dict) or not it0:
            raise UserError(f"{d}: no evaluation before finetuning recorded (@0 needs a merge run of experiment.py; "
                            f"multi-task merge runs record none)")
        return _score_keys(it0, envs, version, f"{d / 'config.json'} (merge_info.iteration_0)", targets)
    seen = {}
    for n, r in enumerate(rows, 1):   # a run writes one row per iteration: two are a file pasted together
        it = r.get("iteration")
        if isinstance(it, int) and it in seen:
            raise UserError(f"{d / 'metrics.jsonl'}: iteration {it} is logged twice (rows {seen[it]} and {n})")
        seen[it] = n
    where = lambda r: f"{d / 'metrics.jsonl'} (iteration {r.get('iteration')})"  # noqa: E731
    rows = [r for r in rows if _score_keys(r, envs, version, where(r), targets)]
    trained = [r for r in rows if r.get("iteration") != 0]
    if not trained:
        if rows:
            raise UserError(f"{d}: metrics.jsonl holds only iteration 0 (the merged model before finetuning); "
                            f"read it with @0")
        raise UserError(f"{d}: no evaluation in metrics.jsonl")
    if pick == "last":   # the highest iteration (rows out of order are read in iteration order)
        last = max(range(len(trained)), key=lambda i: (_iteration(trained[i]), i))
        return _score_keys(trained[last], envs, version, where(trained[last]), targets)
    if multi:
        key = "evaluation/average_norm_return_mean"
    else:
        key = f"evaluation/target_{targets[envs[0]]}_return_mean"    # the run's own selection
    best = max(trained, key=lambda r: _score(r.get(key)))  # first of equal bests
    return _score_keys(best, envs, version, where(best), targets)


# ---- the table -------------------------------------------------------------------------------------------------------

def build_table(rows: dict[str, dict[str, float]], envs=ENV_ORDER) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows: label, one column per env (— where the row has no score), average over the envs
    the row has."""
    envs = list(dict.fromkeys(envs))  # each env once
    header = ["model", *envs, "average"]
    body = []
    for label, scores in rows.items():
        vals = [scores.get(e) for e in envs]
        have = [v for v in vals if v is not None]
        avg = float(np.mean(have)) if have else None
        body.append([label, *[f"{v:.1f}" if v is not None else "—" for v in vals],
                     (f"{avg:.1f}" if avg is not None else "—") + ("" if len(have) in (0, len(envs)) else "*")])
    return header, body


def to_markdown(header, body) -> str:
    """The table (``build_table``'s header and rows) as markdown, score columns right-aligned, with a footnote
    when an average covers only some envs."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if any(r[-1].endswith("*") for r in body):
        lines += ["", "\\* average over the envs that have a score only"]
    return "\n".join(lines) + "\n"


def to_csv(rows: dict[str, dict[str, float]], envs=ENV_ORDER) -> str:
    """The table as CSV, at full precision (the markdown table rounds to one decimal): empty cells where a row has
    no score, the average over the envs the row has, and a last column ``envs_averaged`` with their number (fewer
    than the env columns: a partial average, the markdown table's *)."""
    envs = list(dict.fromkeys(envs))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *envs, "average", "envs_averaged"])
    for label, scores in rows.items():
        vals = [scores.get(e) for e in envs]
        have = [float(v) for v in vals if v is not None]
        w.writerow([label, *["" if v is None else float(v) for v in vals],
                    float(np.mean(have)) if have else "", len(have) if have else ""])
    return buf.getvalue()


def collect(entries: list[str], *, pick: str, **eval_kw) -> dict[str, dict[str, float]]:
    """Parse ``LABEL=PATH[@pick]`` entries and gather their scores by label. Every entry is read and checked before
    the first checkpoint is evaluated."""
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
    rows: dict[str, dict[str, float]] = {}
    for label, path, got in parsed:
        scores = got if isinstance(got, dict) else evaluate_checkpoint(path, prepared=got, **eval_kw)
        row = rows.setdefault(label, {})
        for env, v in scores.items():
            if env in row:
                print(f"warning: row {label!r} has two {env} scores; keeping the later one ({path})", file=sys.stderr)
            row[env] = v
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
        if out.name in ("", ".", ".."):
            raise UserError(f"--out {args.out}: give a file name without extension (writes OUT.csv and OUT.md)")
        out_files = out.with_name(out.name + ".csv"), out.with_name(out.name + ".md")  # appended, not replaced
        for f in out_files:
            if f.is_dir():
                raise UserError(f"--out {args.out}: {f} is a folder")
        for parent in [out.parent, *out.parent.parents]:  # before the rows are evaluated: a path below a file
            if parent.exists() and not parent.is_dir():
                raise UserError(f"--out {args.out}: {parent} is a file, not a folder")
    device = resolve_device(args.device)
    rows = collect(args.row, pick=args.pick, num_episodes=args.num_eval_episodes, seed=args.seed,
                   data_path=args.data_path, dataset=args.dataset, device=device, env_version=args.env_version)
    envs = list(dict.fromkeys(args.envs))
    for label, scores in rows.items():
        if scores and not any(env in envs for env in scores):
            print(f"warning: row {label!r} has scores for {', '.join(scores)} only, none of --envs "
                  f"{' '.join(envs)}; its cells are empty", file=sys.stderr)
    header, body = build_table(rows, envs)
    md = to_markdown(header, body)
    print(md, end="")
    if out_files:
        csv_path, md_path = out_files
        csv_text = to_csv(rows, envs)   # each written whole (another process may write the same table)
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(csv_text))
        atomic_write(md_path, lambda tmp: Path(tmp).write_text(md))
        print(f"wrote {csv_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
