"""Merge checkpoints into a new checkpoint, with any merge method, from flags or a recipe file.

    python -m decision_transformer.merge_cli --models models/hopper/A.pt models/halfcheetah/B.pt models/walker2d/C.pt \
        --include attn mlp --merge_method ties --ties_density 0.2 --out models/merged/hopper-ties.pt
    python -m decision_transformer.merge_cli --recipe recipes/hopper-ties.yaml

Single-task models merge as ``experiment.py`` does (S from ``--include``/``--exclude``, everything else from model 1);
multi-task models (all of them multi, each specialised on one env) as ``experiment_multi.py --multi_pretrained_models``
(the blocks merged, per-env layers from the model specialised on that env). Fisher information, Gram matrices and
greedy-soup scores are computed on each model's own dataset in ``--data_path``. The output is a plain-dict checkpoint
with model 1's config and a ``merge_info`` record, loadable with ``weights_only=True``, that ``experiment.py
--load_checkpoint``, ``--pretrained_models`` and ``results_table`` accept.

A recipe is a YAML mapping whose keys are these flags' names (``models``, ``out``, ``merge_method``, ``include``,
``merge_lambda`` ...); flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from decision_transformer.errors import quiet_startup

quiet_startup(__name__)  # (python -m: Ctrl-C while torch loads is one line, exit 130)

from decision_transformer import fisher as fisher_mod
from decision_transformer import merging
from decision_transformer.checkpoint import atomic_save, make_checkpoint
from decision_transformer.cli import THREADS_HELP, HelpFormatter, check_context, check_seed, check_upper_bounds
from decision_transformer.errors import UserError, cli_entry
from decision_transformer.paths import project_path


def merge_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``merge_cli``."""
    p = argparse.ArgumentParser(description="Merge Decision Transformer checkpoints into a new checkpoint.",
                                formatter_class=HelpFormatter)
    p.add_argument("--recipe", default=None, help="YAML file with any of these options (flags override it)")
    p.add_argument("--models", nargs="+", default=None, help="checkpoints to merge; the first is the target")
    p.add_argument("--out", default=None, help="output checkpoint (an existing file is replaced only with --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--merge_method", default="mean", choices=merging.MERGE_METHODS)
    p.add_argument("--include", nargs="*", default=[], help="merged keys contain any of these (empty: all keys; "
                                                            "multi-task merges always merge transformer.h)")
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--p", type=float, default=0.5, help="2 models: (1-p)·θ1 + p·θ2")
    p.add_argument("--merge_base", default=None, help="task-vector base (default: model 1's shared initialisation)")
    p.add_argument("--merge_lambda", type=float, default=None, help="task-vector scale (0.8 task arithmetic, 1.0 TIES)")
    p.add_argument("--ties_density", type=float, default=0.2)
    p.add_argument("--regmean_alpha", type=float, default=0.1)
    p.add_argument("--regmean_n_windows", type=int, default=1000)
    p.add_argument("--fisher_type", default="batch", choices=fisher_mod.FISHER_TYPES)
    p.add_argument("--fisher_norm", default="trace", choices=merging.FISHER_NORMS)
    p.add_argument("--no_trace_norm", action="store_true", help="= --fisher_norm none")
    p.add_argument("--fisher_floor", type=float, default=1e-6)
    p.add_argument("--fisher_favor_target", action="store_true")
    p.add_argument("--spec_info", action="store_true", help="multi-task: Fisher on each model's own env only")
    p.add_argument("--f_batch_size", type=int, default=64)
    p.add_argument("--f_num_batches", type=int, default=100)
    p.add_argument("--data_path", default=project_path("data"),
                   help="default: the project's data/ when started inside the project, ./data when started outside it")
    p.add_argument("--dataset", default=None, help="multi-task Fisher data (default: model 1's dataset), "
                                                   "normalised with each model's stored state statistics")
    p.add_argument("--K", type=int, default=20, help="context of the RegMean, greedy-soup and multi-task Fisher "
                                                     "windows (a single-task Fisher uses the K its model file "
                                                     "records, --K for a file that records none)")
    p.add_argument("--batch_size", type=int, default=64, help="windows per batch of RegMean and greedy soup")
    p.add_argument("--seed", type=int, default=666, help="seed of the RegMean, greedy-soup and multi-task Fisher "
                                                         "windows (a single-task Fisher uses 666, as "
                                                         "precompute_fisher.py)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", default="auto", help=THREADS_HELP)
    return p


