"""User-facing errors: one line, non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import functools
import sys


class UserError(Exception):
    """Bad input or an unrecoverable run condition that the user can fix. The message is one line."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))  # always one line


class TrainingDiverged(UserError):
    exit_code = 3


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM (exit code 130, as a shell reports SIGINT)."""
    exit_code = 130


def _argparse_error(parser, message):
    raise UserError(f"{parser.prog}: {message} (see {parser.prog} --help)")


def cli_entry(main):
    """Wrap a script's ``main`` so that a ``UserError``, a flag argparse rejects or an unwritable / unreadable path
    (an ``OSError`` no earlier check caught) prints one line ``error: <message>`` and exits non-zero."""

    @functools.wraps(main)
    def wrapper(argv=None):
        before = argparse.ArgumentParser.error
        argparse.ArgumentParser.error = _argparse_error  # one line instead of the usage block
        try:
            return main(argv)
        except UserError as e:
            msg = " ".join(str(e).split())  # keep it on one line
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            argparse.ArgumentParser.error = before

    return wrapper
