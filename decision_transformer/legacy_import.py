"""Model files in every format the project accepts, and the importer for the originals' whole-module pickles.

LAWSON's released checkpoints (``models/{env}/dt_gym-experiment-...pt``, ``models/multi/...``) are ``torch.save(model)``
of whole modules of its classes (``decision_transformer.models.decision_transformer.DecisionTransformer``,
``…trajectory_gpt2.GPT2Model``, ``…multi_decision_transformer.MultiDecisionTransformer``, torch and transformers layers,
a ``GPT2Config``). They cannot be loaded with ``weights_only=True``, and loading them normally would import and run the
original code. The importer unpickles them with a **restricted unpickler**: every class of torch.nn, transformers or the
original packages is mapped to an inert stand-in (:class:`LegacyObject`) that only records its pickled attributes, tensors
are rebuilt by torch's tensor rebuild functions, a handful of plain containers are allowed, and any other global
(``os.system``, ``builtins.eval``, an unknown class ...) stops the import with an error. No ``__init__``,
``__setstate__`` or other method of the original classes ever runs, and none of their modules is imported. The stand-in
tree is then walked like ``nn.Module.state_dict`` to give plain tensors under our key names, and the model config is
read from the tensor shapes and the pickled GPT-2 config.

:func:`load_model_file` is the one loader used by merging, Fisher, multi-task and results code: our checkpoints
(``weights_only=True``), plain state dicts, and (through the importer) original pickles.

    python -m decision_transformer.legacy_import models/hopper/dt_gym-experiment-hopper-medium-expert-706057_best.pt \
        --out_dir models/imported
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import os
import pickle
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from decision_transformer.errors import quiet_startup

quiet_startup(__name__)  # (python -m: Ctrl-C while torch loads is one line, exit 130)

import numpy as np
import torch

from decision_transformer.checkpoint import (atomic_save, check_finite_state, check_not_inflated,
                                             check_state_dict_tensors, holds_pickled_classes, load_state_into,
                                             make_checkpoint, torch_load_problem)
from decision_transformer.data import checked_state_stats  # noqa: F401  (also imported from here)
from decision_transformer.envs import ENVS, check_dataset_name, get_env_spec
from decision_transformer.errors import UserError, cli_entry, first_line
from decision_transformer.files import check_zip_checksums

#: Classes under these module paths become inert stand-ins (the originals' code is never imported).
STUB_PREFIXES = ("torch.nn.modules.", "transformers.", "decision_transformer.", "trajectory_gpt2", "dt.",
                 "lm_cotraining.", "__main__")
#: Buffers of the originals that this implementation computes on the fly.
LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")
#: Per-env module lists of LAWSON's MultiDecisionTransformer, and the aliases of the toggled env that it registered.
MULTI_LISTS = ("embed_returns", "embed_states", "embed_actions", "embed_lns", "predict_actions")
MULTI_ALIASES = ("embed_return", "embed_state", "embed_action", "embed_ln", "predict_action")


# ---- the restricted unpickler -------------------------------------------------------------------------------------

class LegacyObject:
    """Inert stand-in for a class of the original code: keeps the pickled state, runs nothing."""

    _legacy_path = "?"
    dump_patches = False  # torch's legacy-format loader asks this of module classes

    def __init__(self, *args, **kwargs):
        self.__dict__["_legacy_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            self.__dict__.update(slots or {})
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_legacy_state"] = state

    def __repr__(self):
        return f"<legacy {self._legacy_path}>"


_STUBS: dict[str, type] = {}


def stub_class(module: str, name: str) -> type:
    """The inert stand-in class (a :class:`LegacyObject` subclass) for ``module.name``, made once per path."""
    path = f"{module}.{name}"
    if path not in _STUBS:
        _STUBS[path] = type(name, (LegacyObject,), {"_legacy_path": path, "__module__": __name__ + ".stubs"})
    return _STUBS[path]


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data.detach()


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (torch._utils._rebuild_tensor_v2, _rebuild_parameter) or new_type not in (torch.Tensor,
                                                                                           torch.nn.Parameter):
        raise pickle.UnpicklingError("refused a tensor subclass rebuild")
    return func(*args)


def _reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, LegacyObject)) or base is not object:
        raise pickle.UnpicklingError(f"refused copyreg._reconstructor({cls!r}, {base!r})")
    obj = object.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


def _inert_function(*args, **kwargs):
    """Stands in for a function that a pickled module kept as an attribute (the callable of transformers' GELU and
    Mish activations, or a bound method pickled through ``getattr``); it is never applied: the rebuilt model takes
    its activation from the config."""
    return None


#: functions a pickled activation module may hold, read as ``_inert_function``
_INERT_FUNCTIONS = {(m, f) for m in ("torch._C._nn", "torch.nn.functional") for f in ("gelu", "mish", "silu")} | {
    ("builtins", "getattr")}

_SAFE = {
    **{key: _inert_function for key in _INERT_FUNCTIONS},
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("copyreg", "_reconstructor"): _reconstructor,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` resolves only tensor rebuilders, plain containers, torch dtypes and stand-ins for module
    classes; everything else is refused."""

    def find_class(self, module, name):
        """The allowed global ``module.name`` (a stand-in class for the originals' and library classes); any
        other is refused with ``UnpicklingError``."""
        if (module, name) in _compat_pickle.NAME_MAPPING:          # protocol-2 pickles name Python 2 modules
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(STUB_PREFIXES) and name.isidentifier() and name[:1].isupper():
            return stub_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