def read_recipe(path: str) -> dict:
    """A recipe file as a dict of option names to values (YAML); a missing, unreadable or non-mapping file
    is one line naming it."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: a directory, not a recipe file")
    try:
        obj = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: recipe not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file (a recipe is a YAML mapping of option names to values)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: a recipe is a mapping of option names to values")
    return obj


def recipe_value(action: argparse.Action, value, source: str):
    """A recipe's value for one option, converted and checked as the flag's own value would be."""
    name = action.dest
    if action.nargs in ("+", "*"):
        vals = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in vals):
            raise UserError(f"{source}: {name} must be a name or a list of names, got {value!r}")
        return [str(v) for v in vals]
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if value is None and action.default is None:
        return None
    if isinstance(value, (bool, list, dict)) or value is None:
        raise UserError(f"{source}: {name} must be a single value, got {value!r}")
    try:
        value = action.type(str(value)) if action.type is not None else str(value)
    except ValueError:
        kind = getattr(action.type, "__name__", "valid")
        raise UserError(f"{source}: {name} must be {kind}, got {value!r}") from None
    if action.choices and value not in action.choices:
        raise UserError(f"{source}: {name} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def check_args(args):
    """Reject option values that would crash a merge part-way or write a NaN checkpoint, before anything runs."""
    from decision_transformer.envs import check_dataset_name

    if len(args.models) < 2:
        raise UserError(f"a merge needs at least 2 models; --models lists {len(args.models)}")
    for name in ("K", "batch_size", "f_batch_size", "f_num_batches", "regmean_n_windows"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    check_upper_bounds(args)
    check_context(args.K)
    check_seed(args.seed)
    if not 0.0 <= args.p <= 1.0:  # also false for NaN
        raise UserError(f"--p must be in [0, 1] (got {args.p})")
    if args.merge_lambda is not None and not math.isfinite(args.merge_lambda):
        raise UserError(f"--merge_lambda must be finite (got {args.merge_lambda})")
    if not (math.isfinite(args.fisher_floor) and args.fisher_floor >= 0):
        raise UserError(f"--fisher_floor must be finite and >= 0 (got {args.fisher_floor})")
    from decision_transformer.run import MERGE_NUMBER_RULES, check_numbers

    check_numbers(args, MERGE_NUMBER_RULES)
    if args.dataset is not None:
        check_dataset_name(args.dataset)
    if args.merge_base and not Path(args.merge_base).is_file():   # (as experiment.py; the merge records the path)
        from decision_transformer.legacy_import import not_a_model_file

        raise UserError(f"{args.merge_base}: {not_a_model_file(args.merge_base)}")
    for parent in Path(args.out).parents:   # before any Fisher or Gram is computed
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {args.out}: {parent} is a file, not a folder")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; name the merged checkpoint's file (e.g. "
                        f"{Path(args.out) / 'merged.pt'})")
    out = Path(args.out).resolve()
    for m in [*args.models, *([args.merge_base] if args.merge_base else [])]:
        if Path(m).resolve() == out:
            raise UserError(f"--out {args.out} is the input model {m}; write the merge to another file")
    if Path(args.out).exists() and not args.force:
        raise UserError(f"--out {args.out} exists (a trained model or an earlier merge); name another file, or pass "
                        f"--force to replace it")


def parse_args(argv=None) -> argparse.Namespace:
    """The merge options: the recipe's values as defaults, overridden by the command line, then checked
    (models and output required)."""
    parser = merge_parser()
    args = parser.parse_args(argv)
    if args.recipe:
        recipe = read_recipe(args.recipe)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "recipe")}
        for k in recipe:
            if k not in actions:
                raise UserError(f"{args.recipe}: unknown option {k!r} (valid: {', '.join(sorted(actions))})")
        parser.set_defaults(**{k: recipe_value(actions[k], v, args.recipe) for k, v in recipe.items()})
        args = parser.parse_args(argv)  # command-line flags win over the recipe
    from decision_transformer.cli import check_trace_norm, given_flags

    check_trace_norm(given_flags(parser, argv) | set(read_recipe(args.recipe) if args.recipe else ()), args)
    if not args.models:
        raise UserError("no models to merge: pass --models A B ... or a recipe with 'models'")
    if not args.out:
        raise UserError("no output: pass --out FILE or a recipe with 'out'")
    check_args(args)
    return args


def stored_state_stats(mf) -> dict:
    """env -> (mean, std) of a multi-task checkpoint's stored ``state_stats``, checked ({} for an original pickle)."""
    from decision_transformer.legacy_import import stored_state_stats as stored_for

    table = mf.raw.get("state_stats") or {}
    return {env: stored_for(mf, env) for env in (table if isinstance(table, dict) else [None])}


def check_sources_rebuild(sources) -> None:
    """Each model file rebuilds into the model its config describes (sizes that fit its weights, no tensor the model
    lacks, a known env), checked on torch's meta device (no memory): a merged file made from one that does not, with
    model 1's config, is refused by every tool that loads it, yet was written with exit 0. Bare state dicts record
    no config to disagree with."""
    import warnings

    import torch

    from decision_transformer.envs import get_env_spec
    from decision_transformer.legacy_import import build_model

    for s in sources:
        if s.bare:
            continue
        if not s.is_multi and s.env is not None:
            try:
                get_env_spec(s.env)
            except UserError as e:
                raise UserError(f"{s.path}: its config records {e}") from None
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")   # (loading weights into meta tensors is a no-op torch warns of)
            build_model(s)


