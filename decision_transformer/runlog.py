"""Run logging: WandB (online, offline or disabled), a local ``metrics.jsonl`` and ``config.json``, progress bars."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from decision_transformer.errors import UserError, write_problem
from decision_transformer.files import atomic_write

#: The values of ``WANDB_MODE`` that wandb accepts.
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def wandb_credentials_present() -> bool:
    """Whether WandB credentials are configured: ``WANDB_API_KEY``, or an api.wandb.ai entry in the
    netrc file (``NETRC`` or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    if hasattr(v, "item") and callable(v.item):
        return _plain(v.item())
    return v


def check_wandb_mode() -> str | None:
    """``WANDB_MODE`` if wandb accepts it (None when unset); else a one-line error. The scripts call it with ``-w``
    before they write anything."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a WandB mode; use one of {', '.join(WANDB_MODES)} or unset it")
    return mode


def new_wandb_id() -> str:
    """A fresh WandB run id (8 lowercase letters and digits, as WandB draws them)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def recorded_wandb_id(run_dir: Path) -> str | None:
    """The WandB run id a run folder records (its ``config.json``, else the config of its training state), or None."""
    from decision_transformer.run import recorded_config

    cfg = recorded_config(run_dir, note=False) if run_dir.is_dir() else None
    value = (cfg or {}).get("wandb_run_id")
    return value if isinstance(value, str) and value else None


def cut_last_line(text: str, lineno: int, path) -> bool:
    """Whether line ``lineno`` (1-based) of a ``metrics.jsonl`` whose content is ``text`` is its last line, cut short
    before its newline (a run killed while writing it, or a full disk): the readers leave it out with a warning, as
    ``--resume`` does, where any other unreadable line is an error."""
    if lineno != len(text.splitlines()) or text.endswith("\n"):
        return False
    print(f"warning: {path}: its last line is cut short (the run was stopped while writing it); left out",
          file=sys.stderr)
    return True


class RunLogger:
    """``log(metrics, step)`` appends one JSON line to ``{run_dir}/metrics.jsonl`` and logs to WandB when enabled.

    WandB honours ``WANDB_MODE``; with no credentials configured it runs offline (sync later with ``wandb sync``).
    ``resume``: keep the metrics already logged; with ``resume_after`` N, only the rows of iterations up to N (a run
    stopped after logging an iteration but before saving its training state logs that iteration again).

    With WandB the run's WandB id is recorded in ``config`` as ``wandb_run_id`` (so in ``config.json`` and in what the
    caller saves with that dict, such as the training state); a resumed run continues the WandB run of that id
    (``resume="allow"``) instead of starting a new one, and every row carries its ``iteration``, logged as the WandB
    step.
    """

    def __init__(self, run_dir: str | os.PathLike | None, config: dict, *, use_wandb: bool = False,
                 project: str = "decision-transformer", group: str | None = None, name: str | None = None,
                 resume: bool = False, resume_after: int | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.wandb_run = None
        mode = check_wandb_mode() if use_wandb else None
        previous_id = recorded_wandb_id(self.run_dir) if resume and self.run_dir is not None else None
        if previous_id and not config.get("wandb_run_id"):  # kept also by a resumed part that runs without WandB
            config["wandb_run_id"] = previous_id
        if use_wandb and not config.get("wandb_run_id"):
            config["wandb_run_id"] = new_wandb_id()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # through a temporary file: a run stopped (or a disk full) while writing keeps the previous config.json,
            # by which --resume and the sweep launcher find the run
            text = json.dumps(config, indent=2, default=str) + "\n"
            atomic_write(self.run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
            if not resume:
                (self.run_dir / "metrics.jsonl").write_text("")
            elif resume_after is not None:
                self._keep_rows_until(resume_after)
        if use_wandb:
            import wandb

            if mode is None and not wandb_credentials_present():
                mode = "offline"
                print("wandb: no credentials found, logging offline (sync later with `wandb sync`)", file=sys.stderr)
            resume_args = {"resume": "allow"} if previous_id == config["wandb_run_id"] else {}
            self.wandb_run = wandb.init(project=project, group=group, name=name, config=config, mode=mode,
                                        id=config["wandb_run_id"], **resume_args)

    def _keep_rows_until(self, iteration: int):
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        text = path.read_text(errors="replace")  # bytes a crash left behind make their line unparseable, below
        lines = text.splitlines()
        kept, unreadable = [], []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short when the run was killed (or a full disk)
                if line.strip() and not (i == len(lines) and not text.endswith("\n")):
                    unreadable.append(i)   # (the usual case, a last line cut short, goes without a word)
                continue
            if not (isinstance(row, dict) and isinstance(row.get("iteration"), int) and row["iteration"] > iteration):
                kept.append(line)
        if unreadable:
            print(f"warning: {path}: dropped {len(unreadable)} unreadable line(s) on resuming (line "
                  f"{', '.join(map(str, unreadable[:5]))}{' ...' if len(unreadable) > 5 else ''})", file=sys.stderr)
        # a last row cut short before its newline: rewrite, or the next row would be appended to the same line
        if len(kept) != len(lines) or (text and not text.endswith("\n")):
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in kept)))

    def log(self, metrics: dict, step: int | None = None):
        """Append ``metrics`` (with ``iteration`` = ``step``) as one JSON line to ``metrics.jsonl`` and log them to
        WandB, which is not sent a step it already has (from before a resume)."""
        if self.run_dir is not None:
            row = {k: _plain(v) for k, v in metrics.items()}
            if step is not None:
                row["iteration"] = step
            path = self.run_dir / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:  # a row cut short by a full disk is dropped by --resume (see _keep_rows_until)
                raise UserError(f"cannot write {path}: {write_problem(path, e)}") from None
        if self.wandb_run is not None:
            if step is None:
                self.wandb_run.log(metrics)
                return
            current = getattr(self.wandb_run, "step", None)
            if isinstance(current, int) and not isinstance(current, bool) and step < current:
                return  # logged before the resume already (WandB keeps a run's steps increasing)
            self.wandb_run.log({**metrics, "iteration": step}, step=step)

    def finish(self):
        """Finish the WandB run, if there is one."""
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def progress(total: int, desc: str, leave: bool = False):
    """A progress bar on stderr; silent when stderr is not a terminal (CI logs stay readable)."""
    return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, disable=None, file=sys.stderr)


def summary_line(iteration: int, max_iters: int, logs: dict, targets_keys: list[str]) -> str:
    """The console line of one iteration: loss, each target's mean return (and D4RL score), training and
    evaluation time."""
    parts = [f"iter {iteration}/{max_iters}"]
    loss = logs.get("training/train_loss_mean")
    if loss is not None and not (isinstance(loss, float) and math.isnan(loss)):
        parts.append(f"loss {loss:.4f}")
    for key in targets_keys:
        mean = logs.get(f"evaluation/{key}_return_mean")
        score = logs.get(f"evaluation/{key}_d4rl_score_mean")
        if mean is not None:
            parts.append(f"{key} return {mean:.1f}" + ("" if score is None else f" (d4rl {score:.1f})"))
    parts.append(f"train {logs.get('time/training', 0):.1f}s eval {logs.get('time/evaluation', 0):.1f}s")
    return " | ".join(parts)
