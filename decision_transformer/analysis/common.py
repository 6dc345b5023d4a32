"""Shared pieces of the analysis scripts: flags, output folders, atomic writers, figures."""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from decision_transformer.cli import HelpFormatter
from decision_transformer.envs import D4RL_ENVS
from decision_transformer.errors import UserError
from decision_transformer.paths import project_path

#: Default root of the analysis outputs. Relative on purpose: like every relative path in defaults and arguments it
#: resolves against the working directory, so the README's commands (run from the repository root) write into the
#: repository's ``analysis/`` and a script started elsewhere writes under that directory, never into the source tree.
OUTPUT_ROOT = Path("analysis")

#: Section folders (TAKAGI's names); each analysis writes ``{OUTPUT_ROOT}/{section}/results`` and ``.../figs``.
SECTIONS = {
    "scores": "section-4-sanity-check",
    "cka": "section-51-activation-similarity",
    "mi": "section-52-mutual-information",
    "params": "section-53-parameter-similarity",
    "grads": "section-54-gradient-analysis",
    "no_context": "section-55-fine-tuning-no-context",
    "attention": "section-56-dependence-on-context",
}

ENV_NAMES = D4RL_ENVS  # the papers' envs, in their order
MODEL_NAMES = ("gpt2", "igpt", "dt")
#: Display names used in the paper's figures.
MODEL_LABELS = {"gpt2": "GPT2", "igpt": "iGPT", "dt": "Random Init"}


def model_label(name: str) -> str:
    """The display name of a model (``MODEL_LABELS``), else the name itself."""
    return MODEL_LABELS.get(name, name)


#: One colour per model in every figure (matplotlib's default cycle): GPT2 C0, iGPT C1, Random Init C2.
MODEL_COLORS = {"gpt2": "C0", "igpt": "C1", "dt": "C2"}
#: Colours of other model names: C3 ... C9, chosen from the name (so also fixed across figures and scripts).
_OTHER_COLORS = tuple(f"C{i}" for i in range(3, 10))


def model_color(name: str) -> str:
    """The fixed colour of a model name, independent of which other models a figure shows or their order."""
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    import zlib

    return _OTHER_COLORS[zlib.crc32(name.encode()) % len(_OTHER_COLORS)]


def model_colors(names) -> dict[str, str]:
    """``model_color`` of each name; two other names that fall on the same colour in one figure get distinct ones
    (assigned in name order, so still independent of the figure's model order)."""
    out = {m: MODEL_COLORS[m] for m in names if m in MODEL_COLORS}
    used = set(out.values())
    for m in sorted({m for m in names if m not in MODEL_COLORS}):
        c = model_color(m)
        free = [x for x in _OTHER_COLORS if x not in used]
        if c in used and free:
            i = _OTHER_COLORS.index(c)
            c = min(free, key=lambda x: (_OTHER_COLORS.index(x) - i) % len(_OTHER_COLORS))
        out[m] = c
        used.add(c)
    return {m: out[m] for m in names}


