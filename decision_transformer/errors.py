"""User-facing errors: one line, non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import warnings


class UserError(Exception):
    """Bad input or an unrecoverable run condition that the user can fix. The message is one line."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))  # always one line


class TrainingDiverged(UserError):
    """A loss, the weights or an evaluation's returns became NaN or inf (exit code 3)."""
    exit_code = 3


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM (exit code 130, as a shell reports SIGINT)."""
    exit_code = 130


def write_problem(path, error: BaseException) -> str:
    """Why ``path`` could not be written, in words: a part of the path that is a file, a folder in the file's place, a
    full disk, or the system's reason."""
    import errno
    import shutil
    from pathlib import Path

    path = Path(path)
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a folder"
    if path.is_dir():
        return "it is a folder"
    code = getattr(error, "errno", None)
    if code == errno.EEXIST and path.exists():  # a folder was to be made where a file is
        return "it is a file, not a folder"
    full = code in (errno.ENOSPC, errno.EDQUOT)
    if not full and code not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):  # the system's word wins
        try:
            full = shutil.disk_usage(next(p for p in path.parents if p.is_dir())).free < 2 ** 20
        except (OSError, StopIteration):
            full = False
    if full:
        return "no space left on the device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    if "strerror:" in text:  # torch's writer: "[enforce fail at ...] . open file failed with strerror: <reason>"
        return text.split("strerror:", 1)[1].strip().splitlines()[0]
    return text.splitlines()[0] if text else type(error).__name__


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA), its CPU
    allocator's ``RuntimeError``, or MuJoCo's ``ValueError`` ("engine error: Could not allocate memory", many envs)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    if isinstance(e, ValueError):
        return "could not allocate memory" in text.lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (160 characters at most), or its type's name when the message is empty (as
    torch's ``EOFError`` for an empty file)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def interrupted_by(e: BaseException, context: bool = False) -> bool:
    """Whether a KeyboardInterrupt (Ctrl-C, or SIGTERM in a script) is among the causes of ``e`` (``raise ... from``):
    a compiled extension interrupted while it imports (MuJoCo's) fails with an ``ImportError`` made from it. With
    ``context``, also an error raised while one was being handled (not for a failed clean-up, which must show)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or (e.__context__ if context else None)
    return False


@contextlib.contextmanager
def deferred_interrupts():
    """Hold Ctrl-C and SIGTERM back while a few quick file moves that belong together run: a signal that arrives
    meanwhile is raised again right after, to the handlers that were there (main thread; elsewhere a plain block)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    # an ignored signal stays ignored (an env worker's SIGINT): a handler here would also un-ignore it for the
    # processes started meanwhile (MuJoCo's import starts some), which Ctrl-C would then stop with a traceback
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
              if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])


def _argparse_error(parser, message):
    raise UserError(f"{parser.prog}: {message} (see {parser.prog} --help)")


_STARTUP_HANDLERS: dict = {}   # signal -> the handler quiet_startup replaced, until cli_entry puts it back
_SCRIPT = False   # quiet_startup was called by a script run as __main__ (not by a test that loads it)
_DEPTH = 0        # cli_entry mains running (one calls another: run_all's analyses)


def quiet_startup(name: str):
    """Call first thing in a script, with its ``__name__`` (nothing happens unless it is ``"__main__"``): until its
    ``cli_entry`` main starts, Ctrl-C or SIGTERM ends the script with ``error: interrupted`` and exit 130, as later
    on, instead of an import traceback or a silent exit. Importing torch and the toolkit takes a second or more, and
    nothing has been written yet."""
    import signal
    import threading

    global _SCRIPT
    if name != "__main__" or threading.current_thread() is not threading.main_thread():
        return
    _SCRIPT = True
    import atexit

    atexit.register(_ignore_late_signals)   # (registered first: the last to run)

    def stop(signum, frame):
        """End the script before anything was written: one line, exit 130."""
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is default:   # (a handler someone else installed, or SIG_IGN, is kept)
            _STARTUP_HANDLERS[sig] = signal.signal(sig, stop)


def _end_quiet_startup():
    """Put back the handlers ``quiet_startup`` replaced: from here on Ctrl-C raises KeyboardInterrupt, so that the
    script's ``finally`` blocks run."""
    import signal
    import threading

    while _STARTUP_HANDLERS and threading.current_thread() is threading.main_thread():
        sig, handler = _STARTUP_HANDLERS.popitem()
        signal.signal(sig, handler)