#: A ``pickle_module`` for ``torch.load``: its Unpickler is the restricted one.
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
restricted_pickle.UnpicklingError = pickle.UnpicklingError


def not_a_model_file(path: str | Path) -> str:
    """Why ``path``, which is no file, cannot be loaded: missing, or a folder (a run folder: its newest
    ``model_{i}.pt`` is suggested)."""
    path = Path(path)
    if not path.is_dir():
        return "model file not found"
    numbered = [(int(m.group(1)), m.group(0)) for f in path.glob("model_*.pt")
                if (m := re.fullmatch(r"model_(\d+)\.pt", f.name))]
    if not numbered:
        return "is a folder, not a model file"
    return (f"is a folder, not a model file (a run folder: name one of its model_{{i}}.pt, e.g. "
            f"{path / max(numbered)[1]})")


def unpickle_legacy(path: str | Path):
    """The object tree of an original ``torch.save(model)`` file, classes replaced by :class:`LegacyObject`s."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + not_a_model_file(path))
    import warnings

    try:
        with warnings.catch_warnings():  # the legacy format's "Couldn't retrieve source code" notes, one per class
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to import ({e}); only torch/transformers modules and tensors are "
                        f"allowed in an original checkpoint") from None
    except Exception as e:
        first = first_line(e)
        raise UserError(f"{path}: not a readable checkpoint ({first[:200]})") from None


# ---- stand-in tree -> state dict and config ------------------------------------------------------------------------

def _is_module(obj) -> bool:
    return isinstance(obj, LegacyObject) and isinstance(obj.__dict__.get("_modules"), dict)


def module_state(obj, prefix: str = "", skip: tuple[str, ...] = (), _seen: frozenset = frozenset()
                 ) -> dict[str, torch.Tensor]:
    """``nn.Module.state_dict`` of a stand-in: parameters, persistent buffers, then children, recursively (a module
    that contains itself is refused)."""
    if id(obj) in _seen:
        raise UserError(f"module {prefix.rstrip('.') or '(root)'} contains itself")
    _seen = _seen | {id(obj)}
    d = obj.__dict__
    out: dict[str, torch.Tensor] = {}
    for name, t in (d.get("_parameters") or {}).items():
        if isinstance(t, torch.Tensor):
            check_not_inflated(t, prefix + name, "the pickled model")
            out[prefix + name] = t.detach().clone()
    nonpersistent = d.get("_non_persistent_buffers_set") or set()
    for name, t in (d.get("_buffers") or {}).items():
        if isinstance(t, torch.Tensor) and name not in nonpersistent:
            check_not_inflated(t, prefix + name, "the pickled model")
            out[prefix + name] = t.detach().clone()
    for name, m in (d.get("_modules") or {}).items():
        if name in skip or m is None:
            continue
        if not _is_module(m):
            raise UserError(f"unexpected object {type(m).__name__} in module {prefix + name}")
        out.update(module_state(m, f"{prefix}{name}.", _seen=_seen))
    return out


def _attr(obj, name, default=None):
    return obj.__dict__.get(name, default) if isinstance(obj, LegacyObject) else default


def _backbone_config(root, state: dict[str, torch.Tensor]) -> dict:
    """GPT-2 backbone config from the tensor shapes, completed by the pickled ``GPT2Config`` where it says more."""
    tr = _attr(root, "_modules", {}).get("transformer")
    gcfg = _attr(tr, "config")
    gd = dict(gcfg.__dict__) if isinstance(gcfg, LegacyObject) else {}
    layers = sorted({int(m.group(1)) for k in state for m in [re.match(r"transformer\.h\.(\d+)\.", k)] if m})
    if not layers:
        raise UserError("no transformer.h.* tensors: not a Decision Transformer")
    H = state["transformer.h.0.ln_1.weight"].shape[0]
    inner = state["transformer.h.0.mlp.c_proj.weight"].shape[0]
    fc_out = state["transformer.h.0.mlp.c_fc.weight"].shape[1]
    module_act = _module_activation(tr)
    act = gd.get("activation_function") or module_act or "relu"
    if fc_out == 2 * inner and act != "geglu":
        act = "geglu"  # only a gated MLP has c_fc twice as wide as c_proj's input
    if act == "geglu" and fc_out != 2 * inner:
        if module_act is None:
            raise UserError(f"the config says geglu, but c_fc has {fc_out} outputs for an inner size {inner}: this "
                            f"file's activation cannot be determined")
        # (the released "geglu" models: transformers had no geglu; the module that ran tells the activation)
        print(f"warning: the config says geglu, but the MLP is not gated; its activation module is "
              f"{module_act}'s, which is used", file=sys.stderr)
        act = module_act
    # LAWSON's experiment.py sets disable_attention on the GPT2Model itself, not in its config
    disable = bool(gd.get("disable_attention", False) or _attr(tr, "disable_attention", False))
    n_head = gd.get("n_head")
    if n_head is None:
        attn = _attr(_attr(_attr(tr, "_modules", {}).get("h"), "_modules", {}).get("0"), "_modules", {}).get("attn")
        n_head = _attr(attn, "n_head", 1)
    if isinstance(n_head, bool) or not isinstance(n_head, int) and not (isinstance(n_head, float)
                                                                         and n_head.is_integer()):
        raise UserError(f"n_head {n_head!r}: a head count is a whole number")
    cfg = {"n_embd": H, "n_layer": len(layers), "n_head": int(n_head), "n_inner": inner,
           "activation_function": act, "disable_attention": disable}
    if "transformer.h.0.ln_1.bias" not in state:   # ImageGPT's weight-only RMS-style norm
        cfg["norm_type"] = "imagegpt"
    for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop", "layer_norm_epsilon", "initializer_range"):
        if isinstance(gd.get(k), (int, float)):
            cfg[k] = float(gd[k])
    if "transformer.wte.weight" in state:
        cfg["vocab_size"] = state["transformer.wte.weight"].shape[0]
    if "transformer.wpe.weight" in state:
        cfg["n_positions"] = state["transformer.wpe.weight"].shape[0]
    return cfg


#: the activation modules a pickled GPT-2 MLP may hold (transformers' ACT2CLS, torch's), by class name
_ACTIVATION_CLASSES = {
    "NewGELUActivation": "gelu_new", "GELUActivation": "gelu", "FastGELUActivation": "gelu_fast",
    "QuickGELUActivation": "quick_gelu", "MishActivation": "mish", "SiLUActivation": "silu", "SiLU": "silu",
    "ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "LinearActivation": "linear",
    "ClippedGELUActivation": "gelu_10", "AccurateGELUActivation": "gelu_accurate", "GELUTanh": "gelu_pytorch_tanh"}


def _module_activation(tr) -> str | None:
    """The activation named by the class of the first block's ``mlp.act`` module (None where unknown)."""
    blocks = _attr(_attr(tr, "_modules", {}).get("h"), "_modules") or {}
    first = next(iter(blocks.values()), None)
    mlp = (_attr(first, "_modules") or {}).get("mlp")
    act = (_attr(mlp, "_modules") or {}).get("act")
    cls = getattr(act, "_legacy_path", "") if isinstance(act, LegacyObject) else ""
    return _ACTIVATION_CLASSES.get(cls.rsplit(".", 1)[-1]) if cls else None


