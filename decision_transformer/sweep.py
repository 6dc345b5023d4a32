"""The papers' experiment grids: list them, run them locally over GPUs or processes, export WandB sweeps.

    python -m decision_transformer.sweep list
    python -m decision_transformer.sweep run pretraining_table1 --gpus 0,1,2,3      # one run per GPU at a time
    python -m decision_transformer.sweep run block_replacement --procs 2 --dry_run
    python -m decision_transformer.sweep export pretraining_k1 --out sweeps/        # then `wandb sweep FILE`

A grid is a YAML file (``decision_transformer/sweeps/*.yaml`` or any path): ``program``, ``fixed`` flags and ``grid``
lists whose Cartesian product gives the runs; ``null`` leaves a flag out (random initialisation), ``true`` turns a
switch on. ``run`` skips finished runs and resumes (``--resume``) runs that stopped half-way (``experiment.py``,
``lm_cotraining/experiment.py`` and ``experiment_multi.py`` runs); runs whose
``--pretrained_lm`` cannot be found here are listed as blocked, and runs whose training state cannot be read as
damaged; neither is started.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from decision_transformer.cli import positive_int
from decision_transformer.errors import Interrupted, UserError, cli_entry
from decision_transformer.cpu import available_cpus

ROOT = Path(__file__).resolve().parents[1]
GRID_DIR = Path(__file__).resolve().parent / "sweeps"


def load_grid(name: str) -> dict:
    import yaml

    path = Path(name)
    if not path.is_file():
        path = GRID_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRID_DIR.glob("*.yaml")))
        raise UserError(f"unknown grid {name!r}: no file {name} or {path}; known grids: {known}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (UTF-8) file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if (not isinstance(spec, dict) or not isinstance(spec.get("program"), str)
            or not isinstance(spec.get("grid") or {}, dict) or not isinstance(spec.get("fixed") or {}, dict)):
        raise UserError(f"{path}: a grid needs 'program', 'fixed' and 'grid' mappings")
    spec["fixed"] = spec.get("fixed") or {}
    spec["grid"] = spec.get("grid") or {}
    for k, v in spec["grid"].items():
        if not isinstance(v, list):
            raise UserError(f"{path}: grid value of {k!r} must be a list of values, got {v!r} (write [{v}] for one "
                            f"value, or move it to 'fixed')")
        if not v:
            raise UserError(f"{path}: grid value of {k!r} is an empty list (the grid would have no runs)")
    if not (ROOT / spec["program"]).is_file():
        raise UserError(f"{path}: program {spec['program']!r} not found (a path relative to {ROOT})")
    spec["name"] = path.stem
    spec["path"] = str(path.resolve())
    return spec


def expand(spec: dict) -> list[dict]:
    keys = list(spec["grid"])
    combos = itertools.product(*(spec["grid"][k] for k in keys))
    return [{**spec["fixed"], **dict(zip(keys, values))} for values in combos]


def to_argv(params: dict) -> list[str]:
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


def _find_state(parent: Path, prefix: str, signature: dict, done_file: str | None, max_iters: int, found=False):
    """('done' | 'partial' | 'new', folder) for runs kept in ``{parent}/{prefix}{id}`` folders, found by the flags
    they record. The newest such run with a training state is the one ``--resume`` continues (``found``, when given,
    is that run or None): done = it holds ``done_file`` or its training state is at ``max_iters``, partial = not yet.
    Without such a run: done = a run holds ``done_file`` (a run of 0 iterations writes no training state)."""
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
    if done_file is not None and (found / done_file).is_file():
        return "done", found
    it = state_iteration(found / TRAIN_STATE)
    if isinstance(it, str):
        return "damaged", found
    return ("done" if it >= max_iters else "partial"), found


def state_iteration(path: Path) -> int | str:
    """The last finished iteration a training state records, or why it cannot be read (a string)."""
    import torch

    for mmap in (True, False):  # mapped: no need to read a large state; a file that cannot be mapped is read whole
        try:
            st = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - any failure means the run cannot resume from it
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            problem = f"not loadable ({type(e).__name__}{': ' + first[:160] if first else ''})"
            continue
        try:
            return int(st["iteration"])
        except Exception:  # noqa: BLE001
            return "not a training state (no iteration number)"
    return problem


def run_state(program: str, argv: list[str]) -> tuple[str, Path | None]:
    """('done' | 'partial' | 'new', run folder) of a run of ``experiment.py``, ``lm_cotraining/experiment.py`` or
    ``experiment_multi.py``; other programs are always 'new'."""
    from decision_transformer.run import resume_signature

    name = Path(program).name
    if Path(program).parent.name == "lm_cotraining" and name == "experiment.py":
        from decision_transformer.cli_lm import lm_cotraining_parser
        from decision_transformer.run import lm_resume_dir

        a = _parse(lm_cotraining_parser(), "lm_cotraining/experiment.py", argv)
        if a.outdir == "":
            return "new", None
        parent = Path(a.outdir or Path("models") / a.env)
        try:
            found = lm_resume_dir(a, parent)  # the run that --resume continues
        except UserError:
            found = None
        return _find_state(parent, f"dt_gym-experiment-{a.env}-{a.dataset}-", resume_signature(a),
                           f"model_{a.max_iters}.pt", a.max_iters, found)
    if name == "experiment_multi.py":
        from decision_transformer.multi_run import multi_parser, resume_signature as multi_signature

        from decision_transformer.run import resumable_run

        a = _parse(multi_parser(), name, argv)
        if not a.outdir or a.eval_only or a.num_steps_per_iter <= 0:
            return "new", None
        parent, prefix = Path(a.outdir) / "multi", f"gym-experiment-multi-{a.dataset}-"
        try:
            found = resumable_run(parent, prefix, multi_signature(a))  # the run that --resume continues
        except UserError:
            found = None
        return _find_state(parent, prefix, multi_signature(a), None, a.max_iters, found)
    if name != "experiment.py":
        return "new", None
    from decision_transformer.checkpoint import model_name, run_dir_name
    from decision_transformer.cli import experiment_parser, merge_signature

    a = _parse(experiment_parser(), name, argv)
    if not a.outdir:
        return "new", None
    run_dir = Path(a.outdir) / run_dir_name(model_name(a.pretrained_lm, a.pretrained_block), a.dataset, a.env,
                                            a.seed, a.K, a.remove_grad_clip, a.pretrained_block)
    if a.pretrained_models:  # merge runs: {run}_{exp_id}, found by their merge flags
        return _find_state(run_dir.parent, f"{run_dir.name}_", merge_signature(a), f"model_{a.max_iters}.pt",
                           a.max_iters)
    if (run_dir / f"model_{a.max_iters}.pt").is_file():
        return "done", run_dir
    if (run_dir / "train_state.pt").is_file():
        return ("damaged" if isinstance(state_iteration(run_dir / "train_state.pt"), str) else "partial"), run_dir
    return "new", run_dir


def _parse(parser, prog: str, argv: list[str]):
    parser.prog = prog  # a flag it rejects is named as the run's, not the sweep's
    return parser.parse_args(argv)


def plan(spec: dict, extra: list[str]) -> list[tuple[str, list[str]]]:
    """(state, full command) per run of the grid, ``extra`` flags appended to every run."""
    program = str(ROOT / spec["program"])
    out: list = []
    lm_found: dict[str, str | None] = {}
    for params in expand(spec):
        argv = to_argv(params) + extra
        state, _ = run_state(program, argv)
        if state == "partial":
            argv = argv + ["--resume"]
        lm = _flag_value(argv, ("--pretrained_lm", "-plm"))
        if state != "done" and lm:
            if lm not in lm_found:
                lm_found[lm] = _lm_problem(lm)
            if lm_found[lm]:
                state = "blocked"
        out.append((state, [sys.executable, program, *argv]))
    return out


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
    """Why the language model ``name`` cannot be found here (its one-line error), or None when it can."""
    from decision_transformer.models.pretrained import locate_lm

    try:
        locate_lm(name)
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


def _child_setup(cores: list[int] | None):
    """What a run's process does before it starts: SIGINT back to its default (a launcher started in the background
    by a non-interactive shell ignores SIGINT, and its runs would inherit that and never stop on the launcher's
    SIGINT), and its own cores when pinned."""
    import signal

    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if cores:
            os.sched_setaffinity(0, cores)
    return setup


def launch(commands: list[list[str]], slots: list[str | None], log_dir: Path, names: list[str] | None = None,
           grid: str | None = None, pin: bool = True) -> int:
    """Run commands with at most one per slot (a GPU id, or None for a CPU process); returns the number failed.

    With ``pin`` (and at least as many cores as slots) each slot's runs are pinned to their own set of cores, so that
    concurrent runs do not share cores: their ``--threads auto`` and ``--eval_workers auto`` see that set.

    Each command appends to ``log_dir/{name}.log`` (``names``: by default ``run_{i}``), so a resumed run's log follows
    the interrupted one; its header line names the ``grid`` file when given. Ctrl-C or SIGTERM stops the running
    commands (SIGINT, then SIGKILL after 30 s, or at once on a second Ctrl-C or SIGTERM): their last finished
    iterations stay saved, and the same command resumes them."""
    import signal

    log_dir.mkdir(parents=True, exist_ok=True)
    names = names or [f"run_{i:03d}" for i in range(len(commands))]
    pending = list(enumerate(commands))
    running: dict[int, tuple] = {}
    free = list(range(len(slots)))
    failed = 0
    pinned = core_sets(len(slots)) if pin else None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        while pending or running:
            while pending and free:
                slot = free.pop(0)
                i, cmd = pending.pop(0)
                env = dict(os.environ)
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                elif "OMP_NUM_THREADS" not in env:  # concurrent CPU runs: share the cores instead of oversubscribing
                    env["OMP_NUM_THREADS"] = str(max(1, len(pinned[slot]) if pinned else
                                                     len(available_cpus()) // len(slots)))
                log = open(log_dir / f"{names[i]}.log", "a")
                mark = f"[grid {grid}] " if grid else ""
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {mark}{shlex.join(cmd)}\n")
                log.flush()
                where = slots[slot] if slots[slot] is not None else slot
                print(f"[start {names[i]}] slot {where}: {shlex.join(cmd[1:])}", flush=True)
                running[slot] = (names[i], subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                            preexec_fn=_child_setup(pinned[slot] if pinned else None)),
                                 log)
            time.sleep(0.2)
            for slot, (name, proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                    failed += proc.returncode != 0
                    print(f"[end {name}] {status}", flush=True)
                    del running[slot]
                    free.append(slot)
    except KeyboardInterrupt:
        _stop(running)
        raise Interrupted(f"interrupted: stopped {len(running)} running and {len(pending)} waiting runs; the same "
                          f"command resumes them") from None
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
    return failed


def _log_prefix(spec: dict, log_dir: Path) -> str:
    """The grid's logs are ``{name}_{index}.log``; ``{name}-{hash of the grid file's path}_{index}.log`` when
    ``log_dir`` already holds logs of another grid file of the same name (their header names the file), so that
    two grids sharing a ``--log_dir`` never write into each other's logs."""
    import glob
    import hashlib
    import re

    name, mark = spec["name"], f"[grid {spec['path']}] "
    for log in sorted(log_dir.glob(f"{glob.escape(name)}_*.log")):
        if not re.fullmatch(re.escape(name) + r"_\d{3,}\.log", log.name):
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
    for _, proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    try:
        for _, proc, _ in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # a second interrupt: no more waiting
        print("[interrupted again: killing the running commands]", flush=True)
    for name, proc, log in procs:
        while True:
            try:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                break
            except KeyboardInterrupt:  # a further interrupt while killing: kill and wait all the same
                continue
        log.close()
        print(f"[stopped {name}]", flush=True)


