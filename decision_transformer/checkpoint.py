"""Checkpoints as plain dicts (loadable with ``torch.load(..., weights_only=True)``), atomic writes, run naming."""
from __future__ import annotations

import errno
import json
import os
import pickle
import secrets
from pathlib import Path

import numpy as np
import torch

from decision_transformer.errors import UserError, checked_device, deferred_interrupts, first_line, write_problem
from decision_transformer.files import check_zip_checksums, place, short_name, sync

FORMAT_VERSION = 1
DEFAULT_K = 20
# Buffers present in the originals' state dicts that this implementation computes on the fly.
_IGNORED_KEYS = (".attn.bias", ".attn.masked_bias")


# ---- naming -----------------------------------------------------------------------------------------------------

def new_exp_id(folders=()) -> int:
    """A 6-digit run id from OS entropy (not the seeded RNG, so equal-seed runs do not collide), drawn again while a
    file or folder of ``folders`` has a name that ends in it (``..._best.pt``, ``..._{id}``, ``...-{id}.pt``): 900,000
    ids collide by chance (about one pair in eight among 500 runs), and a taken id would overwrite the other run's
    model files."""
    folders = [Path(f) for f in folders if f is not None and Path(f).is_dir()]
    for _ in range(1000):
        i = 100000 + secrets.randbelow(900000)
        if not any(next(f.glob(f"*{i}{end}"), None) is not None for f in folders
                   for end in ("", ".pt", "_best.pt")):
            return i
    raise UserError(f"no free run id in {', '.join(map(str, folders))}")


def model_name(pretrained_lm: str | None, pretrained_block: int | None = None) -> str:
    """TAKAGI's model name: ``dt`` (random init, or a GPT-2 block in one), ``igpt``, or the LM's last path component.
    A block of another LM (``--pretrained_block``) names its run as :func:`block_model_name` does (``dt-igpt``)."""
    if not pretrained_lm:
        return "dt"
    name = Path(pretrained_lm.rstrip("/")).name
    if name in ("", ".."):   # ``.`` or ``..``: the name of the folder they stand for
        name = Path(os.path.abspath(pretrained_lm)).name or name
    lm = "igpt" if "imagegpt" in pretrained_lm or "imagegpt" in name else name
    return lm if pretrained_block is None else block_model_name(lm)


def block_model_name(lm: str) -> str:
    """The model name of a block-replacement run with a block of the LM named ``lm``: ``dt`` for GPT-2 (TAKAGI's only
    case), ``dt-{lm}`` for any other, so that block runs of different LMs never share a run folder."""
    return "dt" if lm == "gpt2" else f"dt-{lm}"


def run_suffix(K: int, remove_grad_clip: bool, pretrained_block: int | None, sep: str) -> str:
    """The run-name suffix of the non-default settings, joined by ``sep``: ``{sep}K{K}`` (K != 20),
    ``{sep}no{sep}grad{sep}clip``, ``{sep}block{b}``."""
    s = ""
    if K != DEFAULT_K:
        s += f"{sep}K{K}"
    if remove_grad_clip:
        s += f"{sep}no{sep}grad{sep}clip"
    if pretrained_block is not None:
        s += f"{sep}block{pretrained_block}"
    return s


def run_dir_name(model: str, dataset: str, env: str, seed: int, K: int = DEFAULT_K, remove_grad_clip: bool = False,
                 pretrained_block: int | None = None) -> str:
    """``{model}_{dataset}_{env}_{seed}[_K{K}][_no_grad_clip][_block{b}]`` (TAKAGI)."""
    return f"{model}_{dataset}_{env}_{seed}" + run_suffix(K, remove_grad_clip, pretrained_block, "_")


def wandb_run_name(env: str, dataset: str, model: str, seed: int, K: int = DEFAULT_K, remove_grad_clip: bool = False,
                   pretrained_block: int | None = None) -> str:
    """``gym-experiment-{env}-{dataset}-{model}-{seed}[-K{K}][-no-grad-clip][-block{b}]`` (TAKAGI)."""
    return f"gym-experiment-{env}-{dataset}-{model}-{seed}" + run_suffix(K, remove_grad_clip, pretrained_block, "-")


