"""Find runs and checkpoints by (model, env, dataset, seed, epoch), rebuild their models, sample analysis batches.

Run folders are ``{checkpoint_dir}/{model}_{dataset}_{env}_{seed}[_K{K}][_no_grad_clip][_block{b}]`` holding
``model_{epoch}.pt`` (``model_0.pt`` = the initial weights), ``config.json`` and ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from decision_transformer.checkpoint import (
    DEFAULT_K,
    check_finite_state,
    load_checkpoint,
    load_state_into,
    run_dir_name,
)
from decision_transformer.data import (
    Batch,
    TrajectoryDataset,
    find_dataset_file,
    say_stand_in,
    load_trajectories,
)
from decision_transformer.envs import ENVS, check_dataset_name, get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.models import DecisionTransformer, DTConfig
from decision_transformer.models.multi_decision_transformer import MODEL_CLASS as MULTI_MODEL_CLASS
from decision_transformer.paths import PROJECT_ROOT, project_path
from decision_transformer.training.trainer import check_timestep_rows, float32_device


@dataclass(frozen=True)
class RunKey:
    """One run: model, dataset, env, seed, context K, the grad-clip ablation and the replaced block; it names
    the run's folder."""
    model: str
    dataset: str
    env: str
    seed: int
    K: int = DEFAULT_K
    no_grad_clip: bool = False
    block: int | None = None

    @property
    def dir_name(self) -> str:
        """The run's folder name (``{model}_{dataset}_{env}_{seed}[_K{K}][_no_grad_clip][_block{b}]``)."""
        return run_dir_name(self.model, self.dataset, self.env, self.seed, self.K, self.no_grad_clip, self.block)

    def path(self, checkpoint_dir) -> Path:
        """The run's folder in ``checkpoint_dir``."""
        return Path(checkpoint_dir) / self.dir_name


_RUN_RE = re.compile(r"^(?P<model>.+)_(?P<dataset>[^_]+)_(?P<env>" + "|".join(ENVS) + r")_(?P<seed>\d+)"
                     r"(?:_K(?P<K>\d+))?(?P<ngc>_no_grad_clip)?(?:_block(?P<block>\d+))?$")


def parse_run_dir(name: str) -> RunKey | None:
    """The key of a run folder name, or None if the name is not a run folder (merge runs' ``_{id}`` suffix too)."""
    m = _RUN_RE.match(name)
    if not m:
        return None
    return RunKey(m["model"], m["dataset"], m["env"], int(m["seed"]), int(m["K"]) if m["K"] else DEFAULT_K,
                  bool(m["ngc"]), int(m["block"]) if m["block"] is not None else None)


def discover_runs(checkpoint_dir) -> list[RunKey]:
    """The keys of the run folders in ``checkpoint_dir`` that hold a checkpoint or a ``metrics.jsonl``, in
    name order."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise UserError(f"checkpoint folder not found: {root}")
    keys = []
    for d in sorted(root.iterdir()):
        key = parse_run_dir(d.name) if d.is_dir() else None
        if key is not None and (any(d.glob("model_*.pt")) or (d / "metrics.jsonl").is_file()):
            keys.append(key)
    return keys


def checkpoint_epochs(checkpoint_dir, key: RunKey) -> list[int]:
    """The epochs of the run's ``model_{epoch}.pt`` files, ascending (empty when there are none)."""
    d = key.path(checkpoint_dir)
    out = []
    for p in d.glob("model_*.pt"):
        tail = p.stem[len("model_"):]
        if tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def checkpoint_path(checkpoint_dir, key: RunKey, epoch: int) -> Path:
    """The path of the run's ``model_{epoch}.pt``."""
    return key.path(checkpoint_dir) / f"model_{epoch}.pt"


def runs_with_other_k(checkpoint_dir, key: RunKey) -> list[RunKey]:
    """The run folders that differ from ``key`` only in K (same model, dataset, env, seed and variant), by K."""
    root = Path(checkpoint_dir)
    prefix = f"{key.model}_{key.dataset}_{key.env}_{key.seed}"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        k = parse_run_dir(d.name) if d.name.startswith(prefix) and d.is_dir() else None
        if k is not None and k.K != key.K and k == RunKey(key.model, key.dataset, key.env, key.seed, k.K,
                                                          key.no_grad_clip, key.block):
            out.append(k)
    return sorted(out, key=lambda k: k.K)


