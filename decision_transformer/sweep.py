"""The papers' experiment grids: list them, run them locally over GPUs or processes, export WandB sweeps.

    python -m decision_transformer.sweep list
    python -m decision_transformer.sweep run pretraining_table1 --gpus 0,1,2,3      # one run per GPU at a time
    python -m decision_transformer.sweep run block_replacement --procs 2 --dry_run
    python -m decision_transformer.sweep export pretraining_k1 --out sweeps/        # then `wandb sweep FILE`

A grid is a YAML file (``decision_transformer/sweeps/*.yaml`` or any path): ``program``, ``fixed`` flags and ``grid``
lists whose Cartesian product gives the runs; ``null`` leaves a flag out (random initialisation), ``true`` turns a
switch on. ``run`` skips finished runs and resumes (``--resume``) runs that stopped half-way (``experiment.py``,
``lm_cotraining/experiment.py`` and ``experiment_multi.py`` runs); runs whose
``--pretrained_lm`` cannot be found here are listed as blocked, runs whose training state cannot be read as
damaged, runs whose folder holds a run made with other flags as mismatch, and points whose flags their program
rejects as invalid; none of these is started, and the launcher exits non-zero at the end. A grid two of whose points
are the same run (one run folder) is refused.

Each run is locked (a ``.{run}.lock`` file next to its folder) while it runs: a second launcher on the same grid, or
on another grid with the same run, skips it as running elsewhere. A run stops (SIGINT) when its launcher dies.
"""
from __future__ import annotations

import argparse
import collections.abc
import contextlib
import itertools
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from decision_transformer.errors import quiet_startup

quiet_startup(__name__)  # (python -m: Ctrl-C while torch loads is one line, exit 130)

from decision_transformer.cli import positive_int
from decision_transformer.errors import (Interrupted, UserError, cli_entry, expand_home, first_line,
                                         write_problem)
from decision_transformer.files import atomic_write, open_lock, short_name
from decision_transformer.cpu import available_cpus
from decision_transformer.paths import project_path

ROOT = Path(__file__).resolve().parents[1]
GRID_DIR = Path(__file__).resolve().parent / "sweeps"


#: Flags of the shipped grids that name project folders (or files in them), made the project's from wherever inside
#: the project a grid is run: those of ``PATH_KEYS`` always; those of ``LOCAL_MODEL_KEYS`` when their first part is a
#: folder of the project (``checkpoints/ChibiT``; not a Hub name such as ``gpt2`` or ``openai/imagegpt-small``).
PATH_KEYS = ("outdir", "data_path", "kmeans_cache")
LOCAL_MODEL_KEYS = ("pretrained_lm", "load_checkpoint", "pretrained_models", "multi_pretrained_models",
                    "pretrained_model", "merge_base")


def _project_value(key: str, value):
    """A shipped grid's value of flag ``key`` as the launcher passes it (see ``PATH_KEYS``)."""
    if isinstance(value, list):
        return [_project_value(key, v) for v in value]
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    if key in PATH_KEYS or (key in LOCAL_MODEL_KEYS and (ROOT / Path(value).parts[0]).is_dir()):
        return project_path(value)
    return value


class _DuplicateKey(Exception):
    """A mapping of a grid file that gives one key twice (YAML keeps the last: the first's values vanished)."""


def _unique_key_loader():
    """yaml's safe loader, refusing a key given twice in one mapping (``seed: [1, 2]`` and later ``seed: [3]``, or
    two ``grid:`` sections), which ``safe_load`` resolves silently by keeping the last."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, collections.abc.Hashable):   # (a list as a key: yaml's own error says it)
                    continue
                if key in seen:
                    raise _DuplicateKey(f"{key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}"
                                        f"): YAML would keep the last and drop the first's values")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


def load_grid(name: str, project_paths: bool = True) -> dict:
    """A grid by name (a bundled ``sweeps/{name}.yaml``) or path, checked: ``program`` is a Python file of the project,
    ``fixed`` and ``grid`` are mappings, every grid value a non-empty list. With ``project_paths``, a bundled grid's
    folders are the project's from wherever in the project it is run (``PATH_KEYS``); without (``export``: a WandB
    agent runs ``program`` from the project's root), its values are as written."""
    import yaml

    path = Path(name)
    if not path.is_file():
        path = GRID_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRID_DIR.glob("*.yaml")))
        also = f" or {path}" if str(path) != name else ""
        raise UserError(f"unknown grid {name!r}: no file {name}{also}; known grids: {known}")
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except _DuplicateKey as e:
        raise UserError(f"{path}: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (UTF-8) file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({first_line(e)})") from None
    if (not isinstance(spec, dict) or not isinstance(spec.get("program"), str)
            or not isinstance(spec.get("grid") or {}, dict) or not isinstance(spec.get("fixed") or {}, dict)):
        raise UserError(f"{path}: a grid needs a 'program' (a script's path); 'fixed' and 'grid', where given, are "
                        f"mappings of flags to values (a grid without 'grid' is one run of its fixed flags)")
    spec["fixed"] = spec.get("fixed") or {}
    spec["grid"] = spec.get("grid") or {}
    for k, v in spec["grid"].items():
        if not isinstance(v, list):
            shown = "null" if v is None else v   # (as YAML writes it: [None] would be the string 'None')
            raise UserError(f"{path}: grid value of {k!r} must be a list of values, got {shown} (write [{shown}] for "
                            f"one value, or move it to 'fixed')")
        if not v:
            raise UserError(f"{path}: grid value of {k!r} is an empty list (the grid would have no runs)")
    program = (ROOT / spec["program"]).resolve()
    if not program.is_file():
        raise UserError(f"{path}: program {spec['program']!r} not found (a path relative to {ROOT})")
    if program.suffix != ".py" or ROOT.resolve() not in program.parents:
        raise UserError(f"{path}: program {spec['program']!r} is not one of the project's Python scripts (a .py file "
                        f"below {ROOT}, such as experiment.py)")
    if project_paths and path.resolve().parent == GRID_DIR.resolve():
        # a shipped grid's folders are the project's own, from wherever in the project it is run (as the defaults)
        for part in ("fixed", "grid"):
            spec[part] = {k: _project_value(k, v) for k, v in spec[part].items()}
    spec["name"] = path.stem
    spec["path"] = str(path.resolve())
    return spec


def expand(spec: dict) -> list[dict]:
    """The grid's runs: one flag dict per point of the Cartesian product of its lists, over the fixed flags."""
    keys = list(spec["grid"])
    combos = itertools.product(*(spec["grid"][k] for k in keys))
    return [{**spec["fixed"], **dict(zip(keys, values))} for values in combos]


def to_argv(params: dict) -> list[str]:
    """Flags as a command line: ``--k v``, a list as ``--k v1 v2 ...``, ``True`` as a bare ``--k``; None and
    False are left out."""
    argv = []
    for k, v in params.items():
        if v is None or v is False:
            continue
        if v is True:
            argv.append(f"--{k}")
        elif isinstance(v, (list, tuple)):
            argv += [f"--{k}", *map(str, v)]
        else:
            argv += [f"--{k}", str(v)]
    return argv