#: Flags whose values are files or folders: a resume or the sweep launcher matches them as paths, so that
#: ``./models/a.pt``, ``models/a.pt`` and the absolute path (or a symlink to it) name the same run.
PATH_FLAGS = frozenset({"pretrained_models", "multi_pretrained_models", "pretrained_model", "merge_base",
                        "load_checkpoint", "kmeans_cache", "pretrained_lm", "nlp_dataset_name", "tokenizer_name"})


#: The key of a run's ``config.json`` (and training state) that records the folder the run was started in: its
#: relative path flags are relative to that folder, wherever a later resume or launcher compares them from.
WORKING_DIR = "working_dir"


def _as_path(v, base: str | None = None):
    if not isinstance(v, str) or not v:
        return v
    return os.path.realpath(os.path.join(base, v) if base else v)   # (join keeps an absolute v as it is)


def recorded_base(config) -> str | None:
    """The folder a run recorded as its working folder (``WORKING_DIR``), or None: a run made before it was recorded,
    or one whose folder is gone (the project moved or copied to another machine); its relative paths are then taken
    from the working folder of the process reading them."""
    base = config.get(WORKING_DIR) if isinstance(config, dict) else None
    return base if isinstance(base, str) and os.path.isabs(base) and os.path.isdir(base) else None


def recorded_path(config, value):
    """A path flag's value as a run recorded it, as this process can open it: a relative path that exists below the
    run's recorded working folder is joined to that folder; anything else (a Hub name, an absolute path) as it is."""
    base = recorded_base(config)
    if base and isinstance(value, str) and value and not os.path.isabs(value) and \
            os.path.exists(os.path.join(base, value)):
        return os.path.join(base, value)
    return value


def path_normalised(signature: dict) -> dict:
    """``signature`` with the values of ``PATH_FLAGS`` resolved (as ``same_flag_value`` compares them)."""
    return {k: ([_as_path(x) for x in v] if isinstance(v, list) else _as_path(v)) if k in PATH_FLAGS else v
            for k, v in signature.items()}


def _same_path(recorded, wanted, base: str | None) -> bool:
    """Whether a recorded path flag value and one asked for now name the same file (see ``same_flag_value``)."""
    r, w = _as_path(recorded, base), _as_path(wanted)
    if r == w:
        return True
    # the same string that names no local file on either side is the same name (a Hub model id such as gpt2)
    return recorded == wanted and not any(isinstance(p, str) and os.path.exists(p) for p in (r, w))


#: List flags of substrings any of which matches: their order changes nothing, so it is not compared.
UNORDERED_FLAGS = ("freeze_subset", "include", "exclude")


def same_flag_value(key: str, recorded, wanted, base: str | None = None) -> bool:
    """Whether a run's recorded flag value is the one asked for now. Path flags are compared as the files they name:
    the recorded ones resolved against ``base``, the run's working folder (``recorded_base``), when given (else this
    process's), the ones asked for against this process's working folder; the same relative path from another folder
    names another file. A value that is no local file (a Hub name) is compared as written."""
    if key in UNORDERED_FLAGS and isinstance(recorded, list) and isinstance(wanted, list):
        return sorted(map(str, recorded)) == sorted(map(str, wanted))
    if key not in PATH_FLAGS:
        return recorded == wanted
    if isinstance(recorded, list) and isinstance(wanted, list):
        return len(recorded) == len(wanted) and all(_same_path(r, w, base) for r, w in zip(recorded, wanted))
    return _same_path(recorded, wanted, base)