def _env_from_id(env_id: str) -> str:
    """``Hopper-v3`` / ``hopper`` -> ``hopper``."""
    base = str(env_id).split("-")[0].lower()
    if base not in ENVS:
        raise UserError(f"unknown env id {env_id!r} in the checkpoint")
    return base


def parse_model_path(path: str | Path) -> tuple[str | None, str | None]:
    """(env, dataset) from ``models/{env}/dt_gym-experiment-{env}-{dataset}-{id}[_best].pt`` as the originals did
    (dataset = the file name's '-'-separated tokens [3:-1]), or from a TAKAGI run folder's name; (None, None) where
    the path does not say."""
    from decision_transformer.analysis.runs import parse_run_dir

    p = Path(path)
    run = parse_run_dir(p.parent.name)   # TAKAGI's run folders: {model}_{dataset}_{env}_{seed}[_K{K}]...
    if run is not None:
        return run.env, run.dataset
    tokens = p.name.split("-")
    env = p.parent.name if p.parent.name in ENVS else (tokens[2] if len(tokens) > 2 and tokens[2] in ENVS else None)
    dataset = "-".join(tokens[3:-1]) if len(tokens) > 4 else None
    return env, dataset or None


def check_env_dims(source, env: str, dims: tuple[int, int], named_by: str) -> None:
    """Refuse weights whose (state dim, action dim) are not those of the env that ``named_by`` gives for them."""
    spec = get_env_spec(env)
    if tuple(dims) != (spec.state_dim, spec.act_dim):
        raise UserError(f"{source}: state/action dims {dims[0]}/{dims[1]}, {named_by} {env} needs "
                        f"{spec.state_dim}/{spec.act_dim}")


def _resolve_env(path, env: str | None, path_env: str | None, dims: tuple[int, int]) -> str | None:
    """A single-task model's env: ``env`` (``--env``), else the one its path names (either must fit the weights'
    dims), else the only env with those dims, else None."""
    if env is not None:
        check_env_dims(path, env, dims, "--env")
        return env
    if path_env is not None:
        check_env_dims(path, path_env, dims, "the path's env")
        return path_env
    matches = [e for e, s in ENVS.items() if (s.state_dim, s.act_dim) == dims]
    return matches[0] if len(matches) == 1 else None


def convert_legacy(root, path: str | Path, env: str | None = None) -> dict:
    """Our checkpoint dict for an original whole-module pickle. ``env`` (``--env``) replaces the env that the path
    names for a single-task model; either must fit the weights' dims. A module tree that is not shaped like the
    originals' models is one line naming the file."""
    try:
        return _convert_legacy(root, path, env)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except RecursionError:  # a module tree nested beyond Python's recursion limit
        raise UserError(f"{path}: its module tree is nested too deeply for a model of the originals' layout") from None
    except KeyError as e:
        raise UserError(f"{path}: not shaped like an original model: no tensor or attribute {e}") from None
    except (IndexError, ValueError, TypeError, AttributeError) as e:
        first = first_line(e)
        raise UserError(f"{path}: not shaped like an original model ({first[:200]})") from None