def expand_home(argv: list[str], words: bool = False) -> list[str]:
    """``--flag=~/path`` (or ``-f=~/path``) as the shell gives ``--flag ~/path``: the shell expands ``~`` only at the
    start of a word, so a path flag written with ``=`` would otherwise name a folder called ``~`` in the working
    directory. ``words``: also a whole argument that starts with ``~``, for command lines no shell has read (a sweep
    grid's values, its ``--extra`` split by ``shlex``)."""
    out = []
    for a in argv:
        flag, eq, value = a.partition("=")
        if a.startswith("-") and eq and value.startswith("~"):
            a = f"{flag}={os.path.expanduser(value)}"
        elif words and a.startswith("~"):
            a = os.path.expanduser(a)
        out.append(a)
    return out


def cli_entry(main):
    """Wrap a script's ``main`` so that a ``UserError``, a flag argparse rejects or an unwritable / unreadable path
    (an ``OSError`` no earlier check caught) prints one line ``error: <message>`` and exits non-zero."""

    @functools.wraps(main)
    def wrapper(argv=None):
        """Run ``main(argv)``; a user error, an OS error, Ctrl-C or SIGTERM, or running out of memory is one
        ``error:`` line and a non-zero exit instead of a traceback."""
        global _DEPTH
        _end_quiet_startup()
        _DEPTH += 1
        if argv is None:
            argv = expand_home(sys.argv[1:])
        before = argparse.ArgumentParser.error
        argparse.ArgumentParser.error = _argparse_error  # one line instead of the usage block
        term = _stop_on_sigterm()
        result = None   # (a main that returns its exit status: the benchmarks' checks)
        try:
            with warnings.catch_warnings():
                # torch warns before it fails on a file that is not one of its own (a plain pickle); the error line
                # that follows names the file and says why
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                try:
                    result = main(argv)
                    return result
                except (KeyboardInterrupt, SystemExit, UserError):   # (a UserError says what it means)
                    raise
                except BaseException as e:  # another error made from an interrupt is the interrupt (exit 130)
                    if interrupted_by(e):
                        raise KeyboardInterrupt from e
                    raise
        except UserError as e:
            msg = " ".join(str(e).split())  # keep it on one line
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except OSError as e:
            import errno

            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            why = e.strerror or e
            if where and e.errno in (errno.EEXIST, errno.ENOTDIR, errno.ENOSPC):  # mkdir below a file, a full disk
                why = write_problem(e.filename, e)
            print(f"error: {where}{why}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except (MemoryError, RuntimeError, ValueError) as e:
            if not out_of_memory(e):
                raise
            print(f"error: out of memory ({first_line(e)}); reduce the sizes given (batch, model, steps or "
                  f"episodes)", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            argparse.ArgumentParser.error = before
            _restore_sigterm(term)
            _DEPTH -= 1
            ending = sys.exc_info()[1]
            if _SCRIPT and _DEPTH == 0 and (ending is None or isinstance(ending, SystemExit)):
                # (not after a crash, whose traceback is still to be printed)
                _quiet_ending(ending if ending is not None else
                              SystemExit(result if isinstance(result, int) and not isinstance(result, bool) else None))

    return wrapper


def _ignore_late_signals():
    """The last atexit callback of a script whose main has ended: from here the interpreter tears its modules down
    (most of a second with torch loaded), with Python's handlers reset to the defaults (SIGTERM: a silent exit 143);
    ignored signals stay ignored, and the process ends with its status moments later."""
    import signal

    if _ENDING:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is _ENDING[0]:
                signal.signal(sig, signal.SIG_IGN)


_ENDING: list = []   # the handler _quiet_ending installed, once it has


def _quiet_ending(exc: SystemExit):
    """A script's main has ended, its files written and closed: a Ctrl-C or SIGTERM during the interpreter's teardown
    (a second or so with torch loaded, atexit callbacks included) ends the process at once with the status it was
    about to exit with, instead of a silent 143 or a KeyboardInterrupt traceback from torch's atexit callback (after
    the atexit callbacks, ``_ignore_late_signals``)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1

    def end(signum, frame):
        """Exit now with the script's status."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):   # (others' handlers are kept)
            signal.signal(sig, end)
    _ENDING[:] = [end]


def _stop_on_sigterm():
    """SIGTERM (``kill``, ``docker stop``, a cluster's preemption) stops a script as Ctrl-C does: its ``finally``
    blocks run and nothing saved is lost. Installed only in the main thread over the default handler; returns what
    ``_restore_sigterm`` puts back, or None."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum, frame):
        """Raise KeyboardInterrupt, as Ctrl-C does."""
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return signal.SIG_DFL


def _restore_sigterm(previous):
    if previous is not None:
        import signal

        signal.signal(signal.SIGTERM, previous)


def checked_device(device):
    """``device`` (a name or ``torch.device``) as a ``torch.device`` for the library's calls; a name torch does not
    know, or a CUDA device on a machine where torch sees none, is a ``UserError`` (the scripts' ``--device cuda``
    falls back to the CPU with a warning instead)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device {device!r}: {first_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: torch sees no CUDA GPU on this machine (use 'cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