@dataclass
class Found:
    """What the launcher knows of one run before it starts it: its ``state`` (see ``STATES``), the ``folder`` it is in
    (when one exists), its ``lock`` file (None: a run that writes no folder), a ``note`` saying why it is not started,
    and the ``target`` it writes to, in words."""
    state: str
    folder: Path | None = None
    lock: Path | None = None
    note: str = ""
    target: str = ""


#: The states of a grid's runs: only ``new`` and ``partial`` (resumed with ``--resume``) runs are started.
STATES = {"done": "finished (skipped)", "partial": "to resume", "new": "new",
          "blocked": "blocked (their language model is not available here)",
          "damaged": "with a damaged training state (not started)",
          "mismatch": "made with other flags (not started)",
          "running": "running elsewhere (another process holds their lock)",
          "invalid": "with invalid flags (not started)"}


def _find_state(parent: Path, prefix: str, signature: dict, done_file: str | None, max_iters: int, found=False,
                final=None):
    """('done' | 'partial' | 'new' | 'damaged', folder) for runs kept in ``{parent}/{prefix}{id}`` folders, found by
    the flags they record. The newest such run with a training state is the one ``--resume`` continues (``found``,
    when given, is that run or None). It is done when its training state is at ``max_iters`` (written after the
    iteration's checkpoint and best model) and the final model ``final(folder)`` names, if any, exists; partial when
    not yet; with a training state that cannot be read, done if it holds ``done_file``, else damaged. Without such a
    run: done = a run holds ``done_file`` (a run of 0 iterations writes no training state)."""
    from decision_transformer.checkpoint import find_run
    from decision_transformer.run import TRAIN_STATE

    if found is False:
        found = find_run(parent, prefix, signature, require=TRAIN_STATE)
    if found is None:
        if done_file is not None:
            done = find_run(parent, prefix, signature, require=done_file)
            if done is not None:
                return "done", done
        return "new", None
    return _state_of(found, done_file, max_iters, final), found


def _state_of(folder: Path, done_file: str | None, max_iters: int, final=None) -> str:
    """'done' | 'partial' | 'damaged' of a run folder that holds a training state (see ``_find_state``)."""
    from decision_transformer.run import TRAIN_STATE

    it = state_iteration(folder / TRAIN_STATE)
    if isinstance(it, str):
        return "done" if done_file is not None and (folder / done_file).is_file() else "damaged"
    if it < max_iters:
        return "partial"
    last = final(folder) if final is not None else None
    return "partial" if last is not None and not last.is_file() else "done"  # resumed: it writes the final model


def _final_model(args, sub: str, model_type: str):
    """For runs that save their last model (``--save_model`` with ``--save_mode last`` or ``both``): a function of the
    run folder giving that file, ``models/{sub}/{model_type}_{exp_prefix}.pt``, written after the last training
    state (None where the folder does not record its ``exp_prefix``); else None. ``models/`` is the project's (from
    inside it), else the one below the folder the run was started in (outside the project, a run writes there, and a
    launcher started elsewhere looks there too)."""
    if not (getattr(args, "save_model", False) and getattr(args, "save_mode", "last") in ("last", "both")):
        return None

    def final(folder: Path) -> Path | None:
        """The run's last model file ``models/{sub}/{model_type}_{exp_prefix}.pt``; None where ``folder`` records
        no ``exp_prefix``."""
        from decision_transformer.checkpoint import recorded_base
        from decision_transformer.paths import PROJECT_ROOT
        from decision_transformer.run import recorded_config

        config = recorded_config(folder, note=False) or {}
        prefix = config.get("exp_prefix")
        if not (isinstance(prefix, str) and prefix):
            return None
        name = f"{model_type}_{prefix}.pt"
        path = Path(project_path("models")) / sub / name
        base = recorded_base(config)
        if not path.is_file() and base:
            started, root = Path(base).resolve(), PROJECT_ROOT.resolve()
            if started != root and root not in started.parents:   # (what project_path gave the run there)
                return started / "models" / sub / name
        return path
    return final


def state_iteration(path: Path) -> int | str:
    """The last finished iteration a training state records, or why it cannot be read (a string)."""
    import warnings

    import torch

    from decision_transformer.checkpoint import recorded_count, torch_load_problem

    for mmap in (True, False):  # mapped: no need to read a large state; a file that cannot be mapped is read whole
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                st = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - any failure means the run cannot resume from it
            first = torch_load_problem(e)
            problem = f"not loadable ({type(e).__name__}{': ' + first[:160] if first else ''})"
            continue
        if not isinstance(st, dict) or "iteration" not in st:
            return "not a training state (no iteration number)"
        try:
            return recorded_count(st, "iteration")
        except ValueError as e:
            return f"not a training state ({e})"
    return problem


def _signature_lock(parent: Path, prefix: str, signature: dict) -> Path:
    """The lock file of the runs ``{parent}/{prefix}{id}`` made with the flags ``signature`` (one run, resumed)."""
    import hashlib
    import json

    from decision_transformer.checkpoint import path_normalised

    from decision_transformer.checkpoint import UNORDERED_FLAGS

    # (paths resolved: ./a.pt and a.pt are one run to --resume, so they are one lock; so are --include attn mlp and
    # --include mlp attn)
    signature = {k: sorted(map(str, v)) if k in UNORDERED_FLAGS and isinstance(v, list) else v
                 for k, v in signature.items()}
    text = json.dumps(path_normalised(json.loads(json.dumps(signature, default=str))), sort_keys=True)
    return parent / f".{prefix}{hashlib.sha1(text.encode()).hexdigest()[:12]}.lock"


def run_lock_path(program: str, a) -> Path | None:
    """The lock file of the run that ``program`` (``experiment.py``, ``lm_cotraining/experiment.py`` or
    ``experiment_multi.py``) makes with the parsed flags ``a``, or None for a run that writes no run folder. A plain
    run is locked by its folder; runs that draw a new folder per run (LM co-training, merges, multi-task) by their
    flags, so that two processes never train (or resume) one run at once."""
    from decision_transformer.run import resume_signature

    if program == "lm_cotraining/experiment.py":
        if a.outdir == "":
            return None
        parent = Path(a.outdir or Path(project_path("models")) / a.env)
        return _signature_lock(parent, f"dt_gym-experiment-{a.env}-{a.dataset}-", resume_signature(a))
    if program == "experiment_multi.py":
        from decision_transformer.multi_run import resume_signature as multi_signature

        if not a.outdir or a.eval_only or a.num_steps_per_iter <= 0:
            return None
        return _signature_lock(Path(a.outdir) / "multi", f"gym-experiment-multi-{a.dataset}-", multi_signature(a))
    from decision_transformer.checkpoint import run_dir_name

    if not a.outdir:
        return None
    run_dir = Path(a.outdir) / run_dir_name(_model_name(a), a.dataset, a.env, a.seed, a.K, a.remove_grad_clip,
                                            a.pretrained_block)
    if a.pretrained_models:   # every flag a resume keeps, as --resume finds the run (run.resume_state_path)
        return _signature_lock(run_dir.parent, f"{run_dir.name}_", resume_signature(a))
    return folder_lock_path(run_dir)