def find_run(parent: str | os.PathLike, prefix: str, signature: dict, require: str | None = None) -> Path | None:
    """The newest ``{parent}/{prefix}{run id}`` folder whose ``config.json`` records every flag of ``signature``
    (experiment.py merge runs: ``cli.merge_signature``, for ``--resume`` and the sweep planner; the sweep planner's
    lm_cotraining runs: ``run.resume_signature``, to find a finished run by its last model file) and that holds the
    file ``require`` if given, or None. Newest = the latest written checkpoint or training state."""
    import json

    want = json.loads(json.dumps(signature, default=str))
    found = []
    for d in Path(parent).glob(f"{prefix}*"):
        if not d.name[len(prefix):].isdigit() or not (d / "config.json").is_file() or \
                (require is not None and not (d / require).is_file()):
            continue
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            continue
        # a flag the file does not record (a run made before the flag existed) is not compared
        if isinstance(cfg, dict) and all(k not in cfg or same_flag_value(k, cfg[k], v, recorded_base(cfg))
                                         for k, v in want.items()):
            newest = max((f.stat().st_mtime for f in d.iterdir() if f.suffix in (".pt", ".json")), default=0.0)
            found.append((newest, d.name, d))
    return max(found)[2] if found else None


def set_aside_previous_run(run_dir: str | os.PathLike) -> Path | None:
    """Move what an earlier run left in ``run_dir`` (checkpoints, training state, config, metrics) to
    ``run_dir/previous/<timestamp>/`` before a fresh run writes there; returns that folder, or None if there was
    nothing. A fresh run that fails part-way then never leaves a folder that mixes two runs, and loses nothing."""
    import time

    run_dir = Path(run_dir)
    files = [f for f in run_dir.iterdir() if f.name != "previous"] if run_dir.is_dir() else []
    if not files:
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    target = run_dir / "previous" / stamp
    while target.exists():
        n += 1
        target = run_dir / "previous" / f"{stamp}-{n}"
    target.mkdir(parents=True)
    with deferred_interrupts():   # all of it or none: a run split across two folders lost its metrics on --resume
        for f in files:
            os.replace(f, target / f.name)
    return target


# ---- saving -----------------------------------------------------------------------------------------------------

def atomic_save(obj, path: str | os.PathLike, replace: bool = True) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written checkpoint. ``replace``
    False: written only where no file of that name is (``files.place``)."""
    path = Path(path)
    # per process, and random: runs writing one cache never collide, also across the hosts of a shared file system
    tmp = path.with_name(f"{short_name(path.name)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        sync(tmp)
        place(tmp, path, replace)
    except (RuntimeError, OSError) as e:  # torch reports an unwritable or full disk as a RuntimeError
        problem = write_problem(path, e)  # (before the partial file goes: a full disk is still full)
        _remove(tmp)
        raise UserError(f"cannot write {path}: {problem}") from None
    except BaseException:  # Ctrl-C / SIGTERM in the middle of the write: no partial file left behind
        _remove(tmp)
        raise
    return path


def _remove(path: Path):
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def make_checkpoint(state_dict: dict, config: dict, state_mean=None, state_std=None, **extra) -> dict:
    """A checkpoint dict: format version, the state dict's tensors detached on the CPU, ``config``, the
    state normalisation as float32 tensors (when given) and any ``extra`` entries."""
    ckpt = {
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "config": config,
    }
    if state_mean is not None:
        ckpt["state_mean"] = torch.as_tensor(np.asarray(state_mean, dtype=np.float32))
        ckpt["state_std"] = torch.as_tensor(np.asarray(state_std, dtype=np.float32))
    ckpt.update(extra)
    return ckpt


# ---- loading ----------------------------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load one of our checkpoints (or a plain state dict, returned as ``{"state_dict": ...}``) without
    executing pickled code."""
    import warnings

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    check_zip_checksums(path)
    try:
        with warnings.catch_warnings():  # torch warns about legacy formats before failing on them: the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        if not holds_pickled_classes(e):
            first = torch_load_problem(e)
            raise UserError(f"{path}: not a loadable checkpoint (torch.load failed: {type(e).__name__}"
                            f"{': ' + first[:160] if first else ''})") from None
        # an original whole-module pickle: read by the restricted importer, which refuses anything else in one line
        from decision_transformer.legacy_import import import_legacy

        ckpt = import_legacy(path)
        ckpt["state_dict"] = {k: v.to(map_location) for k, v in ckpt["state_dict"].items()}
        return ckpt
    if isinstance(obj, dict) and "state_dict" in obj:
        check_state_dict_tensors(obj["state_dict"], path)
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise UserError(f"{path}: not a checkpoint (expected a dict with a 'state_dict' or a state dict)")


