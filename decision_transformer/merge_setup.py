"""Merging as the scripts use it: load the source models, get the data-dependent quantities (Fisher, Gram matrices,
base model), merge, and (for ``experiment.py``) pick and prepare the model to finetune.

``prepare_merge`` (before the data step: the models loaded and checked) and ``apply_merge`` (after it: the merge)
are ``experiment.py``'s hooks (``reference/merging.md`` §3); ``merge_states`` and ``merge_multi_states``
are shared with ``experiment_multi.py`` and ``python -m decision_transformer.merge_cli``. The tensor arithmetic itself
lives in :mod:`decision_transformer.merging`, the Fisher estimators in :mod:`decision_transformer.fisher`.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from decision_transformer import fisher as fisher_mod
from decision_transformer import merging
from decision_transformer.checkpoint import (BEHAVIOUR_FIELDS, check_finite_state, check_state_fits, load_state_into,
                                             recorded_base, recorded_path, same_flag_value)
from decision_transformer.errors import UserError
from decision_transformer.files import exclusive
from decision_transformer.legacy_import import ModelFile, build_model, load_model_file
from decision_transformer.training.trainer import forked_rng


def log(msg: str):
    """Print ``msg`` to stderr."""
    print(msg, file=sys.stderr)


# ---- options ----------------------------------------------------------------------------------------------------------

def resolve_method(args) -> str:
    """``--use_fisher`` is ``--merge_method fisher``."""
    method = getattr(args, "merge_method", None) or "mean"
    if getattr(args, "use_fisher", False):
        if method not in ("mean", "fisher"):
            raise UserError(f"--use_fisher contradicts --merge_method {method}")
        method = "fisher"
    if method not in merging.MERGE_METHODS:
        raise UserError(f"unknown --merge_method {method!r}; choose one of {', '.join(merging.MERGE_METHODS)}")
    if getattr(args, "no_trace_norm", False) and getattr(args, "fisher_norm", "trace") not in ("trace", "none"):
        raise UserError(f"--no_trace_norm (= --fisher_norm none) contradicts --fisher_norm {args.fisher_norm}")
    return method


def merge_words(method: str, n: int, p: float) -> str:
    """The merge in words for the log: ``mean of 2 models``, with the weight where two models are not weighted
    equally (``--p``), and said plainly where one of them gets all of it."""
    words = f"{method} of {n} models"
    if n != 2 or method not in ("mean", "fisher") or p == 0.5:
        return words
    whole = " (model 1 alone)" if p == 0 else " (model 2 alone)" if p == 1 else ""
    return f"{words} weighted {1 - p:g} : {p:g} (--p {p:g}){whole}"


def warn_inert_p(p: float, method: str, n: int):
    """``--p`` weights the two models of a mean or Fisher merge; elsewhere it changes nothing (the run still records
    it), which is said rather than left to be read as applied."""
    if p != 0.5 and (n != 2 or method not in ("mean", "fisher")):
        log(f"warning: --p {p:g} has no effect on a {method} merge of {n} models: it weights the two models of a mean "
            f"or Fisher merge")


def check_favor_target(args, method: str, n: int):
    """``--fisher_favor_target`` floors only model 1's Fisher; ``--p 1`` gives model 1 no weight in a 2-model Fisher
    merge, so an element where model 2's Fisher is 0 would be 0/0. Refused before any Fisher is estimated."""
    if method == "fisher" and n == 2 and getattr(args, "fisher_favor_target", False) and args.p == 1:
        raise UserError("--fisher_favor_target floors only model 1's Fisher, and --p 1 gives model 1 no weight: where "
                        "model 2's Fisher is 0 the merge would be 0/0; use --p below 1 or leave out "
                        "--fisher_favor_target")


def check_experiment_merge(args):
    """``experiment.py``'s merge flags that can be judged before any model is loaded: ``--merge_frozen`` and
    ``--identity_layers`` need ``--include``, ``--flip`` at most 2 models, a merge method other than the uniform mean 2 or
    more ``--pretrained_models`` (one model is merged uniformly with the fresh ``--pretrained_lm`` model, or loaded
    without a merge)."""
    for flag in ("merge_frozen", "identity_layers"):
        if getattr(args, flag, False) and not args.include:
            raise UserError(f"--{flag} needs --include: without it every tensor is merged, and --{flag} would "
                            f"{'leave nothing to train' if flag == 'merge_frozen' else 'reset every weight and bias'}")
    if getattr(args, "flip", False) and len(args.pretrained_models) > 2:   # (one model: see _trained_source)
        raise UserError(f"--flip needs exactly 2 --pretrained_models, got {len(args.pretrained_models)}")
    method = resolve_method(args)
    if len(args.pretrained_models) == 1 and method != "mean":
        flag = "--use_fisher" if getattr(args, "use_fisher", False) else f"--merge_method {method}"
        one = ("is merged with the fresh --pretrained_lm model by the uniform mean (--p) only"
               if getattr(args, "pretrained_lm", None)
               else "without --pretrained_lm is loaded without a merge")
        raise UserError(f"{flag} merges 2 or more --pretrained_models (or merge_cli --models A B ...); one model {one}")
    # (one model with --pretrained_lm is merged with the fresh LM model: two models)
    n = len(args.pretrained_models) + (len(args.pretrained_models) == 1 and bool(getattr(args, "pretrained_lm", None)))
    if len(args.pretrained_models) > 1 or n == 2:
        warn_inert_p(args.p, method, n)
        check_favor_target(args, method, n)
    else:   # one model, no LM: loaded whole, nothing to weight or flip
        inert = [f for f, on in (("--p", args.p != 0.5), ("--flip", getattr(args, "flip", False))) if on]
        if inert:
            log(f"warning: {' and '.join(inert)} {'has' if len(inert) == 1 else 'have'} no effect: one "
                f"--pretrained_models model without --pretrained_lm is loaded without a merge")


