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


def test_an_interrupted_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the scripts turn into it) in the middle of torch.save: the interrupt goes on, the
    previous file stays, no temporary file is left."""
    target = tmp_path / "train_state.pt"
    atomic_save({"a": 1}, target)
    real = torch.save

    def cut(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": 2}, target)
    monkeypatch.setattr(torch, "save", real)
    assert _leftovers(tmp_path) == [] and torch.load(target, weights_only=True) == {"a": 1}


def test_sigterm_stops_a_script_as_ctrl_c_does(capsys):
    """SIGTERM (kill, docker stop, preemption) in a script's main: `error: interrupted`, exit 130, its finally blocks
    run; the default handler is back afterwards."""
    import os
    import signal

    from decision_transformer.errors import cli_entry

    ran = []

    @cli_entry
    def main(argv=None):
        try:
            # without a handler SIGTERM would end the test process itself
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "no SIGTERM handler in main"
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):   # the handler runs between bytecodes
                pass
            raise AssertionError("SIGTERM did not stop main")
        finally:
            ran.append("finally")

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself")
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 130 and ran == ["finally"]
    assert capsys.readouterr().err.strip() == "error: interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_interrupt_turned_into_an_import_error_is_still_an_interrupt(monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) while MuJoCo's compiled module imports surfaces as ImportError("initialization failed"):
    the env module swallowed it (the run went on) and elsewhere it became a traceback. Both are the interrupt now:
    `error: interrupted`, exit 130."""
    import builtins
    import os

    from decision_transformer import envs
    from decision_transformer.errors import Interrupted, cli_entry

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "mujoco":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(envs, "_MUJOCO_HANDLER_SET", False)
    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(KeyboardInterrupt):
        envs._route_mujoco_warnings()

    def swallowing_import(name, *args, **kwargs):   # the signal lost inside the compiled import, which then succeeds
        if name == "mujoco":
            import signal
            import time

            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            except KeyboardInterrupt:
                pass
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", swallowing_import)
    with pytest.raises(KeyboardInterrupt):       # held during the import, raised once it is over
        envs._route_mujoco_warnings()
    monkeypatch.setattr(builtins, "__import__", real_import)

    @cli_entry
    def main(argv=None):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e
        except ImportError as e:
            raise RuntimeError("MuJoCo is not installed") from e   # as gymnasium re-raises the failed import

    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "error: interrupted"

    @cli_entry
    def failed_cleanup(argv=None):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("the progress save failed")      # raised while handling it: shown, not hidden

    with pytest.raises(RuntimeError, match="the progress save failed"):
        failed_cleanup([])

    @cli_entry
    def launcher(argv=None):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:                               # as the sweep launcher says what it stopped
            raise Interrupted("interrupted: stopped 2 running runs; the same command resumes them") from None

    with pytest.raises(SystemExit) as e:
        launcher([])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted: stopped 2 running runs; the same command resumes them"

    @cli_entry
    def plain(argv=None):
        raise RuntimeError("a bug")                             # no interrupt among its causes: unchanged

    with pytest.raises(RuntimeError, match="a bug"):
        plain([])