def envs_with_runs(checkpoint_dir, envs, notes: list) -> list[str]:
    """``envs`` less those of which ``checkpoint_dir`` holds no run folder at all (any model, dataset, seed or K),
    each left out with a line in ``notes``, as the learning-curve scripts leave them out; all of ``envs`` when none
    has one, so that the first missing checkpoint is the error."""
    root = Path(checkpoint_dir)
    found = {k.env for k in map(parse_run_dir, (d.name for d in root.iterdir() if d.is_dir()))
             if k is not None} if root.is_dir() else set()
    have = [e for e in envs if e in found]
    if not have:
        return list(envs)
    notes += [f"skipped {e}: no runs of it in {checkpoint_dir}" for e in envs if e not in found]
    return have


def other_k_hint(checkpoint_dir, key: RunKey) -> str:
    """``found dt_medium_hopper_666_K5: pass --run_K 5`` for the runs of another K, else empty."""
    others = runs_with_other_k(checkpoint_dir, key)
    if not others:
        return ""
    return "found " + ", ".join(f"{k.dir_name}: pass --run_K {k.K}" for k in others)


def _missing(path: Path, key: RunKey | None = None) -> UserError:
    if path.is_dir():   # (not "not found; the folder has ... model_1.pt": it is there, as a folder)
        return UserError(f"{path}: is a folder, not a checkpoint file")
    d = path.parent
    if not d.is_dir():
        hint = other_k_hint(d.parent, key) if key is not None else ""
        if hint:
            return UserError(f"checkpoint not found: {path} (no run folder {d} for K={key.K}; {hint})")
        return UserError(f"checkpoint not found: {path} (no run folder {d}; train it with experiment.py --outdir "
                         f"{d.parent})")
    have = sorted(p.name for p in d.glob("model_*.pt"))
    hint = f"; the folder has {', '.join(have[:6])}{' ...' if len(have) > 6 else ''}" if have else ""
    return UserError(f"checkpoint not found: {path}{hint}")


def model_config_of(ckpt: dict, source) -> DTConfig:
    """The ``DTConfig`` recorded in a checkpoint's ``config['model_config']``; a missing or invalid one,
    or an MLP behaviour-cloning checkpoint, is refused naming ``source``."""
    cfg = (ckpt.get("config") or {}).get("model_config")
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: the checkpoint has no config['model_config'] to rebuild the model from")
    if cfg.get("model_class") == "mlp_bc":
        raise UserError(f"{source}: an MLP behaviour-cloning checkpoint (--model_type bc); the analyses take "
                        f"Decision Transformer checkpoints")
    try:
        return DTConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: invalid model_config ({e})") from None


def _initial_from_other_epoch(checkpoint_dir, key: RunKey, path: Path) -> dict:
    """Epoch 0 without ``model_0.pt``: a randomly initialised run's initial weights are a function of its seed
    (the DT constructor reseeds), so rebuild them from another epoch's config. LM-initialised runs, and runs started
    from a checkpoint or a merge (``--load_checkpoint``, ``--pretrained_models``), need the file."""
    others = [e for e in checkpoint_epochs(checkpoint_dir, key) if e != 0]
    if key.model != "dt" or key.block is not None or not others:
        raise _missing(path, key)
    src = checkpoint_path(checkpoint_dir, key, others[0])
    ckpt = load_checkpoint(src)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for flag in ("load_checkpoint", "pretrained_models"):   # started from other weights than the seed's
        if config.get(flag):
            given = config[flag] if isinstance(config[flag], str) else " ".join(map(str, config[flag]))
            raise UserError(f"checkpoint not found: {path} (the run started from --{flag} {given}, whose weights "
                            f"only model_0.pt holds; they cannot be rebuilt from the seed as a random init's can)")
    seed = config.get("seed", key.seed)
    model = DecisionTransformer(model_config_of(ckpt, src), seed=int(seed))
    return {**ckpt, "state_dict": model.state_dict(), "iteration": 0}


