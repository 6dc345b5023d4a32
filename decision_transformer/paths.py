"""Default locations of the project's folders (``data``, ``checkpoints``, ``analysis/...``) for the scripts the
originals ran from a sub-folder (``cd data``, ``cd mine-pytorch``, ``cd analysis/section-52-...``)."""
from __future__ import annotations

import os
from pathlib import Path

#: The project's root: the folder holding ``experiment.py``, ``data/``, ``checkpoints/``, ``analysis/``.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: The help of the dataset scripts' ``--data_path`` (``project_path("data")``).
DATA_PATH_HELP = "output folder (default: the project's data/ when started inside the project, ./data outside it)"


def project_path(rel: str) -> str:
    """The default path of the project folder ``rel``: ``rel`` itself from the project's root or from outside the
    project; from a folder inside the project, that same project folder written relative to the working folder
    (``data`` is ``.`` inside ``data/`` and ``../data`` inside ``mine/``), so a script finds and writes the
    project's files from wherever in the project it is started. A path given on the command line is never changed."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working folder was removed
        return rel
    root = PROJECT_ROOT.resolve()
    if cwd == root or root not in cwd.parents:
        return rel
    return Path(os.path.relpath(root / rel, cwd)).as_posix()