def _convert_legacy(root, path: str | Path, env: str | None = None) -> dict:
    from decision_transformer.models import DTConfig
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS, MULTI_ENVS, MultiDTConfig

    if not _is_module(root):
        raise UserError(f"{path}: the pickle holds a {type(root).__name__}, not a pickled model")
    cls = root._legacy_path
    _unwrap_lm_head(root)
    is_multi = cls.endswith("MultiDecisionTransformer") or any(isinstance(_attr(root, n), list) for n in MULTI_LISTS)
    path_env, dataset = parse_model_path(path)
    if is_multi:
        state = module_state(root, skip=MULTI_ALIASES)
        for name in MULTI_LISTS:
            mods = _attr(root, name)
            if not isinstance(mods, list):
                raise UserError(f"{path}: multi-task model without the per-env list {name}")
            for i, m in enumerate(mods):
                state.update(module_state(m, f"{name}.{i}."))
    else:
        state = module_state(root)
    state = {k: v for k, v in state.items() if not k.endswith(LEGACY_BUFFERS)}
    check_finite_state(state, str(path))
    backbone = _backbone_config(root, state)
    max_length = _attr(root, "max_length", 20)
    max_length = max_length if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0 \
        else 20
    max_ep_len = state["embed_timestep.weight"].shape[0]
    if max_length > max_ep_len:
        raise UserError(f"{path}: its context length max_length {max_length} exceeds its {max_ep_len} timesteps")
    meta = {"legacy_source": str(path), "legacy_class": cls, "seed": None, "dataset": dataset}
    if is_multi:
        ids = _attr(root, "env_ids") or _attr(root, "envs")
        n = len(_attr(root, "embed_states"))
        envs = [_env_from_id(e) for e in ids] if ids else list(MULTI_ENVS[:n])
        cfg = MultiDTConfig(envs=envs, state_dims=[state[f"embed_states.{i}.weight"].shape[1] for i in range(n)],
                            act_dims=[state[f"embed_actions.{i}.weight"].shape[1] for i in range(n)],
                            max_length=max_length, max_ep_len=max_ep_len,
                            action_tanh=_has_tanh(_attr(root, "predict_actions")[0]),
                            share_input_output_proj="predict_state.weight" not in state,
                            extend_positions=_shares_timestep_table(root), backbone=_bb(backbone))
        for i, e in enumerate(envs):
            spec = ENVS[e]
            if (cfg.state_dims[i], cfg.act_dims[i]) != (spec.state_dim, spec.act_dim):
                raise UserError(f"{path}: per-env layers {i} have dims {cfg.state_dims[i]}/{cfg.act_dims[i]}, "
                                f"{e} needs {spec.state_dim}/{spec.act_dim}")
        specs = [_env_from_id(s) for s in (_attr(root, "specializations") or [])]
        config = {"model_class": MODEL_CLASS, "model_config": cfg.to_dict(), **meta}
        return make_checkpoint(state, config, specializations=specs)
    sd, ad = state["embed_state.weight"].shape[1], state["embed_action.weight"].shape[1]
    env = _resolve_env(path, env, path_env, (sd, ad))
    tied = "predict_action.0.weight" not in state
    head = _attr(root, "_modules", {}).get("predict_action")
    cfg = DTConfig(state_dim=sd, act_dim=ad, max_length=max_length, max_ep_len=max_ep_len,
                   action_tanh=_has_tanh(head) if head is not None else True,
                   share_input_output_proj=tied, extend_positions=_shares_timestep_table(root),
                   backbone=_bb(backbone))
    config = {"model_class": "dt", "model_config": cfg.to_dict(), "env": env, **meta}
    return make_checkpoint(state, config, specializations=[env] if env else [])


def _unwrap_lm_head(root):
    """The LM co-training script's DT keeps a ``GPT2LMHeadModel`` as ``transformer_model`` (``transformer`` is a
    property of it): its inner ``transformer`` becomes the model's, as the originals' ``load_model`` rewired it; the
    LM head, tied to ``wte``, is left out."""
    mods = _attr(root, "_modules")
    if not isinstance(mods, dict) or "transformer" in mods or not _is_module(mods.get("transformer_model")):
        return
    inner = (_attr(mods["transformer_model"], "_modules") or {}).get("transformer")
    if _is_module(inner):
        del mods["transformer_model"]
        mods["transformer"] = inner


def _shares_timestep_table(root) -> bool:
    """Whether the pickled model's ``embed_timestep`` is its ``transformer.wpe`` (``--extend_positions``): pickle
    keeps object identity, so the two attributes are then one stand-in object."""
    mods = _attr(root, "_modules") or {}
    wpe = (_attr(mods.get("transformer"), "_modules") or {}).get("wpe")
    return wpe is not None and mods.get("embed_timestep") is wpe


def _has_tanh(head) -> bool:
    """Whether an action head (a Sequential stand-in) ends in a Tanh."""
    children = list((_attr(head, "_modules") or {}).values())
    return any(getattr(m, "_legacy_path", "").endswith(".Tanh") for m in children)


def _bb(d: dict):
    from decision_transformer.models import BackboneConfig

    return BackboneConfig.from_dict(d)


def import_legacy(path: str | Path, env: str | None = None) -> dict:
    """Read an original whole-module pickle (safely) and return our checkpoint dict (``env``: see
    :func:`convert_legacy`)."""
    return convert_legacy(unpickle_legacy(path), path, env)


# ---- one loader for every model file -------------------------------------------------------------------------------

