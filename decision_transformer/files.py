"""Writing files safely: to a temporary file of its own beside the target, then renamed, so that an existing file is
only ever replaced by a complete one and a failed or interrupted write leaves nothing behind."""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
from pathlib import Path

from decision_transformer.errors import UserError, deferred_interrupts, write_problem


def short_name(name: str, keep: int = 200) -> str:
    """``name`` cut to its first ``keep`` characters: the part of a file's name that a temporary file or lock beside
    it carries, so that a legal name of up to 255 characters keeps one of its own within that limit."""
    return name[:keep]


def refuse_folders(paths) -> None:
    """Files about to be written (``--force`` replacing them) checked before the work that makes them: a folder in
    the place of one is a one-line ``UserError``, as ``atomic_write`` would give only once it is all made."""
    for p in paths:
        if Path(p).is_dir():
            raise UserError(f"cannot write {p}: it is a folder")


def refuse_files_above(path, what: str, writable: bool = True) -> None:
    """A folder (or a file's folder) about to be made, checked before the work that fills it: an existing file in
    its place or above it, or (``writable``) a folder there that cannot be written (no permission, a read-only file
    system: found only once the work was done, minutes or hours later), is a one-line ``UserError`` naming ``what``
    writes there."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"{what} writes to {path}/, but {p} is a file")
    base = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), None)
    if writable and base is not None and not os.access(base, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        raise UserError(f"{what} writes to {path}/, but {base} cannot be written "
                        f"({'a read-only file system' if read_only else 'permission denied'})")


class WrittenMeanwhile(UserError):
    """A file written only where none is (``replace=False``) was written by another process while this one was being
    made: kept, and this one is not written."""

    def __init__(self, path, also: str = ""):
        self.path = Path(path)
        super().__init__(f"{path} was written by another process meanwhile; it is kept and this one is not written "
                         f"(--force replaces it){'; ' + also if also else ''}")


def place(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = True):
    """Rename the complete file ``tmp`` to ``path``. ``replace`` False: only where ``path`` is not (yet), decided
    atomically by a hard link (another process's file of that name, written since the caller's own check, is never
    replaced: ``WrittenMeanwhile``); on a file system without hard links, checked just before the rename."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        if os.path.islink(path) and not os.path.exists(path):
            raise UserError(f"cannot write {path}: a link to {os.readlink(path)}, which does not exist, is in its "
                            f"place; remove the link (or point it at a file: --force replaces that)") from None
        raise WrittenMeanwhile(path) from None
    except OSError:   # no hard links here (some network and FUSE file systems)
        if os.path.lexists(path):
            raise WrittenMeanwhile(path) from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def make_folders(folder: str | os.PathLike) -> list[Path]:
    """Make ``folder`` with the folders above it; the ones this call made, outermost first (for ``remove_folders``
    after a write into them failed). A folder that cannot be made leaves none of those it made behind."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_folders(made)
        raise
    return made


def remove_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (``make_folders``'s list) that are empty, innermost first: a failed write leaves no
    empty folders where there were none. A folder that something was written into meanwhile stays."""
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


def atomic_write(path: str | os.PathLike, write, replace: bool = True) -> Path:
    """``write(tmp)`` into a new temporary file beside ``path``, then rename it to ``path``: an existing file is
    replaced only by a complete one, and a failed write leaves no temporary file behind. A file that cannot be written
    (a folder in its place, a full disk, no permission) is a one-line ``UserError`` naming it, and leaves none of the
    folders made for it. ``replace`` False: written only where no file of that name is (``place``)."""
    path = Path(path)
    tmp, made = None, []
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        made = make_folders(path.parent)
        while tmp is None:  # a name of its own (O_EXCL), with the permissions of a plain open(), not mkstemp's 0600
            name = path.parent / f".{short_name(path.name)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with deferred_interrupts():   # (made and known as ours at once: an interrupt between left it behind)
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                    tmp = name
            except FileExistsError:
                continue
        write(tmp)
        sync(tmp)
        place(tmp, path, replace)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {path}: {write_problem(path, e)}") from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if not os.path.lexists(path):
            remove_folders(made)
    return path