def recorded_count(st: dict, key: str) -> int:
    """A training state's ``iteration`` / ``step``: a non-negative integer, else ValueError (a resume from a damaged
    count would cut the run's metrics and overwrite its saved models)."""
    v = st[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"its {key} {v!r} is not a non-negative integer")
    return v


def holds_pickled_classes(e: Exception) -> bool:
    """Whether ``torch.load(..., weights_only=True)`` failed only because the file pickles classes (a whole pickled
    module, as the originals saved), not because it is damaged."""
    return isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e)


def torch_load_problem(e: Exception) -> str:
    """The line of a ``torch.load`` error that says what is wrong (its weights-only refusals wrap it in advice)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first.split(". ", 1)[0].rstrip(".") if ". " in first else first   # the finding, not the advice after it


def check_state_dict_tensors(state_dict, source) -> None:
    """A checkpoint's ``state_dict`` must map names to tensors; else one line naming the first entry that is not."""
    if not isinstance(state_dict, dict):
        raise UserError(f"{source}: damaged checkpoint: its state_dict is a {type(state_dict).__name__}, not a dict")
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise UserError(f"{source}: damaged checkpoint: state_dict key {k!r} is {_a(k)}, not a name")
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{source}: damaged checkpoint: state_dict entry {k!r} is {_a(v)}, not a tensor")
        check_not_inflated(v, k, source)


def check_not_inflated(t: torch.Tensor, name: str, source, kind: str = "checkpoint", holds: str = "weights") -> None:
    """A tensor whose elements span more bytes than its storage holds is a broadcast view (stride 0): a model's weights
    (or a Fisher estimate) never are, and a small file could unfold into gigabytes wherever it is copied or checked.
    ``kind`` and ``holds`` word the error: ``damaged {kind}: ... not {holds}``."""
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):   # (a tensor without storage: nothing to unfold)
        return
    if t.numel() * t.element_size() > held:
        raise UserError(f"{source}: damaged {kind}: tensor {name} of shape {list(t.shape)} is a broadcast view of "
                        f"{held:,} bytes, not {holds}")