def _damage_tensor_bytes(path):
    """Overwrite 16 bytes in the middle of the largest tensor record of a torch.save file, keeping the file a valid
    zip archive (torch.load reads it without complaint)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra))
        start = f.tell()
        f.seek(start + info.file_size // 2)
        f.write(b"A" * 16)
    return info.filename


def test_damaged_tensor_bytes_are_refused_not_loaded(tmp_path, monkeypatch, capsys):
    """torch.load does not check the checksums a torch.save file stores: a checkpoint (or resume state), a Fisher file
    and a k-means cache with damaged tensor bytes loaded as other numbers. Each is now one line naming the file; a
    damaged token cache is tokenised again, as its docstring says."""
    from decision_transformer import fisher
    from decision_transformer.checkpoint import atomic_save, load_checkpoint
    from decision_transformer.training import kmeans, lm_cotrain

    ckpt = tmp_path / "model_1.pt"
    atomic_save({"format_version": 1, "state_dict": {"w": torch.randn(4096)}, "config": {}}, ckpt)
    info = tmp_path / "info"
    fisher.save_fisher({"transformer.h.0.w": torch.rand(4096), "_stats": {"sum": 1.0, "mean": 0.1}}, info)
    centres = tmp_path / "kmeans.pt"
    atomic_save(torch.randn(64, 64), centres)
    before = load_checkpoint(ckpt)["state_dict"]["w"].clone()
    for path in (ckpt, info, centres):
        _damage_tensor_bytes(path)
    assert not torch.equal(torch.load(ckpt, weights_only=True)["state_dict"]["w"], before)  # torch reads it changed
    with pytest.raises(UserError) as e:
        load_checkpoint(ckpt)
    assert str(e.value).startswith(f"{ckpt}: damaged: the stored bytes of ") and "checksum" in str(e.value)
    # the loader of merge sources, experiment_multi.py, results tables and checkpoint.load_model
    from decision_transformer.checkpoint import load_model
    from decision_transformer.legacy_import import load_model_file
    for load in (load_model_file, load_model):
        with pytest.raises(UserError, match="damaged"):
            load(ckpt)
    with pytest.raises(UserError, match="damaged"):
        fisher.load_fisher(info)
    with pytest.raises(UserError, match="damaged"):
        kmeans.load_or_compute_centres(torch.randn(100, 64), 64, str(centres), seed=0)

    class Tok:       # a tokenizer of one id per character
        def __call__(self, texts, **kw):
            return {"input_ids": [[ord(c) % 50 for c in t] for t in texts]}

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenise\n" * 200)
    monkeypatch.setattr(lm_cotrain, "_tokenizer_fingerprint", lambda tok: "fixed")
    first = lm_cotrain.cached_tokenize_corpus([corpus], Tok(), 8, 100, tmp_path / "cache")
    [cache] = (tmp_path / "cache").glob("joint_*.pt")
    _damage_tensor_bytes(cache)
    capsys.readouterr()
    again = lm_cotrain.cached_tokenize_corpus([corpus], Tok(), 8, 100, tmp_path / "cache")
    assert torch.equal(first, again)
    assert "unreadable token cache, tokenising again" in capsys.readouterr().err


def test_files_reach_the_disk_before_they_replace_older_ones(tmp_path, monkeypatch):
    """Both writers sync the new file before the rename, so a power loss leaves the old file or the new one (a renamed,
    never-synced file can come back empty)."""
    import os

    from decision_transformer import files
    from decision_transformer.checkpoint import atomic_save

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_save({"w": torch.ones(2)}, tmp_path / "a.pt")
    files.atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("b"))
    assert len(synced) == 2 and all(p.endswith(".tmp") for p in synced)     # the temporary files, before the rename
    assert "a.pt." in synced[0] and ".b.txt." in synced[1]
    assert (tmp_path / "a.pt").is_file() and (tmp_path / "b.txt").read_text() == "b"


def test_an_interrupt_while_a_run_is_set_aside_moves_all_of_it(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while a fresh run moves an earlier run's files to previous/: it takes effect after the last
    move. Stopping between two moves split the earlier run, and its --resume then lost the metrics moved away."""
    import os
    import signal

    from decision_transformer import checkpoint

    run = tmp_path / "run"
    run.mkdir()
    names = ["config.json", "metrics.jsonl", "model_0.pt", "model_1.pt", "train_state.pt"]
    for n in names:
        (run / n).write_text(n)
    real_replace, moved = os.replace, []

    def replace(a, b):
        if not moved:
            os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C right before the first move
        real_replace(a, b)
        moved.append(os.path.basename(b))

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.set_aside_previous_run(run)
    assert sorted(moved) == names
    [aside] = (run / "previous").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == names and sorted(p.name for p in run.iterdir()) == ["previous"]


