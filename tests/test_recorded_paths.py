"""Path flags a run recorded are relative to the folder the run was started in (its config's working_dir)."""
import os

from decision_transformer.checkpoint import recorded_base, recorded_path, same_flag_value


def test_recorded_relative_paths_resolve_against_the_runs_folder(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ck").mkdir()
    (tmp_path / "run" / "ck" / "m.pt").write_bytes(b"")
    config = {"working_dir": str(tmp_path / "run"), "pretrained_model": "ck/m.pt"}
    monkeypatch.chdir(tmp_path)
    assert recorded_path(config, "ck/m.pt") == os.path.join(str(tmp_path / "run"), "ck/m.pt")
    assert recorded_path(config, "gpt2") == "gpt2"                        # (a Hub name: nothing there)
    assert recorded_path({"pretrained_model": "ck/m.pt"}, "ck/m.pt") == "ck/m.pt"   # older runs: as recorded
    assert recorded_path({"working_dir": "relative"}, "ck/m.pt") == "ck/m.pt"
    base = str(tmp_path / "run")
    assert same_flag_value("load_checkpoint", "ck/m.pt", "run/ck/m.pt", base)
    assert not same_flag_value("load_checkpoint", "ck/m.pt", "run/ck/m.pt")           # without: this folder's
    assert same_flag_value("pretrained_models", ["ck/m.pt"], [str(tmp_path / "run/ck/m.pt")], base)
    assert not same_flag_value("seed", 1, 2, base)


def test_the_same_relative_path_from_another_folder_names_another_file(tmp_path, monkeypatch):
    """A run started in a/ with models/m.pt, resumed from b/ with models/m.pt: two files, not the same flag value;
    a Hub name (no local file on either side) is the same name from any folder."""
    for d in ("a", "b"):
        (tmp_path / d / "models").mkdir(parents=True)
        (tmp_path / d / "models" / "m.pt").write_bytes(d.encode())
    monkeypatch.chdir(tmp_path / "b")
    base = str(tmp_path / "a")
    assert not same_flag_value("load_checkpoint", "models/m.pt", "models/m.pt", base)
    assert not same_flag_value("pretrained_models", ["models/m.pt"], ["models/m.pt"], base)
    assert same_flag_value("load_checkpoint", "models/m.pt", "../a/models/m.pt", base)
    assert same_flag_value("load_checkpoint", "models/m.pt", "models/m.pt")           # no recorded folder: as before
    assert same_flag_value("pretrained_lm", "gpt2", "gpt2", base)
    assert same_flag_value("pretrained_lm", "openai/imagegpt-small", "openai/imagegpt-small", base)


def test_a_run_whose_recorded_folder_is_gone_reads_its_paths_from_here(tmp_path, monkeypatch):
    """A project moved (or copied to another machine): the recorded working folder no longer exists, so its relative
    paths are read from the resuming process's folder, as for runs that recorded none."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    gone = {"working_dir": str(tmp_path / "old_place")}
    assert recorded_base(gone) is None
    assert same_flag_value("load_checkpoint", "models/m.pt", "models/m.pt", recorded_base(gone))