@dataclass
class ModelFile:
    """A loaded model file: its path, state dict, recorded config (the run's flags), the envs it was
    specialised on, the whole checkpoint dict (``raw``) and whether it is an original pickle."""
    path: str
    state_dict: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    specializations: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)       # the whole checkpoint dict (state statistics ...)
    legacy: bool = False

    @property
    def model_class(self) -> str:
        """The recorded ``model_class``; where none is recorded (a bare state dict) the kind its tensors show: a
        multi-task DT's per-env layers (``embed_states.{i}``), else ``dt``."""
        from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

        recorded = self.config.get("model_class")
        if recorded:
            return recorded
        return MODEL_CLASS if any(k.startswith("embed_states.") for k in self.state_dict) else "dt"

    @property
    def bare(self) -> bool:
        """Whether the file is a bare state dict: tensors only, no stored config (flags, model config, envs)."""
        return not self.config and not self.legacy

    @property
    def is_multi(self) -> bool:
        """Whether the file holds a multi-task model."""
        from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

        return self.model_class == MODEL_CLASS

    @property
    def env(self) -> str | None:
        """The model's env: the recorded one, else (single-task) the one its path names, else the only env whose
        state and action sizes its model config has; None where nothing tells."""
        env = self.config.get("env")
        if env is None and not self.is_multi:
            mc = self.config.get("model_config") or {}
            env = parse_model_path(self.path)[0]
            if env is None and mc:
                m = [e for e, s in ENVS.items() if (s.state_dim, s.act_dim) == (mc.get("state_dim"), mc.get("act_dim"))]
                env = m[0] if len(m) == 1 else None
        return env

    @property
    def dataset(self) -> str | None:
        """The recorded dataset, else the one the file's path names, else None."""
        return self.config.get("dataset") or parse_model_path(self.path)[1]


def _drop_legacy_buffers(state: dict) -> dict:
    """The originals' causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are computed on the fly here."""
    return {k: v for k, v in state.items() if not k.endswith(LEGACY_BUFFERS)}


def _weight_dims(state: dict, state_key: str, action_key: str) -> tuple[int, int] | None:
    """(state dim, action dim) read from the input widths of two embedding weights, None where either is missing."""
    ws = [state.get(k) for k in (state_key, action_key)]
    if all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in ws):
        return ws[0].shape[1], ws[1].shape[1]
    return None


def check_model_env(mf: ModelFile) -> None:
    """Refuse a model file whose weights do not fit the env it records or its path names (single-task), or the
    env of any per-env slot (multi-task): it would fail later with a shape error deep inside a tool."""
    if mf.is_multi:
        envs = (mf.config.get("model_config") or {}).get("envs")
        for i, env in enumerate(envs if isinstance(envs, list) else []):
            dims = _weight_dims(mf.state_dict, f"embed_states.{i}.weight", f"embed_actions.{i}.weight")
            if isinstance(env, str) and env in ENVS and dims is not None:
                check_env_dims(f"{mf.path} (per-env layers {i})", env, dims, "its env")
        return
    env, named_by = mf.config.get("env"), "its recorded env"
    if env is None:
        env, named_by = parse_model_path(mf.path)[0], "the path's env"
    dims = _weight_dims(mf.state_dict, "embed_state.weight", "embed_action.weight")
    if isinstance(env, str) and env in ENVS and dims is not None:
        check_env_dims(mf.path, env, dims, named_by)


