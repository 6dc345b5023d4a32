"""How much disk a training run will write, estimated from its flags before it starts (the sweep launcher's plan).

A run of ``experiment.py`` or ``lm_cotraining/experiment.py`` with a run folder writes one model file per iteration
(``model_0.pt`` ... ``model_{max_iters}.pt``) and keeps one training state (weights and AdamW's two moments), and with
``--save_model`` one or two more model files under ``models/{env}/``. A run of ``experiment_multi.py`` writes its
initial (or merged) model and the training state into its run folder, and with ``--save_model`` one or two more under
``models/multi/``. A model file is the model's fp32 state dict, so
its size follows from the architecture the flags build: the model is built on torch's ``meta`` device (no memory, no
weights read; an LM's ``config.json`` is read for its sizes, an LM not here is not downloaded: its runs are not
sized), and a merge run's from the size of the models it merges.
AdamW keeps two moments of each tensor a loss reaches: all but the token embeddings (``transformer.wte``; reached by
``--joint``'s LM loss and k-means) and the state and return heads. The figures are estimates: a file's pickle framing
and the run's config add a little.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from decision_transformer.errors import UserError


#: The tensors of a DT that no loss reaches without an auxiliary loss: AdamW keeps no moments of them.
UNTRAINED_PREFIXES = ("transformer.wte.", "predict_state.", "predict_return.")


@dataclass
class ModelSize:
    """A model file's bytes (``file``) and those of the tensors AdamW keeps moments of (``trained``)."""
    file: int
    trained: int


@dataclass
class RunDisk:
    """What one run still writes: ``total`` bytes, of which ``model`` bytes per model file, into ``folder`` (the file
    system of its ``--outdir``)."""
    total: int
    model: int
    folder: Path


def model_size(args, lms: dict | None = None) -> ModelSize:
    """The bytes of the state dict of the model that ``args`` (experiment.py's or lm_cotraining/experiment.py's
    flags) trains, built on the meta device, and of the part AdamW keeps moments of; a merge run's
    (``--pretrained_models``): the largest of its models' files (all counted as trained). A ``UserError`` where the
    model cannot be sized here (an LM that is not here yet or not found, a missing model file). ``lms``: the LMs
    located so far, by name (``locate``)."""
    import torch

    from decision_transformer.envs import get_env_spec
    from decision_transformer.model_factory import build_bc_model, build_model, build_model_config

    if getattr(args, "pretrained_models", None):
        return _files_size(args.pretrained_models)
    spec = get_env_spec(args.env)
    lm = locate(args, lms)
    with torch.device("meta"):
        if args.model_type == "bc":
            model = build_bc_model(args, spec)
        else:
            model = build_model(build_model_config(args, spec, lm), args.seed)
    aux = getattr(args, "joint", False) or getattr(args, "gpt_kmeans", None) is not None
    return _state_size(model, () if args.model_type == "bc" else UNTRAINED_PREFIXES[1:] if aux else UNTRAINED_PREFIXES)


def multi_model_size(args, lms: dict | None = None) -> ModelSize:
    """``model_size`` of an experiment_multi.py run: the fresh multi-task DT its flags build, on the meta device, or
    the largest of the model files it starts from (``--multi_pretrained_models``, ``--pretrained_model``)."""
    import torch

    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer
    from decision_transformer.multi_run import new_model_config

    files = args.multi_pretrained_models or ([args.pretrained_model] if args.pretrained_model else [])
    if files:
        return _files_size(files)
    cfg = new_model_config(args, locate(args, lms))
    with torch.device("meta"):
        model = MultiDecisionTransformer(cfg, seed=args.seed or 0)
    return _state_size(model, UNTRAINED_PREFIXES)


def _files_size(paths) -> ModelSize:
    """The largest of the model files ``paths`` (all of it counted as trained); a ``UserError`` for a missing one."""
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: file not found")
    size = max(os.path.getsize(p) for p in files)
    return ModelSize(size, size)


def locate(args, lms: dict | None = None):
    """The ``PretrainedLM`` of ``--pretrained_lm`` (None without one), found without downloading anything: one that
    is neither here nor in the Hugging Face cache is a ``UserError`` (not sized: the run downloads it). ``lms``: the
    LMs located so far, by name, each looked up once (and its "using ..." line printed once)."""
    from decision_transformer.model_factory import locate_pretrained
    from decision_transformer.models.pretrained import WouldDownload, locate_lm

    name = getattr(args, "pretrained_lm", None)
    if not name:
        return locate_pretrained(args)   # (its check of --pretrained_block without an LM)
    lms = {} if lms is None else lms
    if name not in lms:
        try:
            lms[name] = locate_lm(name, download=False)
        except WouldDownload:
            lms[name] = UserError(f"--pretrained_lm {name}: not downloaded yet (the run downloads it)")
        except UserError as e:
            lms[name] = e
    if isinstance(lms[name], UserError):
        raise lms[name]
    return lms[name]


def _state_size(model, untrained) -> ModelSize:
    """``ModelSize`` of ``model``'s state dict, the tensors whose names start with ``untrained`` not trained; a tensor
    under two names (``--extend_positions``' timestep table, ``transformer.wpe``) counted once, as a file holds it."""
    tensors: dict[int, tuple[int, bool]] = {}   # id -> (bytes, trained under one of its names)
    for k, t in model.state_dict(keep_vars=True).items():
        trained = tensors.get(id(t), (0, False))[1] or not k.startswith(untrained)
        tensors[id(t)] = (t.numel() * t.element_size(), trained)
    return ModelSize(sum(n for n, _ in tensors.values()), sum(n for n, trained in tensors.values() if trained))