def _model_name(a) -> str:
    """The model part of an ``experiment.py`` run's folder name, as the run names it."""
    from decision_transformer.checkpoint import model_name

    return "bc" if getattr(a, "model_type", "dt") == "bc" else model_name(a.pretrained_lm, a.pretrained_block)


def folder_lock_path(run_dir: Path) -> Path:
    """The lock a training script holds while it trains in ``run_dir``: a hidden file beside the folder. For plain
    ``experiment.py`` runs it is also the launcher's lock (``run_lock_path``), passed on to the run it starts."""
    run_dir = Path(run_dir).resolve()   # (the folder itself, however reached: through a link, two processes share it)
    return run_dir.parent / f".{short_name(run_dir.name)}.lock"


#: the most runs ``--procs`` starts at a time
MAX_PROCS = 1024


#: set by the launcher in a run it starts: the descriptor of the run's lock, which it holds for the run
LOCK_FD_ENV = "DT_RUN_LOCK_FD"


def _inherited_lock(path: Path) -> bool:
    """Whether this process was started holding the lock ``path`` (by the launcher, through ``LOCK_FD_ENV``)."""
    try:
        fd = int(os.environ.get(LOCK_FD_ENV, ""))
        held, st = os.fstat(fd), path.stat()
    except (ValueError, OSError):
        return False
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


@contextlib.contextmanager
def run_lock(path: Path | None, program: str):
    """Hold the lock ``path`` (the training scripts: ``folder_lock_path`` of the folder they train in) while the run
    trains: another process training in the same folder (a second start or resume of the same run, by hand or by a
    launcher) is a one-line ``UserError`` before anything is written. Under torchrun only rank 0 locks; a run that
    the launcher started holding this very lock (``LOCK_FD_ENV``) has it already."""
    if path is None or int(os.environ.get("RANK", "0") or 0) != 0 or _inherited_lock(path):
        yield
        return
    taken, fd = _take_lock(path)
    if not taken:
        raise UserError(f"{program}: this run is being trained by another process: "
                        f"{_lock_holder(path) or path}; wait for it to end (then --resume continues it if it "
                        f"stopped early), or give another --outdir")
    try:
        yield
    finally:
        _unlock(fd)


def inspect_run(program: str, argv: list[str]) -> Found:
    """The state of a run of ``program`` with the flags ``argv`` (see ``Found``); flags the program rejects are a
    ``UserError`` naming the program. A run found in a folder that a training process holds (``folder_lock_path``:
    started by hand, or by another launcher) is ``running``."""
    found = _inspect_run(program, argv)
    if found.state in ("new", "partial") and found.folder is not None:
        lock = folder_lock_path(found.folder)
        # (a plain run's folder lock is the launcher's own lock, checked by the launcher itself)
        holder = _lock_holder(lock) if found.lock is None or lock.resolve() != found.lock.resolve() else None
        if holder is not None:
            found.state, found.note = "running", f"{found.folder}: {holder}"
    return found


def _inspect_run(program: str, argv: list[str]) -> Found:
    from decision_transformer.run import EXPERIMENT, LM_COTRAINING, TRAIN_STATE, check_run_flags, resume_signature

    name = Path(program).name
    if Path(program).parent.name == "lm_cotraining" and name == "experiment.py":
        from decision_transformer.cli_lm import lm_cotraining_parser
        from decision_transformer.run import lm_resume_dir

        a = _parse(lm_cotraining_parser(), "lm_cotraining/experiment.py", argv,
                   lambda a: check_run_flags(a, LM_COTRAINING))
        if a.outdir == "":
            return Found("new")
        parent = Path(a.outdir or Path(project_path("models")) / a.env)
        prefix = f"dt_gym-experiment-{a.env}-{a.dataset}-"
        try:
            found = lm_resume_dir(a, parent)  # the run that --resume continues
        except UserError:
            found = None
        state, folder = _find_state(parent, prefix, resume_signature(a), f"model_{a.max_iters}.pt", a.max_iters,
                                    found, _final_model(a, a.env, a.model_type))
        return _with_note(Found(state, folder, run_lock_path("lm_cotraining/experiment.py", a),
                                target=f"{parent / prefix}<id> (these flags)"))
    if name == "experiment_multi.py":
        from decision_transformer.multi_run import check_multi_args, multi_parser, resume_signature as multi_signature

        from decision_transformer.run import resumable_run

        a = _parse(multi_parser(), name, argv, check_multi_args)
        if not a.outdir:
            return Found("new")
        parent, prefix = Path(a.outdir) / "multi", f"gym-experiment-multi-{a.dataset}-"
        if a.eval_only or a.num_steps_per_iter <= 0:   # keeps no training state: finished = every iteration logged
            from decision_transformer.checkpoint import find_run

            done = find_run(parent, prefix, multi_signature(a), require="metrics.jsonl")
            if done is not None and logged_iterations(done / "metrics.jsonl") >= a.max_iters:
                return Found("done", done, target=f"{parent / prefix}<id> (these flags)")
            return Found("new")
        try:
            found = resumable_run(parent, prefix, multi_signature(a))  # the run that --resume continues
        except UserError:
            found = None
        state, folder = _find_state(parent, prefix, multi_signature(a), None, a.max_iters, found,
                                    _final_model(a, "multi", "dt"))
        return _with_note(Found(state, folder, run_lock_path(name, a), target=f"{parent / prefix}<id> (these flags)"))
    if name != "experiment.py" or Path(program).resolve() != (ROOT / "experiment.py").resolve():
        _check_with_parser(program, argv)
        return Found("new")
    from decision_transformer.checkpoint import run_dir_name
    from decision_transformer.cli import experiment_parser
    from decision_transformer.run import recorded_config, resumable_run, resume_mismatches

    a = _parse(experiment_parser(), name, argv, lambda a: check_run_flags(a, EXPERIMENT))
    if not a.outdir:
        return Found("new")
    run_dir = Path(a.outdir) / run_dir_name(_model_name(a), a.dataset, a.env, a.seed, a.K, a.remove_grad_clip,
                                            a.pretrained_block)
    final = _final_model(a, a.env, a.model_type)
    done_file = f"model_{a.max_iters}.pt"
    if a.pretrained_models:  # merge runs: {run}_{exp_id}, found by their flags as --resume finds them
        prefix, signature = f"{run_dir.name}_", resume_signature(a)
        try:
            resumable = resumable_run(run_dir.parent, prefix, signature, "merge run")
        except UserError:
            resumable = None
        state, folder = _find_state(run_dir.parent, prefix, signature, done_file, a.max_iters, resumable, final=final)
        found = Found(state, folder, run_lock_path(name, a), target=f"{run_dir}_<id> (these flags)")
    else:
        if (run_dir / TRAIN_STATE).is_file():
            state = _state_of(run_dir, done_file, a.max_iters, final)
        else:  # also a finished run that wrote no training state (made before they were written)
            state = "done" if (run_dir / done_file).is_file() else "new"
        found = Found(state, run_dir if state != "new" else None, run_lock_path(name, a), target=str(run_dir))
    if found.state in ("done", "partial"):  # a folder of a run made with other flags is not this run
        differ = resume_mismatches(a, recorded_config(found.folder) or {})
        if differ:
            found.state = "mismatch"
            found.note = (f"{found.folder} holds a run made with other flags: {'; '.join(differ)}; move it away (or "
                          f"give this grid another --outdir) to run this one")
    return _with_note(found)