def load_model_file(path: str | Path, allow_bc: bool = False) -> ModelFile:
    """Our checkpoint or a plain state dict (``weights_only=True``), else an original whole-module pickle (through
    the restricted importer). Errors name the file; weights that do not fit the model's env are refused. An MLP
    behaviour-cloning checkpoint is refused unless ``allow_bc`` (``load_model``: the tools take DTs only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + not_a_model_file(path))
    check_zip_checksums(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not holds_pickled_classes(e):
            first = torch_load_problem(e) or type(e).__name__
            raise UserError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
        obj = None  # holds classes beyond tensors: maybe an original whole-module pickle
    if obj is None:
        ckpt = import_legacy(path)
        mf = ModelFile(str(path), ckpt["state_dict"], ckpt["config"], ckpt.get("specializations", []), ckpt, True)
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        config = {} if obj.get("config") is None else obj["config"]
        mc = config.get("model_config") if isinstance(config, dict) else None
        for name, value in (("config", config), ("config['model_config']", mc)):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{path}: damaged checkpoint: its {name} is a {type(value).__name__}, not a dict")
        check_state_dict_tensors(obj["state_dict"], path)
        if (mc or {}).get("model_class") == "mlp_bc":
            if not allow_bc:
                raise UserError(f"{path}: an MLP behaviour-cloning checkpoint (--model_type bc); merging, finetuning "
                                f"and the analyses take Decision Transformer checkpoints")
            mf = ModelFile(str(path), obj["state_dict"], config, [], obj)
            check_bc_config(mf)
            return mf
        mf = ModelFile(str(path), _drop_legacy_buffers(obj["state_dict"]), config,
                       list(obj.get("specializations") or []), obj)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        check_state_dict_tensors(obj, path)
        mf = ModelFile(str(path), _drop_legacy_buffers(obj), {}, [], {"state_dict": obj})
    else:
        raise UserError(f"{path}: not a checkpoint (expected a dict with a 'state_dict', a state dict or an original "
                        f"pickled model)")
    check_model_env(mf)
    check_model_config(mf)
    return mf


def check_bc_config(mf: ModelFile) -> None:
    """An MLP behaviour-cloning file's model config must build a model, of its env's state and action sizes."""
    from decision_transformer.models.mlp_bc import MLPBCConfig

    try:
        cfg = MLPBCConfig.from_dict(mf.config["model_config"])
        dims = (int(cfg.state_dim), int(cfg.act_dim))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{mf.path}: invalid model_config ({e})") from None
    env = mf.config.get("env")
    if isinstance(env, str) and env in ENVS:
        check_env_dims(mf.path, env, dims, "its recorded env")


def check_model_config(mf: ModelFile) -> None:
    """A recorded model config must describe a model that can be built (sizes, dropouts, epsilon, activation name:
    ``BackboneConfig``'s checks): else one line naming the file, before any tool merges or trains from it."""
    from decision_transformer.models import DTConfig
    from decision_transformer.models.multi_decision_transformer import MultiDTConfig

    mc = mf.config.get("model_config")
    if not isinstance(mc, dict):
        return
    try:
        (MultiDTConfig if mf.is_multi else DTConfig).from_dict(mc)
    except (ValueError, TypeError, KeyError, ArithmeticError, AttributeError) as e:   # (a backbone that is no dict)
        raise UserError(f"{mf.path}: invalid model_config ({e})") from None


def stored_state_stats(mf, env: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) that a checkpoint stores for ``env`` (multi-task: ``state_stats[env]``), or None where it stores
    none; checked as ``checked_state_stats`` does."""
    if mf.is_multi:
        table, where = mf.raw.get("state_stats"), f"{mf.path}: state_stats[{env!r}]: "
        if table is not None and not isinstance(table, dict):
            raise UserError(f"{mf.path}: its state_stats is a {type(table).__name__}, not a dict by env")
        stored = (table or {}).get(env)
    else:
        stored, where = {k: mf.raw[k] for k in ("state_mean", "state_std") if k in mf.raw} or None, f"{mf.path}: "
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise UserError(f"{where}a {type(stored).__name__}, not a dict with state_mean and state_std")
    for key in ("state_mean", "state_std"):
        if key not in stored:
            raise UserError(f"{where}no stored {key}")
    return checked_state_stats(stored["state_mean"], stored["state_std"], env, where)


def infer_dt_config(state: dict[str, torch.Tensor], n_head: int = 1, activation: str | None = None,
                    max_length: int = 20):
    """A single-task DTConfig from a bare state dict's shapes (n_head cannot be read from weights)."""
    from decision_transformer.models import DTConfig

    holder = LegacyObject()
    bb = _backbone_config(holder, state)
    bb["n_head"] = n_head
    if activation and bb["activation_function"] != "geglu":
        bb["activation_function"] = activation
    return DTConfig(state_dim=state["embed_state.weight"].shape[1], act_dim=state["embed_action.weight"].shape[1],
                    max_length=max_length, max_ep_len=state["embed_timestep.weight"].shape[0],
                    share_input_output_proj="predict_action.0.weight" not in state, backbone=_bb(bb))


def _check_sizes_fit(cfg, mf: ModelFile):
    """The sizes a config records against the tables of the state dict it comes with (timestep, position and token
    tables, width): one line naming the first that differs."""
    bb, sd = cfg.backbone, mf.state_dict
    # with extend_positions the timestep table is the backbone's position table (n_positions rows, at least
    # max_ep_len), checked below as transformer.wpe
    timestep_rows = bb.n_positions if getattr(cfg, "extend_positions", False) else cfg.max_ep_len
    timestep_what = "n_positions" if getattr(cfg, "extend_positions", False) else "max_ep_len"
    for key, dim, want, what in (("embed_timestep.weight", 0, timestep_rows, timestep_what),
                                 ("transformer.wpe.weight", 0, bb.n_positions, "n_positions"),
                                 ("transformer.wte.weight", 0, bb.vocab_size, "vocab_size"),
                                 ("transformer.h.0.ln_1.weight", 0, bb.n_embd, "n_embd")):
        t = sd.get(key)
        if isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] != want:
            raise UserError(f"{mf.path}: its config records {what} {want}, but {key} has {t.shape[dim]} rows; the "
                            f"config does not describe these weights")