def pair_average(values, target: int, axis: int = -1) -> np.ndarray:
    """Average a deeper model's per-block values onto ``target`` positions along ``axis``: consecutive groups of
    ``n // target`` blocks (iGPT's 24 blocks onto 12: blocks 2b and 2b+1), as CKA's ``normalise_depth``. Unchanged
    when the block count equals ``target`` or is not a multiple of it."""
    values = np.asarray(values)
    n = values.shape[axis]
    if target < 1 or n == target or n % target:
        return values
    v = np.moveaxis(values, axis, -1)
    v = v.reshape(*v.shape[:-1], target, n // target).mean(-1)
    return np.moveaxis(v, -1, axis)


def pairing_text(model: str, blocks: int, target: int) -> str:
    """What ``pair_average`` did to a model: "iGPT: blocks 2b and 2b+1 averaged" (24 blocks onto 12)."""
    f = blocks // target
    group = f"blocks {f}b and {f}b+1" if f == 2 else f"blocks {f}b to {f}b+{f - 1}"
    return f"{model_label(model)}: {group} averaged"


def unique(items) -> list:
    """``items`` without repeats, in first-seen order (notes that two steps both report)."""
    return list(dict.fromkeys(items))


# ---- flags ------------------------------------------------------------------------------------------------------

def str2bool(v) -> bool:
    """An argparse type: a bool from true/false, yes/no, on/off, 1/0 and their one-letter forms (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "t", "yes", "y", "on"):
        return True
    if s in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


OUTPUT_FOLDER_FLAGS = ("results_dir", "figs_dir", "out_dir", "path_to_save_mi", "path_to_save_activation",
                       "path_to_save_data")


def folder_problem(path) -> str | None:
    """Why ``path`` cannot be (or become) a folder: it, or a folder above it, is a file; else None."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            return None if q.is_dir() else ("it is a file, not a folder" if q == p else f"{q} is a file, not a folder")
    return None


class _Parser(argparse.ArgumentParser):
    """``--help`` shows every default, also of flags without a help text. An abbreviated flag that is the prefix of
    several spellings of one flag (``--env`` of ``--env_name_list`` and its alias ``--env_name``) is that flag, not
    "ambiguous" (argparse, up to at least Python 3.13, counts each spelling as a match)."""

    def format_help(self):
        """The help text, with ``(default: ...)`` as the help of every flag that has none (and a default to show)."""
        for action in self._actions:
            if action.help is None and action.default not in (None, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        """Also refuses a value repeated in a list flag (``--seed_list 666 666`` would count one run twice)."""
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            values = getattr(parsed, action.dest, None) if action.dest.endswith("_list") else None
            if isinstance(values, list):
                twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
                if twice is not None:
                    self.error(f"argument {'/'.join(action.option_strings[:1])}: {twice} is given twice")
        for action in self._actions:   # before any work: a later folder that cannot be made would leave half a run
            folder = getattr(parsed, action.dest, None) if action.dest in OUTPUT_FOLDER_FLAGS else None
            problem = folder_problem(folder) if isinstance(folder, (str, Path)) else None
            if problem:
                self.error(f"argument {action.option_strings[0]}: {folder}: {problem}")
        return parsed, extras

    def _get_option_tuples(self, option_string):
        seen, unique = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:  # t[0]: the action the prefix matches
                seen.add(id(t[0]))
                unique.append(t)
        return unique


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser of the analysis scripts (every default in ``--help``, repeated list values refused)."""
    return _Parser(description=description, formatter_class=HelpFormatter)


def _runs_folder(value: str) -> str:
    """``--checkpoint_dir``: no file (a missing folder is said where its runs are looked for)."""
    if os.path.exists(value) and not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder of run folders")
    return value


def add_checkpoint_flags(p, *, plm_alias: bool = False, aliases=()):
    """``--checkpoint_dir`` (``aliases``: further spellings of it, those of the original scripts) and
    ``--dataset_name``."""
    names = ["--checkpoint_dir"] + (["-plm"] if plm_alias else []) + list(aliases)
    p.add_argument(*names, dest="checkpoint_dir", type=_runs_folder, default=project_path("checkpoints"),
                   help="folder holding the run folders {model}_{dataset}_{env}_{seed}[_K{K}]...")
    p.add_argument("--dataset_name", type=str, default="medium")


#: The analysis batch's defaults (``add_data_flags``): samples (the gradient scripts have their own), context K and
#: batch seed.
DEFAULT_BATCH_SIZE, DEFAULT_BATCH_K, DEFAULT_BATCH_SEED = 100, 20, 0


def add_data_flags(p, *, device_default: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, data_aliases=(),
                   batch_size_help=None, batch_size_aliases=()):
    """The analysis batch's flags; ``data_aliases``: further spellings of ``--data_path``; ``batch_size_help``: the
    help of ``--batch_size`` (default: its :func:`batch_tag`); ``batch_size_aliases``: further spellings of it. A
    non-default batch tags the results (:func:`batch_tag`)."""
    p.add_argument("--data_path", *data_aliases, dest="data_path", type=str, default=None,
                   help="folder with {env}-{dataset}-v2.pkl; default: the data file recorded in the checkpoint, "
                        "else ./data")
    p.add_argument("--batch_size", *batch_size_aliases, dest="batch_size", type=int, default=batch_size,
                   help=batch_size_help or f"samples of the analysis batch (other than {batch_size}: results tagged "
                                           f"_bs{{n}})")
    p.add_argument("--K", type=int, default=DEFAULT_BATCH_K,
                   help=f"context length of the analysis batch (timesteps; other than {DEFAULT_BATCH_K}: results "
                        f"tagged _ctx{{k}}; --run_K selects the runs)")
    p.add_argument("--batch_seed", type=int, default=DEFAULT_BATCH_SEED,
                   help=f"seed of the batch sampler; every model gets the same batch (other than "
                        f"{DEFAULT_BATCH_SEED}: results tagged _bseed{{n}})")
    p.add_argument("--device", type=str, default=device_default, help="cpu, cuda, cuda:N or auto")
    add_threads_flag(p)


def add_batch_read_flags(p, what: str, *, batch_size: int = DEFAULT_BATCH_SIZE, size_flag: str = "--batch_size"):
    """``--K``, ``--batch_seed`` and the sample count (``size_flag``, the attribute of its name): which analysis
    batch's results (those of ``what`` run with the same flags) a reader reads (:func:`batch_tag`)."""
    read = f"read the results of {what} run with this flag"
    p.add_argument(size_flag, type=int, default=batch_size,
                   help=f"{read}: samples of its analysis batch (other than {batch_size}: tagged _bs{{n}})")
    p.add_argument("--K", type=int, default=DEFAULT_BATCH_K,
                   help=f"{read}: context of its analysis batch (other than {DEFAULT_BATCH_K}: tagged _ctx{{k}})")
    p.add_argument("--batch_seed", type=int, default=DEFAULT_BATCH_SEED,
                   help=f"{read}: its batch seed (other than {DEFAULT_BATCH_SEED}: tagged _bseed{{n}})")


def batch_tag(K: int, batch_seed: int, batch_size: int | None = None, default_batch_size: int | None = None) -> str:
    """The file-name tag of a non-default analysis batch: ``_bs{n}`` (``batch_size`` other than
    ``default_batch_size``; left out when either is None, as for the gradient scripts, which tag it among their own
    settings), ``_ctx{k}`` (context ``K`` other than 20; not ``_K{K}``, the runs' context) and ``_bseed{n}``
    (``batch_seed`` other than 0), in this order; empty for the default batch, so the default names stay the
    originals' and another batch's results never replace them."""
    size = batch_size is not None and default_batch_size is not None and batch_size != default_batch_size
    return (f"_bs{batch_size}" if size else "") + (f"_ctx{K}" if K != DEFAULT_BATCH_K else "") \
        + (f"_bseed{batch_seed}" if batch_seed != DEFAULT_BATCH_SEED else "")


def add_threads_flag(p):
    """``--threads``: the CPU threads torch may use (``auto`` by default)."""
    from decision_transformer.cli import THREADS_HELP

    p.add_argument("--threads", default="auto", help=THREADS_HELP)


def section_dir(section: str, kind: str) -> str:
    """The default ``results`` / ``figs`` folder of a section (the project's, see ``paths.project_path``)."""
    return project_path((OUTPUT_ROOT / SECTIONS[section] / kind).as_posix())


def add_output_flags(p, section: str, *, results_aliases=(), figs_aliases=()):
    """``--results_dir`` and ``--figs_dir``; the aliases are further spellings of each (the original scripts')."""
    p.add_argument("--results_dir", *results_aliases, dest="results_dir", type=str,
                   default=section_dir(section, "results"),
                   help="raw results (.npy/.npz/.csv); relative paths resolve against the working directory")
    p.add_argument("--figs_dir", *figs_aliases, dest="figs_dir", type=str, default=section_dir(section, "figs"),
                   help="figures (PNG and PDF); relative paths resolve against the working directory")


def add_curve_output_flags(p, section: str):
    """The learning-curve scripts' outputs: ``--results_dir`` (the originals' ``--path_to_save_return``/``-psr``),
    ``--figs_dir`` (``-psf``), and the originals' separate action-error folder ``--path_to_save_action_error``/
    ``-psa``, accepted although the returns and action errors go to one CSV (see :func:`check_curve_output_flags`);
    and their ``--device``, which they never read."""
    add_output_flags(p, section, results_aliases=("--path_to_save_return", "-psr"),
                     figs_aliases=("--path_to_save_figure", "-psf"))
    p.add_argument("--path_to_save_action_error", "-psa", dest="action_error_dir", type=str, default=None,
                   help="accepted for the original scripts' commands: returns and action errors share one CSV in "
                        "--results_dir")
    add_ignored_device_flag(p)


def check_curve_output_flags(args):
    """Warn when ``-psa`` names another folder than ``--results_dir``: the action errors are
    written there with the returns."""
    if args.action_error_dir is not None and Path(args.action_error_dir).resolve() != Path(args.results_dir).resolve():
        warn(f"-psa {args.action_error_dir}: the action errors are written with the returns to one CSV in "
             f"--results_dir ({args.results_dir})")


def add_ignored_device_flag(p):
    """``--device`` of the original plotting scripts, which never read it (nothing here runs a model)."""
    p.add_argument("--device", dest="unused_device", type=str, default=None, help=argparse.SUPPRESS)


#: The K of a run folder without a ``_K{K}`` suffix.
DEFAULT_RUN_K = 20


def add_run_k_flag(p, default_text: str = f"{DEFAULT_RUN_K}"):
    """``--run_K``: the context length the runs to load were trained with (their folder's ``_K{K}`` suffix), apart
    from the analysis batch's ``--K``."""
    p.add_argument("--run_K", type=int, default=None,
                   help=f"load the runs trained with this K (folders {{model}}_{{dataset}}_{{env}}_{{seed}}_K{{K}}; no "
                        f"suffix for K={DEFAULT_RUN_K}); default {default_text}")


def run_k(args) -> int:
    """``--run_K``, else 1 with ``--no_context``, else 20."""
    k = getattr(args, "run_K", None)
    if k is None:
        k = 1 if getattr(args, "no_context", False) else DEFAULT_RUN_K
    if k < 1:
        raise UserError(f"invalid --run_K {k}: the runs' context length is a positive integer")
    return k


def run_k_tag(k: int) -> str:
    """The file-name tag of results from K={k} runs: ``_K{k}``, empty for the default K=20 (as the run folders)."""
    return "" if k == DEFAULT_RUN_K else f"_K{k}"


def add_wandb_flags(p):
    """``--from_wandb``, ``--wandb_project`` and ``--wandb_entity``: read run metrics from WandB."""
    p.add_argument("--from_wandb", action="store_true",
                   help="read the run metrics from WandB (by run name) instead of the local metrics.jsonl")
    # -wpn / --wandb_project_name: the original scripts' spelling, a path user_name/project_name
    p.add_argument("--wandb_project", "-wpn", "--wandb_project_name", dest="wandb_project", type=str,
                   default="decision-transformer",
                   help="project, or entity/project when --wandb_entity is not given")
    p.add_argument("--wandb_entity", type=str, default=None)


def check_min(args, low: int, *names):
    """Integer flags ``names`` (None: not given) that must be at least ``low``."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < low:
            raise UserError(f"invalid --{n} {v}: use an integer >= {low}")


def check_positive(args, *names):
    """Integer flags ``names`` (None: not given) that must be at least 1."""
    check_min(args, 1, *names)


#: Rules of ``check_numbers``: (what a valid value is, test); every rule also requires a finite number.
FINITE = ("a finite number", lambda v: True)
POSITIVE = ("a positive number", lambda v: v > 0)
NON_NEGATIVE = ("a number >= 0", lambda v: v >= 0)


def check_numbers(args, **rules):
    """Float flags ``name=(what, test)`` (None: not given): finite and passing the test, e.g. ``eps=NON_NEGATIVE``."""
    for n, (what, ok) in rules.items():
        v = getattr(args, n, None)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise UserError(f"invalid --{n} {v}: use {what}")


def check_seeds(args, *names, bits: int = 32):
    """Seed flags (an integer or a list of them; None: not given) in [0, 2**bits): the training scripts' seed range
    by default, which every generator the analyses seed accepts."""
    for n in names:
        v = getattr(args, n, None)
        for s in v if isinstance(v, list) else [v]:
            if s is not None and not 0 <= s < 2 ** bits:
                raise UserError(f"invalid --{n} {s}: use a non-negative integer below 2**{bits}")


#: The largest analysis batch (the papers use 50-100 examples); a mistyped size stops at once rather than filling memory
MAX_ANALYSIS_BATCH = 100_000


def check_data_flags(args):
    """The flags of ``add_data_flags``: --batch_size and --K positive, --batch_size at most ``MAX_ANALYSIS_BATCH``,
    --batch_seed a seed."""
    check_positive(args, "batch_size", "K")
    if args.batch_size > MAX_ANALYSIS_BATCH:
        raise UserError(f"--batch_size {args.batch_size} is too large (at most {MAX_ANALYSIS_BATCH:,})")
    check_seeds(args, "batch_seed")


def resolve_device(name: str, threads: str = "auto"):
    """The torch device of ``--device`` (cuda falls back to cpu with a warning); also sets torch's CPU threads
    (``--threads``), as the training scripts do."""
    from decision_transformer.run import resolve_device as _resolve

    return _resolve(name, threads)


# ---- outputs ----------------------------------------------------------------------------------------------------

@dataclass
class Outputs:
    """What an analysis wrote: raw result files, figures (PNG paths; a PDF sits next to each), markdown tables."""

    files: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    tables: list = field(default_factory=list)      # (title, markdown)
    notes: list = field(default_factory=list)

    def extend(self, other: Outputs) -> Outputs:
        """Append ``other``'s outputs; a note already present (e.g. the same skipped run seen by two steps) is not
        repeated."""
        self.files += other.files
        self.figures += other.figures
        self.tables += other.tables
        self.notes[:] = unique(self.notes + other.notes)
        return self

    def print_summary(self, stream=None):
        """Print the tables, the notes (once each) and the written files and figures to ``stream`` (stdout)."""
        stream = stream or sys.stdout
        for title, md in self.tables:
            print(f"\n{title}\n\n{md}", file=stream)
        for n in unique(self.notes):
            print(f"note: {n}", file=stream)
        for f in self.files + self.figures:
            print(f"wrote {f}", file=stream)


def check_env_datasets(args, envs) -> None:
    """``--data_path``'s dataset of every env found before the first is analysed (and before any output folder is
    made): a missing one used to stop the script after the envs before it had written their results."""
    if getattr(args, "data_path", None) is None:   # (each run's recorded data file: found as its model is loaded)
        return
    from decision_transformer.data import check_dataset_place, find_dataset_file

    for env in envs:
        check_dataset_place(args.data_path, env, args.dataset_name)
        find_dataset_file(args.data_path, env, args.dataset_name, quiet=True)


def out_dir(path) -> Path:
    """Create the folder ``path`` (and its parents) if needed and return it; a failure is one line naming it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from decision_transformer.errors import write_problem

        raise UserError(f"cannot create output folder {p}: {write_problem(p, e)}") from None
    return p


def _atomic_bytes(path: Path, data: bytes) -> Path:
    """``data`` to ``path`` through a temporary file of its own (none left behind; a failure is one line naming the
    file)."""
    from decision_transformer.files import atomic_write

    path = Path(path)
    out_dir(path.parent)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_npy(path, array) -> Path:
    """Write one array to ``path`` atomically as ``.npy`` without pickle; returns the path."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return _atomic_bytes(Path(path), buf.getvalue())


def save_npz(path, **arrays) -> Path:
    """A dict of arrays (keys may contain dots), loadable with ``np.load(path)`` without pickle."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return _atomic_bytes(Path(path), buf.getvalue())


def _load_array_file(path, kind: str):
    """``np.load`` without pickle; a missing, truncated or corrupt file (whatever numpy, zipfile or zlib raise while
    parsing it, also for a member) or one of the other kind is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        # our own handle: np.load(path) leaves the file open when a damaged archive fails to parse
        with open(path, "rb") as f:
            obj = np.load(f, allow_pickle=False)
            if isinstance(obj, np.lib.npyio.NpzFile):
                with obj:
                    obj = {k: obj[k] for k in obj.files}
    except Exception as e:  # noqa: BLE001 - a corrupt file raises anything from EOFError to zlib.error
        raise UserError(f"{path}: not a readable {kind} file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) != (kind == ".npz"):
        found = "an .npz archive" if isinstance(obj, dict) else "a single array"
        raise UserError(f"{path}: not a {kind} file (found {found})")
    return obj


def load_npz(path) -> dict[str, np.ndarray]:
    """An ``.npz`` archive as a dict; where it is absent but the originals' pickled ``.npy`` dict of the same name is
    there (``save_activation.py`` and the MI scripts saved those), that file, read without running pickled code."""
    path = Path(path)
    legacy = path.with_suffix(".npy")
    if path.suffix == ".npz" and not path.exists() and legacy.is_file():
        arrays = load_legacy_npy_dict(legacy)
        print(f"note: {path} not found; read the original's {legacy.name}", file=sys.stderr)
        return arrays
    return _load_array_file(path, ".npz")


def load_legacy_npy_dict(path) -> dict[str, np.ndarray]:
    """A dict of arrays that ``np.save`` pickled into an ``.npy`` file: each value a numpy array or a torch tensor
    (returned as a numpy array; bf16 and fp16 as float32). Unpickled with numpy arrays, torch tensors, dicts,
    lists and scalars allowed only: a file that would run code is refused, tensor storages are read by
    ``torch.load(weights_only=True)``, and a tensor view must lie inside its storage."""
    import pickle

    import torch

    from decision_transformer.data import safe_unpickle

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if dtype != object or shape != ():
                raise ValueError(f"an array of {dtype} with shape {shape}, not a saved dict")
            obj = safe_unpickle(f, tensors=True)
    except pickle.UnpicklingError as e:
        if "forbidden global" not in str(e):  # truncated or damaged, not refused
            raise UserError(f"{path}: not a readable pickled .npy dict (UnpicklingError: {e})") from None
        raise UserError(f"{path}: refused to load ({e}); only numpy arrays, torch tensors, "
                        f"lists and dicts are allowed") from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises anything from EOFError to ValueError
        raise UserError(f"{path}: not a readable pickled .npy dict ({type(e).__name__}: {e})") from None
    obj = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a saved dict of numpy arrays, found a {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            try:
                v = v.detach().cpu().resolve_conj().resolve_neg()
                v = (v.float() if v.is_floating_point() and v.element_size() < 4 else v).numpy().copy()
            except Exception as e:  # noqa: BLE001 - dtypes numpy lacks, memory
                raise UserError(f"{path}: entry {k!r} cannot be read as an array ({type(e).__name__}: {e})") \
                    from None
        if not isinstance(v, np.ndarray):
            raise UserError(f"{path}: entry {k!r} is a {type(v).__name__}, not an array")
        out[str(k)] = v
    return out


def load_npy(path) -> np.ndarray:
    """One array from an ``.npy`` file, without pickle; a missing or unreadable file is one line naming it."""
    return _load_array_file(path, ".npy")


def check_arrays(path, arrays: dict, names, finite: bool = True):
    """Refuse a missing, non-numeric or (``finite``) NaN / infinite array ``names`` of the file ``path``."""
    for k in names:
        a = arrays.get(k)
        if a is None:
            raise UserError(f"{path}: missing array {k!r}")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise UserError(f"{path}: array {k!r} is not numeric ({a.dtype})")
        if finite and not np.isfinite(a).all():
            raise UserError(f"{path}: array {k!r} has NaN or infinite values")


def save_csv(path, header: list[str], rows: list[list]) -> Path:
    """Write ``header`` and ``rows`` to ``path`` atomically as CSV; returns the path."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return _atomic_bytes(Path(path), buf.getvalue().encode())


def save_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return _atomic_bytes(Path(path), text.encode())


def integer_ticks(ax):
    """Whole-number ticks on the x axis (epochs, blocks), never 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend(ax, **kwargs):
    """``ax.legend(**kwargs)`` when the axes hold labelled artists (an empty panel gets none, and no warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, figs_dir, stem: str, dpi: int = 120) -> Path:
    """Write ``{stem}.png`` and ``{stem}.pdf`` (atomically) and close the figure; returns the PNG path."""
    plt = pyplot()
    d = out_dir(figs_dir)
    try:
        for ext in ("pdf", "png"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
            _atomic_bytes(d / f"{stem}.{ext}", buf.getvalue())
    finally:
        plt.close(fig)
    return d / f"{stem}.png"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table of ``header`` and ``rows``."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def warn(msg: str):
    """Print ``warning: {msg}`` to stderr."""
    print(f"warning: {msg}", file=sys.stderr)