class _Parsed(BaseException):
    """Raised by ``_check_with_parser``'s stand-ins for argparse once the flags are parsed."""


_PROGRAMS: dict[str, dict] = {}


def _own_script(path: Path) -> bool:
    """Whether ``path`` is built as the project's scripts are (read as text, nothing of it run): a ``cli_entry``
    ``main(argv=None)`` called only under ``if __name__ == "__main__":``, so that its top level only imports and
    defines, and its ``main`` parses its flags first."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return all(part in text for part in ("@cli_entry\ndef main(argv=None)", 'if __name__ == "__main__":'))


def _check_with_parser(program: str, argv: list[str]):
    """The flags ``argv`` of one of the project's other scripts (``precompute_fisher.py``, a data or analysis script:
    ``_own_script``), checked by its own parser: its ``main(argv)`` runs until its parser has parsed them and is
    stopped there (nothing else of it runs). A flag the parser rejects, or any error before, is a ``UserError`` naming
    the program. A script of another make (a user's own) is not run here: its flags go unchecked."""
    import io
    import runpy
    import signal

    if not _own_script(Path(program)):
        return
    rel = os.path.relpath(program, ROOT)
    real_args, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = 0

    def parse_known_args(self, args=None, namespace=None):
        """The parse; stopped after the outermost one (one a script calls itself, not a sub-parser's)."""
        nonlocal depth
        depth += 1
        try:
            result = real_known(self, args, namespace)
        finally:
            depth -= 1
        if depth == 0:
            raise _Parsed
        return result

    def parse_args(self, args=None, namespace=None):
        """The parse, with its check of unknown flags; then stopped."""
        nonlocal depth
        depth += 1
        try:
            real_args(self, args, namespace)
        finally:
            depth -= 1
        raise _Parsed

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    err = io.StringIO()
    argv0, sys.argv[0] = sys.argv[0], program   # (a parser's default prog)
    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known_args
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if program not in _PROGRAMS:   # its top level (imports, definitions) once; not its ``__main__`` block
                _PROGRAMS[program] = runpy.run_path(program, run_name="__sweep_check__")
            main = _PROGRAMS[program].get("main")
            if not callable(main):
                raise UserError(f"{rel}: it has no main(argv) function to run")
            main(list(argv))
    except _Parsed:
        return
    except SystemExit as e:   # the parser's error (or --help: exit 0)
        if e.code not in (0, None):
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            raise UserError(lines[-1].removeprefix("error: ") if lines else f"{rel}: its parser exited {e.code}") \
                from None
        return
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the script's own failure: that point cannot run either
        raise UserError(f"{rel}: its flags could not be checked ({type(e).__name__}: {first_line(e)})") from None
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = real_args, real_known
        sys.argv[0] = argv0
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    raise UserError(f"{rel}: its main(argv) returned without parsing flags; the launcher cannot check them")


def logged_iterations(path: Path) -> int:
    """The highest ``iteration`` a ``metrics.jsonl`` logs (0 when none can be read; a line cut short is skipped)."""
    import json

    top = 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        it = row.get("iteration") if isinstance(row, dict) else None
        if isinstance(it, int) and not isinstance(it, bool):
            top = max(top, it)
    return top


def _with_note(found: Found) -> Found:
    """A damaged run's note: its training state and why it cannot be read."""
    if found.state == "damaged" and not found.note:
        from decision_transformer.run import TRAIN_STATE

        state_file = found.folder / TRAIN_STATE
        found.note = f"{state_file}: {state_iteration(state_file)}; move it away to start that run over"
    return found


def _parse(parser, prog: str, argv: list[str], check=None):
    """``argv`` parsed as the run's program does; a flag it rejects, by its parser or by ``check(args)`` (the
    program's own checks of its flags, their warnings silenced), is a ``UserError`` naming the program."""
    import contextlib
    import io

    def error(message):
        """Refuse the flags with one ``UserError`` naming the program (instead of argparse's exit)."""
        raise UserError(f"{prog}: {message} (see {prog} --help)")

    parser.prog = prog
    parser.error = error
    args = parser.parse_args(argv)
    if check is not None:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                check(args)
        except UserError as e:
            raise UserError(f"{prog}: {e}") from None
    return args


@dataclass
class Run:
    """One point of a grid: its ``params``, the program's flags ``argv`` (without ``--resume``), the full command
    (with ``--resume`` when the run is resumed) and what ``inspect_run`` found."""
    params: dict
    argv: list[str]
    cmd: list[str]
    found: Found

    @property
    def state(self) -> str:
        """What ``inspect_run`` found the run to be (a key of ``STATES``)."""
        return self.found.state


def plan(spec: dict, extra: list[str]) -> list[tuple[str, list[str]]]:
    """(state, full command) per run of the grid, ``extra`` flags appended to every run."""
    return [(r.state, r.cmd) for r in plan_runs(spec, extra)]


def plan_runs(spec: dict, extra: list[str]) -> list[Run]:
    """The grid's runs with their states, ``extra`` flags appended to every run. A point whose flags its program
    rejects is ``invalid`` (the others still run); a grid all of whose points are invalid, or two of whose points are
    one and the same run (the same run folder), is refused."""
    program = str(ROOT / spec["program"])
    out: list[Run] = []
    lm_found: dict[str, str | None] = {}
    owners: dict[Path, int] = {}
    for i, params in enumerate(expand(spec)):
        # no shell reads these: a ~ in a grid value or in --extra is the home folder here, as in the run it starts
        argv = expand_home(to_argv(params) + extra, words=True)
        try:
            found = inspect_run(program, argv)
        except UserError as e:
            found = Found("invalid", note=str(e))
        if found.lock is not None:
            key = found.lock.resolve()
            if key in owners:
                j = owners[key]
                raise UserError(f"grid {spec.get('name', spec['program'])}: runs {j + 1} and {i + 1} "
                                f"({_differ(out[j].params, params)}) are one and the same run, {found.target}: "
                                f"each would skip, resume or replace the other; make them differ in a flag that "
                                f"names the run folder, or give them different --outdir values")
            owners[key] = i
            if found.state in ("new", "partial"):
                holder = _lock_holder(found.lock)
                if holder is not None:
                    found.state, found.note = "running", f"{found.target}: {holder}"
        run_argv = argv + ["--resume"] if found.state == "partial" else argv
        lm = _flag_value(run_argv, ("--pretrained_lm", "-plm"))
        if found.state in ("new", "partial") and lm:
            if lm not in lm_found:
                lm_found[lm] = _lm_problem(lm)
            if lm_found[lm]:
                found.state, found.note = "blocked", f"{lm}: {lm_found[lm]}"
        out.append(Run(params, argv, [sys.executable, program, *run_argv], found))
    if all(r.state == "invalid" for r in out):  # nothing of it can run: the error of the grid
        raise UserError(out[0].found.note + (f" (in each of the grid's {len(out)} runs)" if len(out) > 1 else ""))
    return out


def disk_lines(runs: list[Run]) -> list[str]:
    """The plan's disk estimate (``disk_estimate.summary``) of the runs to start or resume: those of the three
    training scripts sized from their flags; others named as not estimated."""
    from decision_transformer import disk_estimate
    from decision_transformer.cli import experiment_parser
    from decision_transformer.cli_lm import lm_cotraining_parser
    from decision_transformer.multi_run import multi_parser

    estimates, unsized, lms = [], [], {}
    for r in runs:
        if r.state not in ("new", "partial"):
            continue
        program = Path(r.cmd[1])
        lm_script = program.parent.name == "lm_cotraining" and program.name == "experiment.py"
        multi = program.resolve() == (ROOT / "experiment_multi.py").resolve()
        if not (lm_script or multi) and program.resolve() != (ROOT / "experiment.py").resolve():
            unsized.append(f"{program.name} runs are not sized")
            continue
        done = r.found.folder if r.state == "partial" else None
        try:
            if multi:
                a = _parse(multi_parser(), program.name, r.argv)
                model = disk_estimate.multi_model_size(a, lms)
                models_dir = Path(project_path("models")) / "multi"
                total = disk_estimate.multi_run_bytes(a, done, model) - \
                    disk_estimate.saved_already(a, done, models_dir, "dt")
                folder = Path(a.outdir) if a.outdir else models_dir
            else:
                a = _parse(lm_cotraining_parser() if lm_script else experiment_parser(), program.name, r.argv)
                model = disk_estimate.model_size(a, lms)
                models_dir = Path(project_path("models")) / a.env
                total = disk_estimate.run_bytes(a, done, model, lm_script) - \
                    disk_estimate.saved_already(a, done, models_dir, a.model_type)
                folder = disk_estimate.folder_of(a, lm_script) or models_dir
        except (UserError, ValueError, OSError) as e:   # an LM not here yet, a missing model file, an architecture
            unsized.append(first_line(e))                # the run itself would refuse
            continue
        except Exception as e:   # (a bug in the estimate): the plan, and the launch, go on without it
            unsized.append(f"{program.name}: {type(e).__name__}: {first_line(e)}")
            continue
        estimates.append(disk_estimate.RunDisk(max(total, 0), model.file, folder))
    return disk_estimate.summary(estimates, unsized)


def _differ(a: dict, b: dict) -> str:
    """The flags in which two grid points differ, in words."""
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    return ", ".join(f"--{k} {a.get(k)!r} / {b.get(k)!r}" for k in keys) or "the same flags"


def _argv_key(argv: list[str]) -> str:
    """A short hash of a run's flags."""
    import hashlib

    return hashlib.sha1("\0".join(argv).encode()).hexdigest()[:8]


def _run_key(run: Run) -> str:
    """What names a run's log: its lock file (the run folder it writes to) or, without one, its flags."""
    import hashlib
    import json

    text = str(run.found.lock.resolve()) if run.found.lock is not None else json.dumps(run.params, sort_keys=True,
                                                                                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# ---- locks: one launcher per run -------------------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None


def _take_lock(path: Path) -> tuple[bool, int | None]:
    """(taken, fd): an exclusive lock on ``path`` (created, with its folders), held while ``fd`` is open in this
    process or in a run it is passed to; (False, None) when another process holds it; (True, None) where no lock can
    be taken (no ``fcntl``, a filesystem without ``flock``: with a warning, or the file cannot be made: the run
    itself then reports the folder's problem)."""
    if fcntl is None:
        return True, None
    try:
        fd = open_lock(path)
    except OSError as e:
        if path.parent.is_dir() and os.access(path.parent, os.W_OK):
            print(f"warning: cannot open the lock {path} ({e.strerror or e}); nothing stops a second process "
                  f"from training this run at the same time", file=sys.stderr)
        return True, None   # (a folder that cannot be written: the run itself reports it)
    for attempt in range(5):  # another process's look (``_lock_holder``) holds it for an instant
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:  # held
            time.sleep(0.05)
        except OSError as e:  # a filesystem without flock (some network and FUSE mounts): run unlocked
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror or e}); nothing stops a second process from training "
                  f"this run at the same time", file=sys.stderr)
            return True, None
    else:
        os.close(fd)
        return False, None
    try:  # who holds it, for the message of another process
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    except OSError:
        pass
    return True, fd