def _bare_config_like(mf: ModelFile, like):
    """The DTConfig of bare state dict ``mf``, for a run whose flags built ``like``: ``like`` itself where the dict
    fits it; else the sizes read from the dict's tensors, with the head count, activation, dropouts and embedding
    order of ``like`` (what the flags say of how it was trained), and a warning."""
    from dataclasses import replace

    from decision_transformer.models import DecisionTransformer

    try:
        want = {k: tuple(v.shape) for k, v in DecisionTransformer(like).state_dict().items()}
        if want == {k: tuple(v.shape) for k, v in _drop_legacy_buffers(mf.state_dict).items()}:
            return like
        inferred = infer_dt_config(mf.state_dict, max_length=like.max_length)
    except (KeyError, AttributeError, IndexError, TypeError):
        return like   # not a DT's state dict: the strict load names what does not fit
    keep = {k: getattr(like.backbone, k) for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop", "layer_norm_epsilon")}
    n_embd = inferred.backbone.n_embd
    heads = like.backbone.n_head if n_embd % like.backbone.n_head == 0 else 1
    act = inferred.backbone.activation_function
    act = act if act == "geglu" else like.backbone.activation_function
    bb = replace(inferred.backbone, n_head=heads, activation_function=act, **keep)
    tied = (like.extend_positions and "transformer.wpe.weight" in mf.state_dict
            and bb.n_positions >= inferred.max_ep_len)
    cfg = replace(inferred, backbone=bb, action_tanh=like.action_tanh, embed_order=like.embed_order,
                  extend_positions=bool(tied))
    print(f"warning: {mf.path}: a bare state dict, sized unlike the model this command's flags build; rebuilt from "
          f"its tensors ({n_embd} wide, {bb.n_layer} layers) with {heads} head(s) and {act}"
          f"{' (the flags head count does not divide its width)' if heads != like.backbone.n_head else ''}: pass "
          f"the --n_head and --activation_function it was trained with, or record them with `python -m "
          f"decision_transformer.legacy_import FILE --n_head N --activation_function F --out OUT`", file=sys.stderr)
    return cfg


#: --n_head / --activation_function of the usual initialisations, for the bare-state-dict error message
_BARE_HINT = ("random-init DT: 1 relu; GPT-2: 12 gelu_new; iGPT-small: 8 quick_gelu; ChibiT: see its config.json")


def import_state_dict(path: str | Path, state: dict, n_head: int | None, activation: str | None,
                      max_length: int | None = None, env: str | None = None) -> dict:
    """Our checkpoint dict for a bare state dict (TAKAGI's ``model_{i}.pt``), which records neither its head count
    nor its activation: both must be given. The env is ``env`` (``--env``), else the path's (a TAKAGI run folder
    ``{model}_{dataset}_{env}_{seed}[_K{K}]...`` also gives the dataset and K), else the only env with the weights'
    dims."""
    from decision_transformer.analysis.runs import parse_run_dir
    from decision_transformer.models import DecisionTransformer

    run = parse_run_dir(Path(path).parent.name)
    if run is not None and max_length is None:
        max_length = run.K
    if n_head is None or activation is None:
        raise UserError(f"{path}: a bare state dict records no head count or activation; give --n_head and "
                        f"--activation_function ({_BARE_HINT})")
    state = _drop_legacy_buffers(state)
    check_finite_state(state, str(path))
    try:
        for key in ("embed_state.weight", "embed_action.weight", "embed_timestep.weight"):
            if not isinstance(state.get(key), torch.Tensor) or state[key].dim() != 2:
                raise UserError(f"no 2-D {key}: not a Decision Transformer's state dict")
        cfg = infer_dt_config(state, n_head, activation, max_length or 20)
        if cfg.max_length > cfg.max_ep_len:
            raise UserError(f"-K {cfg.max_length} exceeds the model's {cfg.max_ep_len} timesteps; give the K it was "
                            f"trained with")
        model = DecisionTransformer(cfg)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise UserError(f"{path}: cannot build a model with --n_head {n_head} --activation_function {activation} "
                        f"({e})") from None
    load_state_into(model, state, path)
    sd, ad = cfg.state_dim, cfg.act_dim
    path_env, dataset = parse_model_path(path)
    env = _resolve_env(path, env, path_env, (sd, ad))
    config = {"model_class": "dt", "model_config": cfg.to_dict(), "env": env, "legacy_source": str(path),
              "legacy_class": "state_dict", "seed": None, "dataset": dataset}
    return make_checkpoint(state, config, specializations=[env] if env else [])


def build_model(mf: ModelFile, device=None, fallback_config=None, max_length: int | None = None) -> torch.nn.Module:
    """The module for a model file, weights loaded strictly. ``fallback_config`` (a DTConfig) is used for bare state
    dicts without a config; ``max_length`` overrides the stored context length (the DT itself does not depend on it)."""
    from dataclasses import replace

    from decision_transformer.models import DecisionTransformer, DTConfig
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig

    mc = mf.config.get("model_config")
    if mf.is_multi and not isinstance(mc, dict):
        raise UserError(f"{mf.path}: a multi-task state dict without a stored config: nothing records its envs and "
                        f"sizes to rebuild the model from (experiment_multi.py --load_checkpoint loads a bare state "
                        f"dict into the model its flags build)")
    try:
        if mf.is_multi:
            cfg = MultiDTConfig.from_dict(mc)
            if max_length:
                cfg = replace(cfg, max_length=max_length)
            model = MultiDecisionTransformer(cfg)
            model.specializations = list(mf.specializations)
        else:
            if mc:
                cfg = DTConfig.from_dict(mc)
            elif fallback_config is not None:
                cfg = _bare_config_like(mf, fallback_config)
            else:
                cfg = infer_dt_config(mf.state_dict)
                print(f"warning: {mf.path}: a bare state dict records no head count or activation; rebuilt with "
                      f"{cfg.backbone.n_head} head and {cfg.backbone.activation_function} (a random-init DT's), so a "
                      f"model trained with others (GPT-2: 12 heads, gelu_new) computes differently; record them with `python -m "
                      f"decision_transformer.legacy_import FILE --n_head N --activation_function F --out OUT`",
                      file=sys.stderr)
            if max_length:
                cfg = replace(cfg, max_length=max_length)
            _check_sizes_fit(cfg, mf)   # before building: a recorded size far beyond the weights would allocate it
            model = DecisionTransformer(cfg)
    except (ValueError, TypeError, KeyError, ArithmeticError, AttributeError) as e:
        raise UserError(f"{mf.path}: cannot rebuild the model from its config ({e})") from None
    load_state_into(model, mf.state_dict, mf.path)
    return model.to(device) if device is not None else model


# ---- CLI ----------------------------------------------------------------------------------------------------------

@cli_entry
def main(argv=None):
    """Convert the originals' whole-module checkpoints (and bare state dicts) into this toolkit's checkpoints;
    every input is read and checked before anything is written."""
    p = argparse.ArgumentParser(description="Convert the originals' whole-module checkpoints into plain-dict "
                                            "checkpoints (loadable with weights_only=True) without running their code.")
    p.add_argument("models", nargs="+", help="original .pt files")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out_dir", help="write <out_dir>/<same file name> for each input")
    g.add_argument("--out", help="output file (one input only)")
    p.add_argument("--env", default=None, help="override the env read from the path (single-task models)")
    p.add_argument("--dataset", default=None, help="override the dataset read from the file name")
    b = p.add_argument_group("bare state dicts (TAKAGI's model_{i}.pt), which record no architecture beyond shapes")
    b.add_argument("--n_head", type=int, default=None, help="attention heads (" + _BARE_HINT + ")")
    b.add_argument("--activation_function", default=None, help="the MLP activation (see --n_head)")
    b.add_argument("--max_length", "-K", type=int, default=None, help="the context length K it was trained with "
                   "(recorded in the checkpoint; default 20)")
    p.add_argument("--force", action="store_true", help="replace output files that exist (refused otherwise)")
    args = p.parse_args(argv)
    if args.out and len(args.models) != 1:
        raise UserError("--out takes one input model; use --out_dir for several")
    if args.n_head is not None and args.n_head < 1:
        raise UserError(f"--n_head must be at least 1, got {args.n_head}")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max_length must be at least 1, got {args.max_length}")
    spec = get_env_spec(args.env) if args.env else None
    if args.dataset:
        check_dataset_name(args.dataset)
    models = [m for m in args.models if not _already_converted(m)]   # a glob over models/{env}/ also matches ours
    if not models:
        raise UserError("nothing to convert: every input is already a checkpoint of this toolkit")
    args.models = models
    outs = [Path(args.out) if args.out else Path(args.out_dir) / Path(m).name for m in args.models]
    check_outputs(args.models, outs, args.force)
    # every input read and checked before anything is written
    ckpts = [_import_any(m, args) for m in args.models]
    if not any(c["config"]["legacy_class"] == "state_dict" for c in ckpts):
        for flag in ("n_head", "activation_function", "max_length"):
            if getattr(args, flag) is not None:
                print(f"warning: --{flag} applies to bare state dicts only; the pickled models record their own",
                      file=sys.stderr)
    for m, ckpt in zip(args.models, ckpts):
        if spec is not None:
            set_env(ckpt, spec, m)
        if args.dataset:
            ckpt["config"]["dataset"] = args.dataset
        # a file that no tool could rebuild (activation unknown, shapes that do not fit the config) is not written
        build_model(ModelFile(m, ckpt["state_dict"], ckpt["config"], ckpt.get("specializations", []), ckpt, True))
    for m, ckpt, out in zip(args.models, ckpts, outs):
        atomic_save(ckpt, out)
        c = ckpt["config"]
        bb = c["model_config"]["backbone"]
        print(f"{m} -> {out}: {c['legacy_class']}, {len(ckpt['state_dict'])} tensors, H {bb['n_embd']}, "
              f"{bb['n_layer']} layers, {bb['n_head']} heads, {bb['activation_function']}"
              + (f", specializations {ckpt['specializations']}" if ckpt.get("specializations") else ""), file=sys.stderr)


def _weights_only(path):
    """The file's content loaded with ``weights_only=True`` (memory-mapped where the format allows: torch's older
    non-zip format does not), else None: an original pickle, or a damaged file that import_legacy reports."""
    import warnings

    if not Path(path).is_file():
        return None
    for mmap in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # noqa: BLE001
            continue
    return None


def _bare_state_dict(path):
    """The tensors of a bare state dict file, else None."""
    obj = _weights_only(path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _import_any(path, args) -> dict:
    """Our checkpoint dict for an original whole-module pickle or a bare state dict; a file that is neither (one
    torch cannot read at all) is reported with torch's finding."""
    import warnings

    if Path(path).is_file():
        check_zip_checksums(path)
    state = _bare_state_dict(path)
    if state is not None:
        return import_state_dict(path, state, args.n_head, args.activation_function, args.max_length, args.env)
    if Path(path).is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            if not holds_pickled_classes(e):
                first = torch_load_problem(e) or type(e).__name__
                raise UserError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
    return import_legacy(path, args.env)


def _already_converted(path) -> bool:
    """True (with a note) for a checkpoint of this toolkit: a dict with a state dict, loadable without pickled code."""
    obj = _weights_only(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        print(f"{path}: already a checkpoint of this toolkit; skipped", file=sys.stderr)
        return True
    return False


def check_outputs(inputs, outs, force: bool = False):
    """No output may be an input (the original would be replaced) or the output of another input, nor, without
    ``force``, a file that exists (a run folder's own checkpoint of the same name, say)."""
    seen: dict = {}
    for m, out in zip(inputs, outs):
        r = out.resolve()
        for i in inputs:   # the same path, or another name (a hard link) of the same file
            if r == Path(i).resolve() or (out.is_file() and Path(i).is_file() and os.path.samefile(out, i)):
                raise UserError(f"{out} is the input {i}: converting would overwrite the original; choose another "
                                f"--out / --out_dir")
        if r in seen:
            raise UserError(f"{seen[r]} and {m} would both be written to {out}; convert them into different folders")
        seen[r] = m
    from decision_transformer.files import refuse_files_above, refuse_folders

    refuse_folders(outs)   # (before the first is written: --force replaces files, not folders)
    for out in outs:
        refuse_files_above(out.parent, "the conversion")
    there = [out for out in outs if out.exists()]
    if there and not force:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise UserError(f"{there[0]} exists{more}: converting would replace it; choose another --out / --out_dir, "
                        f"or --force to replace")


def set_env(ckpt: dict, spec, source) -> None:
    """``--env``: the env of a single-task checkpoint, which must have that env's state and action dims."""
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

    c = ckpt["config"]
    if c.get("model_class") == MODEL_CLASS:
        raise UserError(f"{source}: a multi-task model; --env applies to single-task models")
    mc = c["model_config"]
    if (mc["state_dim"], mc["act_dim"]) != (spec.state_dim, spec.act_dim):
        raise UserError(f"{source}: state/action dims {mc['state_dim']}/{mc['act_dim']}, --env {spec.name} needs "
                        f"{spec.state_dim}/{spec.act_dim}")
    c["env"] = spec.name
    ckpt["specializations"] = [spec.name]


if __name__ == "__main__":
    main()