def _a(value) -> str:
    """'a list', 'an int': the kind of ``value`` with its article."""
    kind = type(value).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def weights_digest(state_dict: dict) -> str:
    """A fingerprint of a state dict's tensors (names, dtypes, shapes and bytes)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state_dict):
        t = state_dict[k]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_finite_state(state_dict: dict, source: str):
    """Refuse a state dict with a NaN or inf in a floating-point tensor, naming ``source`` and the tensor."""
    for k, v in state_dict.items():
        if torch.is_floating_point(v) and not torch.isfinite(v).all():
            raise UserError(f"{source}: tensor {k} contains NaN or inf")


#: model settings that no tensor shape shows, with the flag that sets each: a checkpoint loaded into a model built
#: with another value would load without complaint and run as another network
BEHAVIOUR_FIELDS = {("backbone", "n_head"): "--n_head", ("backbone", "activation_function"): "--activation_function",
                    ("backbone", "disable_attention"): "--disable_attention", ("embed_order",): "--embed_order",
                    ("backbone", "norm_type"): "--pretrained_lm / --igpt_legacy_ln",
                    ("backbone", "layer_norm_epsilon"): "--pretrained_lm",
                    ("backbone", "block_overrides"): "--pretrained_block", ("action_tanh",): None}


#: The recorded model settings that change tensor shapes, and the flag that sets each: named when a checkpoint does not
#: fit the model the flags build.
SIZE_FIELDS = {("backbone", "n_embd"): "--embed_dim", ("backbone", "n_layer"): "--n_layer",
               ("share_input_output_proj",): "--share_input_output_proj", ("state_dim",): "--env",
               ("act_dim",): "--env", ("extend_positions",): "--extend_positions",
               ("backbone", "vocab_size"): "--pretrained_lm"}   # (the token table: the LM the run started from)


def _recorded(cfg, keys):
    """The setting at ``keys`` of a model config dict, JSON-normalised (str dict keys); None if absent."""
    for k in keys:
        cfg = cfg.get(k) if isinstance(cfg, dict) else None
    if keys[-1] == "block_overrides" and isinstance(cfg, dict):  # dropout rates do not change the network
        cfg = {b: {k: v for k, v in o.items() if not k.endswith("_pdrop")} if isinstance(o, dict) else o
               for b, o in cfg.items()}
    return None if cfg is None else json.loads(json.dumps(cfg, sort_keys=True, default=str))


#: The backbone settings a whole --pretrained_lm sets (its config), whatever --n_head, --embed_dim ... say.
LM_SET_FIELDS = ("n_head", "activation_function", "n_embd", "n_layer")


def _config_diffs(fields: dict, saved, built, lm_backbone: bool = False) -> list[tuple]:
    """(field, flag, saved, built) of each of ``fields`` recorded differently; with ``lm_backbone`` (the model is built
    from a whole --pretrained_lm) the flag of a setting the LM sets is ``--pretrained_lm``."""
    return [(keys[-1], "--pretrained_lm" if lm_backbone and keys[:1] == ("backbone",) and keys[-1] in LM_SET_FIELDS
             else flag, _recorded(saved, keys), _recorded(built, keys)) for keys, flag in fields.items()
            if _recorded(saved, keys) is not None and _recorded(built, keys) is not None
            and _recorded(saved, keys) != _recorded(built, keys)]


def _compare_text(diffs) -> str:
    return (", ".join(f"{n} {a!r}" for n, _, a, _ in diffs) + "; the model these flags build has "
            + ", ".join(f"{n} {b!r}" for n, _, _, b in diffs))


def _advice(diffs, negations: dict | None = None) -> str:
    """What to change: ``pass --X`` / ``drop --X`` for an on/off setting (by the checkpoint's value), ``set --X`` for
    any other. ``negations``: the script's off switch for a flag that is on by default there (``--extend_positions``
    -> ``--no_extend_positions`` in the LM script), advised as ``pass`` instead of ``drop``."""
    negations = negations or {}
    kinds = {"set": set(), "pass": set(), "drop": set()}
    for _, flag, saved, _ in diffs:
        if flag and isinstance(saved, bool) and not saved and flag in negations:
            kinds["pass"].add(negations[flag])
        elif flag:
            kinds[("pass" if saved else "drop") if isinstance(saved, bool) else "set"].add(flag)
    return ", ".join(f"{verb} {', '.join(sorted(flags))}" for verb, flags in kinds.items() if flags)


def check_same_behaviour(source: str, saved: dict | None, built: dict, negations: dict | None = None,
                         lm_backbone: bool = False):
    """A ``UserError`` naming the settings (``BEHAVIOUR_FIELDS``) in which the model config a checkpoint records
    (``saved``, its ``config["model_config"]``; nothing is checked without one) differs from the model it is loaded
    into (``built``; ``lm_backbone``: built from a whole --pretrained_lm, whose config sets the head count ...)."""
    if not isinstance(saved, dict):
        return
    diffs = _config_diffs(BEHAVIOUR_FIELDS, saved, built, lm_backbone)
    if diffs:
        advice = _advice(diffs, negations)
        raise UserError(f"{source} was trained with " + _compare_text(diffs)
                        + ": its weights would run as another network" + (f" ({advice} as the checkpoint's run did)"
                                                                           if advice else ""))


def size_hint(saved: dict | None, built: dict, negations: dict | None = None, lm_backbone: bool = False) -> str:
    """`` (it was trained with n_embd 16, ...; the model these flags build has n_embd 128, ...: set --embed_dim ...
    as its run did)`` for the shape-changing settings (``SIZE_FIELDS``) a checkpoint records differently; empty
    without a recorded config or a difference."""
    diffs = _config_diffs(SIZE_FIELDS, saved, built, lm_backbone) if isinstance(saved, dict) else []
    if not diffs:
        return ""
    return f" (it was trained with {_compare_text(diffs)}: {_advice(diffs, negations)} as its run did)"


def load_state_into(model: torch.nn.Module, state_dict: dict, source: str, strict: bool = True,
                    recorded: dict | None = None, negations: dict | None = None, lm_backbone: bool = False):
    """Strict load that names the mismatched tensors instead of dumping a traceback. Only names and shapes are
    compared: a model of another head count or activation takes the weights and computes differently. To rebuild a
    saved model as it was trained, use ``load_model``. ``recorded``: the model config the file records, whose
    shape-changing settings the error then names with their flags (``negations``: as for ``_advice``)."""
    state_dict = check_state_fits(model, state_dict, source, strict, recorded, negations, lm_backbone)
    model.load_state_dict(state_dict, strict=strict)


def check_state_fits(model: torch.nn.Module, state_dict: dict, source: str, strict: bool = True,
                     recorded: dict | None = None, negations: dict | None = None, lm_backbone: bool = False) -> dict:
    """``load_state_into``'s checks without the load (finite values, names and shapes; the error as there); returns
    the state without the originals' mask buffers."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_KEYS)}
    check_finite_state(state_dict, source)
    try:
        check_loadable(model.state_dict(), state_dict, source, strict)
    except UserError as e:
        config = getattr(model, "config", None)
        built = config.to_dict() if hasattr(config, "to_dict") else None
        raise UserError(f"{e}{size_hint(recorded, built, negations, lm_backbone) if built else ''}") from None
    return state_dict


