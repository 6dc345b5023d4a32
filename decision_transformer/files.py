"""Writing files safely: to a temporary file of its own beside the target, then renamed, so that an existing file is
only ever replaced by a complete one and a failed or interrupted write leaves nothing behind."""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from decision_transformer.errors import UserError, write_problem


def atomic_write(path: str | os.PathLike, write) -> Path:
    """``write(tmp)`` into a new temporary file beside ``path``, then rename it to ``path``: an existing file is
    replaced only by a complete one, and a failed write leaves no temporary file behind. A file that cannot be written
    (a folder in its place, a full disk, no permission) is a one-line ``UserError`` naming it."""
    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        while tmp is None:  # a name of its own (O_EXCL), with the permissions of a plain open(), not mkstemp's 0600
            name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                tmp = name
            except FileExistsError:
                continue
        write(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {path}: {write_problem(path, e)}") from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return path