def require_checkpoints(checkpoint_dir, runs):
    """The one-line error ``load_run_checkpoint`` gives for the first missing checkpoint of ``runs`` (pairs of a
    ``RunKey`` and an epoch), found without loading anything: a script that writes results per model checks every
    model first, so that a missing later one stops it before the earlier ones' files are written."""
    for key, epoch in runs:
        path = checkpoint_path(checkpoint_dir, key, epoch)
        if path.is_file():
            continue
        if epoch != 0 or key.model != "dt" or key.block is not None or \
                not [e for e in checkpoint_epochs(checkpoint_dir, key) if e != 0]:
            raise _missing(path, key)


def check_checkpoint_env(ckpt: dict, path, env: str):
    """Refuse a checkpoint whose model was built for another env than the run folder's ``env`` (state / action
    sizes, or the env its config records), naming the file."""
    spec = get_env_spec(env)
    config = ckpt.get("config") or {}
    cfg = config.get("model_config") if isinstance(config, dict) else None
    if isinstance(cfg, dict):
        dims = cfg.get("state_dim"), cfg.get("act_dim")
        if all(isinstance(d, int) for d in dims) and dims != (spec.state_dim, spec.act_dim):
            raise UserError(f"{path}: the model takes {dims[0]}-dim states and {dims[1]}-dim actions, but {env} has "
                            f"{spec.state_dim} and {spec.act_dim}; the checkpoint belongs to another env's run")
    recorded = config.get("env") if isinstance(config, dict) else None
    if isinstance(recorded, str) and recorded in ENVS and recorded != env:
        raise UserError(f"{path}: the checkpoint was trained on {recorded}, but its run folder is for {env}")


def _named_now(config: dict) -> str | None:
    """The model name a run recording ``config`` gets today (block runs of LMs other than GPT-2 were named ``dt`` by
    earlier versions; renamed ``dt-{lm}`` as the README says, their checkpoints still record ``dt``)."""
    from decision_transformer.checkpoint import model_name

    lm, block = config.get("pretrained_lm"), config.get("pretrained_block")
    if "pretrained_lm" not in config or not isinstance(lm, (str, type(None))):
        return None
    return model_name(lm, block if isinstance(block, int) and not isinstance(block, bool) else None)


def check_checkpoint_run(ckpt: dict, path, key: RunKey):
    """Refuse a checkpoint that records another run than its folder's (another env, dataset, seed, context K, model,
    transplanted block or grad-clip setting: a file copied or moved between run folders), naming the file; what the
    checkpoint does not record is not compared."""
    check_checkpoint_env(ckpt, path, key.env)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}

    def recorded(name, kind):
        """The config's ``name`` if it is of type ``kind`` (a bool only where ``kind`` is bool), else None."""
        v = config.get(name)
        return v if isinstance(v, kind) and not isinstance(v, bool) or kind is bool and isinstance(v, bool) else None

    diffs = []
    for name, kind, want in (("dataset", str, key.dataset), ("seed", int, key.seed), ("K", int, key.K),
                             ("model_name", str, key.model), ("remove_grad_clip", bool, key.no_grad_clip)):
        got = recorded(name, kind)
        if got is not None and got != want and not (name == "model_name" and _named_now(config) == want):
            diffs.append(f"{name} {got!r} (the folder: {want!r})")
    if "pretrained_block" in config and (config["pretrained_block"] is None or recorded("pretrained_block", int)
                                         is not None) and config["pretrained_block"] != key.block:
        diffs.append(f"pretrained_block {config['pretrained_block']!r} (the folder: {key.block!r})")
    if diffs:
        raise UserError(f"{path}: the checkpoint records {', '.join(diffs)}; it belongs to another run than its "
                        f"folder {key.dir_name}")


def load_run_checkpoint(checkpoint_dir, key: RunKey, epoch: int) -> tuple[dict, Path]:
    """The checkpoint of ``key`` at ``epoch`` and its path (epoch 0 of a random-init run may be
    rebuilt from its seed); multi-task checkpoints and those of another run are refused."""
    path = checkpoint_path(checkpoint_dir, key, epoch)
    if path.is_file():
        ckpt = load_checkpoint(path)
    elif epoch == 0:
        ckpt = _initial_from_other_epoch(checkpoint_dir, key, path)
    else:
        raise _missing(path, key)
    cfg = (ckpt.get("config") or {}).get("model_config") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(cfg, dict) and cfg.get("model_class") == MULTI_MODEL_CLASS:
        raise UserError(f"{path}: a multi-task checkpoint (experiment_multi.py); the analyses take single-task runs "
                        f"of experiment.py")
    check_checkpoint_run(ckpt, path, key)
    return ckpt, path