def _lock_holder(path: Path) -> str | None:
    """Who holds the lock ``path`` (in words), or None when nobody does."""
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held (any other error: a filesystem without flock, where nothing is held)
        try:
            pid, _, since = os.read(fd, 200).decode(errors="replace").strip().partition(" ")
        except OSError:
            pid, since = "", ""
        return (f"another process (pid {pid}, since {since}) holds {path}" if pid.isdigit() else
                f"another process holds {path}")
    except OSError:
        return None
    finally:
        os.close(fd)  # a lock taken here is released with it
    return None


def _flag_value(argv: list[str], names) -> str | None:
    """The last value given to one of the flag ``names`` in ``argv`` (``--flag value`` or ``--flag=value``)."""
    value = None
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.split("=", 1)[0] in names and "=" in a:
            value = a.split("=", 1)[1]
    return value


def _lm_problem(name: str) -> str | None:
    """Why the language model ``name`` cannot be found here (its one-line error), or None when it can, or when it is
    not here but the Hugging Face Hub could give it: planning downloads nothing, the run itself does."""
    from decision_transformer.models.pretrained import WouldDownload, locate_lm

    try:
        locate_lm(name, download=False)
    except WouldDownload:
        return None
    except UserError as e:
        return str(e)
    return None


def core_sets(n_slots: int) -> list[list[int]] | None:
    """This process's CPU cores split into ``n_slots`` contiguous sets, one per slot; None (no pinning) when there are
    fewer cores than slots."""
    cores = available_cpus()
    if n_slots < 2 or len(cores) < n_slots:
        return None
    k, extra = divmod(len(cores), n_slots)
    out, start = [], 0
    for i in range(n_slots):
        size = k + (i < extra)
        out.append(cores[start:start + size])
        start += size
    return out


def _death_signal():
    """Linux's ``prctl``, to have a run signalled when its launcher dies; None elsewhere. Looked up before the fork:
    the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _child_setup(cores: list[int] | None):
    """What a run's process does before it starts: SIGINT back to its default (a launcher started in the background
    by a non-interactive shell ignores SIGINT, and its runs would inherit that and never stop on the launcher's
    SIGINT), a SIGINT when the launcher dies (Linux; also when killed with SIGKILL: the run stops as on Ctrl-C
    instead of training on unwatched), and its own cores when pinned."""
    import signal

    prctl, launcher = _death_signal(), os.getpid()

    def setup():
        """In the run's process before it starts: SIGINT back to its default, SIGINT when the launcher dies
        (Linux), and its own ``cores`` when pinned."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != launcher:  # the launcher died before that: stop now
                os.kill(os.getpid(), signal.SIGINT)
        if cores:
            os.sched_setaffinity(0, cores)
    return setup