def check_loadable(own: dict, state_dict: dict, source: str, strict: bool = True):
    """Raise a UserError naming the tensors of ``state_dict`` that do not fit a model whose state is ``own`` (shapes;
    with ``strict``, missing and unexpected keys). The originals' mask buffers are ignored."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_KEYS)}
    shape_bad = [f"{k} (checkpoint {list(v.shape)}, model {list(own[k].shape)})"
                 for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if shape_bad:
        problems.append(f"shape mismatch for {shape_bad[0]}" + (f" and {len(shape_bad) - 1} more" if len(shape_bad) > 1 else ""))
    if strict and missing:
        problems.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if strict and unexpected:
        problems.append(f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    if problems:
        raise UserError(f"{source} does not match the model: " + "; ".join(problems))


def _build_bc(mf, device=None) -> torch.nn.Module:
    """The ``MLPBCModel`` of a behaviour-cloning model file, weights loaded strictly."""
    from decision_transformer.models.mlp_bc import MLPBCConfig, MLPBCModel

    try:
        model = MLPBCModel(MLPBCConfig.from_dict(mf.config["model_config"]))
        model.load_state_dict(mf.state_dict)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{mf.path}: the weights do not fit the MLP its config records ({first_line(e)[:200]})") \
            from None
    return model.to(device) if device is not None else model


def load_model(path: str | os.PathLike, device=None):
    """``(model, model file)`` of any model file the toolkit reads (its own checkpoints, those of the training
    scripts, multi-task ones, bare state dicts and the originals' pickled models): the module rebuilt from the
    architecture its file records, weights loaded strictly, in eval mode (dropout off; ``model.train()`` before
    training it). The ``ModelFile`` gives ``config`` (the run's flags),
    ``env``, ``dataset``, ``specializations`` and ``raw`` (the whole checkpoint, with ``state_mean`` / ``state_std``
    where stored). A multi-task model specialised on one env (finetuned on it) comes with that env's layers
    selected; otherwise, as built, with its first env's (``model.toggle_env(env)`` selects another). Errors are
    one-line ``UserError``s naming the file. An MLP behaviour-cloning checkpoint (``--model_type bc``) comes back
    as its ``MLPBCModel``, which ``evaluate_episodes`` takes."""
    from decision_transformer.legacy_import import build_model, load_model_file

    device = checked_device(device) if device is not None else None
    mf = load_model_file(path, allow_bc=True)
    if (mf.config.get("model_config") or {}).get("model_class") == "mlp_bc":
        return _build_bc(mf, device).eval(), mf
    model = build_model(mf, device)
    if mf.is_multi and len(mf.specializations) == 1 and mf.specializations[0] in model.config.envs:
        model.toggle_env(mf.specializations[0])
    return model.eval(), mf