@dataclass
class LoadedModel:
    """A model rebuilt from a run's checkpoint, with the checkpoint, its path, the run's key and the epoch."""
    model: DecisionTransformer
    checkpoint: dict
    path: Path
    key: RunKey
    epoch: int


def load_model(checkpoint_dir, key: RunKey, epoch: int, device="cpu") -> LoadedModel:
    """The model of ``key`` at ``epoch``, rebuilt from the checkpoint's own config, in eval mode on ``device``."""
    ckpt, path = load_run_checkpoint(checkpoint_dir, key, epoch)
    model = DecisionTransformer(model_config_of(ckpt, path))
    load_state_into(model, ckpt["state_dict"], str(path))
    model.to(device).eval()
    return LoadedModel(model, ckpt, path, key, epoch)


def load_state_dict(checkpoint_dir, key: RunKey, epoch: int) -> tuple[dict, Path]:
    """The state dict of ``key`` at ``epoch`` (refused, naming the tensor, when a weight is NaN or inf)."""
    ckpt, path = load_run_checkpoint(checkpoint_dir, key, epoch)
    check_finite_state(ckpt["state_dict"], str(path))
    return ckpt["state_dict"], path


def read_run_config(checkpoint_dir, key: RunKey) -> dict | None:
    """The run's ``config.json`` as a dict, or None when it has none."""
    p = key.path(checkpoint_dir) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable JSON file ({e})") from None


def run_depth(checkpoint_dir, key: RunKey) -> int | None:
    """Number of transformer blocks of a run, from its config.json or, failing that, a checkpoint."""
    cfg = read_run_config(checkpoint_dir, key)
    if cfg and isinstance(cfg.get("model_config"), dict):
        return int(cfg["model_config"].get("backbone", {}).get("n_layer", 0)) or None
    epochs = checkpoint_epochs(checkpoint_dir, key)
    if epochs:
        ckpt = load_checkpoint(checkpoint_path(checkpoint_dir, key, epochs[-1]))
        return model_config_of(ckpt, key.dir_name).backbone.n_layer
    return None


# ---- data and batches -------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _trajectories(path: str, env: str):
    return load_trajectories(path, env)


@lru_cache(maxsize=4)
def _dataset(path: str, env: str, device: str) -> TrajectoryDataset:
    return TrajectoryDataset(_trajectories(path, env), env, device=device)


def analysis_data_file(env: str, dataset: str, data_path: str | None, checkpoint: dict | None = None) -> Path:
    """The data file of a run's analysis: ``data_path``'s; with None, the file recorded in the checkpoint's config if
    it still exists (runs record it as an absolute path; an older relative one is also tried below the project),
    else the project's ``data/``."""
    if data_path is None and checkpoint is not None:
        cfg = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
        recorded = cfg.get("data_file")
        same = cfg.get("env", env) == env and cfg.get("dataset", dataset) == dataset
        for cand in ([Path(recorded), PROJECT_ROOT / recorded] if isinstance(recorded, str) and recorded and same
                     else []):
            if cand.is_file():
                say_stand_in(cand, env, dataset)
                return cand.resolve()
    get_env_spec(env)
    check_dataset_name(dataset)   # (the file is loaded, and checked, by the caller: here only found)
    return Path(find_dataset_file(data_path or project_path("data"), env, dataset)).resolve()


def analysis_dataset(env: str, dataset: str, data_path: str | None, checkpoint: dict | None = None,
                     device="cpu") -> TrajectoryDataset:
    """The run's dataset (``analysis_data_file``; states normalised with its own statistics, as in training)."""
    path = analysis_data_file(env, dataset, data_path, checkpoint)
    return _dataset(str(path), env, str(torch.device(device)))