def open_lock(lock: Path) -> int:
    """A descriptor of lock file ``lock`` (created, with its folders) to ``flock``: read-only where the file is another
    user's (``flock`` works on one). ``OSError`` where it cannot be opened at all."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)   # (the umask decides who else may take it)
    except OSError:
        return os.open(lock, os.O_RDONLY)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "it"):
    """Hold an exclusive lock for making the shared file ``path`` (a dataset, a Fisher file, k-means centres): a second
    process that would make it too waits here, then finds it made (the caller looks again inside the block). The lock
    is the hidden file ``.{name}.lock`` beside ``path``, removed on leaving. Where no lock can be had (no ``fcntl``, a
    file system without ``flock``, a folder that cannot be written) the block runs unlocked, with a warning where the
    folder can be written (an unwritable one: the caller's own write reports it)."""
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = path.parent / f".{short_name(path.name)}.lock"
    fd, told, made = None, False, []
    try:
        made = make_folders(lock.parent)
        while fd is None:
            fd = open_lock(lock)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    print(f"waiting for another process making {path} ({what}) ...", file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder before us removed the file it locked: lock the one there now
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                fd = None
    except OSError as e:
        if fd is not None:
            os.close(fd)
        fd = None
        if path.parent.is_dir() and os.access(path.parent, os.W_OK):
            print(f"warning: cannot lock {lock} ({e.strerror or e}); nothing stops a second process from making "
                  f"{path} at the same time", file=sys.stderr)
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(lock)   # while still held: a waiter then finds its file gone and locks a new one
            except OSError:
                pass
            os.close(fd)
        if not os.path.lexists(path):   # (not made: no empty folders left for it)
            remove_folders(made)


def sync(path: str | os.PathLike):
    """Flush ``path``'s bytes to the disk before it is renamed over an older file: after a power loss or an OS crash
    the target is then the old file or the new one, never an empty one. A file system that cannot sync is left be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_zip_checksums(path: str | os.PathLike):
    """A ``torch.save`` file (a zip archive) whose bytes no longer match the CRC-32 checksums it stores is a one-line
    ``UserError``: ``torch.load`` does not check them, so damaged tensor bytes load as other numbers. Files that are
    not zip archives (torch's legacy format, plain pickles) are left to the loader to judge; one that begins as a zip
    archive but has no end (a save or copy that did not finish) is said to be cut short, where torch's own error reads
    ``Invalid argument`` or ``failed finding central directory``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        try:
            with open(path, "rb") as f:
                begins_as_zip = f.read(4) == b"PK\x03\x04"
                f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16) - 22))
                has_end = b"PK\x05\x06" in f.read()   # (the end-of-archive record, within its comment's reach)
        except OSError:
            return
        if begins_as_zip and not has_end:
            raise UserError(f"{path}: cut short: it begins as a zip archive (torch.save's format) but its end is "
                            f"missing, as a save or copy that did not finish leaves a file (restore it or delete "
                            f"it)") from None
        return
    except (OSError, EOFError, ValueError, NotImplementedError):
        return
    if bad is not None:
        raise UserError(f"{path}: damaged: the stored bytes of {bad} do not match their checksum (restore the file or "
                        f"delete it)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # a process of another user (or a number that is no pid: not ours to judge)
    return True


def remove_stale_temporaries(folder: str | os.PathLike, idle_s: float = 60.0) -> list[Path]:
    """Remove the temporary files that ``atomic_write`` (``.{name}.{pid}.{hex}.tmp``) and ``checkpoint.atomic_save``
    (``{name}.{pid}.{hex}.tmp``; ``{name}.{pid}.tmp`` from earlier versions) left in ``folder`` when their process was killed (``kill -9`` cannot be caught): those of a
    process that no longer runs here and untouched for ``idle_s`` seconds (a file still being written, also by a
    process on another machine sharing the folder, keeps changing). Returns what was removed."""
    import re
    import time

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    pattern = re.compile(r"^(?:.+\.(\d+)\.[0-9a-f]{8}|.+\.(\d+))\.tmp$")
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        try:
            if p.is_file() and not _pid_alive(pid) and time.time() - p.stat().st_mtime > idle_s:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
