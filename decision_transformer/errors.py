"""User-facing errors: one line, non-zero exit, no traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input or an unrecoverable run condition that the user can fix. The message is one line."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))  # always one line


class TrainingDiverged(UserError):
    exit_code = 3


def cli_entry(main):
    """Wrap a script's ``main`` so that a ``UserError`` prints ``error: <message>`` and exits non-zero."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            msg = " ".join(str(e).split())  # keep it on one line
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