def test_run_logger_and_analysis_outputs_name_what_cannot_be_written(tmp_path):
    """config.json with a folder in its place, an analysis output folder that is a file: one line naming it."""
    from decision_transformer.analysis import common
    from decision_transformer.runlog import RunLogger

    run = tmp_path / "run"
    (run / "config.json").mkdir(parents=True)
    with pytest.raises(UserError, match=f"^cannot write {run / 'config.json'}: it is a folder$"):
        RunLogger(run, {"a": 1})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=f"^cannot create output folder {tmp_path / 'afile'}: it is a file, not a "
                                        f"folder$"):
        common.out_dir(tmp_path / "afile")
    (tmp_path / "res" / "x.csv").mkdir(parents=True)
    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'res' / 'x.csv'}: it is a folder$"):
        common.save_csv(tmp_path / "res" / "x.csv", ["a"], [[1]])
    assert _leftovers(tmp_path) == []


def test_run_all_reports_an_unwritable_output_in_one_line(tmp_path, monkeypatch, capsys, hopper_data):
    """An analysis step that cannot write a file (a PermissionError from a figure, say) is one line in run_all's
    output and report, not a traceback; the other steps go on."""
    from test_analysis_support import write_run

    from decision_transformer.analysis import report

    write_run(tmp_path / "ck", "dt", K=20, epochs=(0, 1), data_file=hopper_data / "hopper-medium-v2.pkl")

    def unwritable(plan, args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "figs" / "x.png"))

    monkeypatch.setattr(report, "step_params", unwritable)
    from conftest import load_script

    main = load_script("analysis/run_all.py").main
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint_dir", str(tmp_path / "ck"), "--out_dir", str(tmp_path / "out"), "--only", "params"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"error in params: cannot write {tmp_path / 'figs' / 'x.png'}: Permission denied" in err


