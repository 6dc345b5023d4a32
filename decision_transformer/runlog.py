"""Run logging: WandB (online, offline or disabled), a local ``metrics.jsonl`` and ``config.json``, progress bars."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from decision_transformer.errors import UserError, first_line, interrupted_by, out_of_memory, write_problem
from decision_transformer.files import atomic_write, make_folders, remove_folders

#: The values of ``WANDB_MODE`` that wandb accepts.
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


#: wandb's default server before CoreWeave's Forge (for a wandb whose own default cannot be read)
_OLD_DEFAULT_BASE_URL = "https://api.wandb.ai"

#: ``WANDB_MODE`` values that log to the server, for which wandb needs credentials
_ONLINE_MODES = ("online", "run", "shared")

_OFFLINE = "log offline with WANDB_MODE=offline (sync later with `wandb sync`)"
_REMEDY = f"log in with `wandb login` (or set WANDB_API_KEY), or {_OFFLINE}"


def wandb_base_url() -> str:
    """The WandB server a run logs to, found as wandb finds it: ``WANDB_BASE_URL``, else the ``base_url`` of wandb's
    settings files (the global one that ``wandb login --host`` writes, ``$WANDB_CONFIG_DIR/settings`` or
    ~/.config/wandb/settings, overridden by the working folder's ``wandb/settings``), else wandb's default server."""
    import configparser

    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    files = [Path(config_dir).expanduser() / "settings" if config_dir else
             Path.home() / ".config" / "wandb" / "settings",
             Path(".wandb" if Path(".wandb").is_dir() else "wandb") / "settings"]
    url = None
    for f in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(f)   # (a missing file reads as empty)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue   # (wandb skips a broken file with a warning)
        url = parser.get("default", "base_url", fallback=None) or url
    if url:
        return url
    try:
        from wandb.sdk.wandb_settings import Settings

        return str(Settings().base_url)
    except Exception:  # noqa: BLE001 - wandb missing or of another layout: its long-standing default
        return _OLD_DEFAULT_BASE_URL


def _netrc_path() -> Path:
    """The netrc file wandb reads: ``NETRC``, else ~/.netrc (or ~/_netrc, as on Windows, where only that exists)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix, windows = Path.home() / ".netrc", Path.home() / "_netrc"
    return windows if not unix.exists() and (windows.exists() or sys.platform == "win32") else unix


def wandb_credentials_present() -> bool:
    """Whether wandb finds credentials for the server it logs to (``wandb_base_url``): ``WANDB_API_KEY`` (or
    ``WANDB_IDENTITY_TOKEN_FILE``), or a key for that host in the netrc file (``_netrc_path``; for CoreWeave's Forge
    host, wandb also takes the key of the W&B server behind it)."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    url = wandb_base_url()
    hosts = [urlsplit(url).netloc]
    try:
        from wandb.sdk.lib.urls import forge_upstream_url   # (the wandb releases that know Forge)

        hosts.append(urlsplit(forge_upstream_url(url)).netloc)
    except ImportError:
        pass
    try:
        entries = netrc.netrc(_netrc_path())
    except (OSError, netrc.NetrcParseError):   # none, or unreadable: wandb finds no key there either
        return False
    return any(host and (entry := entries.authenticators(host)) and entry[2] for host in hosts)


def _wandb_importable() -> bool:
    import importlib.util

    if sys.modules.get("wandb") is not None:
        return True
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def wandb_exit_code(error: BaseException | int | None) -> int:
    """The exit code WandB records for a run that ended with ``error`` (an exception, or an exit code): the code the
    script ends with (``cli_entry``): 0 without one, 130 for Ctrl-C or SIGTERM, a ``UserError``'s own code, 1 for
    any other error."""
    if error is None or isinstance(error, int):
        return int(error or 0)
    if interrupted_by(error):
        return 130
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else int(error.code is not None)
    if isinstance(error, UserError):
        return error.exit_code
    return 2 if isinstance(error, OSError) or out_of_memory(error) else 1


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    if hasattr(v, "item") and callable(v.item):
        return _plain(v.item())
    return v


def check_wandb_mode() -> str | None:
    """``WANDB_MODE`` if wandb accepts it (None when unset); else a one-line error, as for a wandb that cannot be
    imported, or an explicit online mode without credentials (wandb would stop, or ask for a key, at ``wandb.init``).
    The scripts call it with ``-w`` before they write anything."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a WandB mode; use one of {', '.join(WANDB_MODES)} or unset it")
    if not _wandb_importable():
        raise UserError("-w logs to WandB, but the wandb package is not installed (pip install wandb); or run "
                        "without -w")
    if mode in _ONLINE_MODES and not wandb_credentials_present():
        raise UserError(f"WANDB_MODE={mode}, but no WandB credentials for {wandb_base_url()} were found "
                        f"(WANDB_API_KEY, or {_netrc_path()}); {_REMEDY}")
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

    WandB honours ``WANDB_MODE``; with no credentials configured it runs offline (sync later with ``wandb sync``). A
    WandB that cannot start (not installed, online without credentials, its server unreachable) is a one-line
    ``UserError``, raised before ``config.json`` is written.
    ``resume``: keep the metrics already logged; with ``resume_after`` N, only the rows of iterations up to N (a run
    stopped after logging an iteration but before saving its training state logs that iteration again).

    With WandB the run's WandB id (the one WandB used: a sweep agent's wins over the one asked for) is recorded in
    ``config`` as ``wandb_run_id`` (so in ``config.json`` and in what the caller saves with that dict, such as the
    training state); a resumed run continues the WandB run of that id (``resume="allow"``) instead of starting a new
    one, and every row carries its ``iteration``, logged as the WandB step. ``finish`` records the run's exit code.
    """

    def __init__(self, run_dir: str | os.PathLike | None, config: dict, *, use_wandb: bool = False,
                 project: str = "decision-transformer", group: str | None = None, name: str | None = None,
                 resume: bool = False, resume_after: int | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.wandb_run = None
        self._raise_log_errors = logging.raiseExceptions
        self._ambient = sys.exc_info()[1]   # an error being handled around the run is not the run's (finish)
        mode = check_wandb_mode() if use_wandb else None
        previous_id = recorded_wandb_id(self.run_dir) if resume and self.run_dir is not None else None
        if previous_id and not config.get("wandb_run_id"):  # kept also by a resumed part that runs without WandB
            config["wandb_run_id"] = previous_id
        if use_wandb and not config.get("wandb_run_id"):
            config["wandb_run_id"] = new_wandb_id()
        if use_wandb:  # before the files: a WandB that cannot start leaves them as they were
            # wandb's debug.log handler prints a traceback for every line it cannot write (dozens on a full disk);
            # finish() says it once instead, naming WandB's folder
            self._raise_log_errors, logging.raiseExceptions = logging.raiseExceptions, False
            try:
                self.wandb_run = self._start_wandb(config, mode, project, group, name, previous_id)
            finally:
                if self.wandb_run is None:
                    logging.raiseExceptions = self._raise_log_errors
        if self.run_dir is not None:
            made = make_folders(self.run_dir)
            # through a temporary file: a run stopped (or a disk full) while writing keeps the previous config.json,
            # by which --resume and the sweep launcher find the run
            text = json.dumps(config, indent=2, default=str) + "\n"
            try:
                atomic_write(self.run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
            except BaseException:   # (a new run folder left empty is not left behind)
                remove_folders(made)
                raise
            if not resume:
                (self.run_dir / "metrics.jsonl").write_text("")
            elif resume_after is not None:
                self._keep_rows_until(resume_after)

    @staticmethod
    def _start_wandb(config: dict, mode: str | None, project: str, group: str | None, name: str | None,
                     previous_id: str | None):
        """``wandb.init`` of this run; a wandb that cannot be imported, refuses the settings (``UsageError``) or
        cannot reach its server (``CommError``) is a one-line ``UserError``. Records the id WandB gave the run in
        ``config``: a sweep agent's (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID``) wins over the one asked for, and
        ``--resume`` must continue that run."""
        try:
            import wandb
        except ImportError as e:
            raise UserError(f"-w logs to WandB, but wandb cannot be imported ({first_line(e)}); reinstall it (pip "
                            f"install wandb), or run without -w") from None
        if mode is None and not wandb_credentials_present():
            mode = "offline"
            print("wandb: no credentials found, logging offline (sync later with `wandb sync`)", file=sys.stderr)
        resume_args = {"resume": "allow"} if previous_id == config["wandb_run_id"] else {}
        wandb_error = getattr(getattr(wandb, "errors", None), "Error", None) or Exception
        try:
            run = wandb.init(project=project, group=group, name=name, config=config, mode=mode,
                             id=config["wandb_run_id"], **resume_args)
        except wandb_error as e:
            kind = type(e).__name__
            if kind == "AuthenticationError":
                raise UserError(f"WandB refused the credentials for {wandb_base_url()} ({first_line(e)}); log in "
                                f"again with `wandb login --relogin`, or {_OFFLINE}") from None
            if kind == "CommError":
                raise UserError(f"WandB could not reach {wandb_base_url()} ({first_line(e)}); check the connection "
                                f"(and WANDB_BASE_URL), or {_OFFLINE}") from None
            raise UserError(f"WandB could not start the run ({first_line(e)}); {_REMEDY}") from None
        run_id = getattr(run, "id", None)
        if (isinstance(run_id, str) and run_id and run_id != config["wandb_run_id"]
                and not getattr(run, "disabled", False)):   # (a disabled run's id means nothing)
            config["wandb_run_id"] = run_id
            run.config.update({"wandb_run_id": run_id}, allow_val_change=True)
        return run

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

    def finish(self, error: BaseException | int | None = None):
        """Finish the WandB run, if there is one, with the exit code of ``error`` (``wandb_exit_code``: an exception
        or an exit code), so that WandB marks a crashed or interrupted run failed, not finished. Called without
        ``error`` from a ``finally`` block, the exception on its way out, if any, is taken."""
        if self.wandb_run is None:
            return
        run, self.wandb_run = self.wandb_run, None
        if error is None:
            current = sys.exc_info()[1]
            error = current if current is not self._ambient else None
        code = wandb_exit_code(error)
        folder = _wandb_folder(run)
        try:
            if code:
                run.finish(exit_code=code)
            else:
                run.finish()   # (a success, as wandb takes a finish without a code)
        except Exception as e:  # noqa: BLE001 - the run's own files are complete: a warning, not an error
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (folder and _disk_full(folder))
            problem = "no space left on the device" if full else first_line(e)
            print(f"warning: WandB could not finish the run{f' in {folder}' if folder else ''}: {problem}"
                  f"{self._own_files()}", file=sys.stderr)
        else:
            if folder and _disk_full(folder):   # wandb cuts its record short on a full disk without a word
                print(f"warning: the disk of WandB's folder {folder} is full: its record of this run may be cut "
                      f"short{self._own_files()}", file=sys.stderr)
        finally:
            logging.raiseExceptions = self._raise_log_errors

    def _own_files(self) -> str:
        return "" if self.run_dir is None else f" (the run's own files in {self.run_dir} are not affected)"


def _wandb_folder(run) -> Path | None:
    """The folder WandB keeps a run's files in (``wandb/run-...``, ``wandb/offline-run-...``), if it has one."""
    try:
        files = getattr(run, "dir", None)
    except Exception:  # noqa: BLE001 - a run that cannot say
        return None
    return Path(files).parent if isinstance(files, str) and files else None


def _disk_full(folder: Path) -> bool:
    """Under 1 MiB free where ``folder`` is (or nearest folder above it that exists)."""
    import shutil

    try:
        return shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.is_dir())).free < 2 ** 20
    except (OSError, StopIteration):
        return False


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
