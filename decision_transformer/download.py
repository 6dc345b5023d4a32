"""Download D4RL's gym-mujoco v2 hdf5 files straight from D4RL's URLs (no ``d4rl`` or ``mujoco-py`` import).

Downloads go to ``<name>.part`` and are resumed with HTTP Range requests; a finished file is checked against the
size and sha256 of shared/reference/training.md section 1.3 before it is renamed into place. The base URL can be
changed with ``D4RL_BASE_URL`` (or the scripts' ``--base_url``), e.g. to a mirror or a local test server.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from decision_transformer.errors import UserError
from decision_transformer.files import exclusive

DEFAULT_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"

#: file name -> (bytes, sha256), from the D4RL v2 files.
D4RL_FILES: dict[str, tuple[int, str]] = {
    "hopper_random-v2.hdf5": (152525345, "63103ef7059db4c0819bd054f4e83ff339030b50bcdb46bdbe50385f234b5054"),
    "hopper_medium-v2.hdf5": (152756557, "5bdf1bc4a713c82941de44633df669b36c89850b652a25985166796d25cf71a0"),
    "hopper_medium_replay-v2.hdf5": (75854457, "e121c5f7c9857a307baa9edc6a2c3b48e85fedb9ac316ecddd0f48ca7ef4e39b"),
    "hopper_medium_expert-v2.hdf5": (304537315, "9d51ad87f8c905be3880d84c6140bcdb7fbf39a19e046a237f238ba34fec9e26"),
    "hopper_expert-v2.hdf5": (152427435, "01aa219a5f8eea5e639eccdc636ec2bf40e317159a95cf4bf6e985f16909941b"),
    "halfcheetah_random-v2.hdf5": (237338037, "25407aef85b5d16c0f36b4149341edb4acc6a9e88c1db529b2de19e7464874ba"),
    "halfcheetah_medium-v2.hdf5": (237727262, "41324e8487a9556d8cfa4538827f8937f4d63dae3030825ebc9f3a726ed08ca0"),
    "halfcheetah_medium_replay-v2.hdf5": (59448533, "48d494a4770c11f48260736dec090b78bdca8375647ed4d24bfa5b6610c7f683"),
    "halfcheetah_medium_expert-v2.hdf5": (474567252, "015db75dae5bbe8e94029b71fa0bafc2073365df0c94744e71031189f3f79c06"),
    "halfcheetah_expert-v2.hdf5": (237464597, "d9fe53bb994eb1e20a99b4fa3412cd76a1bb7966a7ff55e0fcbdd6081bd2965f"),
    "walker2d_random-v2.hdf5": (216109364, "4e863bb6090cf4a461548bd470564b32f1ae5b32ef3085f816b2ede7f092e7fa"),
    "walker2d_medium-v2.hdf5": (232254996, "cf00f43add04c17fdfc2958dd581dea0851b2e5bedbe6fda073758a8f841aeda"),
    "walker2d_medium_replay-v2.hdf5": (86323963, "e75de96a4f77acf7d4e0d6fdf0d7ccb177c26c44bb4388e4fd99f543ccfa18db"),
    "walker2d_medium_expert-v2.hdf5": (462197079, "6b8d7f868c45bbaedf460be797fb7271b46dee6ebe45fe7a64319f2005b59a04"),
    "walker2d_expert-v2.hdf5": (230567195, "2985dc3d436a8baa10e8f43f946fe1d7c6337a4e4fbc65def70618093b18c59a"),
}

CHUNK = 1 << 20


def base_url(override: str | None = None) -> str:
    """The download base URL without a trailing slash: ``override``, else ``D4RL_BASE_URL``, else D4RL's."""
    return (override or os.environ.get("D4RL_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """The hex sha256 digest of the file ``path``, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _offline_error(url: str, reason) -> UserError:
    host = urllib.parse.urlsplit(url).netloc
    from decision_transformer.paths import project_path

    data = project_path("data")
    return UserError(f"cannot download {url} ({host} unreachable: {reason}); download the D4RL hdf5 files "
                     f"elsewhere and convert them with `python {data}/download_d4rl_datasets.py --hdf5 FILE ... "
                     f"--data_path {data}`, or generate datasets with {data}/generate_datasets.py")


def download_file(url: str, dest: str | os.PathLike, *, size: int | None = None, sha256: str | None = None,
                  timeout: float = 30.0, max_attempts: int = 5, progress: bool = True,
                  retry_wait: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming a partial ``.part`` with a Range request and
    retrying a broken transfer up to ``max_attempts`` times (the n-th retry after ``n * retry_wait`` seconds). A host
    that cannot be reached at the first attempt is the offline error at once (a ``.part`` is kept for a later run).
    The finished file must have ``size`` bytes and the ``sha256`` digest (when given), else the ``.part`` is deleted
    and a UserError raised."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"{url}: only http(s) URLs are supported")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    bar = None
    try:
        for attempt in range(max_attempts):
            if attempt:
                time.sleep(attempt * retry_wait)   # (a brief network blip should not end a long download)
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:  # cannot be a prefix of the right file
                part.unlink()
                have = 0
            if size is not None and have == size:
                break
            req = urllib.request.Request(url, headers={"User-Agent": "dt-toolkit"})
            if have:
                req.add_header("Range", f"bytes={have}-")
            try:
                resp = urllib.request.urlopen(req, timeout=timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # range not satisfiable: the server says the part is complete
                    break
                raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                if attempt == 0:
                    err = _offline_error(url, getattr(e, "reason", e))
                    if have:
                        err = UserError(f"{err} (the {have} bytes downloaded so far are kept in {part}: run again "
                                        f"to resume)")
                    raise err from None
                continue
            with resp:
                if have and resp.status != 206:  # server ignored the range: start again
                    have = 0
                mode = "ab" if have else "wb"
                length = resp.headers.get("Content-Length")
                total = size if size is not None else (have + int(length) if length else None)
                if progress and bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=dest.name, mininterval=1.0, disable=None, file=sys.stderr)
                elif bar is not None:
                    bar.n = have
                    bar.refresh()
                received = 0
                try:
                    with open(part, mode) as f:
                        while block := resp.read(CHUNK):
                            f.write(block)
                            received += len(block)
                            if bar is not None:
                                bar.update(len(block))
                except (TimeoutError, ConnectionError, OSError):
                    continue  # resume from what was written
            if size is None or part.stat().st_size >= size:
                break
            if length is not None and received == int(length):
                break   # the server sent all it has, and it is not the expected size: retrying would fetch it again
        else:
            raise UserError(f"{url}: download incomplete after {max_attempts} attempts "
                            f"({part.stat().st_size if part.exists() else 0} bytes in {part}); run again to resume")
    finally:
        if bar is not None:
            bar.close()
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise UserError(f"{dest.name}: size mismatch ({got} bytes, expected {size}); the partial file was deleted")
    if sha256 is not None:
        digest = sha256_file(part)
        if digest != sha256:
            part.unlink()
            raise UserError(f"{dest.name}: sha256 mismatch ({digest[:16]}..., expected {sha256[:16]}...); "
                            f"the downloaded file was deleted")
    os.replace(part, dest)
    return dest


def fetch_d4rl(name: str, hdf5_dir: str | os.PathLike, *, url: str | None = None, verify: bool = True,
               progress: bool = True) -> Path:
    """``hdf5_dir/name``, downloaded from ``base_url()/name`` if absent; an existing file that fails the size / sha256
    check is one line asking to delete it (it is not replaced)."""
    if name not in D4RL_FILES:
        raise UserError(f"{name}: not a D4RL gym-mujoco v2 file")
    size, digest = D4RL_FILES[name]
    dest = Path(hdf5_dir) / name
    with exclusive(dest, "a download"):   # two processes fetching one file: the second waits and checks it
        if dest.is_file():
            ok = dest.stat().st_size == size and (not verify or sha256_file(dest) == digest)
            if ok:
                return dest
            raise UserError(f"{dest}: exists but does not match D4RL's size/sha256; delete it to download again")
        return download_file(url or f"{base_url()}/{name}", dest, size=size, sha256=digest if verify else None,
                             progress=progress)