def _saved_models(args) -> int:
    """How many models ``--save_model`` writes: the last (``--save_mode last`` or ``both``) and the best (``best`` or
    ``both``; only where an iteration is trained and evaluated: its score is what is best)."""
    if not getattr(args, "save_model", False):
        return 0
    last = args.save_mode in ("last", "both")
    best = args.save_mode in ("best", "both") and args.max_iters > 0 and getattr(args, "num_eval_episodes", 1) > 0
    return last + best


def _state(folder: Path | None) -> bool:
    """Whether the earlier part of a run (its folder, ``folder``) left a training state (a run to resume: the state
    is replaced, no new bytes)."""
    from decision_transformer.run import TRAIN_STATE

    return folder is not None and (folder / TRAIN_STATE).is_file()


def saved_already(args, folder: Path | None, models_dir: Path, model_type: str) -> int:
    """The bytes of the ``--save_model`` files (``{models_dir}/{model_type}_{exp_prefix}.pt`` and ``..._best.pt``)
    that the earlier part of a run to resume (its folder, ``folder``; its ``exp_prefix`` from its config) wrote
    already: the run replaces them, no new bytes."""
    if folder is None or not getattr(args, "save_model", False):
        return 0
    from decision_transformer.run import recorded_config

    prefix = (recorded_config(folder, note=False) or {}).get("exp_prefix")
    if not isinstance(prefix, str) or not prefix:
        return 0
    names = ([f"{model_type}_{prefix}.pt"] if args.save_mode in ("last", "both") else []) + \
        ([f"{model_type}_{prefix}_best.pt"] if args.save_mode in ("best", "both") else [])
    return sum((models_dir / n).stat().st_size for n in names if (models_dir / n).is_file())


def multi_run_bytes(args, folder: Path | None, model: ModelSize) -> int:
    """The bytes an experiment_multi.py run with the flags ``args`` writes: with a run folder (``--outdir``), its
    ``model_0.pt`` (not again for a run to resume, ``folder``) and, when it trains an iteration, its training state
    (not again where ``folder`` holds one); ``--save_model`` the best and/or last model."""
    train = not args.eval_only and args.num_steps_per_iter > 0 and args.max_iters > 0
    files = 1 if args.outdir and folder is None else 0
    state = model.file + 2 * model.trained if args.outdir and train and not _state(folder) else 0
    return (files + _saved_models(args)) * model.file + state


def run_bytes(args, folder: Path | None, model: ModelSize, lm_script: bool = False) -> int:
    """The bytes a run with the flags ``args`` writes from the start, with a model of ``model``'s size: its run
    folder (``--outdir``; none with ``--outdir ''``) gets ``model_0.pt`` ... ``model_{max_iters}.pt`` and, once an
    iteration is trained, the training state (the weights and two AdamW moments); ``--save_model`` the best and/or
    last model. ``folder``: the folder of the run's earlier part (a run to resume); what it holds already (model
    files, the training state) is not counted again. ``lm_script``: the flags are lm_cotraining/experiment.py's."""
    has_folder = folder_of(args, lm_script) is not None
    files = args.max_iters + 1 if has_folder else 0
    state = model.file + 2 * model.trained if has_folder and args.max_iters > 0 and not _state(folder) else 0
    total = (files + _saved_models(args)) * model.file + state
    if folder is not None and folder.is_dir():
        total -= sum(f.stat().st_size for f in folder.glob("model_*.pt") if f.is_file())
    return max(total, 0)


def folder_of(args, lm_script: bool = False) -> Path | None:
    """The folder a run writes its model files in: ``--outdir`` (``lm_script``, lm_cotraining/experiment.py: also
    its default, ``models/{env}``), or None for a run without one."""
    from decision_transformer.paths import project_path

    outdir = getattr(args, "outdir", None)
    if lm_script:
        return None if outdir == "" else Path(outdir or Path(project_path("models")) / args.env)
    return Path(outdir) if outdir else None


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent); None where unknown."""
    p = folder.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human(n: float) -> str:
    """Bytes in words: ``512 B``, ``3.4 MB``, ``281 GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def summary(estimates: list[RunDisk], unsized: list[str]) -> list[str]:
    """Lines for the plan: the total the runs to start or resume will write, the largest model file, the free space
    of each file system they write to (a warning where the total there is more), and the runs not sized."""
    lines = []
    if estimates:
        total = sum(e.total for e in estimates)
        largest = max(e.model for e in estimates)
        lines.append(f"disk: about {human(total)} to write for {len(estimates)} runs (model files of up to "
                     f"{human(largest)})")
        by_fs: dict[int, list[RunDisk]] = {}
        for e in estimates:
            p = e.folder.resolve()
            while not p.exists() and p != p.parent:
                p = p.parent
            by_fs.setdefault(p.stat().st_dev if p.exists() else -1, []).append(e)
        for group in by_fs.values():
            need, free = sum(e.total for e in group), free_bytes(group[0].folder)
            if free is not None and need > free:
                lines.append(f"warning: the file system of {group[0].folder} has {human(free)} free, less than the "
                             f"{human(need)} these runs write there")
            elif free is not None:
                lines.append(f"disk: {human(free)} free where {group[0].folder} is")
    if unsized:
        lines.append(f"disk: not estimated for {len(unsized)} runs ({'; '.join(sorted(set(unsized)))})")
    return lines