def check_selection(keys: Sequence[str], args, where: str, all_keys: Sequence[str] = ()):
    """The merged set S must not be empty: an --include / --exclude that matches nothing would merge nothing. Each
    --include and --exclude substring must match some tensor of ``all_keys`` (the model's): a misspelt one would
    silently merge less (or more) than asked for."""
    for flag in ("include", "exclude"):
        for sub in getattr(args, flag, None) or []:
            if all_keys and not any(sub in k for k in all_keys):
                raise UserError(f"--{flag} {sub} matches no tensor of {where}; " + (
                    "nothing to merge" if not keys else f"check its spelling (the selection holds {len(keys)} "
                                                        f"tensors without it)"))
    if not keys:
        sel = " ".join(f"--{k} {' '.join(getattr(args, k) or [])}" for k in ("include", "exclude")
                       if getattr(args, k, None)) or "the selection"
        raise UserError(f"{sel} matches no tensor of {where}; nothing to merge")


def warn_architecture(configs: Sequence[dict | None], names: Sequence[str]):
    """One warning naming the model settings that the tensor shapes do not reveal (``BEHAVIOUR_FIELDS``: head count,
    activation, embedding order, ...) in which the merged models differ, and which model has which value: they merge,
    but not like for like. Models without a stored config are left out."""
    import json

    diffs = []
    for path in BEHAVIOUR_FIELDS:
        field, groups = path[-1], {}
        for cfg, name in zip(configs, names):
            value = cfg if isinstance(cfg, dict) else {}
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:   # (grouped by their JSON form: block_overrides are dicts)
                shown = value if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True, default=str)
                groups.setdefault(shown, []).append(str(name))
        if len(groups) > 1:
            diffs.append(f"{field} (" + "; ".join(f"{v}: {', '.join(ns)}" for v, ns in groups.items()) + ")")
    if diffs:
        log(f"warning: the merged models differ in {' and '.join(diffs)}; their tensors are combined element by "
            f"element all the same")


def check_merged_state(state: dict, method: str, args, sources=()):
    """A merged state with NaN or inf is refused: naming the input file where that tensor already was NaN or inf
    (``sources``: (name, state dict) pairs; a tensor outside the merged set is copied from model 1), else the merge."""
    from decision_transformer.checkpoint import check_finite_state

    try:
        check_finite_state(state, f"the {method} merge")
    except UserError as e:
        bad = next(k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all())
        for name, sd in sources:
            v = sd.get(bad)
            if isinstance(v, torch.Tensor) and torch.is_floating_point(v) and not torch.isfinite(v).all():
                raise UserError(f"{name}: tensor {bad} contains NaN or inf (the {method} merge would carry it)") \
                    from None
        hint = ""
        if method == "fisher" and getattr(args, "fisher_floor", None) == 0:
            hint = (" (--fisher_floor 0: an element whose Fisher is zero in every model gives 0/0; a floor > 0, "
                    "the default 1e-6, avoids it)")
        raise UserError(f"{e}{hint}") from None


def fisher_norm(args) -> str:
    """The Fisher normalisation: ``none`` with ``--no_trace_norm``, else ``--fisher_norm`` (default ``trace``)."""
    return "none" if getattr(args, "no_trace_norm", False) else getattr(args, "fisher_norm", "trace")


def merge_lambda(args, method: str) -> float:
    """The task-vector scale: ``--merge_lambda``, else the method's default (0.8 task arithmetic, else 1.0)."""
    lam = getattr(args, "merge_lambda", None)
    return merging.DEFAULT_LAMBDA.get(method, 1.0) if lam is None else lam


# ---- data ----------------------------------------------------------------------------------------------------------

class DatasetCache:
    """``TrajectoryDataset``s by (env, dataset), loaded once, on ``device``; ``stats`` (env -> (mean, std)) fixes the
    state normalisation where the caller knows better than the data (the multi-task script)."""

    def __init__(self, data_path: str, device, stats: dict | None = None, loaded: tuple[str, str] | None = None):
        self.data_path, self.device, self.stats = data_path, device, stats or {}
        self.loaded = loaded   # an (env, dataset) the caller has loaded already: read again without its notes
        self._cache: dict = {}

    def get(self, env: str, dataset: str):
        """The ``TrajectoryDataset`` of ``env`` and ``dataset``, loaded on first use (states normalised with ``stats``
        for the env where given, else with the data's own statistics)."""
        from decision_transformer.data import TrajectoryDataset, load_dataset

        key = (env, dataset)
        if key not in self._cache:
            _, trajs = load_dataset(self.data_path, env, dataset, quiet=key == self.loaded)
            mean, std = self.stats.get(env, (None, None))
            self._cache[key] = TrajectoryDataset(trajs, env, device=self.device, state_mean=mean, state_std=std)
        return self._cache[key]


def source_env_dataset(mf: ModelFile, dataset_override: str | None = None) -> tuple[str, str]:
    """(env, dataset) a single-task model file was trained on (``dataset_override`` replaces the
    dataset); refused where the file does not tell them."""
    env, dataset = mf.env, dataset_override or mf.dataset
    if env is None or dataset is None:
        raise UserError(f"{mf.path}: cannot tell which env and dataset this model was trained on (no stored config and "
                        f"the file name is not models/{{env}}/dt_gym-experiment-{{env}}-{{dataset}}-{{id}}.pt)")
    return env, dataset


# ---- Fisher ----------------------------------------------------------------------------------------------------------

