"""Files that cannot be written: one line naming the file the user asked for and why; no partial or temporary file is
left behind."""
from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
import torch

from decision_transformer import checkpoint
from decision_transformer.checkpoint import atomic_save
from decision_transformer.errors import UserError, write_problem


def _leftovers(folder):
    return [p.name for p in folder.rglob("*.tmp")]


def test_a_folder_or_a_file_in_the_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'run'}: it is a folder$"):
        atomic_save({"a": 1}, tmp_path / "run")
    for target in (tmp_path / "afile" / "x.pt", tmp_path / "afile" / "sub" / "x.pt"):
        with pytest.raises(UserError, match=f"^cannot write {target}: {tmp_path / 'afile'} is a file, not a folder$"):
            atomic_save({"a": 1}, target)
    assert _leftovers(tmp_path) == [] and (tmp_path / "afile").read_text() == "x"


def test_torch_writer_failures_say_why_and_leave_nothing(tmp_path, monkeypatch):
    """torch reports a full disk or a read-only folder as a RuntimeError with its own wording; the partial file goes."""
    real_save = torch.save

    def failing(reason):
        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)                                  # a partial file exists when the writer fails
            raise RuntimeError(reason)
        return save

    monkeypatch.setattr(checkpoint.torch, "save", failing("[enforce fail at inline_container.cc:747] . open file "
                                                          "failed with strerror: Read-only file system"))
    with pytest.raises(UserError, match="x.pt: Read-only file system$"):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    monkeypatch.setattr(checkpoint.torch, "save", failing("[enforce fail at inline_container.cc:672] . unexpected "
                                                          "pos 29248 vs 29142"))
    monkeypatch.setattr("shutil.disk_usage", lambda p: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(UserError, match="x.pt: no space left on the device$"):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_write_problem_words(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert write_problem(tmp_path / "afile", FileExistsError(errno.EEXIST, "File exists")) == \
        "it is a file, not a folder"
    assert write_problem("/nonexistent-dir/x.pt", OSError(errno.ENOSPC, "No space left on device")) == \
        "no space left on the device"
    assert write_problem("/nonexistent-dir/x.pt", PermissionError(errno.EACCES, "Permission denied")) == \
        "Permission denied"