def test_run_all_imports_torch_only_inside_main():
    """Loading analysis/run_all.py imports neither torch nor numpy (they load inside main, under the one-line Ctrl-C
    handling), so an interrupt while they load is `error: interrupted`, not a traceback."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('ra', 'analysis/run_all.py'); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_processes_are_removed(tmp_path):
    """What a ``kill -9`` leaves mid-write (``{name}.{pid}.{hex}.tmp``, ``.{name}.{pid}.{hex}.tmp``, and the older
    ``{name}.{pid}.tmp``) goes when its process no
    longer runs and the file has been idle; a live writer's file, a fresh one and other files stay."""
    import os
    import time

    from decision_transformer.files import remove_stale_temporaries

    dead, old = _dead_pid(), time.time() - 600
    names = {f"train_state.pt.{dead}.tmp": True, f".config.json.{dead}.0a1b2c3d.tmp": True,
             f"model_2.pt.{dead}.12345678.tmp": True, f"model_4.pt.{os.getpid()}.12345678.tmp": False,
             f"model_3.pt.{os.getpid()}.tmp": False, f"notes.{dead}.txt": False, "model_3.pt": False,
             f"fresh.pt.{dead}.tmp": False}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        if not name.startswith("fresh"):
            os.utime(tmp_path / name, (old, old))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, gone in names.items() if gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in names.items() if not gone)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_the_systems_reason_wins_over_a_full_looking_disk(tmp_path, monkeypatch):
    """A refused write on a filesystem that reports no free space (/proc, /sys, a read-only image) is named by its
    errno, not as a full disk; a real ENOSPC (or a disk-full check without an errno) still is."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=0, used=0, free=0))
    for code, words in ((errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"),
                        (errno.ENOENT, "No such file or directory")):
        assert write_problem(tmp_path / "x.pt", OSError(code, words)) == words
    assert write_problem(tmp_path / "x.pt", OSError(errno.ENOSPC, "No space left")) == "no space left on the device"
    assert write_problem(tmp_path / "x.pt", RuntimeError("write failed")) == "no space left on the device"


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                                               "DefaultCPUAllocator: can't allocate memory: you tried "
                                                               "to allocate 8000000000000 bytes. Error code 12"),
                                   RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   ValueError("Error: engine error: Could not allocate memory")])  # MuJoCo's
def test_running_out_of_memory_is_one_line(capsys, error):
    from decision_transformer.errors import cli_entry

    @cli_entry
    def main(argv=None):
        raise error

    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: out of memory (") and err.rstrip().endswith(
        "); reduce the sizes given (batch, model, steps or episodes)")


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug")])
def test_other_runtime_errors_keep_their_traceback(error):
    from decision_transformer.errors import cli_entry

    @cli_entry
    def main(argv=None):
        raise error

    with pytest.raises(type(error), match="a bug"):
        main([])


def test_a_metrics_file_cut_short_by_a_kill_is_read_by_every_reader(tmp_path, capsys):
    """A run killed while appending a row leaves a last line without its newline: --resume drops it, but the score
    tables and learning curves refused the whole run. They now leave that line out with a warning; an unreadable
    line elsewhere is still an error."""
    from decision_transformer.analysis.curves import read_metrics_jsonl
    from decision_transformer.results_table import _read_run_files

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    rows = '{"iteration": 1, "a": 1.0}\n{"iteration": 2, "a": 2.0}\n'
    (run / "metrics.jsonl").write_text(rows + '{"iteration": 3, "training/train_lo')
    assert [r["iteration"] for r in read_metrics_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert [r["iteration"] for r in _read_run_files(run)[1]] == [1, 2]
    assert capsys.readouterr().err.count("its last line is cut short") == 2
    (run / "metrics.jsonl").write_text('{"iteration": 1, "a"\n' + rows)       # not the last line: an error
    with pytest.raises(UserError, match="line 1"):
        read_metrics_jsonl(run / "metrics.jsonl")
    with pytest.raises(UserError, match="line 1"):
        _read_run_files(run)


def test_deferred_interrupts_leave_an_ignored_signal_ignored():
    """An env worker ignores SIGINT: while files are moved together, it stays ignored (a handler there would be
    inherited as the default by processes started meanwhile, which a Ctrl-C would then stop with a traceback); a
    signal handled before is held back and raised after, as before."""
    import signal

    from decision_transformer.errors import deferred_interrupts

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    caught = []
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *a: caught.append("after"))
        with deferred_interrupts():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)      # ignored
            signal.raise_signal(signal.SIGTERM)     # held
            caught.append("inside")
        assert caught == ["inside", "after"] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def _full_disk_runner():
    """A command prefix running a shell in a private mount namespace (``unshare -rm``), or None where this machine
    does not allow one: there a small tmpfs stands for a full disk."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    try:
        ok = subprocess.run(["unshare", "-rm", "sh", "-c", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-rm", "sh", "-c"] if ok else None


@pytest.mark.parametrize("script", ["generate", "synthetic", "minari"])
def test_a_really_full_disk_under_an_hdf5_write_is_one_line_and_leaves_nothing(tmp_path, script):
    """HDF5 writing into a file on a full disk crashed the process (h5py segfaults closing it), leaving a temporary
    file and a lock, or (Minari export) a partial dataset that blocked the next try: on a real 40 kB tmpfs the dataset
    writers now stop with the one-line error and leave the folder empty."""
    import subprocess
    import sys
    from pathlib import Path

    runner = _full_disk_runner()
    if runner is None:
        pytest.skip("no private mount namespace (unshare -rm) on this machine")
    root = Path(__file__).resolve().parents[1]
    disk = tmp_path / "disk"
    disk.mkdir()
    if script == "generate":
        cmd = ["data/generate_datasets.py", "--env", "hopper", "--dataset", "random", "--num_transitions", "300",
               "--no_progress", "--data_path", str(disk)]
        end = ".hdf5: no space left on the device"
    elif script == "synthetic":
        cmd = ["data/download_d4rl_datasets.py", "--synthetic", "50", "--envs", "hopper", "--datasets", "random",
               "--hdf5_dir", str(disk), "--no_progress", "--data_path", str(disk)]
        end = ".hdf5: no space left on the device"
    else:
        pytest.importorskip("minari")
        from decision_transformer.data import split_episodes
        from decision_transformer.synthetic import rollout_flat, write_pkl

        pkl = write_pkl(tmp_path / "hopper-random-v2.pkl", split_episodes(rollout_flat("hopper", 1000, seed=0)))
        cmd = ["data/minari_datasets.py", "export", str(pkl), "dt/hopper/full-v0", "--minari_root", str(disk)]
        end = f"Minari dataset 'dt/hopper/full-v0' in {disk}: no space left on the device"
    inner = (f"mount -t tmpfs -o size=40k tmpfs {disk} || exit 99; {sys.executable} {' '.join(cmd)}; rc=$?; "
             f"echo @@left; ls -A {disk}; exit $rc")   # (the tmpfs goes with the namespace: listed inside it)
    r = subprocess.run(runner + [inner], cwd=root, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
    assert lines[0].startswith("error: cannot ") and lines[0].endswith(end), lines
    assert r.stdout.split("@@left")[-1].split() == []


@pytest.mark.parametrize("size, said", [("4k", "could not finish the run in"), ("40k", "is full: its record")])
def test_a_full_wandb_folder_is_one_warning_and_the_run_completes(tmp_path, size, said):
    """WandB's folder on a full disk: wandb's log handler printed a traceback for each line it could not write (93
    of them) and the run ended with an unnamed ``error: No space left on device`` although its own files were
    complete; or (a little room) wandb cut its record short without a word. Now one warning names WandB's folder
    and the run exits 0 with its files complete."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("wandb")
    runner = _full_disk_runner()
    if runner is None:
        pytest.skip("no private mount namespace (unshare -rm) on this machine")
    from decision_transformer.data import split_episodes
    from decision_transformer.synthetic import rollout_flat, write_pkl

    root = Path(__file__).resolve().parents[1]
    write_pkl(tmp_path / "hopper-medium-v2.pkl", split_episodes(rollout_flat("hopper", 600, seed=0)))
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    cmd = [sys.executable, str(root / "experiment.py"), "--data_path", str(tmp_path), "--env", "hopper", "--dataset",
           "medium", "--max_iters", "3", "--num_steps_per_iter", "5", "--num_eval_episodes", "1", "--embed_dim", "16",
           "--n_layer", "1", "--n_head", "1", "--batch_size", "4", "--K", "5", "--warmup_steps", "1", "-w",
           "--outdir", str(out)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(disk), "PYTHONPATH": str(root)}
    env.pop("WANDB_SILENT", None)
    inner = f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 99; {' '.join(cmd)}"
    r = subprocess.run(runner + [inner], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "Logging error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith(("warning: WandB", "warning: the disk"))]
    assert len(warnings) == 1 and said in warnings[0] and str(disk / "wandb") in warnings[0], r.stderr[-3000:]
    assert warnings[0].endswith(f"(the run's own files in {out / 'dt_medium_hopper_666_K5'} are not affected)"), warnings
    assert str(disk / "wandb") in warnings[0] and ("no space left on the device" in warnings[0] or size == "40k")
    rows = [json.loads(line) for line in (out / "dt_medium_hopper_666_K5" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert (out / "dt_medium_hopper_666_K5" / "model_3.pt").is_file()


@pytest.mark.parametrize("size", ["8k", "100k"])
def test_a_really_full_disk_under_a_language_model_save_is_one_line_and_leaves_nothing(tmp_path, size):
    """pretrain_chibit.py on a full disk ended in a traceback of safetensors' (or tokenizers') own error; on a real
    tmpfs it now stops with one error line naming --out and leaves the folder empty."""
    import random
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    runner = _full_disk_runner()
    if runner is None:
        pytest.skip("no private mount namespace (unshare -rm) on this machine")
    root = Path(__file__).resolve().parents[1]
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(300)))
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = [sys.executable, "lm_cotraining/pretrain_chibit.py", "--text", str(text), "--out", str(disk / "m"),
           "--vocab_size", "300", "--steps", "2", "--block_size", "16", "--batch_size", "2", "--n_positions", "64",
           "--n_embd", "32", "--n_layer", "1"]
    inner = (f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 99; {' '.join(cmd)}; rc=$?; "
             f"echo @@left; ls -A {disk}; exit $rc")
    r = subprocess.run(runner + [inner], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stderr.splitlines()[-1:] == [f"error: cannot write {disk / 'm'}: no space left on the device"]
    assert "Writing model shards" not in r.stderr, r.stderr[-2000:]   # (transformers' bar, not a terminal here)
    assert r.stdout.split("@@left")[-1].split() == []


def test_a_failed_write_leaves_no_empty_folders_it_made(tmp_path, monkeypatch):
    """A write that failed (a full disk) left behind the folders made for it: ``info/`` of a Fisher file that was never
    written, ``create_state_stats.py --out a/b/stats.pkl``'s ``a/b``, a new run folder with no ``config.json`` (each
    merge try a new ``_{id}`` folder). Now they go, while folders that were there before, or hold anything, stay."""
    from decision_transformer.files import atomic_write, exclusive
    from decision_transformer.runlog import RunLogger

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shutil.disk_usage", lambda p: SimpleNamespace(total=1, used=1, free=0))
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "a" / "b" / "stats.pkl"
    with pytest.raises(UserError, match=f"^cannot write {target}: no space left on the device$"):
        atomic_write(target, full)
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    fisher = tmp_path / "models" / "info" / "m-bs4-nb2"
    with pytest.raises(UserError):
        with exclusive(fisher, "Fisher information"):    # the lock beside it made info/ first
            atomic_write(fisher, full)
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    monkeypatch.setattr("decision_transformer.runlog.atomic_write", lambda path, write: atomic_write(path, full))
    with pytest.raises(UserError, match="config.json: no space left on the device$"):
        RunLogger(tmp_path / "out" / "run_123", {"a": 1})
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    (tmp_path / "kept" / "a").mkdir()
    (tmp_path / "kept" / "a" / "other").write_text("x")   # a folder something is in stays
    with pytest.raises(UserError):
        atomic_write(tmp_path / "kept" / "a" / "b" / "c" / "x", full)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "kept", "other"]
    with exclusive(tmp_path / "made" / "x"):   # a file that was made keeps its folder
        atomic_write(tmp_path / "made" / "x", lambda tmp: tmp.write_text("y"))
    assert (tmp_path / "made" / "x").read_text() == "y" and list((tmp_path / "made").iterdir()) == [
        tmp_path / "made" / "x"]


def test_state_statistics_on_a_really_full_disk_leave_no_folders(tmp_path):
    """create_state_stats.py --out into folders yet to be made, on a real full tmpfs: one line, and the folders it
    made for the file are gone."""
    import subprocess
    import sys
    from pathlib import Path

    from decision_transformer.data import split_episodes
    from decision_transformer.synthetic import rollout_flat, write_pkl

    runner = _full_disk_runner()
    if runner is None:
        pytest.skip("no private mount namespace (unshare -rm) on this machine")
    root = Path(__file__).resolve().parents[1]
    write_pkl(tmp_path / "hopper-medium-v2.pkl", split_episodes(rollout_flat("hopper", 300, seed=0)))
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "a" / "b" / "stats.pkl"
    cmd = [sys.executable, "data/create_state_stats.py", "--data_path", str(tmp_path), "--envs", "hopper",
           "--datasets", "medium", "--out", str(out)]
    inner = (f"mount -t tmpfs -o size=4k tmpfs {disk} || exit 99; dd if=/dev/zero of={disk}/fill bs=1k 2>/dev/null; "
             f"{' '.join(cmd)}; rc=$?; echo @@left; ls -A {disk}; exit $rc")
    r = subprocess.run(runner + [inner], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stderr.splitlines()[-1:] == [f"error: cannot write {out}: no space left on the device"], r.stderr
    assert r.stdout.split("@@left")[-1].split() == ["fill"]