def fisher_for_file(mf: ModelFile, args, data: DatasetCache, device) -> dict:
    """The Fisher info of a single-task model file: loaded from ``<dir>/info/<stem>-bs{B}-nb{N}[-type]`` if it exists,
    else computed on the model's own dataset (with ``precompute_fisher.py``'s default seed) and saved there."""
    path = fisher_mod.fisher_info_path(mf.path, args.f_batch_size, args.f_num_batches, args.fisher_type)
    with exclusive(path, "a Fisher file"):   # two runs computing it at once: the second finds it made
        info, why = (fisher_mod.load_fisher(path) if path.is_file() else None), "not found"
        if info is not None and fisher_mod.stale_weights(info, mf.state_dict):
            info, why = None, f"estimated on other weights than {mf.path} holds now (the file changed since)"
        if info is not None:
            fisher_mod.check_fisher_fits(info, mf.state_dict, path, mf.path)
            rec = info.get("_source") if isinstance(info.get("_source"), dict) else {}
            if rec.get("env") and mf.env and rec.get("env") != mf.env:   # (a copied file: its name records no env)
                raise UserError(f"{path}: a Fisher estimated on {rec.get('env')} data, but {mf.path} is a {mf.env} "
                                f"model; move the file away or run precompute_fisher.py --model {mf.path} --force")
            own, own_K = mf.dataset, fisher_mod.training_context(mf)
            other = f", estimated on {rec.get('dataset')}, not the model's own {own}" \
                if rec.get("dataset") and own and rec.get("dataset") != own else ""
            if rec.get("K") and own_K and rec.get("K") != own_K:
                other += f", on windows of K={rec.get('K')}, not the model's own K={own_K}"
            log(f"fisher: loaded {path} ({fisher_mod.describe(info)}{other})")
            return info
        env, dataset = source_env_dataset(mf)
        K = fisher_mod.training_context(mf) or args.K  # as precompute_fisher.py: windows of the model's own context
        model = build_model(mf, device, max_length=K)
        log(f"fisher: {path} {why}; computing it ({args.fisher_type}, {args.f_num_batches} x {args.f_batch_size} "
            f"windows of K={K} of {env}-{dataset})")
        with forked_rng():  # (the cache's seed, not the run's: see FISHER_SEED)
            info = fisher_mod.compute_fisher(model, data.get(env, dataset), fisher_type=args.fisher_type,
                                             batch_size=args.f_batch_size, num_batches=args.f_num_batches, K=K,
                                             seed=fisher_mod.FISHER_SEED)
        info["_source"] = fisher_mod.source_record(env, dataset, K, fisher_mod.FISHER_SEED, mf.state_dict)
        fisher_mod.save_fisher(info, path)
        log(f"fisher: saved {path} ({fisher_mod.describe(info)})")
        return info


def multi_fisher(model, envs: Sequence[str], datasets: Sequence, args) -> dict[str, torch.Tensor]:
    """Fisher of a multi-task model over ``transformer.h``, averaged elementwise over the given envs' data (LAWSON's
    ``setup_multi``; one env with ``--spec_info``). Each env's estimate uses the same seed."""
    acc = None
    for env, ds in zip(envs, datasets):
        with forked_rng():
            info = fisher_mod.compute_fisher(model, ds, fisher_type=args.fisher_type, batch_size=args.f_batch_size,
                                             num_batches=args.f_num_batches, K=args.K, seed=args.seed,
                                             model_kwargs={"env": env})
        F = fisher_mod.fisher_tensors(info)
        acc = F if acc is None else {k: acc[k] + F[k] for k in acc}
    return {k: v / len(envs) for k, v in acc.items()}


# ---- base model for task vectors -----------------------------------------------------------------------------------

def resolve_base(args, sources: Sequence[ModelFile], fresh_state: dict | None = None) -> dict:
    """θ₀ for task arithmetic / TIES: ``--merge_base`` if given; the fresh ``--pretrained_lm`` model; for a multi-task
    model the ``--pretrained_model`` it was finetuned from (recorded in its config); else the seeded initialisation of
    model 1 rebuilt from its stored config (the run's ``model_0.pt``)."""
    base = getattr(args, "merge_base", None)
    if base:
        mf = load_model_file(base)
        # (a bare state dict records no kind: its per-env embedding lists tell a multi-task one)
        base_multi = mf.is_multi if mf.config.get("model_class") else \
            any(k.startswith("embed_states.") for k in mf.state_dict)
        if sources and base_multi != sources[0].is_multi:
            kind = {True: "multi-task", False: "single-task"}
            raise UserError(f"--merge_base {base}: a {kind[base_multi]} model, but the models merged are "
                            f"{kind[sources[0].is_multi]}; task vectors need the model they were trained from")
        return mf.state_dict
    first = sources[0]
    lm = getattr(args, "pretrained_lm", None)
    if lm and fresh_state is not None and not first.config:
        log("merge base: the fresh --pretrained_lm model (model 1 records no run config to rebuild its start from)")
        return fresh_state
    recorded_lm = first.config.get("pretrained_lm")
    if lm and not (recorded_lm and same_flag_value("pretrained_lm", recorded_lm, lm, recorded_base(first.config))):
        start = f"--pretrained_lm {recorded_lm}" if recorded_lm else "a random initialisation"
        log(f"warning: model 1 ({first.path}) started from {start}, not from this run's --pretrained_lm {lm}: the "
            f"task vectors are taken against the initialisation the models started from (pass --merge_base to choose "
            f"the base)")
    if first.is_multi:
        pre = recorded_path(first.config, first.config.get("pretrained_model"))
        if pre:
            for other in sources[1:]:   # task vectors of models finetuned from another model share no base
                theirs = recorded_path(other.config, other.config.get("pretrained_model"))
                if not theirs or not same_flag_value("pretrained_model", pre, theirs):
                    log(f"warning: {other.path} was finetuned from {theirs or 'no recorded --pretrained_model'}, not "
                        f"from {pre} as model 1; its task vector is taken against {pre} (pass --merge_base to choose "
                        f"the base)")
            log(f"merge base: {pre} (the model {first.path} was finetuned from)")
            return load_model_file(pre).state_dict
    if not first.is_multi:
        started = _recorded_start(first)
        if started is not None:
            return started
    if first.config.get("pretrained_lm"):
        return _rebuild_lm_init(first)
    seed, mc = first.config.get("seed"), first.config.get("model_config")
    if seed is None or not mc:
        raise UserError(f"{first.path}: no stored seed and model config to rebuild the shared initialisation from; "
                        f"pass --merge_base (e.g. the run's model_0.pt)")
    for other in sources[1:]:
        if other.config.get("seed") != seed or (other.config.get("model_config") or {}).get("backbone") != mc.get(
                "backbone"):
            log(f"warning: {other.path} does not share model 1's seed and backbone, so not its initialisation; "
                f"task vectors of differently initialised models are not comparable")
    from decision_transformer.models import DecisionTransformer, DTConfig
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig

    with forked_rng():
        if first.is_multi:
            init = MultiDecisionTransformer(MultiDTConfig.from_dict(mc), seed=seed)
        else:
            init = DecisionTransformer(DTConfig.from_dict(mc), seed=seed)
    log(f"merge base: the initialisation of {first.path} rebuilt from seed {seed}")
    return init.state_dict()