def run_merge(args) -> Path:
    """Merge the ``--models`` (all single-task or all multi-task) with the chosen method and write the
    merged checkpoint, with model 1's config and a ``merge_info`` record, to ``--out``; returns its path."""
    from decision_transformer.legacy_import import build_model, load_model_file
    from decision_transformer.merge_setup import (DatasetCache, check_merged_state, check_multi_sources,
                                                  check_selection, merge_multi_states, merge_single_sources,
                                                  merge_words, multi_fisher, resolve_method, warn_architecture,
                                                  warn_inert_p)
    from decision_transformer.merge_setup import check_favor_target
    from decision_transformer.run import resolve_device

    method = resolve_method(args)
    check_favor_target(args, method, len(args.models))
    device = resolve_device(args.device, args.threads)
    sources = [load_model_file(m) for m in args.models]
    check_sources_rebuild(sources)
    warn_inert_p(args.p, method, len(sources))
    n_multi = sum(s.is_multi for s in sources)
    if n_multi not in (0, len(sources)):
        raise UserError("cannot merge single-task with multi-task models")
    first = sources[0]
    # the methods that read data in --K windows: RegMean, greedy soup and a multi-task Fisher (a single-task Fisher
    # uses windows of each model's own K, and precompute_fisher.py's seed, as merge_setup.fisher_for_file)
    if method in ("regmean", "greedy_soup") or (method == "fisher" and n_multi):
        fisher_mod.warn_context(sources, args.K, lambda msg: print(msg, file=sys.stderr))
    info = {"method": method, "models": list(args.models), "include": list(args.include),
            "exclude": list(args.exclude)}
    if n_multi:
        fishers = None
        check_multi_sources(sources, method)  # before any Fisher is computed
        if method == "fisher":
            ds = args.dataset or first.dataset or "medium"
            fishers = []
            for s in sources:
                # the Fisher data is normalised as the model's inputs were: with the statistics it stores
                data = DatasetCache(args.data_path, device, stored_state_stats(s))
                m = build_model(s, device, max_length=args.K)
                envs = [s.specializations[0]] if args.spec_info and len(s.specializations) == 1 else m.config.envs
                fishers.append(multi_fisher(m, envs, [data.get(e, ds) for e in envs], args))
        state, specs = merge_multi_states(sources, args, device="cpu", fishers=fishers)
    else:
        if args.dataset is not None:
            print(f"warning: --dataset {args.dataset} is for multi-task models; the Fishers, Gram matrices and soup "
                  f"scores of single-task models use each model's own dataset", file=sys.stderr)
        keys = merging.select_keys(list(first.state_dict), args.include, args.exclude)
        check_selection(keys, args, first.path, list(first.state_dict))
        merging.check_compatible([s.state_dict for s in sources], [s.path for s in sources], keys)
        warn_architecture([s.config.get("model_config") for s in sources], [s.path for s in sources])
        state, merged_keys = merge_single_sources(sources, args, keys, device, DatasetCache(args.data_path, device))
        n, tot, frac = merging.merged_fraction(state, merged_keys)
        # as merge_setup._report: the unused 50257 x H token table wte dominates the parameter count of a DT
        _, _, frac_used = merging.merged_fraction({k: v for k, v in state.items() if k != "transformer.wte.weight"},
                                                  merged_keys)
        print(f"merge: {merge_words(method, len(sources), args.p)} over {n} of {tot} tensors ({frac:.1%} of the parameters, "
              f"{frac_used:.1%} without the unused token table wte); the rest from {first.path}", file=sys.stderr)
        specs = list(first.specializations)
        info.update(merged_tensors=n, merged_fraction=frac, merged_fraction_without_wte=frac_used)
    info.update({k: getattr(args, k) for k in ("p", "merge_base", "merge_lambda", "ties_density", "regmean_alpha",
                                               "regmean_n_windows", "fisher_type", "fisher_norm", "no_trace_norm",
                                               "fisher_floor", "fisher_favor_target", "f_batch_size", "f_num_batches",
                                               "seed")})
    try:
        check_merged_state(state, method, args, [(s.path, s.state_dict) for s in sources])
    except UserError as e:
        raise UserError(f"{e}; {args.out} not written") from None
    config = {**first.config, "merge_info": info}
    extra = {k: first.raw[k] for k in ("state_mean", "state_std", "state_stats") if k in first.raw}
    out = atomic_save(make_checkpoint({k: v.cpu() for k, v in state.items()}, config, specializations=specs,
                                      **extra), args.out, replace=args.force)   # (not one written meanwhile)
    print(f"{out}: merged checkpoint ({merge_words(method, len(sources), args.p)})", file=sys.stderr)
    return out


@cli_entry
def main(argv=None):
    """``merge_cli`` entry point: parse the options and run the merge."""
    run_merge(parse_args(argv))


if __name__ == "__main__":
    main()