class SharedDataset:
    """One dataset per env for every model of an analysis, so that they all see the same batch: ``--data_path``'s,
    else the one the first model's checkpoint records. A later model whose checkpoint records another data file is
    said in a note (``notes``), once per env."""

    def __init__(self, dataset: str, data_path: str | None, device, notes: list):
        self.dataset, self.data_path, self.device, self.notes = dataset, data_path, device, notes
        self._chosen: dict[str, tuple[TrajectoryDataset, Path, Path]] = {}

    def get(self, env: str, lm: "LoadedModel") -> TrajectoryDataset:
        """The env's dataset; ``lm`` is the model about to be analysed on it."""
        if env not in self._chosen:
            path = analysis_data_file(env, self.dataset, self.data_path, lm.checkpoint)
            self._chosen[env] = (_dataset(str(path), env, str(torch.device(self.device))), path, lm.path)
            return self._chosen[env][0]
        data, path, first = self._chosen[env]
        if self.data_path is None:
            own = analysis_data_file(env, self.dataset, None, lm.checkpoint)
            if own != path:
                self.notes.append(f"{lm.path} records the data file {own}; it is analysed on {path} (that of "
                                  f"{first}) so that every model sees the same batch (--data_path chooses one)")
        return data


def batch_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed``: an analysis batch is drawn on the CPU whatever the dataset's device
    (a GPU's generator gives another stream), so ``--device cuda`` analyses see the batch ``--device cpu`` ones do."""
    return torch.Generator().manual_seed(int(seed))


def analysis_batch(dataset: TrajectoryDataset, batch_size: int, K: int, seed: int,
                   generator: torch.Generator | None = None) -> Batch:
    """One training-sampler batch (length-weighted trajectories, uniform starts, training padding).

    A fresh generator seeded with ``seed`` per call, so every model of an analysis sees the same batch; pass a
    shared ``generator`` to draw successive, different batches (``--independent_batches``, as TAKAGI)."""
    if batch_size < 1 or K < 1:
        raise UserError(f"invalid batch size {batch_size} or context K {K}")
    if K > dataset.max_ep_len:  # longer contexts would only add padding
        raise UserError(f"invalid context K {K}: longer than {dataset.env}'s {dataset.max_ep_len}-step episodes")
    g = generator if generator is not None else batch_generator(seed)
    return dataset.sample_batch(batch_size, K, g)


_BATCH_ARRAYS = ("states", "actions", "rtg", "attention_mask")


def batch_digest(data) -> str:
    """A fingerprint of a batch's arrays (as float32, with their shapes): equal for the same batch however saved.
    ``data``: a dict of those arrays (a MINE ``data_*.npz``) or a ``Batch``."""
    import hashlib

    if isinstance(data, Batch):
        data = {"states": data.states, "actions": data.actions, "rtg": data.rtg, "attention_mask": data.mask}
    h = hashlib.sha256()
    for k in _BATCH_ARRAYS:
        v = data[k]
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        a = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        h.update(f"{k}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def batch_for(model, batch: Batch, what: str) -> Batch:
    """``batch`` on the device of ``model``'s parameters (tensors elsewhere are copied), after refusing (naming
    ``what``) a model without transformer blocks (a BC model), one that is not float32
    (:func:`~decision_transformer.training.trainer.float32_device`), a batch whose state or action size is not the
    model's (another env's data), or one with timesteps beyond the model's table."""
    if not isinstance(getattr(model, "transformer", None), torch.nn.Module):
        raise UserError(f"{what} analyses Decision Transformers; a {type(model).__name__} has no transformer blocks")
    if not isinstance(batch, Batch):
        raise TypeError(f"{what} takes a decision_transformer.data.Batch (dataset.sample_batch(...)), got "
                        f"{type(batch).__name__}")
    cfg = getattr(model, "config", None)
    dims = (getattr(cfg, "state_dim", None), getattr(cfg, "act_dim", None))
    have = (batch.states.shape[-1], batch.actions.shape[-1])
    if all(isinstance(d, int) for d in dims) and dims != have:
        raise UserError(f"{what}: the model's states and actions have {dims[0]} and {dims[1]} dimensions, the "
                        f"batch's {have[0]} and {have[1]} (data of another env?)")
    if batch.timesteps.numel():
        check_timestep_rows(model, int(batch.timesteps.max()), what, "the batch")
    device = float32_device(model, what)
    if device is None:
        return batch
    return Batch(**{f.name: getattr(batch, f.name).to(device) for f in fields(Batch)})


def model_inputs(batch: Batch) -> tuple:
    """(states, actions, returns_to_go [B, K, 1], timesteps, attention_mask) for ``DecisionTransformer.forward``."""
    return batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps, batch.mask