def _recorded_start(first: ModelFile) -> dict | None:
    """θ₀ of a single-task model 1 whose run did not start from its seeded (or LM) initialisation: the
    ``--load_checkpoint`` file it was trained from (read when it still exists); a run that started from a merge
    (``--pretrained_models``) is refused, its start is its run's model_0.pt. None for a run of neither."""
    if first.config.get("pretrained_models"):
        raise UserError(f"{first.path}: its run started from a merge of --pretrained_models, not from an initialisation "
                        f"this can rebuild; pass --merge_base (that run's model_0.pt holds the merged start)")
    start = recorded_path(first.config, first.config.get("load_checkpoint"))
    if not start:
        return None
    if not Path(start).is_file():
        raise UserError(f"{first.path}: its run started from --load_checkpoint {start}, which is gone; pass --merge_base "
                        f"(that file, or the run's model_0.pt)")
    log(f"merge base: {start} (the --load_checkpoint {first.path} was trained from)")
    return load_model_file(start).state_dict


def _rebuild_lm_init(mf: ModelFile) -> dict:
    """The LM-initialised model a run started from, rebuilt from the run's stored flags (needs the LM files)."""
    from argparse import Namespace

    from decision_transformer.envs import get_env_spec
    from decision_transformer.model_factory import build_model_from_args

    cfg = {**mf.config, "pretrained_lm": recorded_path(mf.config, mf.config.get("pretrained_lm"))}
    if (not cfg.get("env") and not mf.is_multi) or cfg.get("seed") is None:
        raise UserError(f"{mf.path} was initialised from {cfg['pretrained_lm']} but its config lacks the env or seed "
                        f"to rebuild that initialisation; pass --merge_base")
    with forked_rng():
        if mf.is_multi:
            from decision_transformer.multi_run import new_model

            init = new_model(Namespace(**cfg))
        else:
            init = build_model_from_args(Namespace(**cfg), get_env_spec(cfg["env"]))
    log(f"merge base: {cfg['pretrained_lm']} initialisation of {mf.path} rebuilt from its stored flags")
    return init.state_dict()


# ---- one merge ---------------------------------------------------------------------------------------------------------

def merge_states(method: str, states: Sequence[dict], keys: Sequence[str], args, *,
                 fishers=None, grams=None, conv1d=None, base=None, score=None, device=None) -> dict:
    """Dispatch to the merge method with the options in ``args`` (the scripts' flags)."""
    n = len(states)
    if method == "mean":
        return merging.merge_mean(states, keys, p=args.p, device=device)
    if method == "fisher":
        coeffs = [1.0 - args.p, args.p] if n == 2 else None
        return merging.merge_fisher(states, fishers, keys, norm=fisher_norm(args), floor=args.fisher_floor,
                                    favor_target=args.fisher_favor_target, coeffs=coeffs, device=device, verbose=True)
    if method == "task_arithmetic":
        return merging.merge_task_arithmetic(states, base, keys, lam=merge_lambda(args, method), device=device)
    if method == "ties":
        return merging.merge_ties(states, base, keys, density=args.ties_density, lam=merge_lambda(args, method),
                                  device=device)
    if method == "regmean":
        return merging.merge_regmean(states, grams, keys, alpha=args.regmean_alpha, conv1d=conv1d, device=device)
    if method == "greedy_soup":
        return merging.greedy_soup(states, keys, score, device=device, verbose=True)[0]
    raise UserError(f"unknown merge method {method!r}")


def windows(dataset, n_windows: int, batch_size: int, K: int, seed: int) -> list:
    """``n_windows`` training-sampler windows in batches, from a CPU generator seeded with ``seed`` (the same windows
    on any device, as the analyses' and the Fisher's)."""
    gen = torch.Generator().manual_seed(seed)
    out, left = [], n_windows
    while left > 0:
        out.append(dataset.sample_batch(min(batch_size, left), K, gen))
        left -= batch_size
    return out


def gram_matrices(model, keys, batches, model_kwargs: dict | None = None):
    """RegMean's inputs: the Gram matrix XᵀX / n of each Conv1D / Linear layer of S over ``batches``
    (:func:`merging.collect_grams`), and {layer name: is_conv1d}."""
    kw = model_kwargs or {}

    def fwd(m, b):
        """Run model ``m`` on batch ``b`` (the Grams come from the forward pre-hooks)."""
        return m(b.states, b.actions, b.rtg[:, :-1], b.timesteps, attention_mask=b.mask, **kw)

    grams = merging.collect_grams(model, keys, batches, fwd)
    conv1d = {name: is_conv for name, (_, is_conv) in merging.linear_modules(model, keys).items()}
    return grams, conv1d


def action_mse_score(model, batches, model_kwargs: dict | None = None):
    """score(state) = −(masked action MSE of ``model`` with ``state`` loaded) over fixed ``batches`` (eval mode)."""
    from decision_transformer.training.losses import masked_action_mse

    kw = model_kwargs or {}

    @torch.no_grad()
    def score(state):
        """Load ``state`` into the model and return −(mean masked action MSE over ``batches``), in eval mode."""
        load_state_into(model, state, "greedy soup candidate")
        model.eval()
        tot = 0.0
        for b in batches:
            out = model(b.states, b.actions, b.rtg[:, :-1], b.timesteps, attention_mask=b.mask, **kw)
            tot += float(masked_action_mse(out.action_preds, b.actions, b.mask))
        return -tot / len(batches)

    return score