def export_wandb(spec: dict, out_dir: Path) -> list[Path]:
    """WandB grid-sweep files. A grid value ``null`` cannot be expressed in one sweep: the grid is split per value
    of that parameter (one sweep without the flag, one with the other values)."""
    import yaml

    nullable = [k for k, v in spec["grid"].items() if None in v]
    if len(nullable) > 1:
        raise UserError(f"grid {spec['name']}: only one parameter may contain null, found {', '.join(nullable)}")
    variants = [("", spec["grid"])]
    if nullable:
        k = nullable[0]
        rest = {kk: vv for kk, vv in spec["grid"].items() if kk != k}
        variants = [(f"-no-{k}", rest), (f"-{k}", {**rest, k: [v for v in spec["grid"][k] if v is not None]})]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, grid in variants:
        params = {k: {"value": v} for k, v in spec["fixed"].items() if v is not None}
        params.update({k: {"values": v} for k, v in grid.items()})
        sweep = {"name": spec["name"] + suffix, "description": spec.get("description", ""),
                 "program": spec["program"], "method": "grid", "parameters": params,
                 "command": ["${env}", "${interpreter}", "${program}", "${args_no_boolean_flags}"]}
        path = out_dir / f"{spec['name']}{suffix}.yaml"
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
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


@cli_entry
def main(argv=None):
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
    r.add_argument("--log_dir", default="sweep_logs")
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
    spec = load_grid(a.grid)
    if a.cmd == "export":
        for path in export_wandb(spec, Path(a.out)):
            print(f"wrote {path} (start it with `wandb sweep {path}` and `wandb agent ...`)")
        return 0
    try:
        extra = shlex.split(a.extra)
    except ValueError as e:
        raise UserError(f"--extra {a.extra!r}: {e} (it is split as a shell command line)") from None
    slots = _gpu_slots(a.gpus) if a.gpus is not None else [None] * a.procs
    runs = plan(spec, extra)
    todo = [(i, cmd) for i, (state, cmd) in enumerate(runs) if state in ("new", "partial")]
    for state, cmd in runs:
        print(f"{state:8s} {shlex.join(cmd)}")
    blocked = [cmd for state, cmd in runs if state == "blocked"]
    damaged = [cmd for state, cmd in runs if state == "damaged"]
    print(f"{len(runs)} runs: {sum(s == 'done' for s, _ in runs)} finished (skipped), "
          f"{sum(s == 'partial' for s, _ in runs)} to resume, {sum(s == 'new' for s, _ in runs)} new"
          + (f", {len(blocked)} blocked (their language model is not available here)" if blocked else "")
          + (f", {len(damaged)} with a damaged training state (not started)" if damaged else ""))
    if blocked:
        lms = sorted({_flag_value(cmd, ("--pretrained_lm", "-plm")) for cmd in blocked})
        print(f"blocked: {'; '.join(f'{lm}: {_lm_problem(lm)}' for lm in lms)}")
    for cmd in damaged:
        from decision_transformer.run import TRAIN_STATE

        state_file = run_state(cmd[1], cmd[2:])[1] / TRAIN_STATE
        print(f"damaged: {state_file}: {state_iteration(state_file)}; move it away to start that run over")
    if a.dry_run:
        return 0
    if a.gpus is not None and todo:
        check_gpus(slots)
    prefix = _log_prefix(spec, Path(a.log_dir))
    failed = launch([cmd for _, cmd in todo], slots, Path(a.log_dir), [f"{prefix}_{i:03d}" for i, _ in todo],
                    grid=spec["path"], pin=not a.no_pin) if todo else 0
    if failed:
        raise UserError(f"{failed} of {len(todo)} runs failed; logs in {a.log_dir}")
    if blocked:
        raise UserError(f"{len(blocked)} runs not started: their language model is not available here (see above)")
    if damaged:
        raise UserError(f"{len(damaged)} runs not started: their training state cannot be read (see above)")
    return 0


if __name__ == "__main__":
    main()