def new_report() -> dict:
    """What ``launch`` did, by run name: done, failed ((name, exit code, log)), running elsewhere (lock held by
    another process), skipped ((name, state) found when its lock was taken), stopped and not started (interrupted)."""
    return {"done": [], "failed": [], "elsewhere": [], "skipped": [], "stopped": [], "not_started": []}


def launch(commands: list[list[str]], slots: list[str | None], log_dir: Path, names: list[str] | None = None,
           grid: str | None = None, pin: bool = True, locks: list[Path | None] | None = None, recheck=None,
           report: dict | None = None) -> int:
    """Run commands with at most one per slot (a GPU id, or None for a CPU process); returns the number failed.

    With ``pin`` (and at least as many cores as slots) each slot's runs are pinned to their own set of cores, so that
    concurrent runs do not share cores: their ``--threads auto`` and ``--eval_workers auto`` see that set.

    ``locks``: a lock file per command (or None). A command starts only once its lock is taken, and the lock is held
    until it ends, by the launcher and by the command (its file descriptor is passed on, so a run whose launcher was
    killed keeps it); a command whose lock another process holds is skipped as running elsewhere. ``recheck(i)``,
    called once the lock is taken, gives (state, command) again: only ``new`` and ``partial`` runs are started (the
    state may have changed since the plan, by another launcher). ``report`` (see ``new_report``) collects what
    happened.

    Each command appends to ``log_dir/{name}.log`` (``names``: by default ``run_{i}``), so a resumed run's log follows
    the interrupted one; its header line names the ``grid`` file when given. Ctrl-C or SIGTERM stops the running
    commands (SIGINT, then SIGKILL after 30 s, or at once on a second Ctrl-C or SIGTERM): their last finished
    iterations stay saved, and the same command resumes them. A run also gets SIGINT when the launcher dies (Linux)."""
    import signal

    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:   # (before any run starts)
        raise UserError(f"cannot make the runs' log folder {log_dir} (--log_dir): {write_problem(log_dir, e)}") \
            from None
    names = names or [f"run_{i:03d}" for i in range(len(commands))]
    report = new_report() if report is None else report
    pending = list(enumerate(commands))
    running: dict[int, tuple] = {}
    free = list(range(len(slots)))
    failed = 0
    pinned = core_sets(len(slots)) if pin else None

    def on_term(signum, frame):
        """SIGTERM stops the launcher as Ctrl-C does."""
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    # a launcher started in the background by a non-interactive shell ignores SIGINT, while its runs do not (see
    # ``_child_setup``): a Ctrl-C to the process group would stop the runs and the launcher would start the next ones
    sigint = _sigint_taken()
    sigint.__enter__()
    starting = None   # the run being started: stopped now, it counts as not started
    try:
        while pending or running:
            while pending and free:
                i, cmd = starting = pending.pop(0)
                lock_fd = None
                if locks is not None and locks[i] is not None:
                    taken, lock_fd = _take_lock(locks[i])
                    if not taken:
                        print(f"[skip {names[i]}] running elsewhere: {_lock_holder(locks[i]) or locks[i]}",
                              flush=True)
                        report["elsewhere"].append(names[i])
                        starting = None
                        continue
                if recheck is not None:
                    try:
                        state, cmd = recheck(i)
                    except BaseException:
                        _unlock(lock_fd)
                        raise
                    if state not in ("new", "partial"):
                        _unlock(lock_fd)
                        print(f"[skip {names[i]}] now {state} (another launcher or process got to it first)", flush=True)
                        report["skipped"].append((names[i], state))
                        starting = None
                        continue
                slot = free.pop(0)
                env = dict(os.environ)
                env.pop(LOCK_FD_ENV, None)
                if lock_fd is not None:
                    env[LOCK_FD_ENV] = str(lock_fd)  # the run holds its lock through the launcher's descriptor
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                elif "OMP_NUM_THREADS" not in env:  # concurrent CPU runs: share the cores instead of oversubscribing
                    env["OMP_NUM_THREADS"] = str(max(1, len(pinned[slot]) if pinned else
                                                     len(available_cpus()) // len(slots)))
                log_path, log = log_dir / f"{names[i]}.log", None
                mark = f"[grid {grid}] " if grid else ""
                try:
                    log = open(log_path, "a")
                    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {mark}{shlex.join(cmd)}\n")
                    log.flush()
                except OSError as e:   # (a full disk: the runs are stopped below, as on Ctrl-C)
                    if log is not None:
                        with contextlib.suppress(OSError):
                            log.close()
                    _unlock(lock_fd)
                    raise _LogUnwritable(f"cannot write {log_path}: {write_problem(log_path, e)}") from None
                where = slots[slot] if slots[slot] is not None else slot
                print(f"[start {names[i]}] slot {where}: {shlex.join(cmd[1:])}", flush=True)
                try:
                    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=_child_setup(pinned[slot] if pinned else None),
                                            pass_fds=() if lock_fd is None else (lock_fd,))
                except BaseException:
                    log.close()
                    _unlock(lock_fd)
                    raise
                running[slot] = (names[i], proc, log, lock_fd)
                starting = None
            starting = None
            time.sleep(0.2)
            for slot, (name, proc, log, lock_fd) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    _unlock(lock_fd)
                    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                    failed += proc.returncode != 0
                    if proc.returncode == 0:
                        report["done"].append(name)
                    else:
                        report["failed"].append((name, proc.returncode, log.name))
                    print(f"[end {name}] {status}", flush=True)
                    del running[slot]
                    free.append(slot)
                    if proc.returncode != 0 and _disk_full(Path(log.name)):
                        # (its output, and so its error line, went to a log on a full disk: the next runs' would too)
                        raise _LogUnwritable(f"cannot write {log.name}: no space left on the device (run {name} "
                                             f"stopped with exit {proc.returncode}, its log cut short)")
    except (KeyboardInterrupt, _LogUnwritable) as e:
        if starting is not None and all(name != names[starting[0]] for name, *_ in running.values()):
            pending.insert(0, starting)
        report["stopped"] += [name for name, *_ in running.values()]
        report["not_started"] += [names[i] for i, _ in pending]
        _stop(running)
        what = (f"stopped {len(running)} running and {len(pending)} waiting runs; the same command "
                f"{'resumes' if running else 'starts'} them")   # (none had started: nothing to resume)
        if isinstance(e, _LogUnwritable):
            raise UserError(f"{e}; {what}") from None
        raise Interrupted(f"interrupted: {what}") from None
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
        sigint.__exit__(None, None, None)
    return failed


def _disk_full(path: Path) -> bool:
    """Whether the file system of ``path`` has under 1 MiB free (as ``errors.write_problem`` judges a full disk)."""
    import shutil

    try:
        return shutil.disk_usage(path.parent).free < 2 ** 20
    except OSError:
        return False


class _LogUnwritable(UserError):
    """A run's log that cannot be written (a full disk): the launcher stops, as on Ctrl-C, naming the log."""


def _unlock(fd: int | None):
    if fd is not None:
        os.close(fd)  # releases the lock (the launcher's last holder of it once its run has ended)


def _log_prefix(spec: dict, log_dir: Path) -> str:
    """The grid's logs are ``{name}_{key}.log`` (``key``: a hash of the run's folder, see ``_run_key``);
    ``{name}-{hash of the grid file's path}_{key}.log`` when ``log_dir`` already holds logs of another grid file of
    the same name (their header names the file), so that two grids sharing a ``--log_dir`` never write into each
    other's logs."""
    import glob
    import hashlib
    import re

    name, mark = spec["name"], f"[grid {spec['path']}] "
    for log in sorted(log_dir.glob(f"{glob.escape(name)}_*.log")):
        if not re.fullmatch(re.escape(name) + r"_(\d{3,}|[0-9a-f]{8})\.log", log.name):
            continue
        try:
            with open(log, errors="replace") as f:
                first = f.readline()
        except OSError:
            continue
        if " [grid " in first and mark not in first:
            return f"{name}-{hashlib.sha1(spec['path'].encode()).hexdigest()[:8]}"
    return name


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop(running: dict, grace_s: float = 30.0):
    """SIGINT to each running command (it stops as on Ctrl-C), SIGKILL to any still alive after ``grace_s``, or at
    once on a second Ctrl-C or SIGTERM: the launcher never exits with one of its commands still running."""
    import signal

    procs = list(running.values())
    for _, proc, *_ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    try:
        for _, proc, *_ in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # a second interrupt: no more waiting
        print("[interrupted again: killing the running commands]", flush=True)
    for name, proc, log, *lock in procs:
        while True:
            try:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                break
            except KeyboardInterrupt:  # a further interrupt while killing: kill and wait all the same
                continue
        log.close()
        _unlock(lock[0] if lock else None)
        print(f"[stopped {name}]", flush=True)


def export_wandb(spec: dict, out_dir: Path, check=None) -> list[Path]:
    """WandB grid-sweep files. A grid value ``null`` cannot be expressed in one sweep: the grid is split per value
    of that parameter (one sweep without the flag, one with the other values); a parameter whose only value is
    ``null`` is left out. A WandB agent passes a value as one ``--flag=value`` argument: a one-element list is
    exported as its element, and a grid with a list of several values (a flag taking several) is refused. ``check``:
    called once the values are known to export, before anything is written."""
    import yaml

    name = spec["name"]

    def value(k, v):
        """A grid value as one WandB argument: a one-element list as its element; a longer list is refused."""
        if isinstance(v, (list, tuple)):
            if len(v) != 1:
                raise UserError(f"grid {name}: {k} = {list(v)!r} cannot be exported: a WandB agent passes a list as "
                                f"one argument (--{k}={list(v)!r}); run this grid with `sweep run` instead")
            return v[0]
        return v

    fixed = {k: value(k, v) for k, v in spec["fixed"].items() if v is not None}
    grid = {k: [value(k, x) for x in v] for k, v in spec["grid"].items() if any(x is not None for x in v)}
    nullable = [k for k, v in grid.items() if None in v]
    if len(nullable) > 1:
        raise UserError(f"grid {name}: only one parameter may contain null, found {', '.join(nullable)}")
    variants = [("", grid)]
    if nullable:
        k = nullable[0]
        rest = {kk: vv for kk, vv in grid.items() if kk != k}
        variants = [(f"-no-{k}", rest), (f"-{k}", {**rest, k: [v for v in grid[k] if v is not None]})]
    if check is not None:
        check()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, variant in variants:
        params = {k: {"value": v} for k, v in fixed.items() if k not in spec["grid"]}  # a grid value wins
        params.update({k: {"values": v} for k, v in variant.items()})
        sweep = {"name": name + suffix, "description": spec.get("description", ""),
                 "program": spec["program"], "method": "grid", "parameters": params,
                 "command": ["${env}", "${interpreter}", "${program}", "${args_no_boolean_flags}"]}
        path = out_dir / f"{name}{suffix}.yaml"
        text = yaml.safe_dump(sweep, sort_keys=False)   # (a complete file or none: a full disk is one line)
        atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
        paths.append(path)
    return paths


def check_gpus(ids: list[str]):
    """The ``--gpus`` ids against this machine's CUDA devices (numeric ids against the count, where the launcher's own
    ``CUDA_VISIBLE_DEVICES`` does not renumber them), before any run starts."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise UserError(f"--gpus {','.join(ids)}: torch sees no CUDA device on this machine; use --procs N to run the "
                        f"grid on the CPU")
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        missing = [g for g in ids if g.isdigit() and int(g) >= n]
        if missing:
            raise UserError(f"--gpus {','.join(ids)}: no GPU {', '.join(dict.fromkeys(missing))} here; this machine "
                            f"has {n} (ids 0-{n - 1})")


def _gpu_slots(text: str) -> list[str]:
    """``--gpus 0,1`` -> ["0", "1"]: CUDA device indices (or GPU-/MIG- UUIDs), a repeated id runs two at a time."""
    ids = [g.strip() for g in text.split(",")]
    for g in ids:
        if not (g.isdigit() or g.startswith(("GPU-", "MIG-"))):
            raise UserError(f"--gpus {text!r}: expected comma-separated GPU ids such as 0,1,2,3; {g!r} is not one")
    return ids


def _join_extra(argv: list[str]) -> list[str]:
    """``--extra VALUE`` as ``--extra=VALUE``: argparse takes a lone flag such as ``--extra "--max_iters=3"`` or
    ``--extra --save_model`` for an option of its own and rejects it, while the value is meant for the runs."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if len(a) > 3 and "--extra".startswith(a) and i + 1 < len(argv):  # argparse's prefixes too (--ext)
            out.append(f"--extra={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


@contextlib.contextmanager
def _sigint_taken():
    """SIGINT raises KeyboardInterrupt for the block, also in a launcher started in the background by a
    non-interactive shell, which ignores it: planning a grid takes seconds (it inspects every run folder), and such a
    launcher ignored a SIGINT then and went on to run the whole grid."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler) \
        if _main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


@cli_entry
def main(argv=None):
    """``python -m decision_transformer.sweep``: ``list`` the bundled grids, ``export`` one as WandB sweep files,
    or ``run`` one (the plan is printed first); runs failed or not started end in one ``UserError``."""
    with _sigint_taken():
        return _main(argv)


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m decision_transformer.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the bundled grids")
    r = sub.add_parser("run", help="run a grid locally")
    r.add_argument("grid")
    r.add_argument("--gpus", default=None, help="comma-separated GPU ids: one run per GPU at a time")
    r.add_argument("--procs", type=positive_int, default=1, help="parallel CPU processes when --gpus is not given")
    r.add_argument("--no_pin", action="store_true",
                   help="do not pin each slot's runs to their own set of CPU cores (pinned when there are enough)")
    r.add_argument("--log_dir", default="sweep_logs",
                   help="where each run's output goes, one log per grid point ({grid}_{hash of its run "
                        "folder}.log; default: sweep_logs in the working folder)")
    r.add_argument("--dry_run", action="store_true", help="print the plan only")
    r.add_argument("--extra", default="", help="flags appended to every run, e.g. \"--max_iters 1 --device cpu\"")
    e = sub.add_parser("export", help="write WandB sweep files")
    e.add_argument("grid")
    e.add_argument("--out", default="sweeps")
    a = p.parse_args(_join_extra(sys.argv[1:] if argv is None else list(argv)))
    if a.cmd == "list":
        for path in sorted(GRID_DIR.glob("*.yaml")):
            spec = load_grid(str(path))
            print(f"{path.stem:24s} {len(expand(spec)):4d} runs  {spec.get('description', '')}")
        return 0
    spec = load_grid(a.grid, project_paths=a.cmd != "export")
    if a.cmd == "export":
        program = str(ROOT / spec["program"])
        for i, params in enumerate(expand(spec)):   # the flags each point passes, checked by the program's parser
            try:
                _check_with_parser(program, to_argv(params))
            except UserError as e:
                raise UserError(f"grid {spec['name']}: point {i + 1} ({shlex.join(to_argv(params))}): {e}") from None
        # two points that are one run (the same folder) are refused, as by `run`: a sweep would train it twice
        for path in export_wandb(spec, Path(a.out), check=lambda: plan_runs(spec, [])):
            print(f"wrote {path} (start it with `wandb sweep {shlex.quote(str(path))}` and `wandb agent ...`)")
        return 0
    try:
        extra = shlex.split(a.extra)
    except ValueError as e:
        raise UserError(f"--extra {a.extra!r}: {e} (it is split as a shell command line)") from None
    resume = next((x for x in extra if x.split("=", 1)[0] in ("--resume", "--resum", "--resu")), None)
    if resume is not None:   # (every run then failed: a new one has nothing to resume)
        raise UserError(f"--extra {a.extra!r}: leave {resume} out: the launcher resumes each run that stopped part "
                        f"way by itself, and starts the others anew")
    if a.gpus is None and a.procs > MAX_PROCS:
        raise UserError(f"--procs {a.procs} is too large (at most {MAX_PROCS} processes at a time)")
    slots = _gpu_slots(a.gpus) if a.gpus is not None else [None] * a.procs
    if a.gpus is not None and not a.dry_run:  # before the plan: a machine without those GPUs is one line
        check_gpus(slots)
    runs = plan_runs(spec, extra)
    prefix = _log_prefix(spec, Path(a.log_dir))
    names = [f"{prefix}_{_run_key(r)}" for r in runs]
    for r in runs:
        print(f"{r.state:8s} {shlex.join(r.cmd)}")
    count = {state: sum(r.state == state for r in runs) for state in STATES}
    print(f"{len(runs)} runs: {count['done']} finished (skipped), {count['partial']} to resume, {count['new']} new"
          + "".join(f", {count[state]} {STATES[state]}" for state in STATES
                    if state not in ("done", "partial", "new") and count[state]))
    if count["blocked"]:
        print(f"blocked: {'; '.join(sorted({r.found.note for r in runs if r.state == 'blocked'}))}")
    for r in runs:
        if r.state in ("damaged", "mismatch", "running"):
            print(f"{r.state}: {r.found.note}")
        elif r.state == "invalid":  # named by its grid values
            print(f"invalid: {shlex.join(to_argv({k: r.params[k] for k in spec['grid']})) or shlex.join(r.argv)}: "
                  f"{r.found.note}")
    for line in disk_lines(runs):   # last: what the runs to start or resume will write
        print(line)
    if a.dry_run:  # exits as the real run would for runs it could not start
        errors = _not_started(count)
        if errors:
            raise UserError("; ".join(errors))
        return 0
    todo = [i for i, r in enumerate(runs) if r.state in ("new", "partial")]
    report = new_report()

    def recheck(k: int) -> tuple[str, list[str]]:
        """The state of the k-th run to start, again, once its lock is taken."""
        r = runs[todo[k]]
        try:
            state = inspect_run(r.cmd[1], r.argv).state
        except UserError:
            return "invalid", r.cmd
        return state, [*r.cmd[:2], *r.argv, *(["--resume"] if state == "partial" else [])]

    try:
        # a run that writes no run folder (a data, Fisher or analysis script; --outdir '') is locked by its log's
        # name and all its flags (--extra's too): two launchers sharing a --log_dir never start it twice at once
        locks = [runs[i].found.lock or Path(a.log_dir) / f".{names[i]}-{_argv_key(runs[i].argv)}.lock" for i in todo]
        failed = launch([runs[i].cmd for i in todo], slots, Path(a.log_dir), [names[i] for i in todo],
                        grid=spec["path"], pin=not a.no_pin, locks=locks,
                        recheck=recheck, report=report) if todo else 0
    finally:
        print(_summary(runs, report), flush=True)
    errors = []
    if failed:
        errors.append(f"{failed} of {len(todo)} runs failed; logs in {a.log_dir}")
    errors += _not_started({state: count[state] + sum(s == state for _, s in report["skipped"])
                            for state in NOT_STARTED})
    if errors:
        raise UserError("; ".join(errors))
    return 0


#: The states of runs a launcher does not start, and why.
NOT_STARTED = {"blocked": "their language model is not available here",
               "damaged": "their training state cannot be read",
               "mismatch": "their run folder holds a run made with other flags",
               "invalid": "their flags are invalid"}


def _not_started(count: dict) -> list[str]:
    return [f"{count[state]} runs not started: {why} (see above)" for state, why in NOT_STARTED.items()
            if count.get(state)]


def _summary(runs: list[Run], report: dict) -> str:
    """One line at the launcher's exit: what happened to each of the grid's runs."""
    skipped = dict(report["skipped"])
    states = [r.state for r in runs] + list(skipped.values())
    finished = sum(s == "done" for s in states)
    parts = [f"{len(report['done'])} done", f"{len(report['failed'])} failed"
             + (f" ({', '.join(f'{n}: exit {c}' for n, c, _ in report['failed'])})" if report["failed"] else ""),
             f"{finished} skipped (finished before)"]
    elsewhere = sum(s == "running" for s in states) + len(report["elsewhere"])
    if elsewhere:
        parts.append(f"{elsewhere} running elsewhere")
    for state, words in (("invalid", "invalid"), ("blocked", "blocked"), ("damaged", "damaged"),
                         ("mismatch", "made with other flags")):
        n = sum(s == state for s in states)
        if n:
            parts.append(f"{n} {words}")
    if report["stopped"] or report["not_started"]:
        parts.append(f"{len(report['stopped'])} stopped and {len(report['not_started'])} not started (the launcher was stopped)")
    return f"summary of {len(runs)} runs: " + ", ".join(parts)


if __name__ == "__main__":
    main()