def fisher_coverage(states: Sequence[dict], fishers: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """The keys of S that a Fisher merge really combines; one warning names the floating-point tensors of S without a
    Fisher, which keep model 1's values."""
    done = merging.fisher_keys(states, fishers, keys)
    have = set(done)
    rest = [k for k in keys if k not in have and merging.mergeable(states[0][k])]
    if done and rest:
        log(f"warning: {len(rest)} tensors of the merged set have no Fisher (it covers {fisher_mod.FISHER_SCOPE} "
            f"only) and keep model 1's values: {merging.compact_names(rest)}")
    return done


def check_source_data(sources: Sequence[ModelFile], args, data: DatasetCache, method: str,
                      made_later: tuple[str, str] | None = None):
    """Before any Fisher or Gram matrix is computed, for every model (a problem with model 2 was found only after
    model 1's was made and saved): its env and dataset known, its Fisher file's place free, and the dataset it is
    computed on found (a model whose Fisher file exists needs none; ``made_later``: an (env, dataset) whose missing
    file is generated before the merge, only its place is checked)."""
    if method not in ("fisher", "regmean", "greedy_soup"):
        return
    from decision_transformer.data import check_dataset_place, find_dataset_file
    from decision_transformer.files import refuse_files_above, refuse_folders

    for s in sources[:1] if method == "greedy_soup" else sources:   # (the soup scores on model 1's data)
        if method == "fisher":
            path = fisher_mod.fisher_info_path(s.path, args.f_batch_size, args.f_num_batches, args.fisher_type)
            refuse_folders([path])
            refuse_files_above(path.parent, "the Fisher cache", writable=not path.is_file())   # (one there: read)
            if path.is_file():
                continue
        env, dataset = source_env_dataset(s)
        check_dataset_place(data.data_path, env, dataset)
        if (env, dataset) != made_later:
            find_dataset_file(data.data_path, env, dataset, quiet=True)


def merge_single_sources(sources: Sequence[ModelFile], args, keys, device, data: DatasetCache,
                         fresh_state: dict | None = None) -> tuple[dict, list[str]]:
    """Merge single-task models with ``resolve_method(args)``: data-dependent inputs are computed on each model's
    own dataset (Fisher, Gram matrices) or model 1's (greedy-soup score). Returns (merged state, the keys of S it
    really combined: for a Fisher merge those with a Fisher)."""
    method = resolve_method(args)
    check_finite_sources(sources)
    check_source_data(sources, args, data, method)
    states = [s.state_dict for s in sources]
    kw: dict = {}
    merged_keys = list(keys)
    if method == "fisher":
        if not any(fisher_mod.FISHER_SCOPE in k for k in keys if merging.mergeable(states[0][k])):
            raise UserError(f"none of the merged tensors has Fisher information (the Fisher covers "
                            f"{fisher_mod.FISHER_SCOPE} only); --include a part of the blocks (e.g. attn mlp)")
        kw["fishers"] = [fisher_mod.fisher_tensors(fisher_for_file(s, args, data, device)) for s in sources]
        merged_keys = fisher_coverage(states, kw["fishers"], keys)
    elif method in ("task_arithmetic", "ties"):
        kw["base"] = resolve_base(args, sources, fresh_state)
    elif method == "regmean":
        grams = []
        for s in sources:
            env, dataset = source_env_dataset(s)
            m = build_model(s, device, max_length=args.K)
            g, conv1d = gram_matrices(m, keys, windows(data.get(env, dataset), args.regmean_n_windows,
                                                        args.batch_size, args.K, args.seed))
            grams.append(g)
        kw.update(grams=grams, conv1d=conv1d)
    elif method == "greedy_soup":
        env, dataset = source_env_dataset(sources[0])
        m = build_model(sources[0], device, max_length=args.K)
        kw["score"] = action_mse_score(m, windows(data.get(env, dataset), 256, args.batch_size, args.K, args.seed))
    return merge_states(method, states, keys, args, device=device, **kw), merged_keys


# ---- multi-task merge ------------------------------------------------------------------------------------------------

def check_multi_sources(sources: Sequence[ModelFile], method: str):
    """What a multi-task merge needs of its models, checked before any Fisher is computed: N ≥ 2 multi-task models,
    each specialised on exactly one env, all distinct, with compatible tensors, and a method available there."""
    if len(sources) < 2:
        raise UserError("--multi_pretrained_models needs at least 2 models")
    for s in sources:
        if not s.is_multi:
            raise UserError(f"{s.path}: not a multi-task model (config model_class {s.model_class!r})")
        if s.bare:   # (it would read as a model of no specialisation)
            raise UserError(f"{s.path}: a bare multi-task state dict: it has no stored config (envs, sizes, "
                            f"specialisation) to merge it by")
        if len(s.specializations) != 1:
            raise UserError(f"{s.path}: a merged multi-task model must be specialised on exactly one env, this one "
                            f"has {s.specializations or 'none'} (finetune it with --selected_training ENV)")
    specs = [s.specializations[0] for s in sources]
    if len(set(specs)) != len(specs):
        raise UserError(f"the models' specialisations are not distinct: {specs}")
    if method in ("regmean", "greedy_soup"):
        raise UserError(f"--merge_method {method} is available for single-task merges only")
    states = [s.state_dict for s in sources]
    # per-env slots are matched by env name, not by index; the unused predict_state takes the first env's size
    per_env = (*(f"{p}." for p in PER_ENV_LAYERS), "predict_state.")
    merging.check_compatible(states, [s.path for s in sources], [k for k in states[0] if not k.startswith(per_env)])
    envs = _model_envs(sources[0])   # the merged model's per-env slots: model 1's
    for s, env in zip(sources, specs):
        own = _model_envs(s)
        if env not in own:
            raise UserError(f"{s.path}: specialisation {env!r} is not one of the model's envs {own}")
        if env not in envs:
            raise UserError(f"{s.path}: specialisation {env!r} has no slot in the merged model (model 1, "
                            f"{sources[0].path}, has the envs {envs})")
        src, dst = own.index(env), envs.index(env)
        for prefix in PER_ENV_LAYERS:
            p = f"{prefix}.{src}."
            for k, v in s.state_dict.items():
                out = f"{prefix}.{dst}.{k[len(p):]}"
                if k.startswith(p) and (out not in states[0] or states[0][out].shape != v.shape):
                    have = list(states[0][out].shape) if out in states[0] else "missing"
                    raise UserError(f"{s.path}: cannot merge with {sources[0].path}: its {env} tensor {k} is "
                                    f"{list(v.shape)}, model 1's {out} is {have} (different hidden size or "
                                    f"architecture?)")
    check_finite_sources(sources)


def check_finite_sources(sources: Sequence[ModelFile]):
    """Every model's weights are finite, checked before any Fisher or Gram is computed: a NaN would poison a mean but
    be trimmed away by TIES, so each method would treat the damaged file differently."""
    for s in sources:
        check_finite_state(s.state_dict, str(s.path))


def merge_multi_states(sources: Sequence[ModelFile], args, device, fishers=None, base=None) -> tuple[dict, list[str]]:
    """LAWSON's ``setup_multi`` over N ≥ 2 multi-task models, each specialised on one distinct env: the blocks
    ``transformer.h`` (every floating tensor, no include filter) merged with the method, ``ln_f``/``wpe``/``wte``/
    ``embed_timestep`` from model 1, and each model's own env's embeddings, ``embed_ln`` and action head copied into
    that env's slots (each model's slot looked up in its own config's envs). Returns (state, specializations)."""
    method = resolve_method(args)
    check_multi_sources(sources, method)
    specs = [s.specializations[0] for s in sources]
    states = [s.state_dict for s in sources]
    names = [s.path for s in sources]
    warn_architecture([s.config.get("model_config") for s in sources], names)
    keys = [k for k in states[0] if k.startswith("transformer.h.")]
    merged_keys = fisher_coverage(states, fishers, keys) if method == "fisher" and fishers is not None else keys
    if method in ("task_arithmetic", "ties") and base is None:
        base = resolve_base(args, sources)
    merged = merge_states(method, states, keys, args, fishers=fishers, base=base, device=device)
    envs = _model_envs(sources[0])   # the merged model's per-env slots: model 1's (checked by check_multi_sources)
    for s, env in zip(sources, specs):
        own = _model_envs(s)         # a model may list its envs in another order: its slot is looked up in its own
        src, dst = own.index(env), envs.index(env)
        for prefix in PER_ENV_LAYERS:
            p = f"{prefix}.{src}."
            for k, v in s.state_dict.items():
                if k.startswith(p):
                    out = f"{prefix}.{dst}.{k[len(p):]}"
                    merged[out] = v.detach().clone().to(device) if device is not None else v.detach().clone()
    n, _, frac = merging.merged_fraction(merged, merged_keys)
    log(f"multi merge: {merge_words(method, len(sources), args.p)} over {n} block tensors ({frac:.1%} of the "
        f"parameters); per-env layers from the model specialised on each env ({', '.join(specs)})")
    return merged, specs


#: the multi-task DT's per-env module lists (state-dict keys ``{name}.{env index}.…``)
PER_ENV_LAYERS = ("embed_returns", "embed_states", "embed_actions", "embed_lns", "predict_actions")


def _model_envs(mf: ModelFile) -> list[str]:
    """The envs of a multi-task model file, in the order of its per-env slots (its config's ``envs``)."""
    from decision_transformer.models.multi_decision_transformer import MultiDTConfig

    return list(MultiDTConfig.from_dict(mf.config["model_config"]).envs)


# ---- experiment.py's hook -----------------------------------------------------------------------------------------------

def _model_from(src: ModelFile, state: dict, args, spec, device, fallback_config=None, position: int = 1):
    """A module shaped like ``src`` (model ``position`` of --pretrained_models; context length ``--K``) holding
    ``state``; it must fit ``--env``."""
    if src.is_multi:
        raise UserError(f"{src.path}: a multi-task model cannot be finetuned by experiment.py (use experiment_multi.py)")
    model = build_model(ModelFile(src.path, state, src.config, src.specializations), device,
                        fallback_config=fallback_config, max_length=args.K)
    cfg = model.config
    _check_fits_env(src, (cfg.state_dim, cfg.act_dim), spec, position)
    if src.env and src.env != spec.name:
        log(f"warning: the model trained on {src.env} ({src.path}) is finetuned on {spec.name}")
    return model


def _evaluate_before_finetuning(args, model, spec, device) -> dict:
    """The merged model's evaluation before any finetuning (logged as iteration 0 by the merge run)."""
    from decision_transformer.data import load_dataset, state_stats
    from decision_transformer.evaluation import env_pool, evaluate_episodes
    from decision_transformer.run import parse_targets

    _, trajs = load_dataset(args.data_path, args.env, args.dataset, quiet=True)   # (the run's data, loaded before)
    mean, std = state_stats(trajs)
    pool = env_pool(args.env, args.env_version, getattr(args, "eval_workers", "auto"), device,
                    args.num_eval_episodes)
    logs: dict = {}
    try:
        for target in parse_targets(args.env_targets, spec.targets):
            res = evaluate_episodes(model, args.env, target, args.num_eval_episodes, mean, std, seed=args.seed,
                                    mode=args.mode, device=device, pool=pool)
            logs.update({f"evaluation/{k}": v for k, v in res.metrics(args.env).items()})
    finally:
        pool.close()
    return logs


@dataclass
class MergePlan:
    """``experiment.py --pretrained_models``' merge as checked before the data step: the loaded models, the fresh
    model's state before the merge, the merged set S (``keys``) and the method; for one model merged with the fresh
    ``--pretrained_lm`` model, the two states and their names in merge order (``--flip``: the loaded one first)."""
    sources: list
    fresh_sd: dict
    keys: list
    method: str
    lm_pair: tuple | None = None


def prepare_merge(args, fresh, spec) -> MergePlan:
    """``experiment.py --pretrained_models``, before the data step (a missing dataset is generated, for minutes):
    load the models and check all that needs no data (the flags, multi-task models, the selection, tensor shapes,
    NaN or inf, the model to finetune fitting ``--env``, the Fisher files' places and the datasets of the models
    other than the run's own); warnings about context lengths and architectures are given here, once. (The merge
    flags themselves are checked by ``run.check_args``, ``check_experiment_merge``, before.)"""
    sources = [load_model_file(p) for p in args.pretrained_models]
    for s in sources:   # (as merge_cli: a multi-task model's tensors are laid out per env)
        if s.is_multi:
            raise UserError(f"{s.path}: a multi-task model; experiment.py merges single-task models (merge "
                            f"multi-task ones with experiment_multi.py --multi_pretrained_models)")
    check_finite_sources(sources)
    fisher_mod.warn_context(sources, args.K, log)
    fresh_sd = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    method = resolve_method(args)
    if len(sources) == 1 and args.pretrained_lm:
        # LAWSON: merge the fresh LM-initialised model with the loaded one; model 1 = fresh (--flip: the loaded one)
        states = [fresh_sd, sources[0].state_dict]
        names = [f"the fresh --pretrained_lm {args.pretrained_lm} model", sources[0].path]
        if args.flip:
            states, names = states[::-1], names[::-1]
        keys = merging.select_keys(list(states[0]), args.include, args.exclude)
        check_selection(keys, args, names[0], list(states[0]))
        merging.check_compatible(states, names, keys)
        check_state_fits(fresh, states[0], str(names[0]))   # (the merge is loaded into the fresh model)
        configs = [fresh.config.to_dict(), sources[0].config.get("model_config")]
        warn_architecture(configs[::-1] if args.flip else configs, names)
        return MergePlan(sources, fresh_sd, keys, "mean", (states, names))
    keys = merging.select_keys(list(sources[0].state_dict), args.include, args.exclude)
    if len(sources) == 1:
        if args.copy_include and not args.copy_model:   # the selection is what is copied into the fresh model
            check_selection(keys, args, sources[0].path, list(sources[0].state_dict))
        elif args.include or args.exclude:
            log("warning: --include/--exclude have no effect here: the one model is loaded whole (they choose what "
                "--copy_include copies into the fresh model)")
    else:
        check_selection(keys, args, sources[0].path, list(sources[0].state_dict))
        merging.check_compatible([s.state_dict for s in sources], [s.path for s in sources], keys)
        warn_architecture([s.config.get("model_config") for s in sources], [s.path for s in sources])
    _check_destination(args, sources, fresh, keys, spec)
    if len(sources) > 1:   # (a missing dataset of the run's own env and dataset is generated by the data step)
        check_source_data(sources, args, DatasetCache(args.data_path, None), method,
                          made_later=None if args.no_generate or args.resume else (args.env, args.dataset))
    return MergePlan(sources, fresh_sd, keys, method)


def apply_merge(args, plan: MergePlan, model, spec, device, evaluate: bool = True):
    """``experiment.py --pretrained_models A [B ...]`` once its data is loaded (``plan``: from ``prepare_merge``):
    merge, choose the model to finetune, apply ``--identity_layers`` and ``--merge_frozen``; returns the model to
    train, on ``device``. Records what was done in ``args.merge_info`` (written to the run's config), with the
    evaluation of the model to train before finetuning (``iteration_0``, logged as iteration 0) when ``evaluate``
    (False on torchrun's ranks other than 0, which neither evaluate nor log), ``--num_eval_episodes`` > 0, the run is
    not resumed (a resumed run takes the one it recorded) and either ``--max_iters 0`` or ``--num_steps_per_iter`` > 0
    (with ``--num_steps_per_iter 0`` iteration 1 evaluates the same model)."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the run's RNG stream does not depend on how the merge was computed
        train_model, keys, merged_keys, info = _merge_for_experiment(args, plan, model, spec, device)
    if args.identity_layers:
        sd = train_model.state_dict()
        load_state_into(train_model, merging.identity_values(sd, [k for k in keys if k in sd]), "identity layers")
        log(f"identity layers: {len([k for k in keys if k in sd])} tensors set to weight 1 / bias 0")
    if args.merge_frozen:  # the tensors really merged (a Fisher merge leaves those without a Fisher as model 1's)
        names = set(merged_keys)
        frozen = []
        for n, p in train_model.named_parameters():
            if n in names:
                p.requires_grad_(False)
                frozen.append(n)
        log(f"merge_frozen: {len(frozen)} merged parameter tensors frozen")
        info["frozen"] = len(frozen)
    train_model = train_model.to(device)
    resumed = getattr(args, "resume", False)  # a resumed run keeps the evaluation it logged the first time
    # --max_iters 0: iteration 0 is the run's only evaluation; --num_steps_per_iter 0: iteration 1 evaluates this model
    if evaluate and args.num_eval_episodes and (args.max_iters == 0 or args.num_steps_per_iter > 0) and not resumed:
        logs = _evaluate_before_finetuning(args, train_model, spec, device)
        info["iteration_0"] = logs
        first = [k for k in logs if k.endswith("_return_mean")]
        what = "loaded" if info.get("method") == "none" else "merged"   # (one model without an LM: no merge)
        log(f"iter 0 ({what}, before finetuning) | " + " | ".join(
            f"{k.split('/')[1][:-len('_return_mean')]} return {logs[k]:.1f}"
            + (f" (d4rl {logs[d]:.1f})" if (d := k.replace("_return_mean", "_d4rl_score_mean")) in logs else "")
            for k in first))
    args.merge_info = info
    return train_model


def _merge_for_experiment(args, plan: MergePlan, fresh, spec, device):
    sources, fresh_sd, keys, method = plan.sources, plan.fresh_sd, plan.keys, plan.method
    info: dict = {"method": method, "models": list(args.pretrained_models)}
    if plan.lm_pair is not None:
        states, names = plan.lm_pair
        merged = merging.merge_mean(states, keys, p=args.p, device=device)
        check_merged_state(merged, "mean", args, zip(names, states))
        load_state_into(fresh, merged, f"merge of {names[0]} and {names[1]}")
        info.update(method="mean", base="loaded" if args.flip else "fresh")
        _report(merged, keys, info, f"mean of {names[0]} and {names[1]}"   # (in --flip's order: model 1 first)
                + merge_words("mean", 2, args.p)[len("mean of 2 models"):], first=names[0])
        return fresh, keys, keys, info
    merged_keys = keys
    if len(sources) == 1:
        merged = sources[0].state_dict  # one model, no LM: nothing to merge, the model is loaded
        info["method"] = "none"
        log(f"one pretrained model, no --pretrained_lm: loading {sources[0].path} (no merge)")
    else:
        data = DatasetCache(args.data_path, device, loaded=(args.env, args.dataset))
        merged, merged_keys = merge_single_sources(sources, args, keys, device, data, fresh_sd)
        check_merged_state(merged, method, args, [(s.path, s.state_dict) for s in sources])
        _report(merged, merged_keys, info, merge_words(method, len(sources), args.p))
    # As LAWSON's experiment.py: --flip (2 models) makes model 2, with the merged tensors, the merged model; then
    # --copy_model trains that merged model, --copy_include copies only the merged tensors into the fresh model, and
    # neither loads the merged model's whole state into the fresh one.
    if args.copy_model and args.copy_include:
        log("warning: --copy_model takes precedence over --copy_include")
    elif args.flip and len(sources) >= 2 and args.copy_include:
        log("warning: --flip has no effect with --copy_include (the merged tensors are the same; the fresh model's "
            "other tensors are kept)")
    trained = _trained_source(args, sources)
    if trained == 1:
        state2 = dict(sources[1].state_dict)
        state2.update({k: merged[k] for k in keys if k in state2})
        model = _model_from(sources[1], state2, args, spec, device, fresh.config, position=2)
        info["trained"] = "model 2 with the merged tensors"
        log(f"--flip: training model 2 ({sources[1].path}) with the merged tensors and its own other tensors")
    elif trained == 0:
        model = _model_from(sources[0], merged, args, spec, device, fresh.config, position=1)
        info["trained"] = "merged model (model 1's other tensors)"
    elif args.copy_include:
        sd = dict(fresh_sd)
        sd.update({k: merged[k] for k in keys if k in sd})   # shapes checked by _check_destination
        load_state_into(fresh, sd, "the merged tensors (--copy_include)")
        model = fresh
        info["trained"] = "fresh model with the merged tensors"
    else:
        load_state_into(fresh, merged, f"the merged model (model 1: {sources[0].path})")
        model = fresh
        info["trained"] = "fresh model with the whole merged state"
    return model, keys, merged_keys, info


def _trained_source(args, sources: Sequence[ModelFile]) -> int | None:
    """Which source's own model is finetuned (its index), or None for the fresh model: with 2+ models --flip makes
    model 2 the merged model, which --copy_model (or neither --copy_* flag) trains; otherwise --copy_model trains
    model 1's merged model."""
    if args.flip and len(sources) >= 2 and (args.copy_model or not args.copy_include):
        return 1
    return 0 if args.copy_model else None


def _check_fits_env(src: ModelFile, dims: tuple[int, int] | None, spec, position: int, alone: bool = False):
    """The model to finetune (model ``position`` of --pretrained_models; ``alone``: the only one) has ``--env``'s
    state/action dims."""
    if dims is not None and tuple(dims) != (spec.state_dim, spec.act_dim):
        which = "second (--flip trains model 2)" if position == 2 else "first"
        advice = f"give a {spec.name} model" if alone else f"list the {spec.name} model {which}"
        raise UserError(f"{src.path}: this model has state/action dims {dims[0]}/{dims[1]}, --env {spec.name} needs "
                        f"{spec.state_dim}/{spec.act_dim}; {advice}")


def _check_destination(args, sources: Sequence[ModelFile], fresh, keys: Sequence[str], spec):
    """Before the data step: the merged state (one model: the loaded one) fits the model it will be loaded into (the
    fresh model these flags build, unless --copy_model or --flip build it from a source's own config, which must fit
    --env)."""
    from decision_transformer.legacy_import import _weight_dims

    trained = _trained_source(args, sources)
    if trained is not None:
        src = sources[trained]
        _check_fits_env(src, _weight_dims(src.state_dict, "embed_state.weight", "embed_action.weight"), spec,
                        trained + 1, alone=len(sources) == 1)
        return
    first, fresh_sd = sources[0].state_dict, fresh.state_dict()
    if args.copy_include:
        for k in keys:
            if k in fresh_sd and fresh_sd[k].shape != first[k].shape:
                raise UserError(f"--copy_include: merged tensor {k} has shape {list(first[k].shape)}, the fresh "
                                f"model {list(fresh_sd[k].shape)}")
        return
    # the tensors outside the merge come from model 1, its embeddings among them
    _check_fits_env(sources[0], _weight_dims(first, "embed_state.weight", "embed_action.weight"), spec, 1,
                    alone=len(sources) == 1)
    what = (f"the merged model (model 1: {sources[0].path})" if len(sources) > 1 else str(sources[0].path))
    try:
        check_state_fits(fresh, first, what)
    except UserError as e:
        done = "the merge is" if len(sources) > 1 else "one model without --pretrained_lm is"
        raise UserError(f"{e}; {done} loaded into the model these flags build: add --copy_model to build it "
                        f"from model 1's recorded config, or give the models' sizes (--embed_dim, --n_layer, --K, "
                        f"...)") from None


def _report(merged, keys, info, what, first: str = "model 1"):
    """Log the merge (``what``) with how much of the model it covers, and record that in ``info``; ``first``: what
    the tensors outside the merged set come from."""
    n, tot, frac = merging.merged_fraction(merged, keys)
    # the unused 50257 x H token table wte dominates the parameter count of a random-init DT
    _, _, frac_used = merging.merged_fraction({k: v for k, v in merged.items() if k != "transformer.wte.weight"}, keys)
    info.update(merged_tensors=n, merged_fraction=frac, merged_fraction_without_wte=frac_used)
    log(f"merge: {what} over {n} of {tot} tensors ({frac:.1%} of the parameters, {frac_used:.1%} without the unused "
        f"token table wte); the rest from {first}")
